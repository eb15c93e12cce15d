//! Each fused op against the decomposed formulation it replaces, written here from burn's plain tensor ops:
//! forward values and the gradients of every differentiable input, under a random output gradient (not
//! just ones), at odd shapes (widths that are no multiple of the SIMD lanes, row counts that are no
//! multiple of a task's rows, reference rows and none). On flex, and on LibTorch with `--features tch`.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use common::seed::{self, Purpose};
use trainer::fused::{self, Pairs};
use trainer::model::params::{host, trunc_normal};

fn devices() -> Vec<Device> {
    #[allow(unused_mut)]
    let mut d = vec![Device::flex()];
    #[cfg(feature = "tch")]
    #[allow(deprecated)]
    d.push(Device::libtorch());
    d
}

fn random(n: usize, std: f64, salt: u64) -> Vec<f32> {
    trunc_normal(n, std, &mut seed::rng(11, Purpose::Model, &[salt]))
}

fn leaf<const D: usize>(values: &[f32], shape: [usize; D], dev: &Device) -> Tensor<D> {
    Tensor::<D>::from_data(TensorData::new(values.to_vec(), shape), &dev.clone().autodiff()).require_grad()
}

fn close(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let scale = theirs.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let (worst, at) = ours
        .iter()
        .zip(theirs)
        .enumerate()
        .map(|(i, (a, b))| ((a - b).abs(), i))
        .fold((0.0f32, 0), |m, x| if x.0 > m.0 { x } else { m });
    assert!(
        worst <= 1e-5 * scale,
        "{what}: max abs difference {worst} at {at} ({} vs {}, scale {scale})",
        ours[at],
        theirs[at]
    );
}

/// `Σ out ⊙ R` for a fixed random R: its gradient with respect to `out` is R.
fn weighted_sum<const D: usize>(out: Tensor<D>, salt: u64) -> Tensor<1> {
    let n = out.dims().iter().product();
    let r = Tensor::<D>::from_data(TensorData::new(random(n, 1.0, salt), out.dims()), &out.device());
    (out * r).sum()
}

fn layer_norm_reference(x: Tensor<3>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> Tensor<3> {
    let mean = x.clone().mean_dim(2);
    let centred = x - mean;
    let var = centred.clone().square().mean_dim(2);
    centred / var.add_scalar(eps).sqrt() * gamma.unsqueeze::<3>() + beta.unsqueeze::<3>()
}

#[test]
fn layer_norm_matches_the_decomposed_formulation_forward_and_backward() {
    for dev in devices() {
        // 67 rows (a task holds 64) of width 33 (two 16-lane chunks and a tail); and a narrow one.
        for (b, t, d) in [(1, 67, 33), (3, 5, 7), (2, 3, 192)] {
            let xv: Vec<f32> = random(b * t * d, 1.0, 1).iter().map(|v| v * 3.0 + 0.5).collect();
            let gv: Vec<f32> = random(d, 1.0, 2).iter().map(|v| 1.0 + v).collect();
            let bv = random(d, 1.0, 3);
            let run = |fused_op: bool| {
                let (x, g, be) = (leaf(&xv, [b, t, d], &dev), leaf(&gv, [d], &dev), leaf(&bv, [d], &dev));
                let y = if fused_op {
                    fused::layer_norm(x.clone(), g.clone(), be.clone(), 1e-6)
                } else {
                    layer_norm_reference(x.clone(), g.clone(), be.clone(), 1e-6)
                };
                let grads = weighted_sum(y.clone(), 4).backward();
                let grad = |t: &Tensor<1>| host(t.grad(&grads).expect("gradient"));
                (host(y), host(x.grad(&grads).expect("dx")), grad(&g), grad(&be))
            };
            let (ours, theirs) = (run(true), run(false));
            let what = format!("layer_norm [{b}, {t}, {d}] on {dev:?}");
            close(&ours.0, &theirs.0, &format!("{what}: y"));
            close(&ours.1, &theirs.1, &format!("{what}: dx"));
            close(&ours.2, &theirs.2, &format!("{what}: dgamma"));
            close(&ours.3, &theirs.3, &format!("{what}: dbeta"));
        }
    }
}

/// The official formulation: tokens `[main.., ref..]`, `[S, S]` additive mask (0 or −∞), softmax, matmul.
fn attention_reference(qkv: Tensor<3>, heads: usize, main: usize) -> Tensor<3> {
    let [b, s, d3] = qkv.dims();
    let d = d3 / 3;
    let dh = d / heads;
    let part = |i: usize| qkv.clone().narrow(2, i * d, d).reshape([b, s, heads, dh]).swap_dims(1, 2);
    let (q, k, v) = (part(0), part(1), part(2)); // [B, H, S, dh]
    let mut bias = vec![f32::NEG_INFINITY; s * s];
    for i in 0..s {
        for j in 0..s {
            let allowed = if i < main { j < main } else { (1..main).contains(&j) || j == i };
            if allowed {
                bias[i * s + j] = 0.0;
            }
        }
    }
    let bias = Tensor::<2>::from_data(TensorData::new(bias, [s, s]), &qkv.device()).reshape([1, 1, s, s]);
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar((dh as f64).powf(-0.5)) + bias;
    softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b, s, d])
}

#[test]
fn attention_matches_the_masked_formulation_forward_and_backward() {
    for dev in devices() {
        // (batch, main tokens, reference rows, heads, head_dim): reference rows or none, odd sizes, and
        // the ViT-Tiny head width.
        for (b, main, r, heads, dh) in
            [(2, 5, 3, 3, 4), (1, 17, 0, 2, 8), (3, 10, 7, 1, 5), (2, 50, 4, 3, 64)]
        {
            let s = main + r;
            let values = random(b * s * 3 * heads * dh, 1.0, 5);
            let run = |fused_op: bool| {
                let qkv = leaf(&values, [b, s, 3 * heads * dh], &dev);
                let out = if fused_op {
                    fused::attention(qkv.clone(), heads, main)
                } else {
                    attention_reference(qkv.clone(), heads, main)
                };
                let grads = weighted_sum(out.clone(), 6).backward();
                (host(out), host(qkv.grad(&grads).expect("dqkv")))
            };
            let (ours, theirs) = (run(true), run(false));
            let what = format!("attention b{b} main{main} r{r} h{heads} dh{dh} on {dev:?}");
            close(&ours.0, &theirs.0, &format!("{what}: out"));
            close(&ours.1, &theirs.1, &format!("{what}: dqkv"));
        }
    }
}

#[test]
fn dino_cross_entropy_matches_the_decomposed_formulation_forward_and_backward() {
    for dev in devices() {
        // K = 37 (no multiple of the lanes); student rows with no, one and two partners.
        let (ns, nt, k) = (6, 4, 37);
        let pairs_list = [(0, 1), (1, 0), (2, 0), (2, 3), (4, 2), (5, 3), (5, 1)];
        let sv: Vec<f32> = random(ns * k, 1.0, 7);
        let tv = random(nt * k, 3.0, 8);
        let (inv_tau, weight) = (10.0, 0.37);
        let plain = dev.clone();
        let targets = softmax(Tensor::<2>::from_data(TensorData::new(tv, [nt, k]), &plain), 1);
        let run = |fused_op: bool| {
            let s = leaf(&sv, [ns, k], &dev);
            let p = Tensor::<2>::from_inner(targets.clone());
            let loss = if fused_op {
                fused::dino_ce(s.clone(), p, &Pairs::new(ns, pairs_list), inv_tau, weight)
            } else {
                let index = |v: Vec<i64>| {
                    Tensor::<1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), &s.device())
                };
                let si = index(pairs_list.iter().map(|p| p.0 as i64).collect());
                let ti = index(pairs_list.iter().map(|p| p.1 as i64).collect());
                let log_q = log_softmax(s.clone().mul_scalar(inv_tau), 1).select(0, si);
                (p.select(0, ti) * log_q).sum().mul_scalar(-weight)
            };
            let grads = loss.clone().mul_scalar(1.7).backward();
            (host(loss), host(s.grad(&grads).expect("ds")))
        };
        let (ours, theirs) = (run(true), run(false));
        close(&ours.0, &theirs.0, &format!("dino_ce on {dev:?}: loss"));
        close(&ours.1, &theirs.1, &format!("dino_ce on {dev:?}: ds"));
        // Row 3 has no partner: no gradient at all.
        assert!(ours.1[3 * k..4 * k].iter().all(|&g| g == 0.0), "an unmatched row got a gradient");
    }
}

fn linear_case<const D: usize>(dev: &Device, shape: [usize; D], n: usize) {
    let k = shape[D - 1];
    let m: usize = shape[..D - 1].iter().product();
    let (xv, wv, bv) = (random(m * k, 1.0, 21), random(k * n, 1.0, 22), random(n, 1.0, 23));
    let run = |fused_op: bool| {
        let (x, w, b) = (leaf(&xv, shape, dev), leaf(&wv, [k, n], dev), leaf(&bv, [n], dev));
        let y = if fused_op {
            fused::linear(x.clone(), w.clone(), b.clone())
        } else {
            burn::tensor::module::linear(x.clone(), w.clone(), Some(b.clone()))
        };
        let grads = weighted_sum(y.clone(), 24).backward();
        (
            host(y),
            host(x.grad(&grads).expect("dx")),
            host(w.grad(&grads).expect("dw")),
            host(b.grad(&grads).expect("db")),
        )
    };
    let (ours, theirs) = (run(true), run(false));
    let what = format!("linear {shape:?} x [{k}, {n}] on {dev:?}");
    close(&ours.0, &theirs.0, &format!("{what}: y"));
    close(&ours.1, &theirs.1, &format!("{what}: dx"));
    close(&ours.2, &theirs.2, &format!("{what}: dw"));
    close(&ours.3, &theirs.3, &format!("{what}: db"));
}

/// Against burn's `linear` (its matmul and broadcast bias add, differentiated by burn's autodiff): the
/// output and all three gradients, for 2-D and 3-D inputs, row counts that are no multiple of a task's
/// rows, widths that are no multiple of the lanes, a product too small and one large enough to run over
/// rayon's pool (both ways: forward and backward).
#[test]
fn linear_matches_burns_linear_forward_and_backward() {
    for dev in devices() {
        linear_case(&dev, [1, 1], 1);
        linear_case(&dev, [7, 5], 3);
        linear_case(&dev, [3, 67, 33], 19);
        linear_case(&dev, [3, 101, 200], 130); // 303 · 200 · 130 > 192³
        linear_case(&dev, [2, 2, 129, 40], 70);
    }
}

/// Against burn's own GELU (on flex: libm's `erff` per element; on LibTorch: LibTorch's), forward and
/// backward, over [−6, 6] and beyond, at a length that is no multiple of a task's chunk or the lanes.
#[test]
fn gelu_matches_burns_gelu_forward_and_backward() {
    for dev in devices() {
        let n = 3 * 16_384 + 1_001;
        let xs: Vec<f32> =
            (0..n).map(|i| (i as f32 / n as f32 - 0.5) * 12.0).chain([-30.0, 0.0, 30.0]).collect();
        let n = xs.len();
        let run = |fused_op: bool| {
            let x = leaf(&xs, [1, n], &dev);
            let y = if fused_op { fused::gelu(x.clone()) } else { burn::tensor::activation::gelu(x.clone()) };
            let grads = weighted_sum(y.clone(), 9).backward();
            (host(y), host(x.grad(&grads).expect("dx")))
        };
        let (ours, theirs) = (run(true), run(false));
        // Both are within ~2e-7 of x·Φ(x) (see `fused::flex::normal_cdf`); scaled by |x| ≤ 30.
        for (what, a, b) in [("y", &ours.0, &theirs.0), ("dx", &ours.1, &theirs.1)] {
            for (i, (a, b)) in a.iter().zip(b.iter()).enumerate() {
                let tol = 1e-6 * xs[i].abs().max(1.0);
                assert!((a - b).abs() <= tol, "gelu on {dev:?}: {what} at x = {}: {a} vs {b}", xs[i]);
            }
        }
    }
}

/// The CUDA path of the optimiser (LibTorch ops over one flat buffer), run on the CPU, against the host
/// kernel: the same AdamW step with the per-tensor clip and the same EMA.
#[cfg(feature = "tch")]
#[test]
#[allow(deprecated)]
fn flat_libtorch_adamw_and_ema_match_the_host_kernels() {
    use burn::backend::libtorch::TchTensor;
    use trainer::fused::multi_tensor::{self, AdamScalars, AdamSlot};
    use trainer::fused::tch::{self as ltch, AdamConsts};

    let sizes = [7usize, 40_000, 1, 33];
    let vals = |salt: u64, scale: f64| -> Vec<Vec<f32>> {
        sizes.iter().enumerate().map(|(i, &n)| random(n, scale, salt * 10 + i as u64)).collect()
    };
    let (params, grads, m0) = (vals(1, 1.0), vals(2, 3.0), vals(3, 0.1));
    let v0: Vec<Vec<f32>> = vals(4, 0.1).into_iter().map(|v| v.iter().map(|x| x * x).collect()).collect();
    let per: Vec<AdamConsts> = (0..sizes.len())
        .map(|i| AdamConsts {
            decay: 1.0 - 0.01 * i as f32,
            step_size: 0.003 / (i + 1) as f32,
            bc2_sqrt: 0.05 + 0.1 * i as f32,
        })
        .collect();
    let k = AdamScalars { beta1: 0.9, beta2: 0.999, eps: 1e-8, clip: 3.0 };

    let (mut m, mut v) = (m0.clone(), v0.clone());
    let mut out: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut slots: Vec<AdamSlot<'_>> = params
        .iter()
        .zip(&grads)
        .zip(m.iter_mut().zip(v.iter_mut()))
        .zip(out.iter_mut().zip(&per))
        .map(|(((p, g), (m, v)), (o, c))| AdamSlot {
            param: p,
            grad: g,
            m,
            v,
            out: o,
            decay: c.decay,
            step_size: c.step_size,
            bc2_sqrt: c.bc2_sqrt,
        })
        .collect();
    multi_tensor::adamw(&mut slots, k);
    drop(slots);

    let t = |xs: &[Vec<f32>]| -> Vec<TchTensor> {
        xs.iter().map(|x| TchTensor::new(tch::Tensor::from_slice(x))).collect()
    };
    let host_of = |t: &TchTensor| -> Vec<f32> { Vec::<f32>::try_from(&t.tensor).expect("f32 values") };
    let [x2, m2, v2] = ltch::adamw(&t(&params), &t(&grads), &t(&m0), &t(&v0), &per, k);
    for i in 0..sizes.len() {
        close(&host_of(&x2[i]), &out[i], &format!("flat AdamW param {i}"));
        close(&host_of(&m2[i]), &m[i], &format!("flat AdamW m {i}"));
        close(&host_of(&v2[i]), &v[i], &format!("flat AdamW v {i}"));
    }

    let momentum = 0.996;
    let mut ema_out: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut pairs: Vec<(&[f32], &[f32], &mut [f32])> = params
        .iter()
        .zip(&grads)
        .zip(ema_out.iter_mut())
        .map(|((t, s), o)| (&t[..], &s[..], &mut o[..]))
        .collect();
    multi_tensor::ema(&mut pairs, momentum);
    drop(pairs);
    for (i, e) in ltch::ema(&t(&params), &t(&grads), momentum).iter().enumerate() {
        close(&host_of(e), &ema_out[i], &format!("flat EMA {i}"));
    }
}
