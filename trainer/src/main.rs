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
}

fn main() -> ExitCode {
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
            if let Some(c) = summary.last_checkpoint {
                println!("  checkpoint {}", c.display());
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
        Command::Plot { run_dir } => {
            for p in trainer::metrics::plot(&run_dir)? {
                println!("{}", p.display());
            }
            Ok(())
        }
    }
}
