//! `trainer`: DenseDINO pretraining from the command line. With no arguments it runs the embedded CPU demo
//! (`configs/default.toml`): a synthetic data set made on first use, a small DenseDINO, a few minutes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use trainer::config::TrainConfig;
use trainer::run::{self, RunOptions};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "DenseDINO self-supervised pretraining (burn)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain (or continue with --resume).
    Train {
        /// A TOML config (see configs/); without it, the embedded CPU demo.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config value, e.g. --set run.epochs=10 --set loss.alpha=0.3 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Continue the run in this folder (or from this checkpoint file) exactly where it stopped.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// cpu (burn's pure-Rust backend), tch-cpu or cuda:N (LibTorch, the `tch` feature).
        #[arg(long)]
        device: Option<String>,
        /// No progress output.
        #[arg(long)]
        quiet: bool,
    },
    /// Time training steps of a config: step time and images/s.
    Bench {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first (allocation, kernel selection).
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Feed one generated batch repeatedly: model speed without the data pipeline.
        #[arg(long)]
        synthetic_batches: bool,
        #[arg(long)]
        device: Option<String>,
    },
    /// Draw a run's metrics as PNG plots (loss, schedules, teacher entropy).
    Plot { run_dir: PathBuf },
    /// Evaluate a backbone: weighted k-NN classification or the linear segmentation probe.
    Eval {
        #[command(subcommand)]
        what: EvalCommand,
    },
    /// The last block's CLS attention per head (and 60%-mass masks) and a PCA of the patch features.
    Attention {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Input side in pixels (a multiple of the patch size); default: the model's training size.
        #[arg(long)]
        size: Option<usize>,
        /// Also draw masks keeping this fraction of the attention mass (DINO uses 0.6).
        #[arg(long)]
        threshold: Option<f32>,
    },
    /// Write a checkpoint's teacher in the official DINO/timm key layout (safetensors).
    Export {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Include the projection heads (`head.*`, `ref_head.*`).
        #[arg(long)]
        heads: bool,
    },
    /// Make a step-0 checkpoint from official-layout weights (DINO/DenseDINO `.pth` or safetensors), to
    /// evaluate them or to start a run from them (`train --resume OUT`).
    Import {
        /// The weights (`.pth`/`.pt` or `.safetensors`): backbone keys, optionally `head.*` / `ref_head.*`;
        /// a full training checkpoint of the official code gives its teacher.
        #[arg(long)]
        weights: PathBuf,
        /// The config whose model the weights fit.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// The run folder to create.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Which backbone to evaluate.
#[derive(clap::Args)]
struct ModelArgs {
    /// A checkpoint file or run folder (its teacher is evaluated).
    #[arg(long, required_unless_present = "random_init")]
    checkpoint: Option<PathBuf>,
    /// A randomly initialised backbone from --config instead: the floor a trained one must beat.
    #[arg(long)]
    random_init: bool,
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// DINO's weighted k-NN on the teacher's CLS features.
    Knn {
        #[command(flatten)]
        model: ModelArgs,
        /// Training shards (the neighbours).
        #[arg(long)]
        train: PathBuf,
        /// Test shards.
        #[arg(long)]
        val: PathBuf,
        #[arg(long, value_delimiter = ',', default_values_t = [10, 20, 100, 200])]
        k: Vec<usize>,
        #[arg(long, default_value_t = 0.07)]
        temperature: f64,
        /// Centre-crop size (resize = crop · 256/224); default: the model's training size.
        #[arg(long)]
        crop: Option<usize>,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Cache extracted features here.
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// The linear segmentation probe on frozen patch tokens.
    Seg {
        #[command(flatten)]
        model: ModelArgs,
        /// CamVid folder (train/, trainannot/, val/, valannot/) or VOC2012 folder.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "camvid")]
        dataset: String,
        /// Input side (the protocol's 448; a multiple of the patch size).
        #[arg(long, default_value_t = 448)]
        size: usize,
        #[arg(long, default_value_t = 25)]
        epochs: usize,
        /// Where the packed splits go.
        #[arg(long, default_value = "data")]
        cache: PathBuf,
    },
}

fn load_model(m: &ModelArgs) -> Result<(trainer::vit::Vit, TrainConfig, burn::tensor::Device)> {
    let device = trainer::checkpoint::device(&m.device)?;
    let (vit, cfg) = if m.random_init {
        let cfg = TrainConfig::load(m.config.as_deref(), &m.sets)?;
        trainer::eval::backbone(None, Some(&cfg), &device)?
    } else {
        trainer::eval::backbone(m.checkpoint.as_deref(), None, &device)?
    };
    Ok((vit, cfg, device))
}

/// `mi_option_purge_delay` in mimalloc.h (the same index in its v2 and v3; libmimalloc-sys names no
/// constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Keep freed memory instead of handing it back to the OS after 10 ms: every training step frees and
    // reallocates the same few hundred MB of activations, and re-faulting them cost a fifth of a flex step.
    // SAFETY: sets a process-wide allocator option before any thread exists; mimalloc reads it when purging.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // The same for LibTorch's CPU tensors, which glibc serves: by default every block over 32 MB is a
    // fresh mmap, zeroed page by page by the kernel on first touch, and unmapped on free (the head's
    // [rows, 65536] logits and their gradients are such blocks, several per step): 10-15% of a tch-cpu
    // step. Serve them from the heap and keep what is freed.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Train {
        config: None,
        sets: vec![],
        resume: None,
        device: None,
        quiet: false,
    }) {
        Command::Train {
            config,
            sets,
            resume,
            device,
            quiet,
        } => {
            // On resume the stored config is the run; --set may still change run.* (length, device, logging).
            let cfg = if resume.is_some() {
                TrainConfig::load(config.as_deref(), &[])?
            } else {
                TrainConfig::load(config.as_deref(), &sets)?
            };
            let opts = RunOptions {
                resume,
                device,
                sets,
                quiet,
                fail_checkpoint_at: None,
            };
            let summary = run::train(cfg, &opts)?;
            let first = summary.steps.first().map(|m| m.loss);
            let last = summary.steps.last().map(|m| m.loss);
            println!(
                "done: {} steps, loss {} -> {}, {:.1} images/s, data wait {:.0}%",
                summary.steps.len(),
                first.map_or("-".into(), |v| format!("{v:.4}")),
                last.map_or("-".into(), |v| format!("{v:.4}")),
                summary.images_per_s,
                100.0 * summary.data_wait_fraction
            );
            println!("outputs in {}:", summary.run_dir.display());
            println!("  metrics.jsonl, loss.png, schedules.png, entropy.png, config.toml");
            if let Some(c) = &summary.last_checkpoint {
                println!("  checkpoint {}", c.display());
            }
            // On the synthetic set the run evaluates itself: k-NN of its teacher against a random network.
            let stored = TrainConfig::from_resolved(&std::fs::read_to_string(
                summary.run_dir.join("config.toml"),
            )?)?;
            if let (true, Some(c)) = (stored.data.shards.is_empty(), &summary.last_checkpoint) {
                let (trained, random) = run::synthetic_knn(&stored, c)?;
                println!(
                    "k-NN (k=20) on a held-out synthetic set: trained teacher top-1 {:.1}%, randomly initialised {:.1}%",
                    100.0 * trained.top1,
                    100.0 * random.top1
                );
            }
            Ok(())
        }
        Command::Bench {
            config,
            sets,
            steps,
            warmup,
            synthetic_batches,
            device,
        } => {
            let cfg = TrainConfig::load(config.as_deref(), &sets)?;
            run::bench(&cfg, steps, warmup, synthetic_batches, device.as_deref())?;
            Ok(())
        }
        Command::Eval {
            what:
                EvalCommand::Knn {
                    model,
                    train,
                    val,
                    k,
                    temperature,
                    crop,
                    batch,
                    cache,
                },
        } => {
            let (vit, cfg, device) = load_model(&model)?;
            let pre = trainer::eval::Preprocess::for_crop(crop.unwrap_or(cfg.model.img_size));
            let tag = if model.random_init {
                "random".to_string()
            } else {
                model
                    .checkpoint
                    .as_ref()
                    .map_or("x".into(), |c| c.display().to_string().replace('/', "_"))
            };
            let feats = |shards: &PathBuf| {
                let key = format!(
                    "{tag}-{}-{}",
                    shards.display().to_string().replace('/', "_"),
                    pre.crop
                );
                trainer::eval::cached(cache.as_deref(), &key, || {
                    trainer::eval::extract_cls(&vit, shards, pre, batch, &device)
                })
            };
            let (tf, tl) = feats(&train)?;
            let (vf, vl) = feats(&val)?;
            println!(
                "k-NN ({}; {} train, {} test images, T = {temperature}, crop {}):",
                if model.random_init {
                    "random init"
                } else {
                    "teacher"
                },
                tl.len(),
                vl.len(),
                pre.crop
            );
            for r in trainer::eval::knn((&tf, &tl), (&vf, &vl), &k, temperature, &device) {
                println!(
                    "  k={:<4} top-1 {:6.2}%  top-5 {:6.2}%  mean per-class {:6.2}%",
                    r.k,
                    100.0 * r.top1,
                    100.0 * r.top5,
                    100.0 * r.mean_per_class
                );
            }
            Ok(())
        }
        Command::Eval {
            what:
                EvalCommand::Seg {
                    model,
                    data,
                    dataset,
                    size,
                    epochs,
                    cache,
                },
        } => {
            let (vit, _, device) = load_model(&model)?;
            let (classes, ignore, names) = trainer::seg::classes(&dataset)?;
            let train = trainer::seg::packed_split(&data, &dataset, "train", &cache)?;
            let val = trainer::seg::packed_split(&data, &dataset, "val", &cache)?;
            let tr = trainer::seg::features(&vit, &train, size, &device)?;
            let va = trainer::seg::features(&vit, &val, size, &device)?;
            let mut opts = trainer::seg::ProbeOptions::new(classes, ignore);
            opts.epochs = epochs;
            let (miou, per, acc) = trainer::seg::probe(&tr, &va, &opts, size, &device, false)?;
            println!(
                "{dataset} val ({} images, {size} px): mIoU {:.2}% (last epoch), pixel accuracy {:.2}%",
                va.masks.len(),
                100.0 * miou,
                100.0 * acc
            );
            for (n, v) in names.iter().zip(per) {
                println!("  {n:<12} IoU {:6.2}%", 100.0 * v);
            }
            Ok(())
        }
        Command::Attention {
            model,
            image,
            out,
            size,
            threshold,
        } => {
            let (vit, cfg, device) = load_model(&model)?;
            for p in trainer::attention::draw(
                &vit,
                &image,
                &out,
                size.unwrap_or(cfg.model.img_size),
                threshold,
                &device,
            )? {
                println!("{}", p.display());
            }
            Ok(())
        }
        Command::Export {
            checkpoint,
            out,
            heads,
        } => {
            let n =
                trainer::export::export(&checkpoint, &out, heads, &burn::tensor::Device::flex())?;
            println!(
                "wrote {} ({n} tensors, official DINO layout)",
                out.display()
            );
            Ok(())
        }
        Command::Import {
            weights,
            config,
            sets,
            out,
        } => {
            let cfg = TrainConfig::load(config.as_deref(), &sets)?;
            let path = trainer::run::import_checkpoint(&cfg, &weights, &out)?;
            println!(
                "wrote {}: evaluate it with --checkpoint {}, or continue with train --resume {}",
                path.display(),
                out.display(),
                out.display()
            );
            Ok(())
        }
        Command::Plot { run_dir } => {
            for p in trainer::metrics::plot(&run_dir)? {
                println!("{}", p.display());
            }
            Ok(())
        }
    }
}
