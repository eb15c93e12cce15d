//! A pretraining run: open its folder (fresh, or resumed from a checkpoint), start the loader beside the
//! training loop, and run the loop, which reads like DINO's `train_one_epoch`: next batch, one step,
//! report it, checkpoint when due. The pieces it calls are named: [`Reporter`] (progress, stats lines,
//! `metrics.jsonl`), [`checkpoint::Policy`] (when to save, what was saved), [`data`] (shards, loader).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use common::Cursor;

use crate::model::params;
use crate::train::checkpoint::{self, Meta};
use crate::train::config::{DeviceSpec, TrainConfig};
use crate::train::data;
use crate::train::report::Reporter;
use crate::train::step::{Schedules, StepMetrics, Trainer};

/// Where a run starts.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // made once per run: a box would only add noise where it is built
pub enum Start {
    /// A new run of this config, in `run.out_dir/run.name` (`-2`, `-3`, … when that folder holds a run).
    Fresh(TrainConfig),
    /// The run in this folder (or from this checkpoint file), exactly where it stopped. Its stored config
    /// is the run; `sets` may change `run.*` only (the length, checkpointing, logging, the device).
    Resume { from: PathBuf, sets: Vec<String> },
}

/// Command-line choices that are not part of the config.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Overrides `run.device` (also on resume: a run may move between machines).
    pub device: Option<DeviceSpec>,
    /// No progress bar, no stats lines.
    pub quiet: bool,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    /// The resolved config the run ran with (as in its `config.toml`).
    pub config: TrainConfig,
    pub steps: Vec<StepMetrics>,
    pub last_checkpoint: Option<PathBuf>,
    pub images_per_s: f64,
    pub data_wait_fraction: f64,
}

/// Runs (or continues) a pretraining run.
pub fn train(start: Start, opts: &RunOptions) -> Result<RunSummary> {
    let (cfg, run_dir, resume) = open(start, opts)?;
    let shards = data::shards(&cfg, opts.quiet)?;
    let ipe = data::iters_per_epoch(&cfg, &shards)?;
    let total = match cfg.run.max_steps {
        0 => cfg.run.epochs * ipe,
        n => n.min(cfg.run.epochs * ipe),
    };
    let schedules = Schedules::new(&cfg.optim, cfg.run.epochs, ipe, cfg.run.batch_size);
    let mut trainer = Trainer::from_config(&cfg, schedules, &cfg.run.device.device()?)?;
    let cursor = match &resume {
        Some((file, bytes)) => {
            let meta = checkpoint::restore(&mut trainer, bytes)?;
            if !opts.quiet {
                let c = meta.cursor;
                eprintln!(
                    "resuming {} at step {} (epoch {}, sample {})",
                    file.display(),
                    meta.it,
                    c.epoch,
                    c.samples
                );
            }
            meta.cursor
        }
        None => Cursor::default(),
    };
    if !opts.quiet {
        eprintln!(
            "run {}: {} on {}, {:.1}M student parameters, {total} steps ({} epochs x {ipe}), batch {}",
            run_dir.display(),
            if cfg.loss.use_ref_loss { "DenseDINO" } else { "DINO" },
            cfg.run.device,
            params::count(&mut trainer.student) as f64 / 1e6,
            cfg.run.epochs,
            cfg.run.batch_size
        );
    }

    let first = trainer.it;
    let mut report = Reporter::new(&run_dir, &cfg.run, first, total, opts.quiet)?;
    let rt = data::runtime()?;
    let loader = rt.block_on(async { loader::start(data::loader_options(&cfg, &shards, cursor)) })?;
    let mut ckpt = checkpoint::Policy::new(run_dir.join("checkpoints"), &cfg.run);
    // A resumed run's last good checkpoint is the one it resumed from, until it writes another.
    ckpt.last = resume.map(|(file, _)| (first, file));
    let steps = train_steps(&mut trainer, &cfg, total, &mut report, &mut ckpt, || {
        rt.block_on(loader.batches.recv()).ok()
    });
    report.finish();
    rt.block_on(loader.shutdown());
    let steps = steps?;
    if trainer.it != first && ckpt.last.as_ref().map(|(it, _)| *it) != Some(trainer.it) {
        bail!("the loader ended before step {total} without a final checkpoint");
    }
    if let (Err(e), false) = (crate::train::metrics::plot(&run_dir), opts.quiet) {
        eprintln!("warning: plotting failed: {e:#}");
    }
    let (images_per_s, data_wait_fraction) = report.throughput();
    Ok(RunSummary {
        run_dir,
        config: cfg,
        steps,
        last_checkpoint: ckpt.last.map(|(_, p)| p),
        images_per_s,
        data_wait_fraction,
    })
}

/// The loop, until step `total` or the end of the data: next batch, one step, report it, checkpoint when
/// due. Returns the steps' metrics.
fn train_steps(
    trainer: &mut Trainer,
    cfg: &TrainConfig,
    total: usize,
    report: &mut Reporter,
    ckpt: &mut checkpoint::Policy,
    mut next_batch: impl FnMut() -> Option<common::Batch>,
) -> Result<Vec<StepMetrics>> {
    let mut steps = Vec::new();
    while trainer.it < total {
        let t0 = Instant::now();
        let Some(batch) = next_batch() else { break };
        let wait = t0.elapsed();
        let m = trainer.step(&batch).map_err(|m| non_finite(&m, ckpt))?;
        report.step(&m, batch.batch_size, t0.elapsed(), wait)?;
        let epoch_end = batch.cursor.epoch > batch.epoch;
        if epoch_end {
            report.epoch_end(batch.epoch as usize, trainer.it)?;
        }
        if ckpt.due(trainer.it, epoch_end, total) {
            ckpt.save(trainer, &Meta { it: trainer.it, cursor: batch.cursor, config: cfg.clone() })?;
        }
        steps.push(m);
    }
    Ok(steps)
}

/// The run's config, its folder, and the checkpoint it continues from (file and bytes). Writes the
/// resolved config into the folder.
#[allow(clippy::type_complexity)]
fn open(start: Start, opts: &RunOptions) -> Result<(TrainConfig, PathBuf, Option<(PathBuf, Vec<u8>)>)> {
    let (mut cfg, run_dir, resume) = match start {
        Start::Fresh(cfg) => {
            let dir = fresh_dir(cfg.run_dir());
            (cfg, dir, None)
        }
        Start::Resume { from, sets } => {
            let (file, bytes) = checkpoint::latest(&from)?;
            let cfg = checkpoint::meta(&bytes)?.config.with_run_overrides(&sets)?;
            // RUN/checkpoints/ckpt-N.safetensors → RUN
            let dir = file.parent().and_then(Path::parent).map_or_else(|| from.clone(), Path::to_path_buf);
            (cfg, dir, Some((file, bytes)))
        }
    };
    if let Some(d) = opts.device {
        cfg.run.device = d;
    }
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let config_file = run_dir.join("config.toml");
    std::fs::write(&config_file, cfg.to_toml())
        .with_context(|| format!("writing {}", config_file.display()))?;
    Ok((cfg, run_dir, resume))
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

/// The error of a step whose loss is not finite: nothing was updated, and the last good checkpoint is
/// where to resume from.
fn non_finite(m: &StepMetrics, ckpt: &checkpoint::Policy) -> anyhow::Error {
    anyhow!(
        "non-finite loss ({}) at step {} (epoch {}): stopping. The last good checkpoint is {}. Usual causes: \
         a learning rate too high for the batch size, or too few prototypes for the teacher temperature; lower \
         optim.lr or raise loss.teacher_temp and resume from it",
        m.loss,
        m.it,
        m.epoch,
        ckpt.describe_last()
    )
}
