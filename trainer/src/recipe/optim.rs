//! The optimisation step of DINO (`train_one_epoch` in `main_dino.py`; `get_params_groups`, `clip_gradients`
//! and `cancel_gradients_last_layer` in `utils.py`): AdamW with two parameter groups, gradient
//! clipping per parameter tensor, the frozen last layer in the first epoch, and the EMA teacher.
//!
//! burn's `AdamW` decays every parameter at one rate and clips by one global rule; DINO needs the decay
//! schedule on one group only, a per-tensor clip, and a "no gradient at all" state for the last layer
//! (PyTorch's AdamW then skips the tensor: no update, no decay, no step count). Written out here, it is
//! PyTorch's single-tensor AdamW formula, run for all tensors at once by the multi-tensor kernels of
//! [`crate::fused`] (two passes over memory instead of ~15 kernels per tensor), and its state is plain
//! tensors for the checkpoint.

use std::collections::BTreeMap;

use anyhow::Context;
use burn::tensor::{Gradients, Tensor};
use serde::{Deserialize, Serialize};

use crate::fused::host::Host;
use crate::fused::multi_tensor::{self, AdamScalars, AdamSlot};
use crate::model::params::{ParamMut, Params};
use crate::parallel::World;

/// The optimisation recipe of DINO; every default is `main_dino.py`'s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate at a total batch of 256; scaled linearly by `total_batch / 256`.
    pub lr: f64,
    /// Floor of the cosine decay.
    pub min_lr: f64,
    /// Linear warmup from 0 over these epochs.
    pub warmup_epochs: usize,
    /// Weight decay of group 0, cosine from `weight_decay` to `weight_decay_end` over the run.
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    /// Teacher EMA momentum, cosine from this to 1 (use 0.9995 for small batches, dino #104).
    pub momentum_teacher: f64,
    /// Per-tensor gradient norm clip (0: off).
    pub clip_grad: f64,
    /// Epochs during which the heads' last layers get no update.
    pub freeze_last_layer: usize,
    /// AdamW betas and epsilon (PyTorch defaults).
    pub betas: (f64, f64),
    pub eps: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 5e-4,
            min_lr: 1e-6,
            warmup_epochs: 10,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            momentum_teacher: 0.996,
            clip_grad: 3.0,
            freeze_last_layer: 1,
            betas: (0.9, 0.999),
            eps: 1e-8,
        }
    }
}

/// The non-autodiff value of a tensor (parameters live on the autodiff device; updates do not).
pub fn plain<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.is_autodiff() { t.inner() } else { t }
}

/// Group 0 (decayed): tensors of rank ≥ 2 whose name does not end in `.bias`. Group 1: biases and 1-D
/// tensors (LayerNorm). `cls_token` and `pos_embed` are 3-D and therefore decayed, as in DINO.
pub fn is_decayed(name: &str, rank: usize) -> bool {
    rank > 1 && !name.ends_with(".bias")
}

/// Where the per-tensor clip sees two tensors in one of ours: the official DenseDINO ViT holds its
/// positional embedding as two parameters, `cls_pos_embed` `[1, 1, D]` and `patch_pos_embed` `[1, N, D]`,
/// and `clip_gradients` clips each by its own norm; ours is DINO's joined `pos_embed` `[1, 1 + N, D]` (one
/// tensor for checkpoints and export), so its first `D` values (the CLS row) are clipped apart from the
/// rest. `None` for every other tensor. (Only the clip differs: AdamW and the decay are elementwise.)
pub fn clip_split(name: &str, dims: &[usize]) -> Option<usize> {
    match dims {
        &[1, rows, d] if rows > 1 && (name == "pos_embed" || name.ends_with(".pos_embed")) => Some(d),
        _ => None,
    }
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
    /// fp16's loss scale: the gradients carry it, and are multiplied by this (`1 / scale`) before the
    /// clip; a non-finite one skips the step ([`crate::recipe::scaler`]). `None`: unscaled gradients.
    pub unscale: Option<f32>,
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
    /// A diagnostic, off (`None`) unless asked for: with `Some`, each step that clips replaces it with
    /// every clipped tensor's gradient norm before the cut, in the order the clip sees them (a
    /// [`clip_split`] tensor as two, `name[..d]` and `name[d..]`), as the official `clip_gradients`
    /// returns them. The parity test compares them with the official loop's; a pass of its own over the
    /// gradients, so training never pays for it.
    pub clip_norms: Option<Vec<(String, f32)>>,
}

impl Default for AdamW {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, state: BTreeMap::new(), clip_norms: None }
    }
}

/// One parameter's share of a step.
struct Update {
    name: String,
    /// The parameter and its gradient, flattened, on the plain device.
    param: Tensor<1>,
    grad: Tensor<1>,
    weight_decay: f64,
    /// [`clip_split`]: clipped as two tensors, the first this many values and the rest.
    split: Option<usize>,
}

impl AdamW {
    /// One optimiser step over every parameter of `model` that has a gradient in `grads`.
    ///
    /// One multi-tensor kernel: [`multi_tensor::adamw`] where the values live in host memory (flex,
    /// LibTorch on the CPU), [`crate::fused::tch::adamw`] over flat buffers elsewhere (CUDA).
    pub fn step(&mut self, model: &mut dyn Params, grads: &Gradients, o: StepOptions) -> bool {
        self.step_across(&World::single(), model, grads, o).expect("one process runs no collective")
    }

    /// The same with the gradients averaged over the ranks of `world` first (DDP's all-reduce, before
    /// the clip as in the official code). The frozen last layer is left out on every rank alike.
    ///
    /// With `o.unscale` (fp16) the gradients are unscaled first and the step is skipped when any of them
    /// is not finite; returns whether it stepped. Which gradients that check sees follows the official
    /// loop, where `scaler.unscale_` reads every gradient present when it runs: with a clip it runs
    /// before `cancel_gradients_last_layer`, so a frozen last layer's overflow skips the step too;
    /// without one `scaler.step` unscales after the cancel, and the frozen layer is not looked at.
    /// An error is the gradients' all-reduce failing (nothing was updated).
    pub fn step_across(
        &mut self,
        world: &World,
        model: &mut dyn Params,
        grads: &Gradients,
        o: StepOptions,
    ) -> anyhow::Result<bool> {
        if let Some(record) = &mut self.clip_norms {
            record.clear(); // a skipped step clips nothing
        }
        let checks_frozen = o.unscale.is_some() && o.clip_grad > 0.0;
        let mut updates = Vec::new();
        // Gradients that only the overflow check reads (the frozen last layer, see above).
        let mut frozen = Vec::new();
        model.visit("", &mut |name, p: ParamMut<'_>| {
            let is_frozen = o.freeze_last_layer && is_last_layer(name);
            if is_frozen && !checks_frozen {
                return;
            }
            let Some(grad) = p.grad_flat(grads) else {
                return;
            };
            if is_frozen {
                frozen.push(grad);
                return;
            }
            let weight_decay = if is_decayed(name, p.rank()) { o.weight_decay } else { 0.0 };
            let split = clip_split(name, &p.dims());
            updates.push(Update {
                name: name.to_string(),
                param: plain(p.flat()),
                grad,
                weight_decay,
                split,
            });
        });
        if !world.alone() || o.unscale.is_some() {
            // Every gradient the step reads, the frozen ones (read by the overflow check only) last.
            let mut g: Vec<Tensor<1>> = updates.iter().map(|u| u.grad.clone()).chain(frozen).collect();
            if !world.alone() {
                world.average(&mut g).context("averaging the step's gradients")?;
            }
            let finite = o.unscale.is_none_or(|inv| unscale(&mut g, inv));
            for (u, g) in updates.iter_mut().zip(g) {
                u.grad = g;
            }
            if !finite {
                return Ok(false);
            }
        }
        if let (Some(record), true) = (&mut self.clip_norms, o.clip_grad > 0.0) {
            *record = clip_norms(&updates);
        }
        for u in &updates {
            let st = self.state.entry(u.name.clone()).or_insert_with(|| AdamState {
                m: u.param.zeros_like(),
                v: u.param.zeros_like(),
                step: 0,
            });
            st.step += 1;
        }
        let new = match self.step_host(&updates, o) {
            Some(new) => new,
            #[cfg(feature = "tch")]
            None if libtorch::all(updates.iter().map(|u| &u.param)) => self.step_libtorch(&updates, o),
            None => panic!("AdamW: parameters on a device other than flex or LibTorch"),
        };
        // The same walk again: each updated parameter, in the order they were gathered.
        let mut pending = updates.iter().map(|u| u.name.as_str()).zip(new).peekable();
        model.visit("", &mut |name, mut p| {
            if let Some((_, value)) = pending.next_if(|(n, _)| *n == name) {
                p.set_leaf(value, true);
            }
        });
        assert!(pending.next().is_none(), "AdamW: the model's parameters changed during the step");
        Ok(true)
    }

    /// The multi-tensor step over host memory; `None` (nothing changed) when some tensor is elsewhere.
    fn step_host(&mut self, updates: &[Update], o: StepOptions) -> Option<Vec<Tensor<1>>> {
        let mut params = Vec::with_capacity(updates.len());
        let mut grads = Vec::with_capacity(updates.len());
        let mut moments = Vec::with_capacity(updates.len());
        for u in updates {
            params.push(Host::new(u.param.clone())?);
            grads.push(Host::new(u.grad.clone())?);
        }
        // Taken out of the state (a cheap placeholder stands in), so that the kernel owns them and
        // updates them in place.
        for u in updates {
            let st = self.state.get_mut(&u.name).expect("state made by step");
            let m = std::mem::replace(&mut st.m, u.grad.clone());
            let v = std::mem::replace(&mut st.v, u.grad.clone());
            moments.push((
                Host::new(m).expect("moments live with their parameter"),
                Host::new(v).expect("same"),
            ));
        }
        let mut outs: Vec<Host> = params.iter().map(|p| p.output(p.slice().len())).collect();
        let (b1, b2) = (self.beta1, self.beta2);
        let mut slots: Vec<AdamSlot<'_>> = Vec::with_capacity(updates.len() + 1);
        for (((u, param), grad), ((m, v), out)) in
            updates.iter().zip(&params).zip(&grads).zip(moments.iter_mut().zip(outs.iter_mut()))
        {
            let t = self.state[&u.name].step as i32;
            let slot = |param, grad, m, v, out| AdamSlot {
                param,
                grad,
                m,
                v,
                out,
                decay: (1.0 - o.lr * u.weight_decay) as f32,
                step_size: (o.lr / (1.0 - b1.powi(t))) as f32,
                bc2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
            };
            let (param, grad, m, v, out) =
                (param.slice(), grad.slice(), m.slice_mut(), v.slice_mut(), out.slice_mut());
            match u.split {
                // Two slots over the two halves of the same buffers: two clip norms, one update.
                Some(d) => {
                    let ((p0, p1), (g0, g1)) = (param.split_at(d), grad.split_at(d));
                    let ((m0, m1), (v0, v1), (o0, o1)) =
                        (m.split_at_mut(d), v.split_at_mut(d), out.split_at_mut(d));
                    slots.push(slot(p0, g0, m0, v0, o0));
                    slots.push(slot(p1, g1, m1, v1, o1));
                }
                None => slots.push(slot(param, grad, m, v, out)),
            }
        }
        multi_tensor::adamw(
            &mut slots,
            AdamScalars { beta1: b1, beta2: b2, eps: self.eps, clip: o.clip_grad },
        );
        drop(slots);
        for (u, (m, v)) in updates.iter().zip(moments) {
            let st = self.state.get_mut(&u.name).expect("state made above");
            (st.m, st.v) = (m.into_tensor(), v.into_tensor());
        }
        Some(outs.into_iter().map(Host::into_tensor).collect())
    }

    /// The multi-tensor step on LibTorch tensors off the host (CUDA): [`crate::fused::tch::adamw`].
    #[cfg(feature = "tch")]
    fn step_libtorch(&mut self, updates: &[Update], o: StepOptions) -> Vec<Tensor<1>> {
        let (b1, b2) = (self.beta1, self.beta2);
        let mut per = Vec::with_capacity(updates.len());
        let (mut params, mut grads, mut ms, mut vs) = (vec![], vec![], vec![], vec![]);
        for u in updates {
            let st = self.state.get_mut(&u.name).expect("state made by step");
            let t = st.step as i32;
            let consts = crate::fused::tch::AdamConsts {
                decay: (1.0 - o.lr * u.weight_decay) as f32,
                step_size: (o.lr / (1.0 - b1.powi(t))) as f32,
                bc2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
            };
            // A `clip_split` tensor goes in as its two parts (two clip norms) and is joined again below.
            let parts = |t: &Tensor<1>| -> Vec<Tensor<1>> {
                match u.split {
                    Some(d) => vec![t.clone().slice(0..d), t.clone().slice(d..t.dims()[0])],
                    None => vec![t.clone()],
                }
            };
            for (list, t) in
                [(&mut params, &u.param), (&mut grads, &u.grad), (&mut ms, &st.m), (&mut vs, &st.v)]
            {
                list.extend(parts(t).into_iter().map(libtorch::primitive));
            }
            per.extend(std::iter::repeat_n(consts, if u.split.is_some() { 2 } else { 1 }));
        }
        let k = AdamScalars { beta1: b1, beta2: b2, eps: self.eps, clip: o.clip_grad };
        let [x, m, v] = crate::fused::tch::adamw(&params, &grads, &ms, &vs, &per, k);
        let mut joined =
            [x, m, v].map(|list| list.into_iter().map(libtorch::tensor).collect::<Vec<_>>().into_iter());
        let mut out = Vec::with_capacity(updates.len());
        for u in updates {
            let n = if u.split.is_some() { 2 } else { 1 };
            let [x, m, v] = joined.each_mut().map(|it| Tensor::cat(it.by_ref().take(n).collect(), 0));
            let st = self.state.get_mut(&u.name).expect("state made by step");
            (st.m, st.v) = (m, v);
            out.push(x);
        }
        out
    }
}

/// The gradient norm of every tensor the clip sees ([`AdamW::clip_norms`]).
fn clip_norms(updates: &[Update]) -> Vec<(String, f32)> {
    // The host kernel's own reduction (chunked f32 partial sums), on a host copy.
    let norm = |g: Tensor<1>| multi_tensor::norms(&[&crate::model::params::host(g)])[0];
    let mut out = Vec::new();
    for u in updates {
        match u.split {
            Some(d) => {
                let n = u.grad.dims()[0];
                out.push((format!("{}[..{d}]", u.name), norm(u.grad.clone().slice(0..d))));
                out.push((format!("{}[{d}..]", u.name), norm(u.grad.clone().slice(d..n))));
            }
            None => out.push((u.name.clone(), norm(u.grad.clone()))),
        }
    }
    out
}

/// `g ← g · inv` for every gradient; whether all of them were finite before (as
/// `torch._amp_foreach_non_finite_check_and_unscale_` tests the scaled values). In host memory one pass per
/// tensor; elsewhere (CUDA) a multiply per tensor and one read of every tensor's largest magnitude (`max`
/// carries a NaN through on LibTorch).
fn unscale(grads: &mut [Tensor<1>], inv: f32) -> bool {
    let hosts: Option<Vec<Host>> = grads.iter().map(|g| Host::new(g.clone())).collect();
    if let Some(hosts) = hosts {
        let mut finite = true;
        for (g, h) in grads.iter_mut().zip(&hosts) {
            let mut out = h.output(h.slice().len());
            for (o, &x) in out.slice_mut().iter_mut().zip(h.slice()) {
                finite &= x.is_finite();
                *o = x * inv;
            }
            *g = out.into_tensor();
        }
        return finite;
    }
    let largest: Vec<Tensor<1>> = grads
        .iter_mut()
        .map(|g| {
            let largest = g.clone().abs().max();
            *g = g.clone().mul_scalar(inv);
            largest
        })
        .collect();
    largest.is_empty() || crate::model::params::host(Tensor::cat(largest, 0)).iter().all(|v| v.is_finite())
}

/// `θ_t ← m·θ_t + (1−m)·θ_s` over every (student, teacher) pair, backbone and heads: one multi-tensor
/// kernel ([`multi_tensor::ema`] in host memory, [`crate::fused::tch::ema`] on CUDA).
pub fn ema_update(teacher: &mut dyn Params, student: &mut dyn Params, momentum: f64) {
    let mut source = Vec::new();
    student.visit("", &mut |name, p| source.push((name.to_string(), plain(p.flat()))));
    let mut targets = Vec::with_capacity(source.len());
    let mut it = source.iter();
    teacher.visit("", &mut |name, p| {
        let (s_name, _) =
            it.next().unwrap_or_else(|| panic!("teacher has a parameter {name} the student lacks"));
        assert_eq!(s_name, name, "student and teacher parameters must match one to one");
        targets.push(plain(p.flat()));
    });
    let hosts: Option<Vec<(Host, Host)>> = targets
        .iter()
        .zip(&source)
        .map(|(t, (_, s))| Some((Host::new(t.clone())?, Host::new(s.clone())?)))
        .collect();
    let mut new: Vec<Tensor<1>> = match hosts {
        #[cfg(feature = "tch")]
        None if libtorch::all(targets.iter()) => {
            let t: Vec<_> = targets.into_iter().map(libtorch::primitive).collect();
            let s: Vec<_> = source.into_iter().map(|(_, s)| libtorch::primitive(s)).collect();
            crate::fused::tch::ema(&t, &s, momentum).into_iter().map(libtorch::tensor).collect()
        }
        Some(hosts) => {
            let mut outs: Vec<Host> = hosts.iter().map(|(t, _)| t.output(t.slice().len())).collect();
            let mut pairs: Vec<(&[f32], &[f32], &mut [f32])> = hosts
                .iter()
                .zip(outs.iter_mut())
                .map(|((t, s), out)| (t.slice(), s.slice(), out.slice_mut()))
                .collect();
            multi_tensor::ema(&mut pairs, momentum);
            drop(pairs);
            outs.into_iter().map(Host::into_tensor).collect()
        }
        None => panic!("EMA: parameters on a device other than flex or LibTorch"),
    };
    new.reverse();
    teacher.visit("", &mut |_, mut p| p.set_flat(new.pop().expect("one value per parameter")));
}

/// Plain tensors as burn-tch primitives and back.
#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch, as in `fused`
mod libtorch {
    use burn::backend::libtorch::TchTensor;
    use burn::backend::{DispatchDevice, LibTorch};
    use burn::tensor::Tensor;

    pub fn all<'a>(mut ts: impl Iterator<Item = &'a Tensor<1>>) -> bool {
        ts.all(|t| matches!(t.device().as_dispatch(), DispatchDevice::LibTorch(_)))
    }
    pub fn primitive(t: Tensor<1>) -> TchTensor {
        t.try_into_primitive::<LibTorch>().expect("a plain LibTorch tensor")
    }
    pub fn tensor(t: TchTensor) -> Tensor<1> {
        Tensor::from_primitive::<LibTorch>(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_backbone_positional_embedding_is_clipped_as_two_tensors() {
        assert_eq!(clip_split("backbone.pos_embed", &[1, 197, 384]), Some(384));
        assert_eq!(clip_split("pos_embed", &[1, 65, 192]), Some(192));
        for (name, dims) in [("backbone.cls_token", [1, 1, 384]), ("backbone.pos_embed", [1, 1, 384])] {
            assert_eq!(clip_split(name, &dims), None, "{name}");
        }
        assert_eq!(clip_split("backbone.blocks.0.attn.qkv.weight", &[1152, 384]), None);
    }
}
