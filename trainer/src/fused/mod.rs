//! Fused ops with their own backward passes: LayerNorm, DenseDINO's attention (reference rows included),
//! DINO's cross-entropy, GELU, and the linear layer. Under burn's autodiff each of the first four would
//! otherwise be a chain of five to fifteen elementwise kernels forward and as many backward, each a full
//! pass over memory (burn 0.22 decomposes `layer_norm`, `softmax`, `log_softmax` and, under autodiff,
//! `attention`); burn's linear layer on flex writes its output three times (see [`flex::linear`]).
//!
//! Each op is a burn backend extension ([`FusedOps`]) with three implementations: the plain backends run
//! the forward alone, and `Autodiff<B>` records one backward node whose gradient comes from `B`'s kernel.
//! The kernels ([`Kernels`]) are:
//! - on `flex`, single-pass Rust in [`flex`] (rows over rayon, attention's matmuls on `gemm`);
//! - on LibTorch (`tch`), LibTorch's own fused kernels and their backward formulas, run through its
//!   autograd in [`tch`] (`native_layer_norm`, scaled-dot-product attention, `log_softmax`).
//!
//! The optimiser's multi-tensor kernels (AdamW with the per-tensor clip, the EMA) are in [`multi_tensor`],
//! over host memory ([`host`]).
//!
//! Shapes: B batch, S = T + R tokens (CLS, N patches, R reference tokens), D width, H heads, K prototypes.

// burn-tch is deprecated upstream; it is the LibTorch path we ship (the GPU path of this project).
#![cfg_attr(feature = "tch", allow(deprecated))]

pub mod flex;
pub mod host;
pub mod multi_tensor;
#[cfg(feature = "tch")]
pub mod tch;

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;

/// DINO's loss pairs, by student row: the teacher rows each student row is matched with (none, one or
/// two). Shared, since the autodiff node keeps it for the backward.
#[derive(Clone, Debug)]
pub struct Pairs(pub Arc<Vec<Vec<u32>>>);

impl Pairs {
    /// From `(student row, teacher row)` pairs over `n_student` rows.
    pub fn new(n_student: usize, pairs: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let mut by_row = vec![Vec::new(); n_student];
        for (s, t) in pairs {
            by_row[s].push(t as u32);
        }
        Self(Arc::new(by_row))
    }
    /// The flat `(student, teacher)` index lists.
    pub fn flat(&self) -> (Vec<i64>, Vec<i64>) {
        let mut s = Vec::new();
        let mut t = Vec::new();
        for (i, partners) in self.0.iter().enumerate() {
            for &j in partners {
                s.push(i as i64);
                t.push(j as i64);
            }
        }
        (s, t)
    }
}

/// What a backend provides: each forward returns its output and, when `track`, the tensors its backward
/// needs; each backward takes them back.
pub trait Kernels: Backend {
    /// `x` `[.., D]`, γ and β `[D]`.
    fn layer_norm_fwd(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        track: bool,
    ) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>);
    /// dx, dγ, dβ.
    fn layer_norm_bwd(
        saved: Vec<FloatTensor<Self>>,
        dy: FloatTensor<Self>,
        eps: f64,
    ) -> [FloatTensor<Self>; 3];
    /// `qkv` `[B, S, 3D]` → `[B, S, D]`; the first `main` tokens attend to each other, the rest are
    /// reference rows (see [`attention`]).
    fn attention_fwd(
        qkv: FloatTensor<Self>,
        heads: usize,
        main: usize,
        track: bool,
    ) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>);
    fn attention_bwd(
        saved: Vec<FloatTensor<Self>>,
        dout: FloatTensor<Self>,
        heads: usize,
        main: usize,
    ) -> FloatTensor<Self>;
    /// `[1]`: `−weight · Σ_pairs Σ_k p_jk · log_softmax(s_i · inv_tau)_k`.
    fn dino_ce_fwd(
        s: FloatTensor<Self>,
        p: FloatTensor<Self>,
        pairs: &Pairs,
        inv_tau: f64,
        weight: f64,
        track: bool,
    ) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>);
    /// The gradient with respect to `s` (the targets are constants).
    fn dino_ce_bwd(
        saved: Vec<FloatTensor<Self>>,
        dloss: FloatTensor<Self>,
        pairs: &Pairs,
        inv_tau: f64,
        weight: f64,
    ) -> FloatTensor<Self>;
    /// GELU (erf form), elementwise; the state is the input.
    fn gelu_fwd(x: FloatTensor<Self>, track: bool) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>);
    fn gelu_bwd(saved: Vec<FloatTensor<Self>>, dy: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x` `[M, K]`, `w` `[K, N]`, `b` `[N]` → `x·w + b` `[M, N]`.
    fn linear_fwd(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        track: bool,
    ) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>);
    /// dx, dw, db.
    fn linear_bwd(saved: Vec<FloatTensor<Self>>, dy: FloatTensor<Self>) -> [FloatTensor<Self>; 3];
}

/// The ops as burn sees them: routed by the inputs' backend, autodiff included.
#[backend_extension(Flex, LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait FusedOps: Backend {
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    fn fused_attention(qkv: FloatTensor<Self>, heads: usize, main: usize) -> FloatTensor<Self>;
    fn fused_dino_ce(
        s: FloatTensor<Self>,
        p: FloatTensor<Self>,
        pairs: Pairs,
        inv_tau: f64,
        weight: f64,
    ) -> FloatTensor<Self>;
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    fn fused_linear(x: FloatTensor<Self>, w: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The plain backends: forward only.
macro_rules! forward_only {
    ($backend:ty) => {
        impl FusedOps for $backend {
            fn fused_layer_norm(
                x: FloatTensor<Self>,
                gamma: FloatTensor<Self>,
                beta: FloatTensor<Self>,
                eps: f64,
            ) -> FloatTensor<Self> {
                <Self as Kernels>::layer_norm_fwd(x, gamma, beta, eps, false).0
            }
            fn fused_attention(qkv: FloatTensor<Self>, heads: usize, main: usize) -> FloatTensor<Self> {
                <Self as Kernels>::attention_fwd(qkv, heads, main, false).0
            }
            fn fused_dino_ce(
                s: FloatTensor<Self>,
                p: FloatTensor<Self>,
                pairs: Pairs,
                inv_tau: f64,
                weight: f64,
            ) -> FloatTensor<Self> {
                <Self as Kernels>::dino_ce_fwd(s, p, &pairs, inv_tau, weight, false).0
            }
            fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
                <Self as Kernels>::gelu_fwd(x, false).0
            }
            fn fused_linear(
                x: FloatTensor<Self>,
                w: FloatTensor<Self>,
                b: FloatTensor<Self>,
            ) -> FloatTensor<Self> {
                <Self as Kernels>::linear_fwd(x, w, b, false).0
            }
        }
    };
}
forward_only!(Flex);
#[cfg(feature = "tch")]
forward_only!(burn::backend::LibTorch);

#[derive(Debug)]
struct LayerNormBackward;

impl<B: Kernels> Backward<B, 3> for LayerNormBackward {
    type State = (Vec<FloatTensor<B>>, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x, gamma, beta] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (saved, eps) = ops.state;
        let [dx, dgamma, dbeta] = B::layer_norm_bwd(saved, dy, eps);
        for (node, grad) in [(x, dx), (gamma, dgamma), (beta, dbeta)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: Kernels> Backward<B, 1> for AttentionBackward {
    type State = (Vec<FloatTensor<B>>, usize, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [qkv] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let (saved, heads, main) = ops.state;
        if let Some(node) = qkv {
            grads.register::<B>(node.id, B::attention_bwd(saved, dout, heads, main));
        }
    }
}

#[derive(Debug)]
struct DinoCeBackward;

impl<B: Kernels> Backward<B, 2> for DinoCeBackward {
    type State = (Vec<FloatTensor<B>>, Pairs, f64, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [s, _targets_are_constants] = ops.parents;
        let dloss = grads.consume::<B>(&ops.node);
        let (saved, pairs, inv_tau, weight) = ops.state;
        if let Some(node) = s {
            let ds = B::dino_ce_bwd(saved, dloss, &pairs, inv_tau, weight);
            grads.register::<B>(node.id, ds);
        }
    }
}

#[derive(Debug)]
struct GeluBackward;

impl<B: Kernels> Backward<B, 1> for GeluBackward {
    type State = Vec<FloatTensor<B>>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        if let Some(node) = x {
            grads.register::<B>(node.id, B::gelu_bwd(ops.state, dy));
        }
    }
}

#[derive(Debug)]
struct LinearBackward;

impl<B: Kernels> Backward<B, 3> for LinearBackward {
    type State = Vec<FloatTensor<B>>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x, w, b] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let [dx, dw, db] = B::linear_bwd(ops.state, dy);
        for (node, grad) in [(x, dx), (w, dw), (b, db)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: Kernels, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), gamma.node(), beta.node()];
        let (x, gamma, beta) = (x.into_primitive(), gamma.into_primitive(), beta.into_primitive());
        match LayerNormBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, saved) = B::layer_norm_fwd(x, gamma, beta, eps, true);
                prep.finish((saved, eps), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::layer_norm_fwd(x, gamma, beta, eps, false).0),
        }
    }

    fn fused_attention(qkv: FloatTensor<Self>, heads: usize, main: usize) -> FloatTensor<Self> {
        let nodes = [qkv.node()];
        let qkv = qkv.into_primitive();
        match AttentionBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, saved) = B::attention_fwd(qkv, heads, main, true);
                prep.finish((saved, heads, main), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::attention_fwd(qkv, heads, main, false).0),
        }
    }

    fn fused_dino_ce(
        s: FloatTensor<Self>,
        p: FloatTensor<Self>,
        pairs: Pairs,
        inv_tau: f64,
        weight: f64,
    ) -> FloatTensor<Self> {
        assert!(!p.is_tracked(), "dino_ce: the teacher targets must be constants (no gradient)");
        let nodes = [s.node(), p.node()];
        let (s, p) = (s.into_primitive(), p.into_primitive());
        match DinoCeBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (loss, saved) = B::dino_ce_fwd(s, p, &pairs, inv_tau, weight, true);
                prep.finish((saved, pairs, inv_tau, weight), loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dino_ce_fwd(s, p, &pairs, inv_tau, weight, false).0),
        }
    }

    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [x.node()];
        let x = x.into_primitive();
        match GeluBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, saved) = B::gelu_fwd(x, true);
                prep.finish(saved, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_fwd(x, false).0),
        }
    }

    fn fused_linear(x: FloatTensor<Self>, w: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [x.node(), w.node(), b.node()];
        let (x, w, b) = (x.into_primitive(), w.into_primitive(), b.into_primitive());
        match LinearBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, saved) = B::linear_fwd(x, w, b, true);
                prep.finish(saved, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::linear_fwd(x, w, b, false).0),
        }
    }
}

/// A linear layer, `x·weight + bias` over the last dimension: `x` `[.., K]`, `weight` `[K, N]`, `bias`
/// `[N]` → `[.., N]`. Every row of the batch goes through one matrix product (PyTorch's `addmm` for a
/// flattened input); on flex the output is written once (see [`flex::linear`]); on LibTorch it is
/// LibTorch's `addmm`.
pub fn linear<const D: usize>(x: Tensor<D>, weight: Tensor<2>, bias: Tensor<1>) -> Tensor<D> {
    let dims = x.dims();
    let [k, n] = weight.dims();
    assert_eq!(dims[D - 1], k, "linear: input width {} against a weight of [{k}, {n}]", dims[D - 1]);
    assert_eq!(bias.dims()[0], n, "linear: bias of {} for a weight of [{k}, {n}]", bias.dims()[0]);
    let rows = dims[..D - 1].iter().product();
    let x: Tensor<2> = x.reshape([rows, k]);
    let y = Tensor::<2>::from_dispatch(<Dispatch as FusedOps>::fused_linear(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ));
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

/// LayerNorm over the last dimension: `(x − mean)/sqrt(var + eps)·γ + β` (biased variance, as PyTorch).
pub fn layer_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    ))
}

/// Multi-head attention straight from the qkv projection, with DenseDINO's reference rows.
///
/// `qkv`: `[B, S, 3D]` in PyTorch's `reshape(B, S, 3, H, dh)` order; returns the heads merged, `[B, S, D]`,
/// scaled by `dh^-½`. The first `main` tokens (CLS and patches) attend to each other only; each of the
/// `S − main` reference tokens after them attends to the patches (tokens `1..main`) and to itself, and
/// nothing attends to it: the official `all2pos_pos2cls_eye` mask with the references moved to the end.
/// With `main == S` it is plain attention.
pub fn attention(qkv: Tensor<3>, heads: usize, main: usize) -> Tensor<3> {
    let [_, s, d3] = qkv.dims();
    assert!(main >= 2 && main <= s, "attention: {main} main tokens in a sequence of {s}");
    assert!(d3 % (3 * heads) == 0, "attention: qkv width {d3} is not 3 x heads x head_dim");
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention(qkv.into_dispatch(), heads, main))
}

/// DINO's cross-entropy: `−weight · Σ_{(i, j) ∈ pairs} Σ_k p_jk · log_softmax(s_i · inv_tau)_k` as `[1]`,
/// for student logits `s` `[n_s, K]` and teacher targets `p` `[n_t, K]` (constants: no gradient flows
/// into them). DINO's loss is this with `weight = 1 / (rows per term · number of terms)`.
pub fn dino_ce(s: Tensor<2>, p: Tensor<2>, pairs: &Pairs, inv_tau: f64, weight: f64) -> Tensor<1> {
    let [n, k] = s.dims();
    assert_eq!(pairs.0.len(), n, "dino_ce: pairs are for {} student rows, s has {n}", pairs.0.len());
    assert_eq!(p.dims()[1], k, "dino_ce: targets and logits differ in K");
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_dino_ce(
        s.into_dispatch(),
        p.into_dispatch(),
        pairs.clone(),
        inv_tau,
        weight,
    ))
}

/// GELU in its exact form, `x·Φ(x)` (PyTorch's `nn.GELU()`, DINO's MLP activation). On flex a
/// vectorised kernel replaces burn's, which calls libm's `erff` per element (see [`flex::normal_cdf`]);
/// on LibTorch it is LibTorch's own.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(x.into_dispatch()))
}

impl Kernels for Flex {
    fn layer_norm_fwd(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
        track: bool,
    ) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>) {
        let dims = flex::dims(&x);
        let d = *dims.last().expect("layer_norm of a scalar");
        let (x, gamma, beta) = (flex::contiguous(x), flex::contiguous(gamma), flex::contiguous(beta));
        let (y, mean, rstd) =
            flex::layer_norm(flex::slice(&x), flex::slice(&gamma), flex::slice(&beta), d, eps as f32);
        let rows = mean.len();
        let saved = if track {
            vec![x, gamma, flex::tensor(mean, &[rows]), flex::tensor(rstd, &[rows])]
        } else {
            Vec::new()
        };
        (flex::tensor(y, &dims), saved)
    }

    fn layer_norm_bwd(
        saved: Vec<FloatTensor<Self>>,
        dy: FloatTensor<Self>,
        _eps: f64,
    ) -> [FloatTensor<Self>; 3] {
        let [x, gamma, mean, rstd] = <[_; 4]>::try_from(saved).expect("layer_norm state");
        let dims = flex::dims(&x);
        let d = gamma.layout().shape()[0];
        let dy = flex::contiguous(dy);
        let (dx, dg, db) = flex::layer_norm_backward(
            flex::slice(&x),
            flex::slice(&gamma),
            flex::slice(&mean),
            flex::slice(&rstd),
            flex::slice(&dy),
            d,
        );
        [flex::tensor(dx, &dims), flex::tensor(dg, &[d]), flex::tensor(db, &[d])]
    }

    fn attention_fwd(
        qkv: FloatTensor<Self>,
        heads: usize,
        main: usize,
        track: bool,
    ) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>) {
        let shape = attn_shape(&flex::dims(&qkv), heads, main);
        let qkv = flex::contiguous(qkv);
        let (out, lse) = flex::attention(flex::slice(&qkv), shape, attn_scale(&shape));
        let out = flex::tensor(out, &[shape.batch, shape.seq, shape.dim]);
        let saved = if track {
            vec![qkv, out.clone(), flex::tensor(lse, &[shape.batch, heads, shape.seq])]
        } else {
            Vec::new()
        };
        (out, saved)
    }

    fn attention_bwd(
        saved: Vec<FloatTensor<Self>>,
        dout: FloatTensor<Self>,
        heads: usize,
        main: usize,
    ) -> FloatTensor<Self> {
        let [qkv, out, lse] = <[_; 3]>::try_from(saved).expect("attention state");
        let dims = flex::dims(&qkv);
        let shape = attn_shape(&dims, heads, main);
        let dout = flex::contiguous(dout);
        let dqkv = flex::attention_backward(
            flex::slice(&qkv),
            flex::slice(&out),
            flex::slice(&lse),
            flex::slice(&dout),
            shape,
            attn_scale(&shape),
        );
        flex::tensor(dqkv, &dims)
    }

    fn dino_ce_fwd(
        s: FloatTensor<Self>,
        p: FloatTensor<Self>,
        pairs: &Pairs,
        inv_tau: f64,
        weight: f64,
        track: bool,
    ) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>) {
        let k = flex::dims(&s)[1];
        let (s, p) = (flex::contiguous(s), flex::contiguous(p));
        let (total, lse) = flex::dino_ce(flex::slice(&s), flex::slice(&p), k, &pairs.0, inv_tau as f32);
        let loss = flex::tensor(vec![(-weight * total) as f32], &[1]);
        let saved = if track {
            let n = lse.len();
            vec![s, p, flex::tensor(lse, &[n])]
        } else {
            Vec::new()
        };
        (loss, saved)
    }

    fn dino_ce_bwd(
        saved: Vec<FloatTensor<Self>>,
        dloss: FloatTensor<Self>,
        pairs: &Pairs,
        inv_tau: f64,
        weight: f64,
    ) -> FloatTensor<Self> {
        let [s, p, lse] = <[_; 3]>::try_from(saved).expect("dino_ce state");
        let dims = flex::dims(&s);
        let g = flex::slice(&flex::contiguous(dloss))[0];
        let ds = flex::dino_ce_backward(
            flex::slice(&s),
            flex::slice(&p),
            flex::slice(&lse),
            dims[1],
            &pairs.0,
            inv_tau as f32,
            (-weight) as f32 * g,
        );
        flex::tensor(ds, &dims)
    }

    fn gelu_fwd(x: FloatTensor<Self>, track: bool) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>) {
        let dims = flex::dims(&x);
        let x = flex::contiguous(x);
        let y = flex::tensor(flex::gelu(flex::slice(&x)), &dims);
        (y, if track { vec![x] } else { Vec::new() })
    }

    fn gelu_bwd(saved: Vec<FloatTensor<Self>>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        let [x] = <[_; 1]>::try_from(saved).expect("gelu state");
        let dims = flex::dims(&x);
        let dy = flex::contiguous(dy);
        flex::tensor(flex::gelu_backward(flex::slice(&x), flex::slice(&dy)), &dims)
    }

    fn linear_fwd(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        track: bool,
    ) -> (FloatTensor<Self>, Vec<FloatTensor<Self>>) {
        let (m, k, n) = linear_shape(&x, &w);
        let (x, w, b) = (flex::contiguous(x), flex::contiguous(w), flex::contiguous(b));
        let y = flex::linear(flex::slice(&x), flex::slice(&w), flex::slice(&b), (m, k, n));
        (flex::tensor(y, &[m, n]), if track { vec![x, w] } else { Vec::new() })
    }

    fn linear_bwd(saved: Vec<FloatTensor<Self>>, dy: FloatTensor<Self>) -> [FloatTensor<Self>; 3] {
        let [x, w] = <[_; 2]>::try_from(saved).expect("linear state");
        let (m, k, n) = linear_shape(&x, &w);
        let dy = flex::contiguous(dy);
        let (dx, dw, db) =
            flex::linear_backward(flex::slice(&x), flex::slice(&w), flex::slice(&dy), (m, k, n));
        [flex::tensor(dx, &[m, k]), flex::tensor(dw, &[k, n]), flex::tensor(db, &[n])]
    }
}

/// `(M, K, N)` of a linear layer from `x` `[M, K]` and `w` `[K, N]`.
fn linear_shape(x: &FloatTensor<Flex>, w: &FloatTensor<Flex>) -> (usize, usize, usize) {
    let (xd, wd) = (flex::dims(x), flex::dims(w));
    let (&[m, k], &[k2, n]) = (&xd[..], &wd[..]) else { panic!("linear: x {xd:?} and w {wd:?} must be 2-D") };
    assert_eq!(k, k2, "linear: x {xd:?} against w {wd:?}");
    (m, k, n)
}

/// The attention call's geometry from qkv's dims `[B, S, 3D]`.
fn attn_shape(dims: &[usize], heads: usize, main: usize) -> flex::AttnShape {
    let &[batch, seq, d3] = dims else { panic!("attention: qkv must be [B, S, 3D], got {dims:?}") };
    flex::AttnShape { batch, seq, main, heads, dim: d3 / 3 }
}

/// `dh^-½`, as DINO's `Attention` (`qk_scale=None`).
fn attn_scale(s: &flex::AttnShape) -> f32 {
    ((s.dim / s.heads) as f32).powf(-0.5)
}
