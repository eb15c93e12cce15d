//! The optimisation step of DINO (method-spec §2.5, §2.6): AdamW with two parameter groups, gradient
//! clipping per parameter tensor, the frozen last layer in the first epoch, and the EMA teacher.
//!
//! burn's `AdamW` decays every parameter at one rate and clips by one global rule; DINO needs the decay
//! schedule on one group only, a per-tensor clip, and a "no gradient at all" state for the last layer
//! (PyTorch's AdamW then skips the tensor: no update, no decay, no step count). Written out here, it is
//! PyTorch's single-tensor AdamW line for line, and its state is plain tensors for the checkpoint.

use std::collections::BTreeMap;

use burn::tensor::{Gradients, Tensor};

use crate::params::{ParamMut, Params};

/// The non-autodiff value of a tensor (parameters live on the autodiff device; updates do not).
pub fn plain<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.is_autodiff() { t.inner() } else { t }
}

/// Group 0 (decayed): tensors of rank ≥ 2 whose name does not end in `.bias`. Group 1: biases and 1-D
/// tensors (LayerNorm). `cls_token` and `pos_embed` are 3-D and therefore decayed, as in DINO.
pub fn is_decayed(name: &str, rank: usize) -> bool {
    rank > 1 && !name.ends_with(".bias")
}

/// DINO's `cancel_gradients_last_layer` matches by name.
pub fn is_last_layer(name: &str) -> bool {
    name.contains("last_layer")
}

/// What changes from step to step.
#[derive(Clone, Copy, Debug)]
pub struct StepOptions {
    pub lr: f64,
    /// Applied to group 0 only.
    pub weight_decay: f64,
    /// Per-tensor max gradient norm (3.0); 0 turns clipping off.
    pub clip_grad: f64,
    /// Epoch < `freeze_last_layer`: the last layers get no gradient at all.
    pub freeze_last_layer: bool,
}

pub struct AdamState {
    pub m: Tensor<1>,
    pub v: Tensor<1>,
    /// Per tensor, as PyTorch: a frozen tensor's count starts when it starts moving.
    pub step: u64,
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub state: BTreeMap<String, AdamState>,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            state: BTreeMap::new(),
        }
    }
}

/// DINO's `clip_gradients`: each tensor's gradient is scaled by `clip / (‖g‖ + 1e-6)` when that is below 1.
/// Done on the device as `g · min(1, clip / (‖g‖ + 1e-6))`: no host round trip per tensor.
pub fn clip_per_tensor(g: Tensor<1>, clip: f64) -> Tensor<1> {
    let norm = g.clone().square().sum().sqrt(); // [1]
    let coef = norm
        .add_scalar(1e-6)
        .recip()
        .mul_scalar(clip)
        .clamp_max(1.0);
    g * coef
}

impl AdamW {
    /// One optimiser step over every parameter of `model` that has a gradient in `grads`.
    pub fn step(&mut self, model: &mut dyn Params, grads: &Gradients, o: StepOptions) {
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        model.visit("", &mut |name, mut p: ParamMut<'_>| {
            if o.freeze_last_layer && is_last_layer(name) {
                return;
            }
            let Some(mut g) = p.grad_flat(grads) else {
                return;
            };
            if o.clip_grad > 0.0 {
                g = clip_per_tensor(g, o.clip_grad);
            }
            let wd = if is_decayed(name, p.rank()) {
                o.weight_decay
            } else {
                0.0
            };
            let x = plain(p.flat());
            let st = self
                .state
                .entry(name.to_string())
                .or_insert_with(|| AdamState {
                    m: x.zeros_like(),
                    v: x.zeros_like(),
                    step: 0,
                });
            st.step += 1;
            let x = x.mul_scalar(1.0 - o.lr * wd);
            st.m = st.m.clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
            st.v = st.v.clone().mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
            let bc1 = 1.0 - b1.powi(st.step as i32);
            let bc2 = 1.0 - b2.powi(st.step as i32);
            let denom = st.v.clone().sqrt().div_scalar(bc2.sqrt()).add_scalar(eps);
            let x = x - (st.m.clone() / denom).mul_scalar(o.lr / bc1);
            p.set_leaf(x, true);
        });
    }
}

/// `θ_t ← m·θ_t + (1−m)·θ_s` over every (student, teacher) pair, backbone and heads.
pub fn ema_update(teacher: &mut dyn Params, student: &mut dyn Params, momentum: f64) {
    let mut source = Vec::new();
    student.visit("", &mut |name, p| {
        source.push((name.to_string(), plain(p.flat())))
    });
    let mut it = source.into_iter();
    teacher.visit("", &mut |name, mut p| {
        let (s_name, s) = it
            .next()
            .unwrap_or_else(|| panic!("teacher has a parameter {name} the student lacks"));
        assert_eq!(
            s_name, name,
            "student and teacher parameters must match one to one"
        );
        let t = plain(p.flat());
        p.set_flat(t.mul_scalar(momentum) + s.mul_scalar(1.0 - momentum));
    });
}

/// Makes the teacher an exact copy of the student (at start, as `teacher.load_state_dict(student)`), on
/// the student's plain device.
pub fn copy_into(teacher: &mut dyn Params, student: &mut dyn Params) {
    ema_update(teacher, student, 0.0);
}
