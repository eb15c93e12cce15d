//! A pretraining run: open its folder (fresh, or resumed from a checkpoint), start the loader beside the
//! training loop, and run the loop, which reads like DINO's `train_one_epoch`: next batch, one step,
//! report it, checkpoint when due. The pieces it calls are named: [`Reporter`] (progress, stats lines,
//! `metrics.jsonl`), [`checkpoint::Policy`] (when to save, what was saved), [`data`] (shards, loader).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use common::Cursor;

use crate::dist::World;
use crate::model::params;
use crate::train::checkpoint;
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
    /// A checkpoint older than its run's newest starts a branch: only into a new folder, `branch`, so
    /// that two histories never share one (the branch gets the checkpoint and the history up to it).
    Resume { from: PathBuf, sets: Vec<String>, branch: Option<PathBuf> },
}

/// Command-line choices that are not part of the config.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Overrides `run.device` (also on resume: a run may move between machines).
    pub device: Option<DeviceSpec>,
    /// No progress bar, no stats lines.
    pub quiet: bool,
    /// The job this process is one rank of ([`World::from_env`]; one process by default).
    pub world: Arc<World>,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    /// The resolved config the run ran with (as in its `config.toml`).
    pub config: TrainConfig,
    pub steps: Vec<StepMetrics>,
    pub last_checkpoint: Option<PathBuf>,
    /// The steps the run was to reach; it stops short of them only when damaged data shortened its epochs.
    pub planned_steps: usize,
    /// The steps trained in all, by this process and the ones it resumed from.
    pub trained_steps: usize,
    pub images_per_s: f64,
    pub data_wait_fraction: f64,
    /// Damaged shards and skipped samples met on the way (`None`: the data was read whole).
    pub data_problems: Option<String>,
    /// How far the teacher has come from its random initialisation (a teacher that has barely moved
    /// scores like a random network).
    pub teacher: crate::train::step::TeacherMovement,
}

/// A stop asked for by a signal: SIGTERM (what SLURM and Kubernetes send before a kill, with a grace
/// period), SIGINT (Ctrl-C) or SIGUSR1 (what Open MPI's `mpirun` forwards to every rank, so the launcher
/// of `--nproc-per-node` turns its own SIGTERM or SIGINT into it). The run finishes the step it is in,
/// writes a checkpoint and ends with [`Interrupted`]. A second signal at least a second after the first
/// ends the process at once; one sooner is taken as the same request arriving twice (under SLURM a rank
/// can get it directly and through mpirun).
mod stop {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
    use std::time::Instant;

    // Written by the handler: atomics only, and `Instant::now` (clock_gettime), both async-signal-safe.
    pub static COUNT: AtomicUsize = AtomicUsize::new(0);
    pub static SIGNAL: AtomicUsize = AtomicUsize::new(0);
    pub static FIRST_MS: AtomicU64 = AtomicU64::new(0);
    pub static LAST_MS: AtomicU64 = AtomicU64::new(0);
    pub static EXIT_ON_SECOND: AtomicBool = AtomicBool::new(true);
    /// Set when the first step begins: before it there is nothing to checkpoint, so a signal during
    /// start-up (a synthetic set being made, the shards' plan, MPI's start) ends the process at once
    /// instead of waiting for a step that may be minutes away. Everything start-up writes is written
    /// atomically (or, a synthetic set, marked and remade), so nothing half-written is left to look whole.
    pub static IN_STEPS: AtomicBool = AtomicBool::new(false);
    pub static BASE: OnceLock<Instant> = OnceLock::new();

    pub fn now_ms() -> u64 {
        BASE.get().map_or(0, |b| b.elapsed().as_millis() as u64)
    }

    pub fn on_signal(sig: i32) {
        // The launcher of several ranks (no exit on a second signal) always handles its signals itself.
        if !IN_STEPS.load(SeqCst) && EXIT_ON_SECOND.load(SeqCst) {
            let msg = b"stopped by a signal during start-up, before the first step: nothing to save\n";
            // SAFETY: write(2) on stderr is async-signal-safe; the buffer is static.
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
            signal_hook::low_level::exit(128 + sig);
        }
        let now = now_ms();
        if COUNT.fetch_add(1, SeqCst) == 0 {
            FIRST_MS.store(now, SeqCst);
            SIGNAL.store(sig as usize, SeqCst);
        } else if EXIT_ON_SECOND.load(SeqCst) && now.saturating_sub(FIRST_MS.load(SeqCst)) >= 1000 {
            signal_hook::low_level::exit(128 + sig);
        }
        LAST_MS.store(now, SeqCst);
    }
}

/// Installs the stop signals' handlers (once per process). Until this is called, the signals keep their
/// default action (the process ends). `exit_on_second`: whether a later second signal ends the process
/// at once (the launcher of several ranks handles it itself: it must end `mpirun` first).
pub fn stop_on_signals(exit_on_second: bool) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    stop::EXIT_ON_SECOND.store(exit_on_second, std::sync::atomic::Ordering::SeqCst);
    if stop::BASE.set(Instant::now()).is_err() {
        return Ok(());
    }
    for sig in [SIGTERM, SIGINT, SIGUSR1] {
        // SAFETY: the action only touches atomics, reads the monotonic clock and may call `_exit`, all
        // async-signal-safe; it allocates nothing and takes no lock.
        unsafe { signal_hook::low_level::register(sig, move || stop::on_signal(sig)) }?;
    }
    Ok(())
}

/// The signal that asked the run to stop, if one did.
pub fn stop_signal() -> Option<i32> {
    use std::sync::atomic::Ordering::SeqCst;
    (stop::COUNT.load(SeqCst) > 0).then(|| stop::SIGNAL.load(SeqCst) as i32)
}

/// Whether a second stop signal came at least a second after the first (the launcher's cue to end its
/// ranks now).
pub fn stop_insisted() -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    stop::COUNT.load(SeqCst) >= 2
        && stop::LAST_MS.load(SeqCst).saturating_sub(stop::FIRST_MS.load(SeqCst)) >= 1000
}

/// A run stopped by a signal after writing its checkpoint: the error `train` returns, so that the caller
/// exits with the conventional status (128 + the signal) and a scheduler sees an unfinished job.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    /// The last step taken (unknown to the launcher of several ranks).
    pub step: Option<usize>,
    pub checkpoint: String,
    pub run_dir: PathBuf,
    /// The job's processes: a resume needs as many.
    pub processes: usize,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.signal {
            signal_hook::consts::SIGTERM => "SIGTERM",
            signal_hook::consts::SIGINT => "SIGINT",
            signal_hook::consts::SIGUSR1 => "SIGUSR1",
            _ => "a signal",
        };
        let step = self.step.map_or(String::new(), |s| format!(" after step {s}"));
        let procs = match self.processes {
            1 => String::new(),
            n => format!(" under {n} processes (e.g. --nproc-per-node {n})"),
        };
        write!(
            f,
            "stopped by {name}{step}; checkpoint {}; continue with: trainer train --resume {}{procs}",
            self.checkpoint,
            self.run_dir.display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// Runs (or continues) a pretraining run.
pub fn train(start: Start, opts: &RunOptions) -> Result<RunSummary> {
    let world = opts.world.clone();
    // Only rank 0 speaks (every rank holds the same numbers).
    let quiet = opts.quiet || world.rank != 0;
    // A launch that cannot run on the device asked for is refused before any file is written (a fresh run,
    // or --device; a resume learns its device from its stored config).
    let device = match &start {
        Start::Fresh(cfg) => Some(opts.device.unwrap_or(cfg.run.device)),
        Start::Resume { .. } => opts.device,
    };
    if device.is_some_and(|d| !matches!(d, DeviceSpec::Cuda(_))) {
        world.use_device(None)?;
    }
    let (cfg, run_dir, resume, _lock) = open_across(&world, start, opts)?;
    let shards = data::shards(&cfg, quiet)?;
    let identity = data::identity(&shards)?;
    if let Some((file, bytes)) = &resume
        && let Some(then) = checkpoint::meta(bytes)?.data
        && then != identity
    {
        let now = &identity;
        bail!(
            "{} was written by a run on a set of {} samples in {} shards (digest {}); {} now holds {} samples in \
             {} shards (digest {}). Resumed on it, the run's steps per epoch, and with them its lr, weight-decay \
             and momentum schedules, would change silently. Restore the set the run trained on, or start a new \
             run on this one",
            file.display(),
            then.samples,
            then.shards,
            then.digest,
            shards.display(),
            now.samples,
            now.shards,
            now.digest
        );
    }
    let ipe = data::iters_per_epoch(&cfg, &shards, world.rank, world.size)?;
    let total = match cfg.run.max_steps {
        0 => cfg.run.epochs * ipe,
        n => n.min(cfg.run.epochs * ipe),
    };
    let schedules = Schedules::new(&cfg.optim, cfg.run.epochs, ipe, cfg.run.batch_size * world.size);
    // One GPU per process: rank r of a machine drives its GPU r, whatever cuda:N the config names.
    let device = match cfg.run.device {
        DeviceSpec::Cuda(_) if !world.alone() => DeviceSpec::Cuda(crate::dist::gpu_for(world.local_rank)),
        d => d,
    };
    world.use_device(match device {
        DeviceSpec::Cuda(i) => Some(i),
        _ => None,
    })?;
    let mut trainer = Trainer::from_config(&cfg, schedules, &device.device()?)?;
    trainer.world = world.clone();
    let cursor = match &resume {
        Some((file, bytes)) => {
            let meta = checkpoint::restore(&mut trainer, bytes)?;
            if !quiet {
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
    if !quiet {
        let ranks = match world.size {
            1 => String::new(),
            n => format!(" x {n} processes ({}), global batch {}", world.backend(), n * cfg.run.batch_size),
        };
        eprintln!(
            "run {}: {} on {}{ranks}, {:.1}M student parameters, {total} steps ({} epochs x {ipe}), batch {}",
            run_dir.display(),
            if cfg.loss.use_ref_loss { "DenseDINO" } else { "DINO" },
            device,
            params::count(&mut trainer.student) as f64 / 1e6,
            cfg.run.epochs,
            cfg.run.batch_size
        );
    }

    let first = trainer.it;
    let mut report = Reporter::new(
        (world.rank == 0).then_some(run_dir.as_path()),
        &cfg.run,
        world.size,
        first,
        total,
        quiet,
    )?;
    let rt = data::runtime()?;
    let mut loader_opts = data::loader_options(&cfg, &shards, cursor);
    (loader_opts.rank, loader_opts.world_size) = (world.rank, world.size);
    if !world.alone() {
        loader_opts.epoch_samples = Some((ipe * cfg.run.batch_size) as u64);
        // A rank that skips an undecodable image completes its epoch's last batch with copies, so that
        // every rank has the epoch's `ipe` batches (the skip costs that sample, not the job).
        loader_opts.pad_epochs = true;
    }
    let loader = rt.block_on(async { loader::start(loader_opts) })?;
    let mut ckpt = checkpoint::Policy::new(run_dir.join("checkpoints"), &cfg.run);
    ckpt.writes = world.rank == 0;
    ckpt.data = Some(identity);
    // A resumed run's last good checkpoint is the one it resumed from, until it writes another.
    ckpt.last = resume.map(|(file, _)| (first, file));
    // Resumed inside an epoch: that epoch's end is still to be reported (unless an earlier process
    // reported it and was stopped before the checkpoint that would have recorded it).
    let open_epoch = (cursor.samples > 0 && report.last_epoch_logged() != Some(cursor.epoch as usize))
        .then_some(cursor.epoch);
    let stats = loader.stats.clone();
    let steps = train_steps(&mut trainer, &cfg, total, open_epoch, &mut report, &mut ckpt, || {
        match rt.block_on(loader.batches.recv()) {
            Ok(batch) => Ok(Some(batch)),
            // The channel closes when the loader ran to the end of its last epoch, or when one of its
            // tasks failed: only the first is the end of the data.
            Err(_) if stats.finished.load(std::sync::atomic::Ordering::Acquire) => Ok(None),
            Err(_) => Err(anyhow!(
                "the loader stopped before its data ended (one of its tasks failed: see the messages above)"
            )),
        }
    });
    report.finish();
    rt.block_on(loader.shutdown());
    let steps = steps?;
    if world.rank == 0 {
        checkpoint::prune(&run_dir.join("checkpoints"), cfg.run.keep_checkpoints);
    }
    let data_problems = stats.problems();
    if trainer.it < total && !quiet {
        // Only a damaged set ends early (the loader runs exactly `run.epochs` epochs of the plan, and damaged
        // shards and skipped samples make them shorter): the run is complete, but not what was planned.
        eprintln!(
            "warning: the data ended after {} of the planned {total} steps ({} epochs x {ipe}): {}",
            trainer.it,
            cfg.run.epochs,
            data_problems.as_deref().unwrap_or("the set has fewer samples than its index lists")
        );
    }
    if world.rank == 0
        && let (Err(e), false) = (crate::train::metrics::plot(&run_dir), quiet)
    {
        eprintln!("warning: plotting failed: {e:#}");
    }
    let (images_per_s, data_wait_fraction) = report.throughput();
    let teacher = trainer.teacher_movement();
    Ok(RunSummary {
        run_dir,
        config: cfg,
        steps,
        last_checkpoint: ckpt.last.map(|(_, p)| p),
        planned_steps: total,
        trained_steps: trainer.it,
        images_per_s,
        data_wait_fraction,
        data_problems,
        teacher,
    })
}

/// The loop, until step `total` or the end of the data: next batch, one step, report it, checkpoint when
/// due. Returns the steps' metrics. `open_epoch`: the epoch in progress whose end is not yet reported;
/// `next_batch` gives `None` at the end of the data, an error when the loader failed.
///
/// An epoch's last batch says so in its cursor. When damaged shards or skipped samples leave the epoch's
/// tail without a batch, no batch says so; the epoch's end is then seen when the next epoch's first batch
/// comes (or the data ends), and is reported and checkpointed there, with the cursor at the next epoch.
fn train_steps(
    trainer: &mut Trainer,
    cfg: &TrainConfig,
    total: usize,
    mut open_epoch: Option<u64>,
    report: &mut Reporter,
    ckpt: &mut checkpoint::Policy,
    mut next_batch: impl FnMut() -> Result<Option<common::Batch>>,
) -> Result<Vec<StepMetrics>> {
    let mut steps = Vec::new();
    stop::IN_STEPS.store(true, std::sync::atomic::Ordering::SeqCst);
    // The loader's cursor after the last step's batch: where a checkpoint written now resumes.
    let mut last_cursor: Option<common::Cursor> = None;
    while trainer.it < total {
        let t0 = Instant::now();
        let mut stop = stop_signal();
        if trainer.world.alone()
            && let Some(signal) = stop
        {
            return Err(interrupt(trainer, cfg, ckpt, last_cursor, signal));
        }
        let next = next_batch().with_context(|| {
            format!("at step {}; the last checkpoint is {}", trainer.it, ckpt.describe_last())
        })?;
        if !trainer.world.alone() {
            // Every rank stops after the same step: a signal may reach the ranks steps apart.
            stop = agree_on_data(&trainer.world, next.as_ref(), trainer.it, ckpt, stop)?;
            if let Some(signal) = stop {
                return Err(interrupt(trainer, cfg, ckpt, last_cursor, signal));
            }
        }
        let Some(batch) = next else { break };
        let wait = t0.elapsed();
        if let Some(prev) = open_epoch.take().filter(|&e| e < batch.epoch) {
            close_epoch(trainer, cfg, total, report, ckpt, prev)?;
        }
        let m = trainer.step(&batch).map_err(|m| non_finite(&m, ckpt))?;
        let every = cfg.run.check_ranks_every;
        if !trainer.world.alone() && every > 0 && trainer.it.is_multiple_of(every) {
            let digest = trainer.teacher_digest();
            trainer.world.check_same(&format!("the teacher after step {}", trainer.it), &digest)?;
        }
        report.step(&m, batch.batch_size * trainer.world.size, t0.elapsed(), wait)?;
        let epoch_end = batch.cursor.epoch > batch.epoch;
        if epoch_end {
            report.epoch_end(batch.epoch as usize, trainer.it)?;
        } else {
            open_epoch = Some(batch.epoch);
        }
        if ckpt.due(trainer.it, epoch_end, total) {
            ckpt.save(trainer, batch.cursor, cfg)?;
        }
        last_cursor = Some(batch.cursor);
        steps.push(m);
    }
    if let (Some(prev), true) = (open_epoch, trainer.it < total) {
        // The data ended (the loader ran all its epochs) inside a batch-less tail.
        close_epoch(trainer, cfg, total, report, ckpt, prev)?;
    }
    Ok(steps)
}

/// The checkpoint of a run stopped by `signal` after its last step (none when that step has one already,
/// or when no step ran in this process), and the error that says so.
fn interrupt(
    trainer: &mut Trainer,
    cfg: &TrainConfig,
    ckpt: &mut checkpoint::Policy,
    last_cursor: Option<common::Cursor>,
    signal: i32,
) -> anyhow::Error {
    let saved = ckpt.last.as_ref().is_some_and(|(it, _)| *it == trainer.it);
    if let (Some(cursor), false) = (last_cursor, saved)
        && let Err(e) = ckpt.save(trainer, cursor, cfg)
    {
        return e.context(format!("writing the checkpoint of step {} after a stop signal", trainer.it));
    }
    // The other ranks wait here for rank 0's write: a launcher (torchrun) that saw a rank leave would
    // otherwise end rank 0 in the middle of it.
    if !trainer.world.alone()
        && let Err(e) = trainer.world.gather(0)
    {
        return e.context("waiting for the stop checkpoint of rank 0");
    }
    let run_dir = ckpt.dir().parent().map_or_else(PathBuf::new, Path::to_path_buf);
    let (checkpoint, processes) = (ckpt.describe_last(), trainer.world.size);
    anyhow::Error::new(Interrupted { signal, step: Some(trainer.it), checkpoint, run_dir, processes })
}

/// Data-parallel: every rank must step on a batch of the same epoch, or all must have reached the end of
/// their data. A rank whose epoch ran short (damaged shards or skipped samples) would otherwise leave the
/// others waiting in the next all-reduce, or feed them gradients of another epoch's recipe (the frozen
/// last layer, the teacher temperature). Every rank sees the same answer, so all stop together.
///
/// The same exchange carries each rank's stop request (bit 23): the ranks stop together.
fn agree_on_data(
    world: &crate::dist::World,
    next: Option<&common::Batch>,
    it: usize,
    ckpt: &checkpoint::Policy,
    stop: Option<i32>,
) -> Result<Option<i32>> {
    const STOP_BIT: u32 = 1 << 23;
    let mine = next.map_or(0, |b| (b.epoch as u32 + 1).min(STOP_BIT - 1));
    let all = world.gather(mine | if stop.is_some() { STOP_BIT } else { 0 })?;
    if all.iter().any(|&x| x & STOP_BIT != 0) {
        // This rank's own signal, or SIGTERM's for a rank that got none (the exchange carries one bit).
        return Ok(Some(stop.unwrap_or(signal_hook::consts::SIGTERM)));
    }
    if all.iter().all(|&x| x == all[0]) {
        return Ok(None);
    }
    let state = |x: u32| {
        if x == 0 { "its data had ended".to_string() } else { format!("a batch of epoch {}", x - 1) }
    };
    let odd: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|&(r, &x)| r == 0 || x != all[0])
        .map(|(r, &x)| format!("rank {r}: {}", state(x)))
        .collect();
    bail!(
        "at step {it} the ranks' data disagree ({}): a rank's epoch ran short (damaged shards or skipped \
         samples, reported above), and a data-parallel step needs a batch of the same epoch on every rank. \
         Repair the set (`shard verify --decode` names the bad files) and resume from {}",
        odd.join(", "),
        ckpt.describe_last()
    )
}

/// Reports the end of `epoch`, seen late (after its last batch's step), and checkpoints it as an epoch end:
/// the state after that step, with the loader's cursor at the next epoch's start.
fn close_epoch(
    trainer: &mut Trainer,
    cfg: &TrainConfig,
    total: usize,
    report: &mut Reporter,
    ckpt: &mut checkpoint::Policy,
    epoch: u64,
) -> Result<()> {
    report.epoch_end(epoch as usize, trainer.it)?;
    if ckpt.due(trainer.it, true, total) {
        let cursor = Cursor { epoch: epoch + 1, samples: 0 };
        ckpt.save(trainer, cursor, cfg)?;
    }
    Ok(())
}

/// What [`open`] gives: the run's config, its folder, the checkpoint it continues from (file and bytes),
/// and the folder's lock (held until the file is dropped; rank 0's only).
type Opened = (TrainConfig, PathBuf, Option<(PathBuf, Vec<u8>)>, Option<std::fs::File>);

/// [`open`] on rank 0 (and the synthetic set made there, when the config uses one), then the others told
/// where the run is: they read the config rank 0 wrote and the checkpoint it chose, so every rank runs
/// the same config from the same state. A failure on rank 0 stops every rank.
fn open_across(world: &World, start: Start, opts: &RunOptions) -> Result<Opened> {
    #[derive(serde::Serialize, serde::Deserialize)]
    enum Told {
        Run { dir: PathBuf, checkpoint: Option<PathBuf> },
        Failed(String),
    }
    if world.alone() {
        return open(start, opts, world);
    }
    if world.rank == 0 {
        let opened = open(start, opts, world).and_then(|o| data::shards(&o.0, opts.quiet).map(|_| o));
        let told = match &opened {
            Ok((_, dir, resume, _)) => {
                Told::Run { dir: dir.clone(), checkpoint: resume.as_ref().map(|(f, _)| f.clone()) }
            }
            Err(e) => Told::Failed(format!("{e:#}")),
        };
        world.broadcast(serde_json::to_vec(&told)?)?;
        return opened;
    }
    match serde_json::from_slice(&world.broadcast(Vec::new())?)? {
        Told::Failed(e) => bail!("rank {}: rank 0 could not open the run: {e}", world.rank),
        Told::Run { dir, checkpoint } => {
            let stored = dir.join("config.toml");
            let text =
                std::fs::read_to_string(&stored).with_context(|| format!("reading {}", stored.display()))?;
            let cfg = TrainConfig::from_resolved(&text).with_context(|| stored.display().to_string())?;
            let resume = match checkpoint {
                Some(file) => {
                    let bytes = std::fs::read(&file).with_context(|| {
                        format!("rank {}: reading {} (rank 0's checkpoint; is the run folder on a file system every \
                                 machine shares?)", world.rank, file.display())
                    })?;
                    Some((file, bytes))
                }
                None => None,
            };
            Ok((cfg, dir, resume, None))
        }
    }
}

/// The run's config, its folder, the checkpoint it continues from (file and bytes), and the folder's lock
/// (held until the file is dropped). Writes the resolved config into the folder.
fn open(start: Start, opts: &RunOptions, world: &World) -> Result<Opened> {
    // `branch_lock`: a branch's new folder is locked before anything is copied into it.
    // `continued`: the config of the checkpoint a resume continues from.
    let mut continued = None;
    let (mut cfg, run_dir, resume, branch_lock) = match start {
        Start::Fresh(cfg) => {
            let dir = fresh_dir(cfg.run_dir());
            (cfg, dir, None, None)
        }
        Start::Resume { from, sets, branch } if branch.is_none() && not_yet_checkpointed(&from) => {
            // Killed before its first checkpoint: nothing to continue from, so the run starts over in its
            // own folder with its stored config (a job script can always pass --resume).
            let stored = from.join("config.toml");
            let text =
                std::fs::read_to_string(&stored).with_context(|| format!("reading {}", stored.display()))?;
            let cfg = TrainConfig::from_resolved(&text)
                .and_then(|c| c.with_run_overrides(&sets))
                .with_context(|| stored.display().to_string())?;
            if let Some(past) = history_past_a_checkpoint(&from, &cfg) {
                bail!(
                    "{} has no checkpoint, but its metrics.jsonl records {past}: were its checkpoints deleted \
                     or moved? Starting over would overwrite that history. Put the checkpoints back in {}, or \
                     move metrics.jsonl aside to start the run over",
                    from.display(),
                    from.join("checkpoints").display()
                );
            }
            if !opts.quiet {
                eprintln!("{}: no checkpoint yet; starting the run over from step 0", from.display());
            }
            (cfg, from, None, None)
        }
        Start::Resume { from, sets, branch } => {
            let (file, bytes) = checkpoint::latest(&from)?;
            let meta = checkpoint::meta(&bytes)?;
            if meta.world_size != world.size {
                bail!(
                    "{} was written by a job of {} process(es); this one has {}. The loader's place in the \
                     epoch is counted per rank, so the run continues only with the same number: relaunch \
                     with {} (or start a new run)",
                    file.display(),
                    meta.world_size,
                    world.size,
                    meta.world_size
                );
            }
            let cfg = meta.config.clone().with_run_overrides(&sets)?;
            continued = Some(meta.config.clone());
            // RUN/checkpoints/ckpt-N.safetensors → RUN
            let dir = file.parent().and_then(Path::parent).map_or_else(|| from.clone(), Path::to_path_buf);
            if let Some(new) = branch {
                let (file, lock) = start_branch(&dir, &file, meta.it, &new)?;
                (cfg, new, Some((file, bytes)), Some(lock))
            } else {
                match newest_intact(&dir.join("checkpoints"), meta.it, opts.quiet)? {
                    Some(newest) if newest > meta.it => bail!(
                        "{} is not the newest checkpoint of {} (step {newest} is): resuming from it there would \
                         mix two histories. Continue from it in a new run folder with --branch NEW_FOLDER (its \
                         history up to step {} goes with it), or resume {} to continue from step {newest}",
                        file.display(),
                        dir.display(),
                        meta.it,
                        dir.display()
                    ),
                    _ => (cfg, dir, Some((file, bytes)), None),
                }
            }
        }
    };
    if let Some(d) = opts.device {
        cfg.run.device = d;
    }
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let lock = match branch_lock {
        Some(lock) => lock,
        None => lock_run(&run_dir)?,
    };
    // What a crashed process left half written is of no use and may hold the space the next write needs
    // (no other process writes here: the lock is held).
    for p in checkpoint::sweep_partials(&run_dir.join("checkpoints")) {
        if !opts.quiet {
            eprintln!("removed {}, left by an interrupted checkpoint write", p.display());
        }
    }
    // A config.toml edited by hand since the run wrote it (beyond `run.*`, which a resume may change
    // with --set) does not change a resumed run, which continues with its checkpoint's config: the edit is
    // kept beside it and said, not overwritten silently.
    let stored = run_dir.join("config.toml");
    if let (Some(ckpt_cfg), Ok(text)) = (&continued, std::fs::read_to_string(&stored)) {
        let parsed = TrainConfig::from_resolved(&text).ok();
        // Another run's checkpoint copied into this folder: it would switch the model and mix two
        // histories in one metrics.jsonl. Its name or seed says so (a resume cannot change either).
        if let (Some(c), Some(file)) = (&parsed, resume.as_ref().map(|(f, _)| f))
            && (c.run.name != ckpt_cfg.run.name || c.run.seed != ckpt_cfg.run.seed)
        {
            bail!(
                "{} belongs to another run (run.name {:?}, seed {}) than {} (run.name {:?}, seed {}): resuming \
                 it here would switch the model and mix two histories. Move it out of {}, or resume it in \
                 its own run folder",
                file.display(),
                ckpt_cfg.run.name,
                ckpt_cfg.run.seed,
                stored.display(),
                c.run.name,
                c.run.seed,
                run_dir.join("checkpoints").display()
            );
        }
        let same = parsed.is_some_and(|c| TrainConfig { run: ckpt_cfg.run.clone(), ..c } == *ckpt_cfg);
        if !same {
            let kept = run_dir.join("config.toml.edited");
            shard::format::write_atomic(&kept, text.as_bytes())?;
            eprintln!(
                "warning: {} was edited since the run wrote it; a resume continues with its checkpoint's \
                 config (only run.* may change, with --set), so the edit is not used. It is kept in {}; to \
                 train with it, start a new run with --config {}",
                stored.display(),
                kept.display(),
                kept.display()
            );
        }
    }
    // Through a temporary file and a rename: a run killed here keeps a whole config (the old or the new),
    // which a resume before the first checkpoint reads.
    shard::format::write_atomic(&stored, cfg.to_toml().as_bytes())?;
    Ok((cfg, run_dir, resume, Some(lock)))
}

/// Takes the run folder's lock (`RUN/.lock`, an advisory `flock` the kernel drops when the process ends,
/// however it ends): two processes writing one run would interleave their histories and remove each
/// other's checkpoint writes.
pub(crate) fn lock_run(run_dir: &Path) -> Result<std::fs::File> {
    let path = run_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "{}: another trainer process is running in this run folder (it holds {}); wait for it to end \
                 or stop it first",
                run_dir.display(),
                path.display()
            );
        }
    }
    Ok(file)
}

/// Whether `from` is a run folder that holds its config but no complete checkpoint (a `.partial` is
/// none; a damaged one is, and is `checkpoint::latest`'s to report).
fn not_yet_checkpointed(from: &Path) -> bool {
    from.join("config.toml").is_file() && checkpoint::list(&from.join("checkpoints")).is_empty()
}

/// What in `run`'s history shows that a checkpoint was written, said for an error: a step logged after
/// the run's first checkpoint (at `run.checkpoint_every`, or the first epoch's end, whichever came first;
/// a step runs only once the checkpoint before it is saved). `None` for a run killed before its first
/// checkpoint (even between the step's log line and that checkpoint), whose history the start-over
/// rewrites with the same steps.
fn history_past_a_checkpoint(run: &Path, cfg: &TrainConfig) -> Option<String> {
    use crate::train::metrics::Record;
    let records = crate::train::metrics::read(&run.join("metrics.jsonl")).ok()?;
    let epoch_end = records.iter().find_map(|r| match r {
        Record::Epoch { steps, .. } => Some(*steps),
        _ => None,
    });
    let every = (cfg.run.checkpoint_every > 0).then_some(cfg.run.checkpoint_every);
    let first = every.into_iter().chain(epoch_end).min()?;
    records.iter().find_map(|r| match r {
        Record::Step { m, .. } if m.it >= first => {
            Some(format!("step {}, logged after the checkpoint at step {first}", m.it))
        }
        _ => None,
    })
}

/// The step of the newest checkpoint in `dir` that is intact. Damaged checkpoints newer than `from`
/// (the one a resume starts from) are moved aside to `*.damaged`: they are not part of any history the
/// run can continue, and left in place they would read as a newer history that the resume abandons.
fn newest_intact(dir: &Path, from: usize, quiet: bool) -> Result<Option<usize>> {
    let mut newest = None;
    for (it, file) in checkpoint::list(dir) {
        // Only a file that reads and fails its check is damaged; one that cannot be read (permissions, an
        // I/O error) is left where it is and counts, so that the resume refuses rather than moves it.
        let damaged = it > from && std::fs::read(&file).is_ok_and(|b| checkpoint::verify(&b).is_err());
        if !damaged {
            newest = Some(it);
            continue;
        }
        let aside = file.with_extension("safetensors.damaged");
        std::fs::rename(&file, &aside)
            .with_context(|| format!("moving the damaged {} aside", file.display()))?;
        if !quiet {
            eprintln!("moved the damaged {} aside to {}", file.display(), aside.display());
        }
    }
    Ok(newest)
}

/// A new run folder `new` that continues `run` from its checkpoint `file` (step `it`): the checkpoint, the
/// metrics and TensorBoard's files are copied (the metrics log drops the later steps when it opens, and
/// TensorBoard the later events at the branch's restart marker). Returns the
/// copied checkpoint and the new folder's lock, taken before anything is copied.
fn start_branch(run: &Path, file: &Path, it: usize, new: &Path) -> Result<(PathBuf, std::fs::File)> {
    std::fs::create_dir_all(new).with_context(|| format!("creating {}", new.display()))?;
    let lock = lock_run(new)?;
    // A checkpoint or a config is a run; copied metrics alone are an interrupted branch's, made again.
    if new.join("config.toml").exists() || !checkpoint::list(&new.join("checkpoints")).is_empty() {
        bail!("--branch {}: that folder already holds a run; choose a new one", new.display());
    }
    let ckpt_dir = new.join("checkpoints");
    std::fs::create_dir_all(&ckpt_dir).with_context(|| format!("creating {}", ckpt_dir.display()))?;
    // Metrics first, the checkpoint last and through a rename: until the checkpoint is whole under its
    // name, the new folder holds no run.
    let metrics = run.join("metrics.jsonl");
    if metrics.exists() {
        let to = new.join("metrics.jsonl");
        std::fs::copy(&metrics, &to).with_context(|| format!("copying {}", metrics.display()))?;
    }
    // TensorBoard's files too: the branch's own file drops their steps from `it` on, as the metrics log does.
    for events in crate::train::tensorboard::files(run) {
        let to = new.join(events.file_name().expect("a file"));
        std::fs::copy(&events, &to).with_context(|| format!("copying {}", events.display()))?;
    }
    let copy = ckpt_dir.join(checkpoint::file_name(it));
    let partial = copy.with_extension("safetensors.partial");
    std::fs::copy(file, &partial)
        .and_then(|_| std::fs::rename(&partial, &copy))
        .with_context(|| format!("copying {} to {}", file.display(), copy.display()))?;
    Ok((copy, lock))
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
