//! What each rank reads in an epoch: a seeded permutation of the shards, dealt out so that every rank
//! gets nearly the same number of samples, and a per-epoch length equal for all ranks (the minimum
//! share; the few samples beyond it are dropped, as `drop_last` drops the tail batch). Every rank thus
//! yields the same number of batches, so multi-GPU steps never wait on a rank that ran dry.

use rand::seq::SliceRandom;
use shard::Index;

use common::seed::{Purpose, rng};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochPlan {
    /// Indices into `index.shards`, in reading order, for this rank.
    pub shards: Vec<usize>,
    /// Samples this rank yields this epoch (the same on every rank).
    pub len: u64,
}

pub fn epoch_plan(index: &Index, seed: u64, epoch: u64, rank: usize, world_size: usize) -> EpochPlan {
    let mut order: Vec<usize> = (0..index.shards.len()).collect();
    order.shuffle(&mut rng(seed, Purpose::ShardOrder, &[epoch]));
    let mut per_rank: Vec<(Vec<usize>, u64)> = vec![(vec![], 0); world_size.max(1)];
    for s in order {
        // Greedy: the next shard goes to the rank with the fewest samples so far (lowest rank on ties).
        let r = (0..per_rank.len()).min_by_key(|&r| (per_rank[r].1, r)).unwrap_or(0);
        per_rank[r].0.push(s);
        per_rank[r].1 += index.shards[s].samples;
    }
    let len = per_rank.iter().map(|r| r.1).min().unwrap_or(0);
    EpochPlan { shards: per_rank.swap_remove(rank.min(per_rank.len() - 1)).0, len }
}
