//! The pretraining run: the loader on a tokio runtime beside the training loop, metrics, checkpoints,
//! exact resume, and the end-of-run plots. Also `bench`, which times the same step.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use common::{Batch, Cursor};
use indicatif::{ProgressBar, ProgressStyle};
use loader::{LoaderOptions, start};

use crate::checkpoint::{self, Meta};
use crate::config::TrainConfig;
use crate::metrics::{MetricsLog, Record};
use crate::step::{Schedules, StepMetrics, Trainer};
use crate::vit::Precision;

/// Command-line choices that are not part of the config.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// A run folder (or checkpoint file) to continue.
    pub resume: Option<PathBuf>,
    /// Overrides `run.device` (also on resume: a run may move between machines).
    pub device: Option<String>,
    /// `--set` overrides applied to a resumed run's stored config (`run.*` keys only: the length of the
    /// run, checkpointing, logging, the device).
    pub sets: Vec<String>,
    /// No progress bar, no stats lines.
    pub quiet: bool,
    /// Test hook: the checkpoint at this step fails half way through writing.
    pub fail_checkpoint_at: Option<usize>,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub steps: Vec<StepMetrics>,
    pub last_checkpoint: Option<PathBuf>,
    pub images_per_s: f64,
    pub data_wait_fraction: f64,
}

/// The shard directory of a config; the synthetic set is made on first use.
pub fn data_dir(cfg: &TrainConfig, quiet: bool) -> Result<PathBuf> {
    if !cfg.data.shards.is_empty() {
        return Ok(PathBuf::from(&cfg.data.shards));
    }
    let dir = cfg.data.synth_dir.clone();
    make_synth(
        &dir,
        cfg,
        cfg.data.synth_count,
        cfg.run.seed,
        "train",
        !quiet,
    )?;
    Ok(dir)
}

/// Whether `dir` already holds the synthetic set these settings make (a set made with other settings is
/// remade rather than silently reused).
fn synth_is_current(dir: &Path, cfg: &TrainConfig, count: usize, seed: u64) -> bool {
    let Ok(index) = shard::Index::load(&dir.join(shard::index::INDEX_FILE)) else {
        return false;
    };
    let extra = &index.options.extra;
    let field = |k: &str| extra.get(k).and_then(serde_json::Value::as_u64);
    index.options.layout == "synth"
        && index.options.seed == seed
        && field("count") == Some(count as u64)
        && field("size") == Some(cfg.data.synth_size as u64)
        // Sets from before the option were shapes.
        && extra.get("kind").and_then(serde_json::Value::as_str).unwrap_or("shapes")
            == cfg.data.synth_kind.name()
        // Sets from before the option had up to three shapes.
        && field("max_shapes").unwrap_or(3) == cfg.data.synth_shapes as u64
}

/// The trainer a config describes (student and teacher equal, fresh optimiser and centers).
fn new_trainer(
    cfg: &TrainConfig,
    schedules: Schedules,
    device: &burn::tensor::Device,
) -> Result<Trainer> {
    if cfg.run.precision == Precision::Bf16
        && matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
    {
        bail!(
            "run.precision = \"bf16\" needs a LibTorch device (tch-cpu or cuda:N): the flex backend computes \
             bf16 through f32 and would be slower than f32"
        );
    }
    let mut t = Trainer::new(
        &cfg.model,
        &cfg.head,
        &cfg.loss,
        &cfg.optim,
        schedules,
        cfg.run.seed,
        device,
    );
    t.student.set_precision(cfg.run.precision);
    t.teacher.set_precision(cfg.run.precision);
    Ok(t)
}

/// A synthetic shapes set (the `shard synth` generator) in `dir`, unless it is there already.
fn make_synth(
    dir: &Path,
    cfg: &TrainConfig,
    count: usize,
    seed: u64,
    prefix: &str,
    announce: bool,
) -> Result<()> {
    if synth_is_current(dir, cfg, count, seed) {
        return Ok(());
    }
    if announce {
        eprintln!(
            "making a synthetic data set: {count} {} images of {} px in {}",
            cfg.data.synth_kind.name(),
            cfg.data.synth_size,
            dir.display()
        );
    }
    let opts = shard::synth::SynthOptions {
        kind: cfg.data.synth_kind,
        count,
        size: cfg.data.synth_size,
        max_shapes: cfg.data.synth_shapes,
        seed,
        prefix: prefix.into(),
        per_shard: 128,
        zstd_level: None,
        quality: 90,
        force: true,
        quiet: true,
    };
    shard::synth::synth(dir, &opts)
        .with_context(|| format!("making the synthetic set in {}", dir.display()))?;
    Ok(())
}

/// Batches per epoch for this data set (single process; the loader drops the tail).
fn iters_per_epoch(cfg: &TrainConfig, shards: &Path) -> Result<usize> {
    let (_, index) = loader::pipeline::open_index(shards)?;
    let samples = loader::plan::epoch_plan(&index, cfg.run.seed, 0, 0, 1).len as usize;
    let ipe = samples / cfg.run.batch_size;
    if ipe == 0 {
        bail!(
            "{}: {samples} samples, fewer than one batch of {}",
            shards.display(),
            cfg.run.batch_size
        );
    }
    Ok(ipe)
}

/// `runs/name`, or `runs/name-2`, … when it already holds a run (never mix two runs' files).
fn fresh_dir(base: PathBuf) -> PathBuf {
    if !base.join("metrics.jsonl").exists() && !base.join("checkpoints").exists() {
        return base;
    }
    (2..)
        .map(|i| PathBuf::from(format!("{}-{i}", base.display())))
        .find(|p| !p.exists())
        .expect("an unused name")
}

fn loader_options(cfg: &TrainConfig, shards: &Path, cursor: Cursor) -> LoaderOptions {
    let mut o = LoaderOptions::new(shards, cfg.views.clone(), cfg.run.batch_size);
    o.seed = cfg.run.seed;
    if cfg.data.workers > 0 {
        o.workers = cfg.data.workers;
    }
    o.capacity = cfg.data.capacity.max(1);
    o.shuffle_buffer = cfg.data.shuffle_buffer;
    o.interleave = cfg.data.interleave.max(1);
    o.start = cursor;
    o.end_epoch = Some(cfg.run.epochs as u64);
    o
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // Two async threads: the reader and collator; decoding runs on tokio's blocking pool.
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("loader")
        .enable_all()
        .build()?)
}

fn progress(total: u64, quiet: bool) -> Option<ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("template"),
    );
    Some(bar)
}

fn stats_line(m: &StepMetrics, images_per_s: f64, step_time: f64, wait_fraction: f64) -> String {
    let part = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    format!(
        "ep {} it {} loss {:.4} (cls {} ref {}) lr {:.2e} wd {:.3} mom {:.5} T {:.3} H {:.2} | {:.1} img/s, {:.3} s/step, data wait {:.0}%",
        m.epoch,
        m.it,
        m.loss,
        part(m.cls_loss),
        part(m.ref_loss),
        m.lr,
        m.weight_decay,
        m.momentum,
        m.teacher_temp,
        m.teacher_entropy,
        images_per_s,
        step_time,
        100.0 * wait_fraction
    )
}

/// Runs (or continues) a pretraining run.
pub fn train(cfg: TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let (mut cfg, resumed, run_dir) = match &opts.resume {
        Some(path) => {
            let (file, bytes) = checkpoint::latest(path)?;
            let meta = checkpoint::meta(&bytes)?;
            let run_dir = file
                .parent()
                .and_then(|p| p.parent())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| path.clone());
            let cfg = meta.config.with_run_overrides(&opts.sets)?;
            (cfg, Some((file, bytes)), run_dir)
        }
        None => {
            let dir = fresh_dir(cfg.run_dir());
            (cfg, None, dir)
        }
    };
    if let Some(d) = &opts.device {
        cfg.run.device = d.clone();
    }
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    std::fs::write(run_dir.join("config.toml"), cfg.to_toml())?;
    let shards = data_dir(&cfg, opts.quiet)?;
    let ipe = iters_per_epoch(&cfg, &shards)?;
    let total_steps = match cfg.run.max_steps {
        0 => cfg.run.epochs * ipe,
        n => n.min(cfg.run.epochs * ipe),
    };
    let device = checkpoint::device(&cfg.run.device)?;
    let schedules = Schedules::new(&cfg.optim, cfg.run.epochs, ipe, cfg.run.batch_size);
    let mut trainer = new_trainer(&cfg, schedules, &device)?;
    let mut cursor = Cursor::default();
    if let Some((file, bytes)) = &resumed {
        let meta = checkpoint::restore(&mut trainer, bytes)?;
        cursor = meta.cursor;
        if !opts.quiet {
            eprintln!(
                "resuming {} at step {} (epoch {}, sample {})",
                file.display(),
                meta.it,
                cursor.epoch,
                cursor.samples
            );
        }
    }
    let ckpt_dir = run_dir.join("checkpoints");
    let mut log = MetricsLog::open(&run_dir.join("metrics.jsonl"), trainer.it)?;
    if !opts.quiet {
        let n = crate::params::count(&mut trainer.student);
        eprintln!(
            "run {}: {} on {}, {:.1}M student parameters, {} steps ({} epochs x {ipe}), batch {}",
            run_dir.display(),
            if cfg.loss.use_ref_loss {
                "DenseDINO"
            } else {
                "DINO"
            },
            cfg.run.device,
            n as f64 / 1e6,
            total_steps,
            cfg.run.epochs,
            cfg.run.batch_size
        );
    }

    let rt = runtime()?;
    let loader = rt.block_on(async { start(loader_options(&cfg, &shards, cursor)) })?;
    let bar = progress(total_steps as u64, opts.quiet);
    if let Some(b) = &bar {
        b.set_position(trainer.it as u64);
    }
    let mut steps = Vec::new();
    let mut last_checkpoint = None;
    let mut saved_at = trainer.it;
    let run_start = Instant::now();
    let (mut wait_total, mut images_total) = (Duration::ZERO, 0usize);
    let mut epoch_acc: Vec<StepMetrics> = Vec::new();
    let (mut epoch_wait, mut epoch_start) = (Duration::ZERO, Instant::now());
    let result: Result<()> = (|| {
        while trainer.it < total_steps {
            let t0 = Instant::now();
            let Ok(batch) = rt.block_on(loader.batches.recv()) else {
                break;
            };
            let wait = t0.elapsed();
            let m = match trainer.step(&batch) {
                Ok(m) => m,
                Err(m) => bail!(
                    "non-finite loss ({}) at step {} (epoch {}): stopping. The last good checkpoint is {}. \
                     Usual causes: a learning rate too high for the batch size, or too few prototypes for the teacher \
                     temperature; lower optim.lr or raise loss.teacher_temp and resume from it",
                    m.loss,
                    m.it,
                    m.epoch,
                    last_checkpoint
                        .as_ref()
                        .map_or("none yet".to_string(), |p: &PathBuf| p
                            .display()
                            .to_string())
                ),
            };
            let step_time = t0.elapsed().as_secs_f64();
            wait_total += wait;
            epoch_wait += wait;
            images_total += batch.batch_size;
            let ips = batch.batch_size as f64 / step_time;
            log.write(&Record::Step {
                m: m.clone(),
                step_time,
                data_wait: wait.as_secs_f64(),
                images_per_s: ips,
            })?;
            let wait_fraction = wait_total.as_secs_f64() / run_start.elapsed().as_secs_f64();
            let overall_ips = images_total as f64 / run_start.elapsed().as_secs_f64();
            let line = stats_line(&m, overall_ips, step_time, wait_fraction);
            match &bar {
                Some(b) => {
                    b.set_position(trainer.it as u64);
                    b.set_message(line);
                }
                None if !opts.quiet
                    && (m.it % cfg.run.log_every.max(1) == 0 || trainer.it == total_steps) =>
                {
                    eprintln!("{line}")
                }
                None => {}
            }
            epoch_acc.push(m.clone());
            steps.push(m);
            let epoch_end = batch.cursor.epoch > batch.epoch;
            if epoch_end {
                let n = epoch_acc.len() as f64;
                let mean = |f: &dyn Fn(&StepMetrics) -> Option<f64>| -> Option<f64> {
                    let v: Vec<f64> = epoch_acc.iter().filter_map(f).collect();
                    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
                };
                let secs = epoch_start.elapsed().as_secs_f64();
                log.write(&Record::Epoch {
                    epoch: batch.epoch as usize,
                    steps: trainer.it,
                    loss: mean(&|m| Some(m.loss)).unwrap_or(f64::NAN),
                    cls_loss: mean(&|m| m.cls_loss),
                    ref_loss: mean(&|m| m.ref_loss),
                    images_per_s: n * cfg.run.batch_size as f64 / secs,
                    data_wait_fraction: epoch_wait.as_secs_f64() / secs,
                })?;
                epoch_acc.clear();
                (epoch_wait, epoch_start) = (Duration::ZERO, Instant::now());
            }
            let periodic =
                cfg.run.checkpoint_every > 0 && trainer.it.is_multiple_of(cfg.run.checkpoint_every);
            if epoch_end || periodic || trainer.it == total_steps {
                let meta = Meta {
                    it: trainer.it,
                    cursor: batch.cursor,
                    config: cfg.clone(),
                };
                let crash = opts.fail_checkpoint_at == Some(trainer.it);
                last_checkpoint = Some(checkpoint::save(
                    &ckpt_dir,
                    &mut trainer,
                    &meta,
                    cfg.run.keep_checkpoints,
                    crash,
                )?);
                saved_at = trainer.it;
            }
        }
        Ok(())
    })();
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    rt.block_on(loader.shutdown());
    result?;
    if saved_at != trainer.it {
        return Err(anyhow!(
            "the loader ended before step {total_steps} without a final checkpoint"
        ));
    }
    let plots = crate::metrics::plot(&run_dir);
    if let (Err(e), false) = (&plots, opts.quiet) {
        eprintln!("warning: plotting failed: {e:#}");
    }
    let elapsed = run_start.elapsed().as_secs_f64();
    Ok(RunSummary {
        run_dir,
        steps,
        last_checkpoint,
        images_per_s: images_total as f64 / elapsed,
        data_wait_fraction: wait_total.as_secs_f64() / elapsed,
    })
}

/// The demo's evaluation: weighted k-NN (k = 20) of the trained teacher and of a randomly initialised
/// backbone on a held-out synthetic set (made on first use with another seed). Returns (trained, random).
pub fn synthetic_knn(
    cfg: &TrainConfig,
    checkpoint: &Path,
) -> Result<(crate::eval::KnnResult, crate::eval::KnnResult)> {
    let train = data_dir(cfg, true)?;
    let val = PathBuf::from(format!("{}-val", cfg.data.synth_dir.display()));
    let seed = cfg.run.seed.wrapping_add(1_000_003);
    make_synth(
        &val,
        cfg,
        (cfg.data.synth_count / 2).max(64),
        seed,
        "val",
        false,
    )?;
    let device = checkpoint::device("cpu")?;
    let pre = crate::eval::Preprocess::for_crop(cfg.model.img_size);
    let mut out = Vec::new();
    for ckpt in [Some(checkpoint), None] {
        let (vit, _) = crate::eval::backbone(ckpt, Some(cfg), &device)?;
        let tr = crate::eval::extract_cls(&vit, &train, pre, 64, &device)?;
        let va = crate::eval::extract_cls(&vit, &val, pre, 64, &device)?;
        out.push(crate::eval::knn((&tr.0, &tr.1), (&va.0, &va.1), &[20], 0.07, &device).remove(0));
    }
    let random = out.pop().expect("two results");
    Ok((out.pop().expect("two results"), random))
}

/// A step-0 run folder from official-layout weights: backbone into student and teacher; heads from the
/// file when present, else freshly initialised; a missing `ref_head` starts as a copy of `head` (the
/// official code's fine-tuning mode).
pub fn import_checkpoint(cfg: &TrainConfig, weights: &Path, out: &Path) -> Result<PathBuf> {
    let mut named = crate::export::import(weights)?;
    if !named.keys().any(|k| k.starts_with("ref_head.")) {
        let copies: Vec<(String, crate::params::HostTensor)> = named
            .iter()
            .filter(|(k, _)| k.starts_with("head."))
            .map(|(k, v)| (format!("ref_{k}"), v.clone()))
            .collect();
        named.extend(copies);
    }
    let device = crate::checkpoint::device("cpu")?;
    let schedules = Schedules::new(&cfg.optim, cfg.run.epochs, 1, cfg.run.batch_size);
    let mut trainer = new_trainer(cfg, schedules, &device)?;
    // `import` has stripped `backbone.`: backbone tensors sit at the top level, heads under their prefix.
    let get = |n: &str| named.get(n).cloned();
    let load_side =
        |model: &mut crate::model::DenseDino, dev: &burn::tensor::Device| -> Result<()> {
            let mut parts: Vec<(&str, &mut dyn crate::params::Params)> =
                vec![("", &mut model.backbone)];
            if named.contains_key("head.last_layer.weight_v") {
                parts.push(("head.", &mut model.head));
                if let Some(r) = &mut model.ref_head {
                    parts.push(("ref_head.", r));
                }
            }
            for (prefix, part) in parts {
                crate::params::load_official(part, prefix, &get, dev)
                    .map_err(|e| anyhow!("{}: {e}", weights.display()))?;
            }
            Ok(())
        };
    load_side(&mut trainer.student, &device.clone().autodiff())?;
    load_side(&mut trainer.teacher, &device)?;
    let meta = Meta {
        it: 0,
        cursor: Cursor::default(),
        config: cfg.clone(),
    };
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("config.toml"), cfg.to_toml())?;
    checkpoint::save(
        &out.join("checkpoints"),
        &mut trainer,
        &meta,
        cfg.run.keep_checkpoints,
        false,
    )
}

/// Times `steps` training steps (after `warmup` untimed ones) with the real loader or with generated
/// batches, and prints step time and images/s.
pub fn bench(
    cfg: &TrainConfig,
    steps: usize,
    warmup: usize,
    synthetic: bool,
    device: Option<&str>,
) -> Result<(f64, f64)> {
    let device_name = device.unwrap_or(&cfg.run.device);
    let device = checkpoint::device(device_name)?;
    let schedules = Schedules::new(&cfg.optim, cfg.run.epochs, 1000, cfg.run.batch_size);
    let mut trainer = new_trainer(cfg, schedules, &device)?;
    let b = cfg.run.batch_size;
    let batches: Box<dyn FnMut() -> Result<Batch>> = if synthetic {
        let sizes: Vec<usize> = (0..cfg.views.num_views())
            .map(|i| cfg.views.view_size(i))
            .collect();
        let batch = random_batch(
            cfg.run.batch_size,
            &sizes,
            cfg.views.num_points,
            cfg.run.seed,
        );
        Box::new(move || Ok(batch.clone()))
    } else {
        let shards = data_dir(cfg, false)?;
        let rt = runtime()?;
        let loader =
            rt.block_on(async { start(loader_options(cfg, &shards, Cursor::default())) })?;
        Box::new(move || {
            rt.block_on(loader.batches.recv())
                .map_err(|_| anyhow!("the loader ended"))
        })
    };
    let mut next = batches;
    for _ in 0..warmup {
        trainer
            .step(&next()?)
            .map_err(|m| anyhow!("non-finite loss {} in warmup", m.loss))?;
    }
    let mut wait = Duration::ZERO;
    let t0 = Instant::now();
    for _ in 0..steps {
        let w = Instant::now();
        let batch = next()?;
        wait += w.elapsed();
        trainer
            .step(&batch)
            .map_err(|m| anyhow!("non-finite loss {}", m.loss))?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let step_time = secs / steps as f64;
    let ips = (steps * b) as f64 / secs;
    println!(
        "bench: {} on {device_name} in {}, {} views, batch {b}, {} ({}): {:.4} s/step, {:.1} images/s, data wait {:.0}%",
        if cfg.loss.use_ref_loss {
            "DenseDINO"
        } else {
            "DINO"
        },
        cfg.run.precision,
        cfg.views.num_views(),
        format_args!(
            "D={} depth={} heads={} patch={}",
            cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads, cfg.model.patch_size
        ),
        if synthetic {
            "generated batches"
        } else {
            "real loader"
        },
        step_time,
        ips,
        100.0 * wait.as_secs_f64() / secs
    );
    Ok((step_time, ips))
}

/// A batch of `b` images with views of the given sizes, random pixels and valid reference points: for
/// timing the model without the data pipeline, and for tests. The same `seed` gives the same batch.
pub fn random_batch(b: usize, sizes: &[usize], m: usize, seed: u64) -> Batch {
    use rand::Rng;
    let mut rng = common::seed::rng(seed, common::seed::Purpose::Synth, &[u64::MAX]);
    let v = sizes.len();
    let mut pts = |n: usize| {
        (0..n)
            .map(|_| rng.random::<f32>() * 1.8 - 0.9)
            .collect::<Vec<f32>>()
    };
    let teacher_points = (0..2).map(|_| pts(b * v * m * 2)).collect();
    let student_points = (0..v).map(|_| pts(b * 2 * m * 2)).collect();
    let views = sizes
        .iter()
        .map(|&s| common::ViewPixels {
            size: s,
            data: (0..b * 3 * s * s).map(|_| rng.random()).collect(),
        })
        .collect();
    Batch {
        batch_size: b,
        num_points: m,
        views,
        teacher_points,
        student_points,
        labels: vec![-1; b],
        keys: (0..b).map(|i| format!("generated-{i}")).collect(),
        seq: (0..b as u64).collect(),
        epoch: 0,
        cursor: Cursor::default(),
    }
}
