//! The point-correspondence metric (`trainer eval match`): does a backbone's patch feature find the same
//! place of the image in another view? It needs no labels and measures directly what DenseDINO's reference
//! loss trains (the same point's token agreeing across views).
//!
//! For each held-out image the loader makes its two global views with the training config's geometry and
//! photometric draws (`loader::views::make_views`, seeded by the image's position, so every backbone sees
//! the same pairs). For each patch centre of view A that lies inside view B, the patch of B that holds it
//! is the true partner; the prediction is the patch of B whose feature (final-norm patch token) has the
//! highest cosine similarity with A's. We count a hit when the prediction is the true patch or one of its
//! 8 neighbours ("within one patch"), and report the exact rate beside it. Both directions (A→B, B→A)
//! count. A random guess is right within one patch for at most 9 of the g² patches.
//!
//! Beside it, the reference tokens themselves: [`REF_POINTS`] points drawn in the pair's overlap (the
//! loader's own draw), each made a reference token in both views; a hit is a token of view A whose most
//! similar token of view B is its own point's (chance 1 in [`REF_POINTS`]). That is what the reference
//! loss trains; the patch metric is what a dense probe reads.
//!
//! And where those tokens look: in every block, the share of a reference token's attention over the
//! patches that falls within one patch of its point ([`RefAttention`]), against the share a uniform
//! attention would give the same patches. A token that reads its point has the first well above the
//! second; one that reads the whole image has them close.

use std::path::Path;

use anyhow::{Result, bail};
use burn::tensor::Device;

use common::config::ViewsConfig;
use common::geometry::{CropBox, to_image, to_view};

use crate::model::params::host;
use crate::model::vit::{self, Vit};

/// Hits and totals of the metric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatchCounts {
    /// Points whose prediction is within one patch (Chebyshev distance ≤ 1) of the true one.
    pub within_one: usize,
    /// Points whose prediction is the true patch.
    pub exact: usize,
    /// Patch centres of A that lie inside B (the points scored).
    pub points: usize,
}

impl MatchCounts {
    pub fn add(&mut self, o: MatchCounts) {
        self.within_one += o.within_one;
        self.exact += o.exact;
        self.points += o.points;
    }

    pub fn within_one_rate(&self) -> f64 {
        self.within_one as f64 / self.points.max(1) as f64
    }

    pub fn exact_rate(&self) -> f64 {
        self.exact as f64 / self.points.max(1) as f64
    }
}

/// Reference points per view pair for the reference-token retrieval.
pub const REF_POINTS: usize = 16;

/// Hits of the reference-token retrieval: tokens whose most similar token in the other view is their
/// own point's, both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RefCounts {
    pub hits: usize,
    pub tokens: usize,
    /// Sum over tokens of the cosine similarity to the own point's token in the other view.
    pub own_sim: f64,
    /// Sum over tokens of the mean cosine similarity to the other points' tokens in the other view.
    pub other_sim: f64,
}

impl RefCounts {
    pub fn rate(&self) -> f64 {
        self.hits as f64 / self.tokens.max(1) as f64
    }

    /// Mean similarity to the own point's token and to the other points' (a token that tells points
    /// apart has the first well above the second; image-level tokens have both near 1).
    pub fn sims(&self) -> (f64, f64) {
        let n = self.tokens.max(1) as f64;
        (self.own_sim / n, self.other_sim / n)
    }

    pub fn add(&mut self, o: RefCounts) {
        self.hits += o.hits;
        self.tokens += o.tokens;
        self.own_sim += o.own_sim;
        self.other_sim += o.other_sim;
    }
}

/// Where the reference tokens attend, summed over tokens (see [`locality`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RefAttention {
    /// Per block: the share of a token's patch attention within one patch of its point.
    pub local: Vec<f64>,
    /// Per block: the share on the patch that holds the point.
    pub own: Vec<f64>,
    /// Per block: the largest share on any one patch (1/g² for a uniform attention): how sharp the
    /// attention is, wherever it looks.
    pub peak: Vec<f64>,
    /// The share a uniform attention would give the patches within one patch of the point.
    pub uniform: f64,
    pub tokens: usize,
    /// Per block: how much of a reference token's attention goes to the patches at all (the rest it
    /// gives itself): a token that reads no patch carries only its positional embedding.
    pub mass: Vec<f64>,
    /// The control: per block, the share of a patch's attention within one patch of itself, and the
    /// uniform share for the same neighbourhoods. Patches that attend locally while the reference tokens
    /// do not would put the fault in the tokens' queries; neither attending locally puts it in the
    /// backbone's training.
    pub patch_local: Vec<f64>,
    pub patch_uniform: f64,
    pub patches: usize,
}

impl RefAttention {
    /// Means over tokens: (local share per block, own-patch share per block, peak share per block,
    /// uniform share).
    pub fn means(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>, f64) {
        let n = self.tokens.max(1) as f64;
        let mean = |v: &[f64]| v.iter().map(|x| x / n).collect();
        (mean(&self.local), mean(&self.own), mean(&self.peak), self.uniform / n)
    }

    /// Means of the control and the patch mass: (reference tokens' patch mass per block, patches'
    /// local share per block, its uniform share).
    pub fn control_means(&self) -> (Vec<f64>, Vec<f64>, f64) {
        let (n, p) = (self.tokens.max(1) as f64, self.patches.max(1) as f64);
        let mass = self.mass.iter().map(|x| x / n).collect();
        (mass, self.patch_local.iter().map(|x| x / p).collect(), self.patch_uniform / p)
    }
}

/// The patch (row, col) of a `grid`×`grid` view that holds the normalised point `(x, y)` ([-1, 1],
/// pixel edges at ±1, as the reference points are placed).
fn patch_of(grid: usize, x: f32, y: f32) -> (usize, usize) {
    let at = |v: f32| ((((v as f64 + 1.0) * 0.5 * grid as f64).floor()).max(0.0) as usize).min(grid - 1);
    (at(y), at(x))
}

/// Shares of one token's attention over the `grid²` patches (of the row's total, whatever it is).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Locality {
    /// Within one patch (Chebyshev) of the point's patch.
    pub local: f64,
    /// On the point's patch.
    pub own: f64,
    /// The largest on any one patch.
    pub peak: f64,
    /// What a uniform attention would give the same neighbourhood (fewer patches at the view's edge).
    pub uniform: f64,
    /// The row's total: the token's attention on the patches at all.
    pub mass: f64,
}

/// One token's attention `attn` (`[grid²]`, row-major) read around its normalised point.
pub fn locality(attn: &[f32], grid: usize, point: (f32, f32)) -> Locality {
    let (pr, pc) = patch_of(grid, point.0, point.1);
    let mass: f64 = attn.iter().map(|&a| a as f64).sum();
    let total = mass.max(1e-30);
    let (mut near, mut count) = (0f64, 0usize);
    for r in pr.saturating_sub(1)..(pr + 2).min(grid) {
        for c in pc.saturating_sub(1)..(pc + 2).min(grid) {
            near += attn[r * grid + c] as f64;
            count += 1;
        }
    }
    let peak = attn.iter().fold(0f32, |m, &a| m.max(a)) as f64;
    Locality {
        local: near / total,
        own: attn[pr * grid + pc] as f64 / total,
        peak: peak / total,
        uniform: count as f64 / (grid * grid) as f64,
        mass,
    }
}

/// Row-wise L2 normalisation of `[n, dim]`.
fn unit_rows(f: &[f32], dim: usize) -> Vec<f32> {
    f.chunks_exact(dim)
        .flat_map(|r| {
            let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            r.iter().map(move |v| v / norm)
        })
        .collect()
}

/// The similarities of unit row `q` to every unit row of `bank` (`[n, dim]`), and the index of the
/// largest (the first among equals).
fn nearest(q: &[f32], bank: &[f32], dim: usize) -> (usize, Vec<f32>) {
    let sims: Vec<f32> = bank.chunks_exact(dim).map(|r| q.iter().zip(r).map(|(x, y)| x * y).sum()).collect();
    let best = (0..sims.len()).fold(0, |best, k| if sims[k] > sims[best] { k } else { best });
    (best, sims)
}

/// Retrieval among `m` tokens a view: token j of A (`[m, dim]`) hits when B's most similar token is j.
pub fn retrieve(a: &[f32], b: &[f32], m: usize, dim: usize) -> RefCounts {
    let (ua, ub) = (unit_rows(a, dim), unit_rows(b, dim));
    let mut c = RefCounts::default();
    for j in 0..m {
        let (best, sims) = nearest(&ua[j * dim..(j + 1) * dim], &ub, dim);
        c.hits += (best == j) as usize;
        c.tokens += 1;
        c.own_sim += sims[j] as f64;
        c.other_sim += (sims.iter().sum::<f32>() - sims[j]) as f64 / (m - 1).max(1) as f64;
    }
    c
}

/// Every patch of view A (a `grid`×`grid` view of `box_a`, mirrored when `flip_a`) whose centre lies
/// inside view B, with the patch of B that holds that centre: `(patch of A, patch of B)`, row-major
/// indices.
pub fn true_partners(grid: usize, a: (&CropBox, bool), b: (&CropBox, bool)) -> Vec<(usize, usize)> {
    let g = grid as f64;
    let mut out = Vec::new();
    for row in 0..grid {
        for col in 0..grid {
            // The centre of patch (row, col) in A's normalised frame ([-1, 1], pixel edges at ±1, as the
            // reference points are placed), then in the image, then in B's frame.
            let centre =
                [(2.0 * (col as f64 + 0.5) / g - 1.0) as f32, (2.0 * (row as f64 + 0.5) / g - 1.0) as f32];
            let (x, y) = to_image(a.0, a.1, centre);
            let [bx, by] = to_view(b.0, b.1, x, y);
            let (bx, by) = ((bx as f64 + 1.0) * 0.5 * g, (by as f64 + 1.0) * 0.5 * g); // in patches
            if !(0.0..g).contains(&bx) || !(0.0..g).contains(&by) {
                continue;
            }
            out.push((row * grid + col, by as usize * grid + bx as usize));
        }
    }
    out
}

/// Scores `pairs` (from [`true_partners`]) on the patch features of the two views, `[g², dim]` row-major
/// each: the prediction for A's patch is B's patch of highest cosine similarity.
pub fn score(
    feats_a: &[f32],
    feats_b: &[f32],
    grid: usize,
    dim: usize,
    pairs: &[(usize, usize)],
) -> MatchCounts {
    let n = grid * grid;
    assert_eq!((feats_a.len(), feats_b.len()), (n * dim, n * dim), "features are [g², dim]");
    let (ua, ub) = (unit_rows(feats_a, dim), unit_rows(feats_b, dim));
    let mut counts = MatchCounts::default();
    for &(pa, truth) in pairs {
        let (best, _) = nearest(&ua[pa * dim..(pa + 1) * dim], &ub, dim);
        let (dr, dc) = ((best / grid).abs_diff(truth / grid), (best % grid).abs_diff(truth % grid));
        counts.points += 1;
        counts.exact += (best == truth) as usize;
        counts.within_one += (dr <= 1 && dc <= 1) as usize;
    }
    counts
}

/// What [`evaluate`] measures.
#[derive(Clone, Debug, Default)]
pub struct MatchReport {
    pub patches: MatchCounts,
    pub refs: RefCounts,
    pub attention: RefAttention,
    pub images: usize,
}

/// The metric over the first `limit` images of a shard set: both global views of the training `views`
/// config at their own size, `seed` choosing the views: the patch counts, the reference-token retrieval
/// and where the reference tokens attend.
pub fn evaluate(
    vit: &Vit,
    shards: &Path,
    views: &ViewsConfig,
    seed: u64,
    limit: usize,
    device: &Device,
) -> Result<MatchReport> {
    let size = views.global_size;
    let patch = vit.cfg.patch_size;
    if !size.is_multiple_of(patch) {
        bail!("views.global_size {size} is not a multiple of the patch size {patch}");
    }
    let grid = size / patch;
    // The two global views only: the others are never scored.
    let views = ViewsConfig { num_local: 0, num_points: REF_POINTS, ..views.clone() };
    let m = REF_POINTS;
    let mut refs = RefCounts::default();
    let mut attention = RefAttention {
        local: vec![0.0; vit.blocks.len()],
        own: vec![0.0; vit.blocks.len()],
        peak: vec![0.0; vit.blocks.len()],
        mass: vec![0.0; vit.blocks.len()],
        patch_local: vec![0.0; vit.blocks.len()],
        ..Default::default()
    };
    // Each patch's centre, normalised as the points are.
    let centre = |k: usize| {
        let at = |i: usize| ((i as f64 + 0.5) / grid as f64 * 2.0 - 1.0) as f32;
        (at(k % grid), at(k / grid))
    };
    let (dir, index) = loader::pipeline::open_index(shards)?;
    let mut scratch = loader::views::Scratch::default();
    let mut batch: Vec<loader::views::SampleViews> = Vec::new();
    let mut counts = MatchCounts::default();
    let (mut images, mut skipped, mut seq) = (0usize, 0usize, 0u64);
    let mut run = |batch: &mut Vec<loader::views::SampleViews>| -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // [2·B, 3, S, S]: view 0 of every image, then view 1.
        let pixels: Vec<u8> =
            (0..2).flat_map(|v| batch.iter().flat_map(move |s| s.views[v].iter().copied())).collect();
        let x = vit::normalize_pixels(&pixels, 2 * batch.len(), size, device);
        // Pair (g = 0, v = 1): its points in view 0's frame, then the same points in view 1's.
        let points: Vec<f32> = batch
            .iter()
            .flat_map(|s| s.points.teacher[0][m * 2..2 * m * 2].iter().copied())
            .chain(batch.iter().flat_map(|s| s.points.student[1][..m * 2].iter().copied()))
            .collect();
        let weights = vit::ref_weights(&points, vit.cfg.grid(), device);
        for (block, (a, p)) in vit.ref_attention(x.clone(), weights.clone()).into_iter().enumerate() {
            let a = host(a); // [2·B, m, g²]
            for (t, row) in a.chunks_exact(grid * grid).enumerate() {
                let l = locality(row, grid, (points[2 * t], points[2 * t + 1]));
                attention.local[block] += l.local;
                attention.own[block] += l.own;
                attention.peak[block] += l.peak;
                attention.mass[block] += l.mass;
                if block == 0 {
                    attention.uniform += l.uniform;
                    attention.tokens += 1;
                }
            }
            let p = host(p); // [2·B, g², g²]
            for (q, row) in p.chunks_exact(grid * grid).enumerate() {
                let l = locality(row, grid, centre(q % (grid * grid)));
                attention.patch_local[block] += l.local;
                if block == 0 {
                    attention.patch_uniform += l.uniform;
                    attention.patches += 1;
                }
            }
        }
        let out = vit.forward(x, Some(weights), &[], false);
        let feats = host(out.patches); // [2·B, g², D]
        let tokens = host(out.refs.expect("reference tokens were given")); // [2·B, m, D]
        let (b, per) = (batch.len(), feats.len() / (2 * batch.len()));
        let dim = per / (grid * grid);
        for (i, s) in batch.iter().enumerate() {
            let (ta, tb) =
                (&tokens[i * m * dim..(i + 1) * m * dim], &tokens[(b + i) * m * dim..(b + i + 1) * m * dim]);
            refs.add(retrieve(ta, tb, m, dim));
            refs.add(retrieve(tb, ta, m, dim));
            let (fa, fb) = (&feats[i * per..(i + 1) * per], &feats[(b + i) * per..(b + i + 1) * per]);
            let (a, bb) = ((&s.boxes[0], s.flips[0]), (&s.boxes[1], s.flips[1]));
            counts.add(score(fa, fb, grid, dim, &true_partners(grid, a, bb)));
            counts.add(score(fb, fa, grid, dim, &true_partners(grid, bb, a)));
        }
        batch.clear();
        Ok(())
    };
    let mut failure = None;
    loader::pipeline::for_each_sample(&dir, &index, |s| {
        if images >= limit {
            return false;
        }
        seq += 1;
        let Some(bytes) = s.get("jpg") else {
            skipped += 1;
            return true;
        };
        match loader::views::make_views(bytes, &views, seed, 0, seq, &mut scratch) {
            Ok(v) => {
                batch.push(v);
                images += 1;
            }
            Err(e) => {
                eprintln!("warning: {}: {}: {e}, skipped", shards.display(), s.key);
                skipped += 1;
            }
        }
        if batch.len() == 32
            && let Err(e) = run(&mut batch)
        {
            failure = Some(e);
            return false;
        }
        true
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    run(&mut batch)?;
    if skipped > 0 {
        eprintln!("{}: {skipped} samples skipped", shards.display());
    }
    if images == 0 {
        bail!("{}: no usable images", shards.display());
    }
    Ok(MatchReport { patches: counts, refs, attention, images })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(x1: u32, y1: u32, side: u32) -> CropBox {
        CropBox { x1, y1, w: side, h: side }
    }

    /// Features that name their image location: patch (r, c) of a view at image cell (R, C) gets a
    /// one-hot of the cell, so the only perfect match is the true patch.
    fn located(grid: usize, origin: (usize, usize), cells: usize) -> Vec<f32> {
        let mut f = vec![0f32; grid * grid * cells * cells];
        for r in 0..grid {
            for c in 0..grid {
                let cell = (r + origin.0) * cells + (c + origin.1);
                f[(r * grid + c) * cells * cells + cell] = 1.0;
            }
        }
        f
    }

    /// A hand-made case: attention all on the point's patch is local and own; uniform attention gives
    /// the uniform share (9 of 16 patches around an inner point, 4 of 16 at a corner).
    #[test]
    fn locality_of_hand_made_attention() {
        let g = 4;
        // The point (-0.3, 0.1) lies in column floor(0.35·4) = 1, row floor(0.55·4) = 2.
        let mut one_hot = vec![0f32; g * g];
        one_hot[2 * g + 1] = 0.5; // any total: shares are of the row's patch mass
        let l = locality(&one_hot, g, (-0.3, 0.1));
        assert_eq!((l.local, l.own, l.uniform), (1.0, 1.0, 9.0 / 16.0));
        let uniform = vec![1f32; g * g];
        let l = locality(&uniform, g, (-0.3, 0.1));
        assert!(
            (l.local - 9.0 / 16.0).abs() < 1e-12
                && (l.own - 1.0 / 16.0).abs() < 1e-12
                && l.uniform == l.local
        );
        // A corner point: its neighbourhood is clipped to 2x2.
        let l = locality(&uniform, g, (-0.99, -0.99));
        assert!((l.local - 0.25).abs() < 1e-12 && (l.uniform - 0.25).abs() < 1e-12);
        // Mass two patches away is not local.
        let mut far = vec![0f32; g * g];
        far[0] = 1.0;
        assert_eq!(locality(&far, g, (0.9, 0.9)).local, 0.0);
    }

    #[test]
    fn identical_views_match_every_patch() {
        let b = square(10, 20, 64);
        let pairs = true_partners(8, (&b, false), (&b, false));
        assert_eq!(pairs, (0..64).map(|i| (i, i)).collect::<Vec<_>>());
        let f = located(8, (0, 0), 8);
        let c = score(&f, &f, 8, 64, &pairs);
        assert_eq!(c, MatchCounts { within_one: 64, exact: 64, points: 64 });
    }

    #[test]
    fn a_shift_of_one_patch_maps_each_column_to_its_left_neighbour() {
        // B starts 8 px (one patch of a 64 px, 8x8 view of a 64 px box) right of A: A's column c is B's
        // column c − 1, and A's first column lies outside B. 8 rows × 7 columns.
        let (a, b) = (square(0, 0, 64), square(8, 0, 64));
        let pairs = true_partners(8, (&a, false), (&b, false));
        assert_eq!(pairs.len(), 56);
        for &(pa, pb) in &pairs {
            assert_eq!((pa / 8, pa % 8 - 1), (pb / 8, pb % 8), "{pa} -> {pb}");
        }
        // Features of the image cells: B sees cells shifted by one column; the 9-column image has them all.
        let (fa, fb) = (located(8, (0, 0), 9), located(8, (0, 1), 9));
        let c = score(&fa, &fb, 8, 81, &pairs);
        assert_eq!(c, MatchCounts { within_one: 56, exact: 56, points: 56 });
    }

    #[test]
    fn retrieval_finds_permuted_partners_and_misses_swapped_ones() {
        // B's tokens are A's in the same order (all hit), then with tokens 0 and 1 swapped (those miss).
        let a: Vec<f32> = (0..4).flat_map(|j| (0..4).map(move |k| (j == k) as u8 as f32)).collect();
        let same = retrieve(&a, &a, 4, 4);
        assert_eq!((same.hits, same.tokens, same.sims()), (4, 4, (1.0, 0.0)));
        let mut b = a.clone();
        b[..8].rotate_left(4);
        let swapped = retrieve(&a, &b, 4, 4);
        // Tokens 0 and 1 see their own point's token orthogonal and one other at similarity 1.
        assert_eq!((swapped.hits, swapped.tokens, swapped.sims()), (2, 4, (0.5, 1.0 / 6.0)));
    }

    #[test]
    fn a_mirrored_view_reverses_columns() {
        let b = square(0, 0, 32);
        let pairs = true_partners(4, (&b, false), (&b, true));
        assert_eq!(pairs.len(), 16);
        for &(pa, pb) in &pairs {
            assert_eq!((pa / 4, 3 - pa % 4), (pb / 4, pb % 4));
        }
    }

    #[test]
    fn a_half_scale_view_maps_four_patches_to_one() {
        // A covers the top-left quarter of B's box at twice its resolution: A's patch (r, c) sits in B's
        // patch (r / 2, c / 2).
        let (a, b) = (square(0, 0, 32), square(0, 0, 64));
        let pairs = true_partners(8, (&a, false), (&b, false));
        assert_eq!(pairs.len(), 64);
        for &(pa, pb) in &pairs {
            assert_eq!(((pa / 8) / 2, (pa % 8) / 2), (pb / 8, pb % 8));
        }
    }

    #[test]
    fn a_prediction_one_patch_off_counts_within_one_but_not_exact() {
        // B's features name the cell one row down: every prediction is one patch from the truth.
        let b = square(0, 0, 64);
        let pairs = true_partners(8, (&b, false), (&b, false));
        let fa = located(8, (1, 0), 9);
        let fb = located(8, (0, 0), 9);
        let c = score(&fa, &fb, 8, 81, &pairs);
        // A's row 7 names cell row 8, which no patch of B has: every similarity is 0 and the first patch,
        // (0, 0), wins, far from (7, c); rows 0-6 find B's row r + 1.
        assert_eq!(c.exact, 0);
        assert_eq!(c.points, 64);
        assert_eq!(c.within_one, 56, "rows 0-6 are one row off, row 7 far off");
    }
}
