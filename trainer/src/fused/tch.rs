//! The fused ops on LibTorch: each forward is LibTorch's own fused kernel (`native_layer_norm`,
//! scaled-dot-product attention, `log_softmax`) run under LibTorch's autograd on leaf views of burn's
//! tensors; the backward asks that autograd for the leaves' gradients. So the backward formulas are
//! PyTorch's own, and the kernel choice too (flash attention on the CPU, flash or memory-efficient
//! attention on CUDA).
//!
//! burn-tch writes in place into a tensor whose storage nobody else holds. Everything kept for the
//! backward therefore shares its storage handle with the tensor it views, so neither side is overwritten
//! while the other still needs it.

#![allow(deprecated)] // burn-tch, as in `fused`

use burn::backend::libtorch::{LibTorch, TchTensor};
use burn::backend::ops::ActivationOps;
use burn::backend::tensor::FloatTensor;
use tch::Tensor;

use super::{Kernels, Pairs};

/// Runs `f` on `leaves` (differentiable) and `consts`. With `track`, under LibTorch's autograd: returns
/// burn's view of the output and the state `[leaf.., output]` for [`backward`].
fn forward(
    leaves: &[&TchTensor],
    consts: &[&TchTensor],
    track: bool,
    f: impl FnOnce(&[Tensor], &[Tensor]) -> Tensor,
) -> (TchTensor, Vec<TchTensor>) {
    let consts: Vec<Tensor> = consts.iter().map(|t| t.tensor.shallow_clone()).collect();
    if !track {
        let xs: Vec<Tensor> = leaves.iter().map(|t| t.tensor.shallow_clone()).collect();
        return (TchTensor::new(tch::no_grad(|| f(&xs, &consts))), Vec::new());
    }
    let xs: Vec<Tensor> = leaves.iter().map(|t| t.tensor.detach().set_requires_grad(true)).collect();
    let out = tch::with_grad(|| f(&xs, &consts));
    let mut saved: Vec<TchTensor> =
        leaves.iter().zip(xs).map(|(t, leaf)| TchTensor::from_existing(leaf, t.storage.clone())).collect();
    let out = TchTensor::new(out);
    let for_burn = TchTensor::from_existing(out.tensor.detach(), out.storage.clone());
    saved.push(out);
    (for_burn, saved)
}

/// The gradients of the saved leaves, given the output's gradient.
fn backward(saved: Vec<TchTensor>, dout: TchTensor) -> Vec<TchTensor> {
    let (out, leaves) = saved.split_last().expect("saved graph");
    // d(Σ out ⊙ dout)/d out = dout exactly: autograd's entry point without a grad_outputs argument.
    let root = tch::with_grad(|| (&out.tensor * &dout.tensor).sum(out.tensor.kind()));
    let leaves: Vec<&Tensor> = leaves.iter().map(|t| &t.tensor).collect();
    Tensor::run_backward(&[root], &leaves, false, false).into_iter().map(TchTensor::new).collect()
}

/// (sequence length, main tokens, device).
type MaskKey = (usize, usize, tch::Device);

/// `[S, S]` boolean mask (true: may attend) of the reference rows for `main` main tokens. Kept per shape
/// and device: on CUDA each host-to-device copy would stall the stream, and every block asks for it.
fn reference_mask(seq: usize, main: usize, device: tch::Device) -> Tensor {
    thread_local! {
        static MASKS: std::cell::RefCell<Vec<(MaskKey, Tensor)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    MASKS.with_borrow_mut(|masks| {
        if let Some((_, m)) = masks.iter().find(|(key, _)| *key == (seq, main, device)) {
            return m.shallow_clone();
        }
        let mut m = vec![false; seq * seq];
        for i in 0..seq {
            if i < main {
                m[i * seq..i * seq + main].fill(true);
            } else {
                m[i * seq + 1..i * seq + main].fill(true);
                m[i * seq + i] = true;
            }
        }
        let m = Tensor::from_slice(&m).view([seq as i64, seq as i64]).to_device(device);
        masks.push(((seq, main, device), m.shallow_clone()));
        m
    })
}

impl Kernels for LibTorch {
    fn layer_norm_fwd(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        track: bool,
    ) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>) {
        let d = *x.tensor.size().last().expect("layer_norm of a scalar");
        forward(&[&x, &gamma, &beta], &[], track, |t, _| {
            t[0].layer_norm([d], Some(&t[1]), Some(&t[2]), eps, true)
        })
    }

    fn layer_norm_bwd(
        saved: Vec<FloatTensor<Self>>,
        dy: FloatTensor<Self>,
        _eps: f64,
    ) -> [FloatTensor<Self>; 3] {
        <[_; 3]>::try_from(backward(saved, dy)).expect("three gradients")
    }

    fn attention_fwd(
        qkv: FloatTensor<Self>,
        heads: usize,
        main: usize,
        track: bool,
    ) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>) {
        let size = qkv.tensor.size();
        let (b, s, d) = (size[0], size[1], size[2] / 3);
        let h = heads as i64;
        let mask = (main < s as usize).then(|| reference_mask(s as usize, main, qkv.tensor.device()));
        forward(&[&qkv], &[], track, |t, _| {
            let qkv = t[0].reshape([b, s, 3, h, d / h]).permute([2, 0, 3, 1, 4]); // [3, B, H, S, dh]
            let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
            let o = Tensor::scaled_dot_product_attention(&q, &k, &v, mask.as_ref(), 0.0, false, None, false);
            o.transpose(1, 2).reshape([b, s, d]) // [B, S, D]
        })
    }

    fn attention_bwd(
        saved: Vec<FloatTensor<Self>>,
        dout: FloatTensor<Self>,
        _heads: usize,
        _main: usize,
    ) -> FloatTensor<Self> {
        backward(saved, dout).pop().expect("one gradient")
    }

    fn dino_ce_fwd(
        s: FloatTensor<Self>,
        p: FloatTensor<Self>,
        pairs: &Pairs,
        inv_tau: f64,
        weight: f64,
        track: bool,
    ) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>) {
        let device = s.tensor.device();
        let (si, ti) = pairs.flat();
        let si = Tensor::from_slice(&si).to_device(device);
        let ti = Tensor::from_slice(&ti).to_device(device);
        forward(&[&s], &[&p], track, |s, p| {
            let s = &s[0];
            // Each student row's summed targets, then one log-softmax per row (LibTorch's fused kernel
            // and, in the backward, its fused `_log_softmax_backward_data`).
            let targets = tch::no_grad(|| s.zeros_like().index_add(0, &si, &p[0].index_select(0, &ti)));
            let log_q = (s * inv_tau).log_softmax(-1, s.kind());
            ((log_q * targets).sum(s.kind()) * -weight).reshape([1])
        })
    }

    fn dino_ce_bwd(
        saved: Vec<FloatTensor<Self>>,
        dloss: FloatTensor<Self>,
        _pairs: &Pairs,
        _inv_tau: f64,
        _weight: f64,
    ) -> FloatTensor<Self> {
        backward(saved, dloss).pop().expect("one gradient")
    }

    // LibTorch's own GELU forward and backward (one kernel each), as burn's autodiff would call them.
    fn gelu_fwd(x: FloatTensor<Self>, track: bool) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>) {
        if !track {
            return (<LibTorch as ActivationOps<LibTorch>>::gelu(x), Vec::new());
        }
        // The clone shares x's storage, so burn-tch does not compute the GELU in place over the saved x.
        (<LibTorch as ActivationOps<LibTorch>>::gelu(x.clone()), vec![x])
    }

    fn gelu_bwd(saved: Vec<FloatTensor<Self>>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        let [x] = <[_; 1]>::try_from(saved).expect("gelu state");
        <LibTorch as ActivationOps<LibTorch>>::gelu_backward(x, dy)
    }

    fn linear_fwd(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        track: bool,
    ) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>) {
        // PyTorch's `F.linear` on a 2-D input: one addmm (bias broadcast over the rows). The output is a
        // new tensor, so keeping x and w (their storage handles with them) keeps burn-tch from writing
        // into them in place.
        let y = tch::no_grad(|| b.tensor.addmm(&x.tensor, &w.tensor));
        (TchTensor::new(y), if track { vec![x, w] } else { Vec::new() })
    }

    fn linear_bwd(saved: Vec<FloatTensor<Self>>, dy: FloatTensor<Self>) -> [FloatTensor<Self>; 3] {
        let [x, w] = <[_; 2]>::try_from(saved).expect("linear state");
        let dy = &dy.tensor;
        // addmm's backward formulas: dx = dy·wᵀ, dw = xᵀ·dy, db = Σ_rows dy.
        let (dx, dw, db) = tch::no_grad(|| {
            (
                dy.mm(&w.tensor.tr()),
                x.tensor.tr().mm(dy),
                dy.sum_dim_intlist([0i64].as_slice(), false, dy.kind()),
            )
        });
        [TchTensor::new(dx), TchTensor::new(dw), TchTensor::new(db)]
    }
}

/// One parameter's AdamW constants, as in [`super::multi_tensor::AdamSlot`].
#[derive(Clone, Copy, Debug)]
pub struct AdamConsts {
    pub decay: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
}

/// `per` (one value per tensor) repeated over each tensor's `lengths` values: `[N]`.
fn per_value(per: &[f32], lengths: &Tensor, n: i64, device: tch::Device) -> Tensor {
    Tensor::from_slice(per).to_device(device).repeat_interleave_self_tensor(lengths, 0, n)
}

/// Views of `flat` with the given sizes, each sharing the buffer's storage handle (so burn never writes
/// into one in place while the others live).
fn split(flat: Tensor, sizes: &[i64]) -> Vec<TchTensor> {
    let flat = TchTensor::new(flat);
    flat.tensor
        .split_with_sizes(sizes, 0)
        .into_iter()
        .map(|t| TchTensor::partial(t, flat.storage.clone()))
        .collect()
}

/// The multi-tensor AdamW step on LibTorch tensors anywhere (the CUDA path; on the CPU the host kernel
/// does the same in one pass): the formula of [`super::multi_tensor::adamw`] on all parameters
/// concatenated into one flat buffer, so a step is about 25 kernels whatever the number of tensors. All
/// inputs are 1-D; returns the new parameters, first and second moments, each a view into one buffer.
pub fn adamw(
    params: &[TchTensor],
    grads: &[TchTensor],
    m: &[TchTensor],
    v: &[TchTensor],
    per: &[AdamConsts],
    k: super::multi_tensor::AdamScalars,
) -> [Vec<TchTensor>; 3] {
    let t = |xs: &[TchTensor]| -> Vec<Tensor> { xs.iter().map(|x| x.tensor.shallow_clone()).collect() };
    let device = params[0].tensor.device();
    let sizes: Vec<i64> = params.iter().map(|p| p.tensor.numel() as i64).collect();
    let n: i64 = sizes.iter().sum();
    let lengths = Tensor::from_slice(&sizes).to_device(device);
    tch::no_grad(|| {
        let mut g = Tensor::cat(&t(grads), 0);
        if k.clip > 0.0 {
            // DINO's per-tensor clip: the per-tensor norms by one segmented reduction.
            let norms =
                Tensor::segment_reduce(&g.square(), "sum", Some(&lengths), None, None, 0, false, 0.0).sqrt();
            let coef = ((norms + 1e-6).reciprocal() * (k.clip as f32) as f64).clamp_max(1.0);
            g *= coef.repeat_interleave_self_tensor(&lengths, 0, n);
        }
        let pick = |f: fn(&AdamConsts) -> f32| {
            per_value(&per.iter().map(f).collect::<Vec<_>>(), &lengths, n, device)
        };
        let (b1, b2) = (k.beta1 as f32 as f64, k.beta2 as f32 as f64);
        let (c1, c2) = ((1.0 - k.beta1) as f32 as f64, (1.0 - k.beta2) as f32 as f64);
        let m = Tensor::cat(&t(m), 0) * b1 + &g * c1;
        let v = Tensor::cat(&t(v), 0) * b2 + &g * &g * c2;
        let denom = v.sqrt() / pick(|c| c.bc2_sqrt) + k.eps as f32 as f64;
        let x = Tensor::cat(&t(params), 0) * pick(|c| c.decay) - &m / denom * pick(|c| c.step_size);
        [split(x, &sizes), split(m, &sizes), split(v, &sizes)]
    })
}

/// `momentum·teacher + (1 − momentum)·student` over all pairs at once (1-D tensors); views into one buffer.
pub fn ema(teacher: &[TchTensor], student: &[TchTensor], momentum: f64) -> Vec<TchTensor> {
    let t = |xs: &[TchTensor]| -> Vec<Tensor> { xs.iter().map(|x| x.tensor.shallow_clone()).collect() };
    let sizes: Vec<i64> = teacher.iter().map(|p| p.tensor.numel() as i64).collect();
    tch::no_grad(|| {
        let keep = momentum as f32 as f64;
        let rest = (1.0 - momentum) as f32 as f64;
        split(Tensor::cat(&t(teacher), 0) * keep + Tensor::cat(&t(student), 0) * rest, &sizes)
    })
}
