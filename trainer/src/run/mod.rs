//! A pretraining run: open its folder (fresh, or resumed from a checkpoint), start the loader beside the
//! training loop, and run the loop, which reads like DINO's `train_one_epoch`: next batch, one step,
//! report it, checkpoint when due. The pieces it calls are named: [`Reporter`] (progress, stats lines,
//! `metrics.jsonl`), [`checkpoint::Policy`] (when to save, what was saved), [`data`] (shards, loader).

pub mod bench;
pub mod checkpoint;
pub mod data;
mod folder;
pub mod metrics;
pub mod report;
pub mod stop;
pub mod tensorboard;

pub use folder::{Start, lock_run};
pub use stop::Interrupted;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use common::Cursor;

use crate::model::params;
use crate::parallel::World;
use crate::recipe::config::{DeviceSpec, TrainConfig};
use crate::recipe::schedule::Schedules;
use crate::recipe::step::{NonFiniteLoss, StepMetrics, Trainer};
use report::Reporter;

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
    pub teacher: crate::recipe::step::TeacherMovement,
}

/// Runs (or continues) a pretraining run, phase by phase as DINO's `train_dino`: the run's folder, its
/// data, the device, the trainer (restored on resume), what reports and what checkpoints, the loader,
/// the loop.
pub fn train(start: Start, opts: &RunOptions) -> Result<RunSummary> {
    let world = opts.world.clone();
    // Only rank 0 speaks (every rank holds the same numbers).
    let quiet = opts.quiet || world.rank != 0;
    refuse_device_early(&start, opts, &world)?;
    let folder::Opened { cfg, dir: run_dir, resume, lock: _lock } =
        folder::open_across(&world, start, opts.device, opts.quiet)?;
    let plan = data::Plan::new(&cfg, &world, quiet, trained_on(resume.as_ref())?)?;
    let device = rank_device(&cfg, &world)?;
    let schedules = Schedules::new(&cfg.optim, cfg.run.epochs, plan.iters_per_epoch, plan.global_batch);
    let mut trainer = Trainer::from_config(&cfg, schedules, &device.device()?, &world)?;
    let cursor = restore(&mut trainer, resume.as_ref(), quiet)?;
    if !quiet {
        announce(&mut trainer, &cfg, &plan, &run_dir, device);
    }
    let first = trainer.it;
    let rank0_dir = (world.rank == 0).then_some(run_dir.as_path());
    let mut report = Reporter::new(rank0_dir, &cfg.run, plan.global_batch, first, plan.total_steps, quiet)?;
    // A resumed run's last good checkpoint is the one it resumed from, until it writes another.
    let resumed_from = resume.map(|(file, _)| (first, file));
    let ckpt_dir = run_dir.join("checkpoints");
    let mut ckpt = checkpoint::Policy::new(ckpt_dir, &cfg.run, &world, resumed_from, plan.identity.clone());
    let rt = data::runtime()?;
    let loader = rt.block_on(async { loader::start(plan.loader_options(&cfg, cursor)) })?;
    // Resumed inside an epoch: that epoch's end is still to be reported (unless an earlier process
    // reported it and was stopped before the checkpoint that would have recorded it).
    let open_epoch = (cursor.samples > 0 && report.last_epoch_logged() != Some(cursor.epoch as usize))
        .then_some(cursor.epoch);
    let next = || next_batch(&rt, &loader);
    let steps = train_steps(&mut trainer, &cfg, plan.total_steps, open_epoch, &mut report, &mut ckpt, next);
    report.finish();
    let stats = loader.stats.clone();
    rt.block_on(loader.shutdown());
    let steps = steps?;
    if let Some(problem) = stats.failure() {
        // Found while the last batch trained (the loop asks for no batch after it): the run took its
        // steps, on data that is not the set's.
        bail!("the run took its {} steps, but its data failed at the end: {problem}", steps.len());
    }
    wrap_up(&mut trainer, &plan, &run_dir, &cfg, stats.problems(), &report, ckpt, steps, quiet)
}

/// A launch that cannot run on the device asked for is refused before any file is written (a fresh run,
/// or --device; a resume learns its device from its stored config, and [`rank_device`] checks it).
fn refuse_device_early(start: &Start, opts: &RunOptions, world: &World) -> Result<()> {
    let device = match start {
        Start::Fresh(cfg) => Some(opts.device.unwrap_or(cfg.run.device)),
        Start::Resume { .. } => opts.device,
    };
    match device {
        Some(d) if !matches!(d, DeviceSpec::Cuda(_)) => world.check_device(None),
        _ => Ok(()),
    }
}

/// A resumed run's checkpoint and the data set it was written on, which the run must read again
/// ([`data::Plan::new`] checks it before anything is counted in the set).
fn trained_on(resume: Option<&(PathBuf, Vec<u8>)>) -> Result<Option<(&Path, data::DataIdentity)>> {
    let Some((file, bytes)) = resume else { return Ok(None) };
    Ok(checkpoint::meta(bytes)?.data.map(|d| (file.as_path(), d)))
}

/// The device this rank runs on, the job's collectives set up for it. One GPU per process: rank r of a
/// machine drives its GPU r, whatever cuda:N the config names.
fn rank_device(cfg: &TrainConfig, world: &World) -> Result<DeviceSpec> {
    let device = match cfg.run.device {
        DeviceSpec::Cuda(_) if !world.alone() => DeviceSpec::Cuda(crate::parallel::gpu_for(world.local_rank)),
        d => d,
    };
    world.use_device(match device {
        DeviceSpec::Cuda(i) => Some(i),
        _ => None,
    })?;
    Ok(device)
}

/// The trainer's state from the checkpoint a resume continues from (file and bytes); the loader's
/// cursor there (the start of the data for a fresh run).
fn restore(trainer: &mut Trainer, resume: Option<&(PathBuf, Vec<u8>)>, quiet: bool) -> Result<Cursor> {
    let Some((file, bytes)) = resume else { return Ok(Cursor::default()) };
    let meta = checkpoint::restore(trainer, bytes)?;
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
    Ok(meta.cursor)
}

/// The run's first line: its folder, objective, device, job, size and length.
fn announce(trainer: &mut Trainer, cfg: &TrainConfig, plan: &data::Plan, run_dir: &Path, device: DeviceSpec) {
    let world = &trainer.world;
    let ranks = match world.size {
        1 => String::new(),
        n => format!(" x {n} processes ({}), global batch {}", world.backend(), plan.global_batch),
    };
    eprintln!(
        "run {}: {} on {}{ranks}, {:.1}M student parameters, {} steps ({} epochs x {}), batch {}",
        run_dir.display(),
        if cfg.loss.use_ref_loss { "DenseDINO" } else { "DINO" },
        device,
        params::count(&mut trainer.student) as f64 / 1e6,
        plan.total_steps,
        cfg.run.epochs,
        plan.iters_per_epoch,
        cfg.run.batch_size
    );
}

/// The loader's next batch; `None` at the end of the data, an error when the loader stopped before it.
fn next_batch(rt: &tokio::runtime::Runtime, loader: &loader::Loader) -> Result<Option<common::Batch>> {
    Ok(rt.block_on(loader.next())?)
}

/// After the loop: old checkpoints pruned, a run the data ended early said, the curves plotted; the
/// summary.
#[allow(clippy::too_many_arguments)] // the run's pieces, each once, at its end
fn wrap_up(
    trainer: &mut Trainer,
    plan: &data::Plan,
    run_dir: &Path,
    cfg: &TrainConfig,
    data_problems: Option<String>,
    report: &Reporter,
    ckpt: checkpoint::Policy,
    steps: Vec<StepMetrics>,
    quiet: bool,
) -> Result<RunSummary> {
    let rank0 = trainer.world.rank == 0;
    if rank0 {
        checkpoint::prune(&run_dir.join("checkpoints"), cfg.run.keep_checkpoints);
    }
    if trainer.it < plan.total_steps && !quiet {
        warn_short(trainer.it, plan, cfg, data_problems.as_deref());
    }
    if rank0 && let (Err(e), false) = (metrics::plot(run_dir), quiet) {
        eprintln!("warning: plotting failed: {e:#}");
    }
    let (images_per_s, data_wait_fraction) = report.throughput();
    Ok(RunSummary {
        run_dir: run_dir.to_path_buf(),
        config: cfg.clone(),
        steps,
        last_checkpoint: ckpt.last.map(|(_, p)| p),
        planned_steps: plan.total_steps,
        trained_steps: trainer.it,
        images_per_s,
        data_wait_fraction,
        data_problems,
        teacher: trainer.teacher_movement(),
    })
}

/// A run that the data ended after `steps` steps, short of its plan. Only a damaged set ends early (the
/// loader runs exactly `run.epochs` epochs of the plan, and damaged shards and skipped samples make them
/// shorter): the run is complete, but not what was planned.
fn warn_short(steps: usize, plan: &data::Plan, cfg: &TrainConfig, data_problems: Option<&str>) {
    eprintln!(
        "warning: the data ended after {steps} of the planned {} steps ({} epochs x {}): {}",
        plan.total_steps,
        cfg.run.epochs,
        plan.iters_per_epoch,
        data_problems.unwrap_or("the set has fewer samples than its index lists")
    );
}

/// The loop, DINO's `train_one_epoch` over every epoch, until step `total` or the end of the data: next
/// batch, one step, report it, checkpoint when due. Returns the steps' metrics. `open_epoch`: the epoch in
/// progress whose end is not yet reported; `next_batch` gives `None` at the end of the data, an error when
/// the loader failed.
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
    stop::entering_steps();
    // The loader's cursor after the last step's batch: where a checkpoint written now resumes.
    let mut last_cursor: Option<common::Cursor> = None;
    while trainer.it < total {
        let t0 = Instant::now();
        let Some(batch) = batch_or_stop(trainer, cfg, ckpt, last_cursor, &mut next_batch)? else { break };
        let wait = t0.elapsed();
        if let Some(prev) = open_epoch.take().filter(|&e| e < batch.epoch) {
            close_epoch(trainer, cfg, total, report, ckpt, prev)?;
        }
        let m = trainer.step(&batch).map_err(|e| non_finite(e, ckpt))?;
        check_ranks(trainer, cfg)?;
        report.step(&m, t0.elapsed(), wait)?;
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

/// The next step's batch (`None`: the data ended), or, when a stop signal came, the stop checkpoint and
/// [`Interrupted`]. Data-parallel ranks agree first, so that all stop after the same step (a signal may
/// reach them steps apart) and all step on the same epoch.
fn batch_or_stop(
    trainer: &mut Trainer,
    cfg: &TrainConfig,
    ckpt: &mut checkpoint::Policy,
    last_cursor: Option<Cursor>,
    next_batch: &mut impl FnMut() -> Result<Option<common::Batch>>,
) -> Result<Option<common::Batch>> {
    let mut stop = stop::requested();
    if trainer.world.alone()
        && let Some(signal) = stop
    {
        return Err(interrupt(trainer, cfg, ckpt, last_cursor, signal));
    }
    let next = next_batch().with_context(|| {
        format!("at step {}; the last checkpoint is {}", trainer.it, ckpt.describe_last())
    })?;
    if !trainer.world.alone() {
        stop = agree_on_data(&trainer.world, next.as_ref(), trainer.it, ckpt, stop)?;
        if let Some(signal) = stop {
            return Err(interrupt(trainer, cfg, ckpt, last_cursor, signal));
        }
    }
    Ok(next)
}

/// Every `run.check_ranks_every` steps of a data-parallel run: the ranks' teachers compared by digest.
fn check_ranks(trainer: &mut Trainer, cfg: &TrainConfig) -> Result<()> {
    let every = cfg.run.check_ranks_every;
    if !trainer.world.alone() && every > 0 && trainer.it.is_multiple_of(every) {
        let digest = checkpoint::teacher_digest(&mut trainer.teacher);
        trainer.world.check_same(&format!("the teacher after step {}", trainer.it), &digest)?;
    }
    Ok(())
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
    world: &crate::parallel::World,
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

/// A step's error: a non-finite loss said with where to resume from (nothing was updated; the last good
/// checkpoint is where to resume from); any other error as it is.
fn non_finite(e: anyhow::Error, ckpt: &checkpoint::Policy) -> anyhow::Error {
    match e.downcast_ref::<NonFiniteLoss>() {
        Some(nf) => anyhow!(
            "{nf}: stopping. The last good checkpoint is {}. Usual causes: a learning rate too high for the \
             batch size, or too few prototypes for the teacher temperature; lower optim.lr or raise \
             loss.teacher_temp and resume from it",
            ckpt.describe_last()
        ),
        None => e,
    }
}

/// `mi_option_purge_delay` in mimalloc.h (the same index in its v2 and v3; libmimalloc-sys names no
/// constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Allocator settings for training: keep freed memory instead of handing it back to the OS. Every step
/// frees and reallocates the same few hundred MB of activations; by default mimalloc returns them after
/// 10 ms and glibc (which serves LibTorch's CPU tensors) maps every block over 32 MB afresh, and the kernel
/// zeroes each page again on first touch: a fifth of a flex step, 10-15% of a tch-cpu one. The binaries
/// that train (`trainer`, and the test binaries of long runs) make mimalloc their global allocator and
/// call this first.
pub fn keep_freed_memory() {
    // SAFETY: sets one word of mimalloc's option table, which it reads when it purges; called before the
    // run allocates (first thing in `main`, or in a test).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy, under glibc's own arena lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
