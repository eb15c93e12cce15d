//! A run's folder: a fresh one (`runs/name`, or `-2`, `-3`, … beside a run), a resumed one (its newest
//! intact checkpoint, its stored config), a start-over of a run killed before its first checkpoint, or a
//! branch from an older checkpoint into a new folder. The folder is locked while a process runs in it,
//! and its config and checkpoints are written through a rename, so a crash never leaves one that looks
//! whole (a branch is a run only once its checkpoint is).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::parallel::World;
use crate::recipe::config::{DeviceSpec, TrainConfig};
use crate::run::{checkpoint, data};

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

/// An opened run: its config (resolved, written into the folder), its folder, the checkpoint it
/// continues from (file and bytes), and the folder's lock (held until dropped; rank 0's only).
pub(super) struct Opened {
    pub cfg: TrainConfig,
    pub dir: PathBuf,
    pub resume: Option<(PathBuf, Vec<u8>)>,
    pub lock: Option<std::fs::File>,
}

/// [`open`] on rank 0 (and the synthetic set made there, when the config uses one), then the others told
/// where the run is: they read the config rank 0 wrote and the checkpoint it chose, so every rank runs
/// the same config from the same state. A failure on rank 0 stops every rank.
/// `device`: the command line's `--device`, over the config's; `quiet`: no messages.
pub(super) fn open_across(
    world: &World,
    start: Start,
    device: Option<DeviceSpec>,
    quiet: bool,
) -> Result<Opened> {
    #[derive(serde::Serialize, serde::Deserialize)]
    enum Told {
        Run { dir: PathBuf, checkpoint: Option<PathBuf> },
        Failed(String),
    }
    if world.alone() {
        return open(start, device, quiet, world);
    }
    if world.rank == 0 {
        let opened = open(start, device, quiet, world).and_then(|o| data::shards(&o.cfg, quiet).map(|_| o));
        let told = match &opened {
            Ok(o) => Told::Run { dir: o.dir.clone(), checkpoint: o.resume.as_ref().map(|(f, _)| f.clone()) },
            Err(e) => Told::Failed(format!("{e:#}")),
        };
        world.broadcast(serde_json::to_vec(&told)?)?;
        return opened;
    }
    match serde_json::from_slice(&world.broadcast(Vec::new())?)? {
        Told::Failed(e) => bail!("rank {}: rank 0 could not open the run: {e}", world.rank),
        Told::Run { dir, checkpoint } => open_as_told(world, dir, checkpoint),
    }
}

/// A rank other than 0: the run rank 0 opened in `dir`, from its `checkpoint`.
fn open_as_told(world: &World, dir: PathBuf, checkpoint: Option<PathBuf>) -> Result<Opened> {
    let stored = dir.join("config.toml");
    let text = std::fs::read_to_string(&stored).with_context(|| format!("reading {}", stored.display()))?;
    let cfg = TrainConfig::from_resolved(&text).with_context(|| stored.display().to_string())?;
    let resume = match checkpoint {
        Some(file) => {
            let bytes = std::fs::read(&file).with_context(|| {
                format!(
                    "rank {}: reading {} (rank 0's checkpoint; is the run folder on a file system every machine \
                     shares?)",
                    world.rank,
                    file.display()
                )
            })?;
            Some((file, bytes))
        }
        None => None,
    };
    Ok(Opened { cfg, dir, resume, lock: None })
}

/// [`Opened`] for this process alone. Writes the resolved config into the folder.
fn open(start: Start, device: Option<DeviceSpec>, quiet: bool, world: &World) -> Result<Opened> {
    let Found { mut cfg, dir, resume, lock, continued } = match start {
        Start::Fresh(cfg) => {
            Found { dir: fresh_dir(cfg.run_dir()), cfg, resume: None, lock: None, continued: None }
        }
        Start::Resume { from, sets, branch } if branch.is_none() && not_yet_checkpointed(&from) => {
            start_over(from, &sets, quiet)?
        }
        Start::Resume { from, sets, branch } => continue_from(&from, &sets, branch, world, quiet)?,
    };
    if let Some(d) = device {
        cfg.run.device = d;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // A branch's new folder is locked before anything is copied into it.
    let lock = match lock {
        Some(lock) => lock,
        None => lock_run(&dir)?,
    };
    // What a crashed process left half written is of no use and may hold the space the next write needs
    // (no other process writes here: the lock is held).
    for p in checkpoint::sweep_partials(&dir.join("checkpoints")) {
        if !quiet {
            eprintln!("removed {}, left by an interrupted checkpoint write", p.display());
        }
    }
    if let (Some(ckpt_cfg), Some((file, _))) = (&continued, &resume) {
        check_stored_config(&dir, ckpt_cfg, file)?;
    }
    // Through a temporary file and a rename: a run killed here keeps a whole config (the old or the new),
    // which a resume before the first checkpoint reads.
    shard::format::write_atomic(&dir.join("config.toml"), cfg.to_toml().as_bytes())?;
    Ok(Opened { cfg, dir, resume, lock: Some(lock) })
}

/// Where [`open`]'s start leads, before the folder is locked and written.
struct Found {
    cfg: TrainConfig,
    dir: PathBuf,
    resume: Option<(PathBuf, Vec<u8>)>,
    /// A branch's lock, taken before anything was copied into its folder.
    lock: Option<std::fs::File>,
    /// The config of the checkpoint a resume continues from.
    continued: Option<TrainConfig>,
}

/// A run killed before its first checkpoint: nothing to continue from, so it starts over in its own
/// folder with its stored config (a job script can always pass --resume).
fn start_over(from: PathBuf, sets: &[String], quiet: bool) -> Result<Found> {
    let stored = from.join("config.toml");
    let text = std::fs::read_to_string(&stored).with_context(|| format!("reading {}", stored.display()))?;
    let cfg = TrainConfig::from_resolved(&text)
        .and_then(|c| c.with_run_overrides(sets))
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
    if !quiet {
        eprintln!("{}: no checkpoint yet; starting the run over from step 0", from.display());
    }
    Ok(Found { cfg, dir: from, resume: None, lock: None, continued: None })
}

/// A run continued from its newest intact checkpoint (or `from`, a checkpoint file), in its own folder
/// or, `branch`, in a new one.
fn continue_from(
    from: &Path,
    sets: &[String],
    branch: Option<PathBuf>,
    world: &World,
    quiet: bool,
) -> Result<Found> {
    let (file, bytes) = checkpoint::latest(from)?;
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
    let cfg = meta.config.clone().with_run_overrides(sets)?;
    let continued = Some(meta.config.clone());
    // RUN/checkpoints/ckpt-N.safetensors → RUN
    let dir = file.parent().and_then(Path::parent).map_or_else(|| from.to_path_buf(), Path::to_path_buf);
    if let Some(new) = branch {
        let (file, lock) = start_branch(&dir, &file, meta.it, &new)?;
        return Ok(Found { cfg, dir: new, resume: Some((file, bytes)), lock: Some(lock), continued });
    }
    match newest_intact(&dir.join("checkpoints"), meta.it, quiet)? {
        Some(newest) if newest > meta.it => bail!(
            "{} is not the newest checkpoint of {} (step {newest} is): resuming from it there would \
             mix two histories. Continue from it in a new run folder with --branch NEW_FOLDER (its \
             history up to step {} goes with it), or resume {} to continue from step {newest}",
            file.display(),
            dir.display(),
            meta.it,
            dir.display()
        ),
        _ => Ok(Found { cfg, dir, resume: Some((file, bytes)), lock: None, continued }),
    }
}

/// A resumed run's stored `config.toml` against its checkpoint's config (`ckpt_cfg`, of checkpoint
/// `file`). Edited by hand since the run wrote it (beyond `run.*`, which a resume may change with
/// --set), it does not change the run, which continues with its checkpoint's config: the edit is kept
/// beside it and said, not overwritten silently. Another run's config is an error.
fn check_stored_config(dir: &Path, ckpt_cfg: &TrainConfig, file: &Path) -> Result<()> {
    let stored = dir.join("config.toml");
    let Ok(text) = std::fs::read_to_string(&stored) else { return Ok(()) };
    let parsed = TrainConfig::from_resolved(&text).ok();
    // Another run's checkpoint copied into this folder: it would switch the model and mix two
    // histories in one metrics.jsonl. Its name or seed says so (a resume cannot change either).
    if let Some(c) = &parsed
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
            dir.join("checkpoints").display()
        );
    }
    let same = parsed.is_some_and(|c| TrainConfig { run: ckpt_cfg.run.clone(), ..c } == *ckpt_cfg);
    if !same {
        let kept = dir.join("config.toml.edited");
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
    Ok(())
}

/// Takes the run folder's lock (`RUN/.lock`, an advisory `flock` the kernel drops when the process ends,
/// however it ends): two processes writing one run would interleave their histories and remove each
/// other's checkpoint writes.
pub fn lock_run(run_dir: &Path) -> Result<std::fs::File> {
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
    use crate::run::metrics::Record;
    let records = crate::run::metrics::read(&run.join("metrics.jsonl")).ok()?;
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
    for events in crate::run::tensorboard::files(run) {
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
