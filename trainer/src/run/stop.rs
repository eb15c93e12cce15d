//! Stopping a run on a signal: SIGTERM (what SLURM and Kubernetes send before a kill, with a grace
//! period), SIGINT (Ctrl-C) or SIGUSR1 (what Open MPI's `mpirun` forwards to every rank, so the launcher
//! of `--nproc-per-node` turns its own SIGTERM or SIGINT into it). The run finishes the step it is in,
//! writes a checkpoint and ends with [`Interrupted`]. A second signal at least a second after the first
//! ends the process at once; one sooner is taken as the same request arriving twice (under SLURM a rank
//! can get it directly and through mpirun).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::Instant;

use anyhow::Result;

// Written by the handler: atomics only, and `Instant::now` (clock_gettime), both async-signal-safe.
static COUNT: AtomicUsize = AtomicUsize::new(0);
static SIGNAL: AtomicUsize = AtomicUsize::new(0);
static FIRST_MS: AtomicU64 = AtomicU64::new(0);
static LAST_MS: AtomicU64 = AtomicU64::new(0);
static EXIT_ON_SECOND: AtomicBool = AtomicBool::new(true);
/// Set when the first step begins: before it there is nothing to checkpoint, so a signal during
/// start-up (a synthetic set being made, the shards' plan, MPI's start) ends the process at once
/// instead of waiting for a step that may be minutes away. Everything start-up writes is written
/// atomically (or, a synthetic set, marked and remade), so nothing half-written is left to look whole.
static IN_STEPS: AtomicBool = AtomicBool::new(false);
static BASE: OnceLock<Instant> = OnceLock::new();

fn now_ms() -> u64 {
    BASE.get().map_or(0, |b| b.elapsed().as_millis() as u64)
}

fn on_signal(sig: i32) {
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

/// Installs the stop signals' handlers (once per process). Until this is called, the signals keep their
/// default action (the process ends). `exit_on_second`: whether a later second signal ends the process
/// at once (the launcher of several ranks handles it itself: it must end `mpirun` first).
pub fn install(exit_on_second: bool) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    EXIT_ON_SECOND.store(exit_on_second, SeqCst);
    if BASE.set(Instant::now()).is_err() {
        return Ok(());
    }
    for sig in [SIGTERM, SIGINT, SIGUSR1] {
        // SAFETY: the action only touches atomics, reads the monotonic clock and may call `_exit`, all
        // async-signal-safe; it allocates nothing and takes no lock.
        unsafe { signal_hook::low_level::register(sig, move || on_signal(sig)) }?;
    }
    Ok(())
}

/// The signal that asked the run to stop, if one did.
pub fn requested() -> Option<i32> {
    (COUNT.load(SeqCst) > 0).then(|| SIGNAL.load(SeqCst) as i32)
}

/// Whether a second stop signal came at least a second after the first (the launcher's cue to end its
/// ranks now).
pub fn insisted() -> bool {
    COUNT.load(SeqCst) >= 2 && LAST_MS.load(SeqCst).saturating_sub(FIRST_MS.load(SeqCst)) >= 1000
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

/// Marks the first step's start: from now on a stop signal asks for a checkpoint (before it, a signal
/// ends the process at once: there is nothing to save).
pub(super) fn entering_steps() {
    IN_STEPS.store(true, SeqCst);
}
