//! The data side of a run: which shards it reads (a synthetic set is made on first use), how many batches
//! an epoch holds, and the loader's options and runtime.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use common::Cursor;
use loader::LoaderOptions;
use shard::synth::{SynthOptions, SynthRecord};

use crate::parallel::World;
use crate::recipe::config::TrainConfig;

/// The shard directory of a config; the synthetic set is made on first use.
pub fn shards(cfg: &TrainConfig, quiet: bool) -> Result<PathBuf> {
    if let Some(dir) = &cfg.data.shards {
        return Ok(dir.clone());
    }
    let dir = cfg.data.synth_dir.clone();
    make_synth(&dir, &synth_options(cfg, cfg.data.synth_count, cfg.run.seed, "train"), !quiet)?;
    Ok(dir)
}

/// What a checkpoint records of the set its run trained on: the sample count (which sets the steps per
/// epoch, and through them the lr, weight decay and momentum schedules) and a digest of the index's
/// shards (names, counts, content digests), so that a set repacked or regenerated in place between a
/// checkpoint and its resume is seen, not trained on silently with another schedule.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataIdentity {
    pub samples: u64,
    pub shards: usize,
    pub digest: String,
}

/// The [`DataIdentity`] of the shard set at `shards`.
pub fn identity(shards: &Path) -> Result<DataIdentity> {
    use sha2::{Digest, Sha256};
    let index = shard::Index::load(shards)?;
    let mut h = Sha256::new();
    for s in &index.shards {
        h.update(format!("{}\t{}\t{}\n", s.name, s.samples, s.sha256).as_bytes());
    }
    Ok(DataIdentity {
        samples: index.total_samples,
        shards: index.shards.len(),
        digest: hex::encode(&h.finalize()[..16]),
    })
}

/// The held-out synthetic set of a config (another seed, half the size, at least 64 images), made on
/// first use: what the demo's k-NN is scored on.
pub fn synthetic_val(cfg: &TrainConfig) -> Result<PathBuf> {
    let dir = PathBuf::from(format!("{}-val", cfg.data.synth_dir.display()));
    let count = (cfg.data.synth_count / 2).max(64);
    make_synth(&dir, &synth_options(cfg, count, cfg.run.seed.wrapping_add(1_000_003), "val"), false)?;
    Ok(dir)
}

fn synth_options(cfg: &TrainConfig, count: usize, seed: u64, prefix: &str) -> SynthOptions {
    SynthOptions {
        kind: cfg.data.synth_kind,
        count,
        size: cfg.data.synth_size,
        max_shapes: cfg.data.synth_shapes,
        seed,
        prefix: prefix.into(),
        // The sets the trainer has always made: changing these would change every demo's data.
        per_shard: 128,
        quality: 90,
        force: true,
        quiet: true,
        ..SynthOptions::default()
    }
}

/// Marks a folder as the trainer's own synthetic set: the only kind it may replace.
const MARKER: &str = ".made-by-trainer";

/// The synthetic set `opts` describes in `dir`, unless it is there already. A set the trainer made with
/// other settings is remade (and said so); a folder it did not make is never touched.
fn make_synth(dir: &Path, opts: &SynthOptions, announce: bool) -> Result<()> {
    if SynthRecord::is_current(dir, opts) {
        return Ok(());
    }
    let ours = dir.join(MARKER).exists();
    let occupied = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if occupied && !ours {
        let what = match shard::Index::load(dir) {
            Ok(index) => format!("a set of {} images made by `{}`", index.total_samples, index.options.tool),
            Err(_) => "files the trainer did not write".to_string(),
        };
        bail!(
            "{} holds {what}, with other settings than this run's synthetic set: the run would replace it. \
             Point data.synth_dir to another folder, or remove this one",
            dir.display()
        );
    }
    if announce {
        let why = if occupied { " (remade: its settings changed)" } else { "" };
        eprintln!(
            "making a synthetic data set: {} {} images of {} px in {}{why}",
            opts.count,
            opts.kind.name(),
            opts.size,
            dir.display()
        );
    }
    // The mark goes first, so that a set interrupted half way is still known as the trainer's.
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join(MARKER),
        "made by the DenseDINO trainer; it remakes this set when its settings change\n",
    )
    .with_context(|| format!("writing {}", dir.join(MARKER).display()))?;
    shard::synth::synth(dir, opts)
        .with_context(|| format!("making the synthetic set in {}", dir.display()))?;
    Ok(())
}

/// Batches per epoch for this data set, for each of `world_size` ranks (they all get the same number of
/// samples; the loader drops the tail). One process reads every shard, the same count each epoch. Ranks
/// get the minimum share of each epoch's shard deal, which varies from epoch to epoch with shards of
/// unequal size: the run takes the smallest over its epochs and caps every epoch there
/// (`LoaderOptions::epoch_samples`), so that epochs keep one length, as `DistributedSampler`'s.
pub fn iters_per_epoch(cfg: &TrainConfig, shards: &Path, rank: usize, world_size: usize) -> Result<usize> {
    let (_, index) = loader::pipeline::open_index(shards)?;
    let epochs = if world_size > 1 { cfg.run.epochs.max(1) as u64 } else { 1 };
    let samples = (0..epochs)
        .map(|e| loader::plan::epoch_plan(&index, cfg.run.seed, e, rank, world_size).len as usize)
        .min()
        .unwrap_or(0);
    let ipe = samples / cfg.run.batch_size;
    if ipe == 0 && world_size > 1 && index.shards.len() < world_size {
        bail!(
            "{}: {} shard(s) for {world_size} ranks: each rank reads whole shards, so a rank got none. Pack \
             the set into at least {world_size} shards (`shard pack --per-shard N` or `--shard-bytes SIZE`)",
            shards.display(),
            index.shards.len()
        );
    }
    if ipe == 0 {
        bail!(
            "{}: {samples} samples per rank ({world_size} rank(s)), fewer than one batch of {}",
            shards.display(),
            cfg.run.batch_size
        );
    }
    Ok(ipe)
}

/// What a run reads and how far, decided once: its shard set and the set's identity (a resume on
/// another set is refused), the batches of one rank's epoch, the global batch, the steps to reach.
#[derive(Clone, Debug)]
pub struct Plan {
    pub shards: PathBuf,
    pub identity: DataIdentity,
    pub iters_per_epoch: usize,
    /// `run.batch_size` on each of the job's ranks.
    pub global_batch: usize,
    /// `run.epochs` epochs, or `run.max_steps` if fewer.
    pub total_steps: usize,
    rank: usize,
    world_size: usize,
    /// No launcher: one process reads the whole set.
    alone: bool,
}

impl Plan {
    /// The plan of a run of `cfg` as one rank of `world` (a synthetic set is made on first use).
    /// `trained_on`: a resumed run's checkpoint and the set it was written on, which must be this one.
    pub fn new(
        cfg: &TrainConfig,
        world: &World,
        quiet: bool,
        trained_on: Option<(&Path, DataIdentity)>,
    ) -> Result<Self> {
        let shards = shards(cfg, quiet)?;
        let identity = identity(&shards)?;
        if let Some((file, then)) = trained_on {
            same_set(file, &then, &shards, &identity)?;
        }
        let ipe = iters_per_epoch(cfg, &shards, world.rank, world.size)?;
        let total_steps = match cfg.run.max_steps {
            0 => cfg.run.epochs * ipe,
            n => n.min(cfg.run.epochs * ipe),
        };
        Ok(Self {
            shards,
            identity,
            iters_per_epoch: ipe,
            global_batch: cfg.run.batch_size * world.size,
            total_steps,
            rank: world.rank,
            world_size: world.size,
            alone: world.alone(),
        })
    }

    /// The loader's options for this rank from `cursor`: [`loader_options`] and the rank's share.
    pub fn loader_options(&self, cfg: &TrainConfig, cursor: Cursor) -> LoaderOptions {
        let mut o = loader_options(cfg, &self.shards, cursor);
        (o.rank, o.world_size) = (self.rank, self.world_size);
        if !self.alone {
            o.epoch_samples = Some((self.iters_per_epoch * cfg.run.batch_size) as u64);
            // A rank that skips an undecodable image completes its epoch's last batch with copies, so that
            // every rank has the epoch's `ipe` batches (the skip costs that sample, not the job).
            o.pad_epochs = true;
        }
        o
    }
}

/// A resume on another data set than its checkpoint's (`file`, written on `then`) is refused: the steps
/// per epoch, and with them the lr, weight-decay and momentum schedules, would change silently.
fn same_set(file: &Path, then: &DataIdentity, shards: &Path, now: &DataIdentity) -> Result<()> {
    if then == now {
        return Ok(());
    }
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
    )
}

/// The loader's options for one process reading the whole set of `cfg` from `cursor`.
pub fn loader_options(cfg: &TrainConfig, shards: &Path, cursor: Cursor) -> LoaderOptions {
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
    // Checked by `TrainConfig::validate` when the config was loaded.
    o.cache = cfg.data.cache().ok().flatten();
    o
}

/// The loader's runtime: two worker threads for its async task (the collator); the shard reader and the
/// decoders are blocking tasks on tokio's blocking pool.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("loader")
        .enable_all()
        .build()?)
}
