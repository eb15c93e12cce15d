//! The backbone against independent formulations: bicubic sampling against a direct evaluation of Keys'
//! kernel, the efficient reference path against the literal masked attention, and reference tokens that
//! leave CLS and patches untouched.

use burn::tensor::{Device, Tensor, TensorData};
use common::seed::{self, Purpose};
use trainer::model::params::host;
use trainer::model::vit::{self, DropKey, MaskMode, Vit, VitConfig};

fn device() -> Device {
    Device::flex()
}

/// Keys' cubic convolution kernel with A = -0.75, written as a function of the distance (not of the
/// fractional offset the implementation uses).
fn keys(d: f64) -> f64 {
    let a = -0.75;
    let d = d.abs();
    if d <= 1.0 {
        (a + 2.0) * d.powi(3) - (a + 3.0) * d.powi(2) + 1.0
    } else if d < 2.0 {
        a * d.powi(3) - 5.0 * a * d.powi(2) + 8.0 * a * d - 4.0 * a
    } else {
        0.0
    }
}

/// grid_sample(bicubic, zeros, align_corners=False) of a `[g, g, D]` grid at (x, y), by brute force: every
/// grid cell weighted by the kernel at its distance from the sampling location.
fn direct_sample(grid: &[f32], g: usize, d: usize, x: f64, y: f64) -> Vec<f64> {
    let ix = ((x + 1.0) * g as f64 - 1.0) / 2.0;
    let iy = ((y + 1.0) * g as f64 - 1.0) / 2.0;
    let mut out = vec![0.0; d];
    for r in 0..g {
        for c in 0..g {
            let w = keys(ix - c as f64) * keys(iy - r as f64);
            for k in 0..d {
                out[k] += w * grid[(r * g + c) * d + k] as f64;
            }
        }
    }
    out
}

fn random_grid(g: usize, d: usize, salt: u64) -> Vec<f32> {
    let mut rng = seed::rng(7, Purpose::Model, &[salt]);
    trainer::model::params::trunc_normal(g * g * d, 1.0, &mut rng)
}

fn sample(points: &[f32], grid: &[f32], g: usize, d: usize) -> Vec<f32> {
    let dev = device();
    let w = vit::ref_weights(points, g, &dev);
    let grid = Tensor::<2>::from_data(TensorData::new(grid.to_vec(), [g * g, d]), &dev);
    host(w.matmul(grid))
}

#[test]
fn bicubic_at_patch_centres_returns_the_grid_row_exactly() {
    let (g, d) = (14, 8);
    let grid = random_grid(g, d, 1);
    let mut points = Vec::new();
    let mut rows = Vec::new();
    for (r, c) in [(0, 0), (3, 7), (13, 13), (6, 0), (13, 2)] {
        // Patch (r, c)'s centre in grid_sample coordinates: (2c + 1)/g - 1.
        points.extend([(2 * c + 1) as f32 / g as f32 - 1.0, (2 * r + 1) as f32 / g as f32 - 1.0]);
        rows.push(r * g + c);
    }
    let out = sample(&points, &grid, g, d);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(&out[i * d..(i + 1) * d], &grid[row * d..(row + 1) * d], "point {i}");
    }
}

#[test]
fn bicubic_between_centres_and_at_the_border_matches_the_kernel() {
    let (g, d) = (14, 6);
    let grid = random_grid(g, d, 2);
    let pts: Vec<(f64, f64)> =
        vec![(0.013, -0.27), (0.5, 0.5), (-0.93, 0.41), (-1.0, -1.0), (0.999, -0.999), (0.97, 0.2)];
    let flat: Vec<f32> = pts.iter().flat_map(|&(x, y)| [x as f32, y as f32]).collect();
    let out = sample(&flat, &grid, g, d);
    for (i, &(x, y)) in pts.iter().enumerate() {
        let want = direct_sample(&grid, g, d, x as f32 as f64, y as f32 as f64);
        for k in 0..d {
            assert!(
                (out[i * d + k] as f64 - want[k]).abs() < 1e-5,
                "point {i} ch {k}: {} vs {}",
                out[i * d + k],
                want[k]
            );
        }
    }
    // Zero padding: on a constant grid of ones the interior reads 1 and the corner fades (the taps beyond
    // the edge read 0). At x = y = -1 the location is half a cell outside the first centre: per axis the
    // surviving taps are at distances 0.5 and 1.5, so the value is (k(0.5) + k(1.5))².
    let ones = vec![1.0f32; g * g];
    let v = sample(&[0.1, -0.2, -1.0, -1.0], &ones, g, 1);
    assert!((v[0] - 1.0).abs() < 1e-6);
    let edge = (keys(0.5) + keys(1.5)).powi(2);
    assert!((v[1] as f64 - edge).abs() < 1e-6 && edge < 1.0, "corner {} vs {edge}", v[1]);
}

#[test]
fn bicubic_gradient_into_the_grid_matches_finite_differences() {
    let (g, d) = (6, 3);
    let dev = device().autodiff();
    let grid = random_grid(g, d, 3);
    let points = [0.31f32, -0.62, -0.95, 0.88, 0.05, 0.0];
    let cot = random_grid(1, 3 * d, 4); // a fixed cotangent [3 points, D]
    let objective = |grid: &[f32]| -> f64 {
        let out = direct_sample(grid, g, d, 0.31f32 as f64, -0.62f32 as f64)
            .into_iter()
            .chain(direct_sample(grid, g, d, -0.95f32 as f64, 0.88f32 as f64))
            .chain(direct_sample(grid, g, d, 0.05f32 as f64, 0.0));
        out.zip(cot.iter()).map(|(o, c)| o * *c as f64).sum()
    };
    let leaf = Tensor::<2>::from_data(TensorData::new(grid.clone(), [g * g, d]), &dev).require_grad();
    let w = vit::ref_weights(&points, g, &dev);
    let c = Tensor::<2>::from_data(TensorData::new(cot.clone(), [3, d]), &dev);
    let loss = (w.matmul(leaf.clone()) * c).sum();
    let grads = loss.backward();
    let analytic = host(leaf.grad(&grads).expect("grid gradient"));
    let h = 1e-3;
    for i in 0..g * g * d {
        let mut up = grid.clone();
        let mut down = grid.clone();
        up[i] += h;
        down[i] -= h;
        let fd = (objective(&up) - objective(&down)) / (2.0 * h as f64);
        assert!((analytic[i] as f64 - fd).abs() < 1e-3, "grid element {i}: {} vs {fd}", analytic[i]);
    }
}

fn tiny(mask: MaskMode, drop: f64) -> VitConfig {
    VitConfig {
        embed_dim: 32,
        depth: 3,
        num_heads: 4,
        patch_size: 8,
        img_size: 32,
        mlp_ratio: 4,
        drop_path_rate: drop,
        mask_mode: mask,
        learnable_ref_token: true,
        detach_pos_embed: false,
        sincos_pos_embed: false,
    }
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < tol, "{what}: max abs difference {worst}");
}

fn inputs(batch: usize, size: usize, refs: usize, dev: &Device) -> (Tensor<4>, Vec<f32>) {
    let mut rng = seed::rng(3, Purpose::Model, &[9]);
    let x = trainer::model::params::trunc_normal(batch * 3 * size * size, 1.0, &mut rng);
    let pts: Vec<f32> = trainer::model::params::uniform(batch * refs * 2, 0.98, &mut rng);
    (Tensor::<4>::from_data(TensorData::new(x, [batch, 3, size, size]), dev), pts)
}

#[test]
fn efficient_reference_path_equals_the_masked_formulation_and_leaves_cls_and_patches_alone() {
    oracle_check(device());
}

/// The same on LibTorch (CPU), whose fused attention is LibTorch's own kernel.
#[cfg(feature = "tch")]
#[test]
#[allow(deprecated)] // burn-tch is deprecated upstream; it is the LibTorch path we ship
fn efficient_reference_path_equals_the_masked_formulation_on_libtorch() {
    oracle_check(Device::libtorch());
}

fn oracle_check(dev: Device) {
    let cfg = tiny(MaskMode::All2posPos2clsEye, 0.2);
    let vit = Vit::new(&cfg, &mut seed::rng(1, Purpose::Model, &[0]), &dev);
    let (b, r) = (3, 5);
    let (x, pts) = inputs(b, 32, r, &dev);
    // The same stochastic-depth draw for all three forwards.
    let drop = vit::drop_path_scales(&cfg, DropKey { seed: 1, it: 5, first: 0 }, 0..1, b, &dev);
    let w = || Some(vit::ref_weights(&pts, cfg.grid(), &dev));

    let fast = vit.forward(x.clone(), w(), &drop, false);
    let masked = vit.forward_masked(x.clone(), w(), MaskMode::All2posPos2clsEye, &drop);
    let plain = vit.forward(x.clone(), None, &drop, false);
    close(&host(fast.cls.clone()), &host(masked.cls.clone()), 1e-5, "cls: efficient vs masked");
    close(&host(fast.patches.clone()), &host(masked.patches), 1e-5, "patches: efficient vs masked");
    close(&host(fast.refs.clone().unwrap()), &host(masked.refs.unwrap()), 1e-5, "refs: efficient vs masked");
    close(&host(fast.cls), &host(plain.cls.clone()), 1e-6, "cls: with vs without refs");
    close(&host(fast.patches), &host(plain.patches), 1e-6, "patches: with vs without refs");

    // The other `all2pos` modes leave the plain path alone too; `none` does not.
    for mode in [MaskMode::All2pos, MaskMode::All2posPos2cls] {
        let out = vit.forward_masked(x.clone(), w(), mode, &drop);
        close(&host(out.cls), &host(plain.cls.clone()), 1e-5, &format!("cls under {mode:?}"));
    }
    let perturbed = vit.forward_masked(x, w(), MaskMode::None, &drop);
    let diff =
        host(perturbed.cls).iter().zip(host(plain.cls)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff > 1e-4, "with full attention the reference tokens must change CLS ({diff})");
}

#[test]
fn mask_rows_follow_the_official_modes() {
    // [CLS, R1, R2, P1]: row i, column j; true = -inf.
    let m = |mode| vit::mask_bias(mode, 2, 1).iter().map(|v| v.is_infinite()).collect::<Vec<_>>();
    let eye = m(MaskMode::All2posPos2clsEye);
    #[rustfmt::skip]
    let want = [
        false, true, true, false, // CLS sees CLS and patches
        true, false, true, false, // R1 sees itself and patches
        true, true, false, false, // R2 likewise
        false, true, true, false, // patches see CLS and patches
    ];
    assert_eq!(eye, want);
    let all2pos = m(MaskMode::All2pos);
    assert!(all2pos[5] && !all2pos[4], "all2pos: a reference token sees CLS, not itself");
}

#[test]
fn positional_grid_resizes_for_other_input_sizes() {
    // A 16 px input on a grid learned at 32 px (patch 8): 2x2 patches through the +0.1 bicubic resize.
    let dev = device();
    let cfg = tiny(MaskMode::All2posPos2clsEye, 0.0);
    let vit = Vit::new(&cfg, &mut seed::rng(1, Purpose::Model, &[0]), &dev);
    let (x, _) = inputs(2, 16, 1, &dev);
    let out = vit.forward(x, None, &[], true);
    assert_eq!(out.patches.dims(), [2, 4, 32]);
    let attn = out.attn.expect("attention");
    assert_eq!(attn.dims(), [2, 4, 4]);
    // CLS attends to CLS and 4 patches: the patch part of each head's row sums to less than 1.
    let a = host(attn);
    for head in a.chunks(4) {
        let s: f32 = head.iter().sum();
        assert!(s > 0.0 && s < 1.0);
    }
}

#[test]
fn stochastic_depth_drops_whole_samples_per_branch_at_the_linear_rate() {
    let dev = device();
    let cfg = VitConfig { depth: 5, drop_path_rate: 0.4, ..tiny(MaskMode::All2posPos2clsEye, 0.4) };
    let n = 20_000;
    let scales = vit::drop_path_scales(&cfg, DropKey { seed: 2, it: 1, first: 0 }, 0..1, n, &dev);
    assert!(
        scales[0].attn.is_none() && scales[0].mlp.is_none(),
        "linspace(0, rate, depth)[0] = 0: block 0 never drops"
    );
    for (i, s) in scales.iter().enumerate().skip(1) {
        let rate = 0.4 * i as f64 / 4.0;
        let keep = 1.0 - rate;
        let attn = host(s.attn.clone().expect("a dropping block"));
        let mlp = host(s.mlp.clone().expect("a dropping block"));
        for v in [&attn, &mlp] {
            let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / n as f64;
            assert!(
                v.iter().all(|&x| x == 0.0 || (x as f64 - 1.0 / keep).abs() < 1e-6),
                "kept samples scale by 1/keep"
            );
            assert!((dropped - rate).abs() < 0.015, "block {i}: dropped {dropped}, rate {rate}");
        }
        // The two branches draw their own masks (the official Block calls its DropPath once per branch):
        // both dropped with probability rate², not rate.
        let both = attn.iter().zip(&mlp).filter(|(a, m)| **a == 0.0 && **m == 0.0).count() as f64 / n as f64;
        assert!((both - rate * rate).abs() < 0.01, "block {i}: both dropped {both}, rate² {}", rate * rate);
    }
}

/// Data-parallel ranks each hold a slice of the global batch: the rows a rank draws for its samples are
/// the rows one process draws for the same samples of the whole batch (view by view), so both drop the
/// same paths. Another step draws otherwise.
#[test]
fn stochastic_depth_is_keyed_by_the_sample_in_the_global_batch() {
    let dev = device();
    let cfg = VitConfig { depth: 4, drop_path_rate: 0.5, ..tiny(MaskMode::All2posPos2clsEye, 0.5) };
    let (per_rank, views) = (6, 3);
    let key = DropKey { seed: 7, it: 11, first: 0 };
    // The last two views, as the student's forward groups its smaller views.
    let whole = vit::drop_path_scales(&cfg, key, 1..views, 2 * per_rank, &dev);
    for rank in 0..2 {
        let first = (rank * per_rank) as u64;
        let part = vit::drop_path_scales(&cfg, DropKey { first, ..key }, 1..views, per_rank, &dev);
        for (w, p) in whole.iter().zip(&part).skip(1) {
            for (w, p) in [(&w.attn, &p.attn), (&w.mlp, &p.mlp)] {
                let (w, p) = (host(w.clone().unwrap()), host(p.clone().unwrap()));
                for v in 0..views - 1 {
                    let rows = v * 2 * per_rank + rank * per_rank;
                    assert_eq!(
                        &p[v * per_rank..(v + 1) * per_rank],
                        &w[rows..rows + per_rank],
                        "rank {rank}, view {v}"
                    );
                }
            }
        }
    }
    let other = vit::drop_path_scales(&cfg, DropKey { it: 12, ..key }, 1..views, 2 * per_rank, &dev);
    let bits = |s: &[vit::BlockDrop]| -> Vec<f32> {
        s.iter().skip(1).flat_map(|b| host(b.attn.clone().unwrap())).collect()
    };
    assert_ne!(bits(&whole), bits(&other), "each step draws anew");
}

/// `--with_learnable_token`: the official zeros-then-trunc_normal_(std 0.02), drawn after every other
/// weight so that the switch leaves the rest of the initialisation as it was.
#[test]
fn the_learnable_reference_token_starts_as_the_official_one() {
    let dev = device();
    let cfg = VitConfig { embed_dim: 768, depth: 2, num_heads: 12, ..tiny(MaskMode::All2posPos2clsEye, 0.0) };
    let mut with = Vit::new(&cfg, &mut seed::rng(3, Purpose::Model, &[0]), &dev);
    let mut without = Vit::new(
        &VitConfig { learnable_ref_token: false, ..cfg.clone() },
        &mut seed::rng(3, Purpose::Model, &[0]),
        &dev,
    );
    let token = host(with.ref_token.clone().expect("a learnable token"));
    let mean = token.iter().map(|&x| x as f64).sum::<f64>() / token.len() as f64;
    let std = (token.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / token.len() as f64).sqrt();
    assert!(mean.abs() < 0.003 && (std - 0.02).abs() < 0.002, "mean {mean}, std {std}");
    assert!(without.ref_token.is_none());
    let rest = |v: &mut Vit| {
        let all = trainer::model::params::to_host(v);
        all.into_iter().filter(|(name, ..)| !name.contains("ref_token")).collect::<Vec<_>>()
    };
    assert_eq!(rest(&mut with), rest(&mut without));
}

/// MoCo v3's fixed positions, by hand: D = 8 gives two frequencies, ω = (1, 1/100); the patch at row 1,
/// column 0 of a 2x2 grid is [sin 0, sin 0, cos 0, cos 0, sin 1, sin 0.01, cos 1, cos 0.01]; CLS is zero.
#[test]
fn sincos_positions_by_hand() {
    let pe = trainer::model::vit::sincos_2d(2, 8);
    assert_eq!(pe.len(), 5 * 8);
    assert!(pe[..8].iter().all(|&v| v == 0.0));
    let row = &pe[(1 + 2) * 8..(1 + 3) * 8];
    let want = [0.0, 0.0, 1.0, 1.0, 1f64.sin(), 0.01f64.sin(), 1f64.cos(), 0.01f64.cos()];
    for (a, b) in row.iter().zip(want) {
        assert!((*a as f64 - b).abs() < 1e-6, "{row:?}");
    }
}

/// With the query and key weights zero every logit is equal, so each token attends uniformly over the
/// keys its mask row allows (`all2pos_pos2cls_eye`): a reference token over the N patches and itself
/// (N/(N+1) on the patches), a patch over CLS and the N patches (N/(N+1) on the patches), evenly.
#[test]
fn attention_rows_of_an_attention_without_logits_are_uniform_over_the_allowed_keys() {
    use trainer::model::params::{ParamMut, Params};
    let dev = device();
    let cfg = tiny(MaskMode::All2posPos2clsEye, 0.0);
    let mut vit = Vit::new(&cfg, &mut seed::rng(1, Purpose::Model, &[0]), &dev);
    let d = cfg.embed_dim;
    vit.visit("", &mut |name, p| {
        // qkv's weight is [in, 3·D] (burn's layout) and its bias [3·D]: zero the q and k thirds.
        if let (true, ParamMut::R2(w)) = (name.ends_with("attn.qkv.weight"), p) {
            let v = w.clone().slice([0..d, 2 * d..3 * d]);
            *w = Tensor::cat(vec![Tensor::zeros([d, 2 * d], &dev), v], 1);
        }
    });
    vit.visit("", &mut |name, p| {
        if let (true, ParamMut::R1(b)) = (name.ends_with("attn.qkv.bias"), p) {
            let v = b.clone().narrow(0, 2 * d, d);
            *b = Tensor::cat(vec![Tensor::zeros([2 * d], &dev), v], 0);
        }
    });
    let (b, r, n) = (2, 3, cfg.grid() * cfg.grid());
    let (x, pts) = inputs(b, 32, r, &dev);
    let blocks = vit.ref_attention(x, vit::ref_weights(&pts, cfg.grid(), &dev));
    assert_eq!(blocks.len(), cfg.depth);
    let even = 1.0 / (n as f32 + 1.0);
    for (refs, patches) in blocks {
        assert_eq!((refs.dims(), patches.dims()), ([b, r, n], [b, n, n]));
        close(&host(refs), &vec![even; b * r * n], 1e-6, "a reference token's row");
        close(&host(patches), &vec![even; b * n * n], 1e-6, "a patch's row");
    }
}
