//! The streaming pipeline: shards → samples → views → batches on a bounded async channel.
//!
//! ```text
//!  reader (blocking task)        interleaves `interleave` shards round-robin, seeded shuffle buffer,
//!     │ work channel             numbers samples by seq, skips those before the resume cursor
//!  workers × N (blocking tasks)  decode + views + points, RNG from (seed, epoch, seq)
//!     │ result channel
//!  collator (async task)         reorders by seq, skips bad samples (counted, logged), collates B
//!     │ batch channel (bounded)  back-pressure: a full channel stalls everything behind it
//!  consumer
//! ```
//!
//! Worker count, thread timing and channel depth never change a batch: the sample order is fixed by the
//! reader (which blocks on each shard in turn) and every random draw of a sample by its (epoch, seq).
//! Dropping the receiver shuts everything down: each stage sees its channel closed and returns.
//!
//! Damage: a bad image costs its sample (skipped, counted); a local shard cut short gives its samples up
//! to the cut (reported once); a remote shard that fails its size or digest check, or that the store
//! stops serving, stops the loader ([`Loader::next`] returns why), because it is not the set the run
//! started on and its samples have already streamed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::Rng;

use common::config::ViewsConfig;
use common::seed::{Purpose, rng};
use common::{Batch, Cursor, ViewPixels};
use shard::{Index, Sample, read_samples};

use crate::error::{Error, Result};
use crate::plan::epoch_plan;
use crate::views::{SampleViews, Scratch, make_views};

/// The most samples the shuffle buffer may hold: 100k ImageNet JPEGs are ~11 GB of held bytes, ten
/// times WebDataset's usual buffer; more is a typo, not a plan.
pub const MAX_SHUFFLE_BUFFER: usize = 100_000;

/// The most shards read at once (each holds a thread and a small channel).
pub const MAX_INTERLEAVE: usize = 256;

#[derive(Clone, Debug)]
pub struct LoaderOptions {
    /// A shard directory or its `index.json`.
    pub shards: PathBuf,
    pub views: ViewsConfig,
    pub batch_size: usize,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    /// Decode/augment workers (default: the available cores).
    pub workers: usize,
    /// Capacity of the batch channel, in batches.
    pub capacity: usize,
    /// Samples held by the shuffle buffer (1 = no shuffling beyond the shard order).
    pub shuffle_buffer: usize,
    /// Shards read at once, interleaved sample by sample.
    pub interleave: usize,
    /// Stop after this epoch (exclusive); `None` runs until the receiver is dropped.
    pub end_epoch: Option<u64>,
    /// At most this many samples per epoch and rank. A rank's share of an epoch is the minimum share of
    /// that epoch's shard deal, which varies from epoch to epoch when shards differ in size; a
    /// data-parallel trainer caps every epoch at the smallest, so that all epochs have one length.
    pub epoch_samples: Option<u64>,
    /// Complete an epoch's last batch, when skipped samples left it short, with copies of its own
    /// samples (in order, cycling), as `DistributedSampler` pads an epoch with repeated indices: the
    /// ranks of a data-parallel run each need the same number of batches, and a rank that skipped an
    /// undecodable image would otherwise have one fewer. Off, the short tail is dropped.
    pub pad_epochs: bool,
    /// Where to start: (epoch, samples of that epoch already consumed).
    pub start: Cursor,
    /// Where a remote set's shards are kept between epochs (`None`: streamed every epoch). Unused for a
    /// local folder.
    pub cache: Option<shard::remote::Cache>,
}

impl LoaderOptions {
    pub fn new(shards: impl Into<PathBuf>, views: ViewsConfig, batch_size: usize) -> Self {
        LoaderOptions {
            shards: shards.into(),
            views,
            batch_size,
            seed: 0,
            rank: 0,
            world_size: 1,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            capacity: 4,
            shuffle_buffer: 1000,
            interleave: 4,
            end_epoch: None,
            epoch_samples: None,
            pad_epochs: false,
            start: Cursor::default(),
            cache: None,
        }
    }
}

/// Skipped samples warned about one by one; later ones are only counted (a set with a bad region
/// would otherwise print a line per sample per epoch).
pub const SKIP_WARNINGS: u64 = 5;

/// Counters for the stats line.
#[derive(Default)]
pub struct Stats {
    pub images: AtomicU64,
    pub batches: AtomicU64,
    /// Samples whose image could not be decoded or augmented, counted each time one is read.
    pub skipped: AtomicU64,
    /// Samples where a view took the overlap redraw loop's fallback (a tiny or thin image).
    pub overlap_fallbacks: AtomicU64,
    /// Distinct shards found cut short or unreadable during this run (each counted once, however
    /// many epochs read it).
    pub truncated_shards: AtomicU64,
    /// Samples those shards lack against their index entry (once per shard, not per epoch).
    pub lost_samples: AtomicU64,
    /// Copies that completed a short last batch ([`LoaderOptions::pad_epochs`]).
    pub repeated: AtomicU64,
    /// Set once the collator has passed the last position of the last epoch (`end_epoch`): the batch
    /// channel then closes because the data ended, not because a stage failed.
    pub finished: std::sync::atomic::AtomicBool,
    /// The damaged shards seen so far, so each is reported once.
    damaged: Mutex<std::collections::BTreeSet<String>>,
    /// The first failure that stops the loader ([`Stats::failure`]).
    failure: Mutex<Option<String>>,
    /// Recent per-sample processing times in microseconds (a ring of 4096).
    times_us: Mutex<Vec<u32>>,
    next_time: AtomicU64,
}

impl Stats {
    /// Records a damaged shard; true the first time this shard is reported in this run.
    fn shard_damaged(&self, name: &str, lost: u64) -> bool {
        let first = self.damaged.lock().map(|mut d| d.insert(name.to_string())).unwrap_or(true);
        if first {
            self.truncated_shards.fetch_add(1, Ordering::Relaxed);
            self.lost_samples.fetch_add(lost, Ordering::Relaxed);
        }
        first
    }

    /// Records a failure that stops the loader: the collator sends no batch after it, and
    /// [`Loader::next`] returns it. The first one is kept.
    fn fail(&self, problem: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(problem);
        }
    }

    /// Why the loader stopped before its data ended, if it did for a reason of its data: a remote shard
    /// that could not be read whole or whose bytes are not the ones its index lists.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// The data problems of the run so far, for its end-of-run summary: damaged shards with the samples
    /// they lack and skipped samples; `None` for a clean run.
    pub fn problems(&self) -> Option<String> {
        let plural = |n: u64, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        let (damaged, lost) =
            (self.truncated_shards.load(Ordering::Relaxed), self.lost_samples.load(Ordering::Relaxed));
        let skipped = self.skipped.load(Ordering::Relaxed);
        let mut parts = vec![];
        if damaged > 0 {
            parts.push(format!("{} ({} lost)", plural(damaged, "damaged shard"), plural(lost, "sample")));
        }
        if skipped > 0 {
            parts.push(format!("{} skipped", plural(skipped, "sample")));
        }
        let repeated = self.repeated.load(Ordering::Relaxed);
        if repeated > 0 {
            parts.push(format!("{} repeated to complete an epoch's last batch", plural(repeated, "sample")));
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    fn record_time(&self, us: u32) {
        let i = self.next_time.fetch_add(1, Ordering::Relaxed) as usize % 4096;
        if let Ok(mut t) = self.times_us.lock() {
            if t.len() < 4096 {
                t.push(us);
            } else {
                t[i] = us;
            }
        }
    }

    /// (p50, p99) of recent per-sample decode+augment times, in milliseconds.
    pub fn time_percentiles(&self) -> (f64, f64) {
        let mut t = self.times_us.lock().map(|t| t.clone()).unwrap_or_default();
        if t.is_empty() {
            return (0.0, 0.0);
        }
        t.sort_unstable();
        let p = |q: f64| t[((t.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        (p(0.5), p(0.99))
    }
}

/// A running loader: receive batches from `batches`.
pub struct Loader {
    pub batches: async_channel::Receiver<Batch>,
    pub stats: Arc<Stats>,
    pub index: Arc<Index>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Loader {
    /// The next batch; `Ok(None)` at the end of the data (the last epoch of `end_epoch`), an error when
    /// the loader stopped before it: a data failure ([`Stats::failure`]), or a stage that failed (its
    /// message was printed). A data failure is returned as soon as it is known, even with batches still
    /// queued: those may hold the failed shard's samples.
    pub async fn next(&self) -> Result<Option<Batch>> {
        let failed = |stats: &Stats| stats.failure().map(|problem| Error::Stopped { problem });
        if let Some(e) = failed(&self.stats) {
            return Err(e);
        }
        match self.batches.recv().await {
            Ok(batch) => Ok(Some(batch)),
            // The channel closes when the collator passed the end of the last epoch, or when a stage
            // stopped: only the first is the end of the data, and only without a failure (one found at
            // the last shard may close the channel after the collator has marked the end).
            Err(_) => match failed(&self.stats) {
                Some(e) => Err(e),
                None if self.stats.finished.load(Ordering::Acquire) => Ok(None),
                None => Err(Error::Stopped {
                    problem: "one of its stages failed (see the messages above)".into(),
                }),
            },
        }
    }

    /// Drops the receiving end and waits until every stage has returned (dropping a `Loader` stops it
    /// the same way, without waiting).
    pub async fn shutdown(self) {
        let Loader { batches, tasks, .. } = self;
        batches.close();
        drop(batches);
        for t in tasks {
            let _ = t.await;
        }
    }
}

struct Work {
    epoch: u64,
    seq: u64,
    epoch_len: u64,
    shard: Arc<str>,
    /// `None`: a position of the epoch plan that a damaged shard could not fill (its reader reported it).
    sample: Option<Sample>,
}

struct Done {
    epoch: u64,
    seq: u64,
    epoch_len: u64,
    key: String,
    shard: Arc<str>,
    label: i64,
    /// `Err(Missing)`: a position a damaged shard could not fill (reported by its reader).
    result: std::result::Result<Result<SampleViews>, Missing>,
}

/// A position of the epoch plan that no sample filled.
struct Missing;

/// The shard directory and index from a directory or an `index.json` path; one clear error if absent.
/// A remote set's URL gives the set's URL as the directory, and is checked against one listing of the
/// store (where it can list: not `pipe:`).
pub fn open_index(path: &Path) -> Result<(PathBuf, Index)> {
    if let Some(url) = shard::remote::remote_url(path) {
        return open_remote_index(url);
    }
    if !path.exists() {
        return Err(Error::ShardSet {
            path: path.to_path_buf(),
            problem: "no such shard directory or index".into(),
        });
    }
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let index = Index::load(path)?;
    if index.total_samples == 0 || index.shards.is_empty() {
        return Err(Error::ShardSet { path: dir, problem: "the shard index lists no samples".into() });
    }
    // A missing shard is a set that is not what its index says: training on the rest would run a
    // different (smaller) data set under the same name, so it is refused before anything starts.
    // So is one that cannot be opened (permissions) or is not a regular file (a link to a device): each
    // would otherwise pass as damage found mid-run; so is one longer than its entry. (A shorter one is left
    // to the reader: a cut shard gives the samples before its cut, reported once; `shard verify` checks
    // sizes and digests.)
    let mut missing = vec![];
    let mut unusable = vec![];
    for s in &index.shards {
        let path = dir.join(&s.name);
        if !path.exists() {
            missing.push(s.name.as_str());
            continue;
        }
        let bytes = match shard::format::open_regular(&path) {
            Ok(f) => f.metadata().map_or(0, |m| m.len()),
            Err(e) => {
                unusable.push(e.to_string());
                continue;
            }
        };
        // Longer than its entry: not the shard the index describes (a shorter one is a cut shard, which
        // gives the samples before its cut, reported by its reader).
        if bytes > s.bytes {
            unusable.push(format!(
                "{}: {bytes} bytes where its index entry lists {} (replaced or repacked without its index; \
                 `shard verify` checks it)",
                path.display(),
                s.bytes
            ));
        }
    }
    refuse_damaged_set(&dir, index.shards.len(), &missing, &unusable)?;
    Ok((dir, index))
}

/// A set with shards missing, or present and not as its index lists them, is refused before anything
/// starts, naming them.
fn refuse_damaged_set(dir: &Path, total: usize, missing: &[&str], unusable: &[String]) -> Result<()> {
    let refuse = |problem| Err(Error::ShardSet { path: dir.to_path_buf(), problem });
    if !missing.is_empty() {
        let n = missing.len();
        let verb = if n == 1 { "is" } else { "are" };
        return refuse(format!(
            "{n} of the {total} shards its index.json lists {verb} missing: {}",
            missing.join(", ")
        ));
    }
    if !unusable.is_empty() {
        let n = unusable.len();
        return refuse(format!(
            "{n} of the {total} shards its index.json lists cannot be used: {}",
            unusable.join("; ")
        ));
    }
    Ok(())
}

fn open_remote_index(url: &str) -> Result<(PathBuf, Index)> {
    let set = shard::remote::RemoteSet::shared(url)?;
    let dir = PathBuf::from(&set.url);
    let index = Index::load(Path::new(url))?;
    if index.total_samples == 0 || index.shards.is_empty() {
        return Err(Error::ShardSet { path: dir, problem: "the shard index lists no samples".into() });
    }
    let names: Vec<&str> = index.shards.iter().map(|s| s.name.as_str()).collect();
    if let Some(sizes) = set.sizes(&names)? {
        let missing: Vec<&str> =
            names.iter().zip(&sizes).filter(|(_, size)| size.is_none()).map(|(n, _)| *n).collect();
        let unusable: Vec<String> = index
            .shards
            .iter()
            .zip(&sizes)
            .filter_map(|(s, size)| {
                let size = (*size)?;
                (size != s.bytes).then(|| {
                    format!(
                        "{}: {size} bytes where its index entry lists {} (replaced or repacked without its \
                         index; `shard verify` checks it)",
                        s.name, s.bytes
                    )
                })
            })
            .collect();
        refuse_damaged_set(&dir, index.shards.len(), &missing, &unusable)?;
    }
    Ok((dir, index))
}

/// Starts the pipeline on the current tokio runtime.
pub fn start(opts: LoaderOptions) -> Result<Loader> {
    opts.views.validate()?;
    let invalid = |option, problem: String| Err(Error::InvalidOption { option, problem });
    if opts.batch_size == 0 {
        return invalid("batch_size", "must be at least 1, got 0".into());
    }
    if !(1..=MAX_SHUFFLE_BUFFER).contains(&opts.shuffle_buffer) {
        let problem = format!("{} is not within 1..={MAX_SHUFFLE_BUFFER}", opts.shuffle_buffer);
        return invalid("shuffle_buffer", problem);
    }
    if !(1..=MAX_INTERLEAVE).contains(&opts.interleave) {
        return invalid("interleave", format!("{} is not within 1..={MAX_INTERLEAVE}", opts.interleave));
    }
    if opts.world_size == 0 {
        return invalid("world_size", "must be at least 1, got 0".into());
    }
    if opts.rank >= opts.world_size {
        return invalid("rank", format!("{} is not below world_size {}", opts.rank, opts.world_size));
    }
    let (dir, index) = open_index(&opts.shards)?;
    let first = rank_plan(&opts, &index, opts.start.epoch);
    if first.len < opts.batch_size as u64 {
        return Err(Error::ShardSet {
            path: dir,
            problem: format!(
                "rank {} of {} gets {} samples per epoch, fewer than one batch of {}",
                opts.rank, opts.world_size, first.len, opts.batch_size
            ),
        });
    }
    let index = Arc::new(index);
    let stats = Arc::new(Stats::default());
    if opts.end_epoch.is_some_and(|end| opts.start.epoch >= end) {
        stats.finished.store(true, Ordering::Release); // started at the end: nothing left to read
    }
    let workers = opts.workers.max(1);
    let (work_tx, work_rx) = async_channel::bounded::<Work>(workers * 4);
    let (done_tx, done_rx) = async_channel::bounded::<Done>(workers * 4);
    let (batch_tx, batch_rx) = async_channel::bounded::<Batch>(opts.capacity.max(1));
    let opts = Arc::new(opts);

    let mut tasks = vec![];
    {
        let (opts, index, dir, stats) = (opts.clone(), index.clone(), dir.clone(), stats.clone());
        tasks.push(tokio::task::spawn_blocking(move || read_loop(&opts, &index, &dir, &stats, work_tx)));
    }
    for _ in 0..workers {
        let (opts, rx, tx, stats) = (opts.clone(), work_rx.clone(), done_tx.clone(), stats.clone());
        tasks.push(tokio::task::spawn_blocking(move || work_loop(&opts, rx, tx, &stats)));
    }
    drop((work_rx, done_tx));
    tasks.push(tokio::spawn(collate_loop(opts.clone(), done_rx, batch_tx, stats.clone())));
    Ok(Loader { tasks, batches: batch_rx, stats, index })
}

/// Reads one shard on its own thread into a small channel, so the reader can pull samples from several
/// shards in a fixed round-robin order. A damaged folder's shard gives what it has; it is reported once
/// per run (not once per epoch) with the samples it lacks against its index entry (`listed`). A remote
/// shard is read to its end and checked against its entry; any problem with it stops the loader
/// ([`Stats::failure`]).
fn spawn_shard_reader(
    dir: &Path,
    info: &shard::format::ShardInfo,
    name: Arc<str>,
    cache: Option<shard::remote::Cache>,
    stats: Arc<Stats>,
) -> std::sync::mpsc::Receiver<Sample> {
    let (tx, rx) = std::sync::mpsc::sync_channel(8);
    let path = dir.join(&*name);
    let (dir, info, listed) = (dir.to_path_buf(), info.clone(), info.samples);
    std::thread::spawn(move || {
        let (mut stopped, mut sent, mut over) = (false, 0u64, false);
        let remote = shard::remote::remote_url(&dir).is_some();
        // What went wrong, as one message naming the file, and the samples the shard gave.
        let (error, delivered) = match shard::remote::open_tar(&dir, &info, cache.as_ref()) {
            Err(e) => (e.to_string(), 0),
            Ok(mut reader) => {
                let read = read_samples(&mut reader, |s| {
                    // The epoch plan is the index's: a shard holding more than its entry lists gives
                    // only those, or it would crowd the other shards out of the epoch.
                    if sent == listed {
                        over = true;
                        return false;
                    }
                    sent += 1;
                    stopped = tx.send(s).is_err();
                    !stopped
                });
                if stopped {
                    return; // left early by its reader: nothing to report
                }
                // A remote shard's bytes to their end: its size and digest against the index.
                let samples = match &read {
                    Ok(n) => *n,
                    Err(shard::Error::Shard { samples, .. }) => *samples,
                    Err(_) => 0,
                };
                let problem = match read_outcome(reader.finish(), read, &path) {
                    Err(problem) => Some(problem),
                    Ok(_) if over => {
                        if stats.shard_damaged(&name, 0) {
                            eprintln!(
                                "warning: {}: it holds more samples than the {listed} its index.json lists; \
                                 only those are read (the index is not this shard's: `shard verify` names \
                                 the difference; repack the set to use them all)",
                                path.display()
                            );
                        }
                        None
                    }
                    // An intact tar with fewer samples than the index lists: replaced, or packed by
                    // another tool.
                    Ok(n) if n < listed => Some(format!(
                        "{}: it holds {n} samples where its index.json lists {listed}",
                        path.display()
                    )),
                    Ok(_) => None,
                };
                match problem {
                    Some(p) => (p, samples),
                    None => return,
                }
            }
        };
        if remote {
            // A remote shard is checked against its index's size and SHA-256 as it streams, and its
            // client has already retried what can be retried: what is left is a shard changed or
            // corrupted in the store (or its cached copy on disk), or a store that stopped answering.
            // Unlike a folder's shard cut short (whose samples before the cut are good), that is not the
            // set the run was started on, and its samples have streamed: the loader stops, and the
            // trainer with it, with a non-zero status.
            let used = match delivered {
                0 => String::new(),
                n => format!(" Its first {n} samples were used as they streamed, before that showed."),
            };
            stats.fail(format!("{error}.{used} `shard verify '{}'` checks the whole set", dir.display()));
            return;
        }
        let lost = listed.saturating_sub(delivered);
        if stats.shard_damaged(&name, lost) {
            eprintln!(
                "warning: {error}; {lost} of its {listed} samples are lost (reported once; counted in the \
                 stats line)"
            );
        }
    });
    rx
}

/// This rank's plan for `epoch`, its length capped at `opts.epoch_samples`.
fn rank_plan(opts: &LoaderOptions, index: &Index, epoch: u64) -> crate::plan::EpochPlan {
    let mut plan = epoch_plan(index, opts.seed, epoch, opts.rank, opts.world_size);
    plan.len = opts.epoch_samples.map_or(plan.len, |cap| plan.len.min(cap));
    plan
}

fn read_loop(
    opts: &LoaderOptions,
    index: &Index,
    dir: &Path,
    stats: &Arc<Stats>,
    work: async_channel::Sender<Work>,
) {
    let mut epoch = opts.start.epoch;
    while opts.end_epoch.is_none_or(|end| epoch < end) {
        let plan = rank_plan(opts, index, epoch);
        let skip = if epoch == opts.start.epoch { opts.start.samples } else { 0 };
        let mut pending = plan.shards.iter().map(|&i| &index.shards[i]);
        let mut open: Vec<(Arc<str>, std::sync::mpsc::Receiver<Sample>)> = vec![];
        let mut next_slot = 0usize;
        let mut shuffle_rng = rng(opts.seed, Purpose::ShuffleBuffer, &[epoch]);
        let mut buffer: Vec<(Arc<str>, Sample)> = Vec::with_capacity(opts.shuffle_buffer);
        let mut seq = 0u64;
        // Emits one sample; false once the consumer is gone or the epoch is full.
        let emit = |item: (Arc<str>, Sample), seq: &mut u64| -> bool {
            if *seq >= plan.len {
                return false;
            }
            let s = *seq;
            *seq += 1;
            if s < skip {
                return true;
            }
            work.send_blocking(Work {
                epoch,
                seq: s,
                epoch_len: plan.len,
                shard: item.0,
                sample: Some(item.1),
            })
            .is_ok()
        };
        loop {
            while open.len() < opts.interleave.max(1) {
                match pending.next() {
                    Some(info) => {
                        let name: Arc<str> = Arc::from(info.name.as_str());
                        let rx =
                            spawn_shard_reader(dir, info, name.clone(), opts.cache.clone(), stats.clone());
                        open.push((name, rx));
                    }
                    None => break,
                }
            }
            if open.is_empty() {
                break;
            }
            let slot = next_slot % open.len();
            match open[slot].1.recv() {
                Ok(sample) => {
                    let item = (open[slot].0.clone(), sample);
                    next_slot = slot + 1;
                    buffer.push(item);
                    if buffer.len() < opts.shuffle_buffer.max(1) {
                        continue;
                    }
                    let pick = shuffle_rng.random_range(0..buffer.len());
                    if !emit(buffer.swap_remove(pick), &mut seq) {
                        break;
                    }
                }
                Err(_) => {
                    // The shard is done: its slot goes to the next shard, keeping the rotation position.
                    open.remove(slot);
                    next_slot = slot;
                }
            }
        }
        while !buffer.is_empty() && seq < plan.len {
            let pick = shuffle_rng.random_range(0..buffer.len());
            if !emit(buffer.swap_remove(pick), &mut seq) {
                break;
            }
        }
        if work.is_closed() {
            return;
        }
        if seq < plan.len {
            // Damaged shards delivered fewer samples than the index promised (already reported and
            // counted by their readers); the collator must still see the epoch end, so the missing
            // positions are sent without a sample, and it passes over them silently.
            while seq < plan.len {
                let s = seq;
                seq += 1;
                if s >= skip {
                    let w = Work { epoch, seq: s, epoch_len: plan.len, shard: Arc::from(""), sample: None };
                    if work.send_blocking(w).is_err() {
                        return;
                    }
                }
            }
        }
        epoch += 1;
    }
}

fn work_loop(
    opts: &LoaderOptions,
    rx: async_channel::Receiver<Work>,
    tx: async_channel::Sender<Done>,
    stats: &Stats,
) {
    let mut scratch = Scratch::default();
    while let Ok(w) = rx.recv_blocking() {
        let Work { epoch, seq, epoch_len, shard, sample } = w;
        let done = match sample {
            None => {
                Done { epoch, seq, epoch_len, key: String::new(), shard, label: -1, result: Err(Missing) }
            }
            Some(sample) => {
                let t0 = Instant::now();
                let label = sample
                    .get("cls")
                    .and_then(|c| std::str::from_utf8(c).ok()?.trim().parse().ok())
                    .unwrap_or(-1);
                let result =
                    match sample.get("jpg").or_else(|| sample.get("png")).or_else(|| sample.get("jpeg")) {
                        Some(bytes) => make_views(bytes, &opts.views, opts.seed, epoch, seq, &mut scratch),
                        None => Err(Error::image("no image member (jpg, png or jpeg)")),
                    };
                if result.as_ref().is_ok_and(|v| v.overlap_fallback) {
                    stats.overlap_fallbacks.fetch_add(1, Ordering::Relaxed);
                }
                stats.record_time(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                Done { epoch, seq, epoch_len, key: sample.key, shard, label, result: Ok(result) }
            }
        };
        if tx.send_blocking(done).is_err() {
            return;
        }
    }
}

struct Pending {
    views: Vec<Vec<u8>>,
    teacher: Vec<Vec<f32>>,
    student: Vec<Vec<f32>>,
    flips: Vec<bool>,
    labels: Vec<i64>,
    keys: Vec<String>,
    seq: Vec<u64>,
}

impl Pending {
    fn new(cfg: &ViewsConfig, b: usize) -> Self {
        let (g, v, m) = (cfg.num_global, cfg.num_views(), cfg.num_points);
        Pending {
            views: (0..v).map(|i| Vec::with_capacity(b * 3 * cfg.view_size(i).pow(2))).collect(),
            teacher: vec![Vec::with_capacity(b * v * m * 2); g],
            student: vec![Vec::with_capacity(b * g * m * 2); v],
            flips: Vec::with_capacity(b * v),
            labels: Vec::with_capacity(b),
            keys: Vec::with_capacity(b),
            seq: Vec::with_capacity(b),
        }
    }

    fn push(&mut self, label: i64, key: String, seq: u64, s: SampleViews) {
        for (dst, src) in self.views.iter_mut().zip(&s.views) {
            dst.extend_from_slice(src);
        }
        for (dst, src) in self.teacher.iter_mut().zip(&s.points.teacher) {
            dst.extend_from_slice(src);
        }
        for (dst, src) in self.student.iter_mut().zip(&s.points.student) {
            dst.extend_from_slice(src);
        }
        self.flips.extend_from_slice(&s.flips);
        self.labels.push(label);
        self.keys.push(key);
        self.seq.push(seq);
    }

    /// Fills up to `b` samples with copies of the ones held, in order, cycling; the number of copies.
    fn repeat_to(&mut self, b: usize) -> usize {
        let n = self.labels.len();
        if n == 0 || n >= b {
            return 0;
        }
        fn cycle<T: Clone>(v: &mut Vec<T>, n: usize, b: usize) {
            let chunk = v.len() / n;
            for j in 0..b - n {
                let i = j % n;
                v.extend_from_within(i * chunk..(i + 1) * chunk);
            }
        }
        self.views.iter_mut().for_each(|v| cycle(v, n, b));
        self.teacher.iter_mut().chain(self.student.iter_mut()).for_each(|v| cycle(v, n, b));
        cycle(&mut self.flips, n, b);
        cycle(&mut self.labels, n, b);
        cycle(&mut self.keys, n, b);
        cycle(&mut self.seq, n, b);
        b - n
    }

    fn into_batch(self, cfg: &ViewsConfig, b: usize, epoch: u64, cursor: Cursor) -> Batch {
        Batch {
            batch_size: b,
            num_points: cfg.num_points,
            views: self
                .views
                .into_iter()
                .enumerate()
                .map(|(v, data)| ViewPixels { size: cfg.view_size(v), data })
                .collect(),
            teacher_points: self.teacher,
            student_points: self.student,
            flips: self.flips,
            labels: self.labels,
            keys: self.keys,
            seq: self.seq,
            epoch,
            cursor,
        }
    }

    /// Drops the samples but keeps the buffers (the incomplete tail of an epoch).
    fn clear(&mut self) {
        self.views.iter_mut().for_each(Vec::clear);
        self.teacher.iter_mut().chain(self.student.iter_mut()).for_each(Vec::clear);
        self.flips.clear();
        self.labels.clear();
        self.keys.clear();
        self.seq.clear();
    }
}

async fn collate_loop(
    opts: Arc<LoaderOptions>,
    rx: async_channel::Receiver<Done>,
    tx: async_channel::Sender<Batch>,
    stats: Arc<Stats>,
) {
    let cfg = &opts.views;
    let b = opts.batch_size;
    let mut reorder: BTreeMap<(u64, u64), Done> = BTreeMap::new();
    let mut next = (opts.start.epoch, opts.start.samples);
    let mut pending = Pending::new(cfg, b);
    let mut warned = 0u64;
    while let Ok(done) = rx.recv().await {
        reorder.insert((done.epoch, done.seq), done);
        while let Some(d) = reorder.remove(&next) {
            let Done { epoch, seq, epoch_len, key, shard, label, result } = d;
            match result {
                Ok(Ok(views)) => pending.push(label, key, seq, views),
                Ok(Err(e)) => {
                    stats.skipped.fetch_add(1, Ordering::Relaxed);
                    warned += 1;
                    if warned <= SKIP_WARNINGS {
                        eprintln!(
                            "warning: skipped sample {key} of shard {shard} (epoch {epoch}, seq {seq}): {e}"
                        );
                    } else if warned == SKIP_WARNINGS + 1 {
                        eprintln!(
                            "warning: further skipped samples are not shown; they are counted in the stats line"
                        );
                    }
                }
                Err(Missing) => {}
            }
            next = (epoch, seq + 1);
            let left = epoch_len - (seq + 1);
            let mut batch = None;
            if pending.labels.len() == b {
                // Fewer positions than a batch left: unless it is padded, the epoch's tail can never fill
                // a batch and is dropped, so the cursor already points at the next epoch.
                let cursor = if left == 0 || (!opts.pad_epochs && left < b as u64) {
                    Cursor { epoch: epoch + 1, samples: 0 }
                } else {
                    Cursor { epoch, samples: seq + 1 }
                };
                let full = std::mem::replace(&mut pending, Pending::new(cfg, b));
                batch = Some(full.into_batch(cfg, b, epoch, cursor));
            } else if left == 0 && opts.pad_epochs && !pending.labels.is_empty() {
                let copies = pending.repeat_to(b);
                stats.repeated.fetch_add(copies as u64, Ordering::Relaxed);
                let full = std::mem::replace(&mut pending, Pending::new(cfg, b));
                batch = Some(full.into_batch(cfg, b, epoch, Cursor { epoch: epoch + 1, samples: 0 }));
            }
            if let Some(batch) = batch {
                if stats.failure().is_some() {
                    // Closes the batch channel: its reader learns why from `Loader::next`.
                    rx.close();
                    return;
                }
                stats.images.fetch_add(b as u64, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                if tx.send(batch).await.is_err() {
                    rx.close();
                    return;
                }
            }
            if left == 0 {
                // Epoch end: the incomplete tail batch (if not padded) is dropped.
                pending.clear();
                next = (epoch + 1, 0);
                if opts.end_epoch == Some(epoch + 1) {
                    stats.finished.store(true, Ordering::Release);
                }
            }
        }
    }
}

/// The first `limit` images (`jpg` members) of a shard set in index order, for the examples that time
/// or digest the view pipeline on real photos.
pub fn first_images(path: &Path, limit: usize) -> Result<Vec<Vec<u8>>> {
    let (dir, index) = open_index(path)?;
    let mut images = vec![];
    for_each_sample(&dir, &index, |s| {
        images.extend(s.get("jpg").map(<[u8]>::to_vec));
        images.len() < limit
    })?;
    Ok(images)
}

/// Reads the shard directory's samples in index order without views (the decode-only benchmark, the
/// evaluations). A remote set's shards are streamed, uncached, and read to their end, where their size
/// and digest are checked: a remote shard that fails is an error (as in the training loader), a folder's
/// shard cut short a warning.
pub fn for_each_sample(dir: &Path, index: &Index, mut f: impl FnMut(Sample) -> bool) -> Result<()> {
    let remote = shard::remote::remote_url(dir).is_some();
    for s in &index.shards {
        let path = dir.join(&s.name);
        let mut reader = shard::remote::open_tar(dir, s, None)?;
        let mut go = true;
        let read = read_samples(&mut reader, |x| {
            go = f(x);
            go
        });
        if !go {
            break;
        }
        match read_outcome(reader.finish(), read, &path) {
            Ok(_) => {}
            Err(problem) if remote => return Err(Error::RemoteShard { problem }),
            Err(problem) => eprintln!("warning: {problem}; the shard ends there"),
        }
    }
    Ok(())
}

/// What a shard's read (`read`: its samples, or where its tar broke) and the check at the end of its
/// bytes (`verdict`: [`shard::remote::TarReader::finish`]) say together: the samples, or the problem
/// naming the file. Bytes that are not the index's are the cause, whatever the tar reader made of them;
/// a failed source read that the tar reader already reported is said once.
fn read_outcome(
    verdict: std::io::Result<()>,
    read: shard::Result<u64>,
    path: &Path,
) -> std::result::Result<u64, String> {
    let named = |e: std::io::Error| {
        let (text, file) = (e.to_string(), path.display().to_string());
        if text.contains(&file) { text } else { format!("{file}: {text}") }
    };
    match (verdict, read) {
        (Err(m), _) if shard::remote::is_mismatch(&m) => Err(m.to_string()),
        (Err(e), Ok(_)) => Err(named(e)),
        (Err(e), Err(t)) => {
            let (t, e) = (t.in_file(path).to_string(), e.to_string());
            Err(if t.contains(&e) { t } else { format!("{t}; then: {e}") })
        }
        (Ok(()), Err(t)) => Err(t.in_file(path).to_string()),
        (Ok(()), Ok(n)) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_views() -> ViewsConfig {
        ViewsConfig { global_size: 32, local_size: 16, ..ViewsConfig::paper_main() }
    }

    /// `start` refuses before spawning anything, with a message naming the path or the option.
    fn refusal(opts: LoaderOptions) -> String {
        start(opts).err().expect("start must refuse").to_string()
    }

    #[test]
    fn refusals_name_the_path_or_the_option() {
        let empty = tempfile::tempdir().unwrap();
        let err = refusal(LoaderOptions::new(empty.path(), small_views(), 8));
        let index = empty.path().join(shard::index::INDEX_FILE);
        assert!(err.contains(&format!("{}: cannot read the shard index", index.display())), "{err}");
        let err = refusal(LoaderOptions::new("/no/such/dir", small_views(), 8));
        assert!(err.contains("/no/such/dir: no such shard directory or index"), "{err}");
        let err = refusal(LoaderOptions::new(empty.path(), small_views(), 0));
        assert!(err.contains("batch_size: must be at least 1"), "{err}");
        let mut opts = LoaderOptions::new(empty.path(), small_views(), 8);
        (opts.rank, opts.world_size) = (2, 2);
        assert!(refusal(opts).contains("rank: 2 is not below world_size 2"));
        let views =
            ViewsConfig { num_points: 3, sampling_mode: common::config::SamplingMode::Grid, ..small_views() };
        let err = refusal(LoaderOptions::new(empty.path(), views, 8));
        assert!(err.contains("views.num_points = 3"), "{err}");

        let set = tempfile::tempdir().unwrap();
        let synth = shard::synth::SynthOptions { count: 4, size: 16, quiet: true, ..Default::default() };
        shard::synth::synth(set.path(), &synth).unwrap();
        let err = refusal(LoaderOptions::new(set.path(), small_views(), 8));
        assert!(err.contains(&format!("{}: rank 0 of 1 gets 4 samples", set.path().display())), "{err}");
    }

    /// Shards of 48 and 16 samples dealt to 2 ranks give each rank 16 samples (the minimum share);
    /// capped at 8 per epoch, each epoch ends after one batch of 8, whose cursor says so.
    #[test]
    fn epochs_are_capped_at_epoch_samples() {
        let set = tempfile::tempdir().unwrap();
        let synth = shard::synth::SynthOptions {
            count: 64,
            size: 16,
            per_shard: 48,
            quiet: true,
            ..Default::default()
        };
        shard::synth::synth(set.path(), &synth).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let batches = |cap: Option<u64>| -> Vec<(u64, Cursor)> {
            let mut o = LoaderOptions::new(set.path(), small_views(), 8);
            (o.rank, o.world_size, o.end_epoch, o.epoch_samples, o.workers) = (1, 2, Some(2), cap, 1);
            let loader = rt.block_on(async { start(o) }).unwrap();
            let mut out = vec![];
            while let Ok(b) = rt.block_on(loader.batches.recv()) {
                out.push((b.epoch, b.cursor));
            }
            rt.block_on(loader.shutdown());
            out
        };
        assert_eq!(batches(None).len(), 4, "16 samples per epoch: 2 batches of 8");
        let capped = batches(Some(8));
        let want = vec![(0, Cursor { epoch: 1, samples: 0 }), (1, Cursor { epoch: 2, samples: 0 })];
        assert_eq!(capped, want);
    }
}
