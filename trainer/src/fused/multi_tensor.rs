//! The optimiser's multi-tensor kernels on host memory (flex, or LibTorch on the CPU): AdamW with DINO's
//! per-tensor gradient clip over every parameter in two parallel passes (the per-tensor norms, then the
//! update), and the EMA teacher in one. The per-tensor formulation costs ~15 kernels per tensor, each a
//! full pass over ~200 tensors; here each value is read and written once per pass.
//!
//! Work is cut into chunks of [`CHUNK`] values across all tensors, and the norms are summed chunk by chunk
//! in a fixed order: the same bits whatever the thread count.

use multiversion::multiversion;
use rayon::prelude::*;

/// Values per unit of parallel work.
const CHUNK: usize = 1 << 15;

/// One parameter tensor's AdamW update (values in host memory, all of one length).
pub struct AdamSlot<'a> {
    pub param: &'a [f32],
    pub grad: &'a [f32],
    /// First and second moments, updated in place.
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
    /// The updated parameter.
    pub out: &'a mut [f32],
    /// `1 − lr·weight_decay` (decoupled decay; 1 for the undecayed group).
    pub decay: f32,
    /// `lr / (1 − β1^t)`.
    pub step_size: f32,
    /// `sqrt(1 − β2^t)`.
    pub bc2_sqrt: f32,
}

/// The scalars every slot shares (f64, as the config holds them: `1 − β` is formed before rounding to f32,
/// as a scalar op on a burn tensor does).
#[derive(Clone, Copy, Debug)]
pub struct AdamScalars {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// DINO's per-tensor clip: each gradient is scaled by `min(1, clip / (‖g‖ + 1e-6))`; 0 turns it off.
    pub clip: f64,
}

/// The f32 constants of the update: β1, 1 − β1, β2, 1 − β2, eps.
#[derive(Clone, Copy)]
struct Consts([f32; 5]);

/// `(slot, start, end)` for every chunk of every slot.
fn chunks(lens: impl Iterator<Item = usize>) -> Vec<(usize, usize, usize)> {
    lens.enumerate()
        .flat_map(|(i, n)| (0..n.div_ceil(CHUNK)).map(move |c| (i, c * CHUNK, ((c + 1) * CHUNK).min(n))))
        .collect()
}

/// The L2 norm of each slice, from partial sums of squares added in chunk order.
pub fn norms(slices: &[&[f32]]) -> Vec<f32> {
    let work = chunks(slices.iter().map(|s| s.len()));
    let partial: Vec<f32> = work.par_iter().map(|&(i, a, b)| sum_squares(&slices[i][a..b])).collect();
    let mut sums = vec![0f32; slices.len()];
    for (&(i, _, _), p) in work.iter().zip(partial) {
        sums[i] += p;
    }
    sums.into_iter().map(f32::sqrt).collect()
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw", "x86_64+avx2+fma"))]
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            acc[j] += c[j] * c[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for &v in tail {
        s += v * v;
    }
    s
}

/// One AdamW step over every slot, PyTorch's single-tensor formula in f32:
/// `g ← g·clip_coef; θ ← θ·decay; m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;`
/// `θ ← θ − step_size · m / (sqrt(v)/bc2_sqrt + eps)`.
pub fn adamw(slots: &mut [AdamSlot<'_>], k: AdamScalars) {
    let coefs: Vec<f32> = if k.clip > 0.0 {
        let grads: Vec<&[f32]> = slots.iter().map(|s| s.grad).collect();
        let clip = k.clip as f32;
        norms(&grads).into_iter().map(|n| (clip * (1.0 / (n + 1e-6))).min(1.0)).collect()
    } else {
        vec![1.0; slots.len()]
    };
    // Split every slot into its chunks' disjoint pieces, then update all pieces in parallel.
    let mut pieces = Vec::new();
    for (slot, &coef) in slots.iter_mut().zip(&coefs) {
        let n = slot.param.len();
        assert!(
            slot.grad.len() == n && slot.m.len() == n && slot.v.len() == n && slot.out.len() == n,
            "adamw: a parameter of {n} values with a gradient, moments or output of another length"
        );
        let mut m: &mut [f32] = slot.m;
        let mut v: &mut [f32] = slot.v;
        let mut out: &mut [f32] = slot.out;
        for (param, grad) in slot.param.chunks(CHUNK).zip(slot.grad.chunks(CHUNK)) {
            let n = param.len();
            let (m_c, m_rest) = std::mem::take(&mut m).split_at_mut(n);
            let (v_c, v_rest) = std::mem::take(&mut v).split_at_mut(n);
            let (o_c, o_rest) = std::mem::take(&mut out).split_at_mut(n);
            (m, v, out) = (m_rest, v_rest, o_rest);
            pieces.push((param, grad, m_c, v_c, o_c, coef, slot.decay, slot.step_size, slot.bc2_sqrt));
        }
    }
    let consts = Consts([
        k.beta1 as f32,
        (1.0 - k.beta1) as f32,
        k.beta2 as f32,
        (1.0 - k.beta2) as f32,
        k.eps as f32,
    ]);
    pieces.into_par_iter().for_each(|(param, grad, m, v, out, coef, decay, step, bc2)| {
        adamw_chunk(param, grad, m, v, out, coef, decay, step, bc2, consts)
    });
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
fn adamw_chunk(
    param: &[f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    out: &mut [f32],
    coef: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    k: Consts,
) {
    let [b1, c1, b2, c2, eps] = k.0;
    for i in 0..param.len() {
        let g = grad[i] * coef;
        let mi = m[i] * b1 + g * c1;
        let vi = v[i] * b2 + g * g * c2;
        m[i] = mi;
        v[i] = vi;
        let denom = vi.sqrt() / bc2_sqrt + eps;
        out[i] = param[i] * decay - mi / denom * step_size;
    }
}

/// `out ← momentum·teacher + (1 − momentum)·student`, over every pair of slices.
pub fn ema(pairs: &mut [(&[f32], &[f32], &mut [f32])], momentum: f64) {
    let mut pieces = Vec::new();
    for (teacher, student, out) in pairs.iter_mut() {
        assert!(
            teacher.len() == student.len() && out.len() == teacher.len(),
            "ema: teacher, student and output differ in length"
        );
        let mut out: &mut [f32] = out;
        for (t, s) in teacher.chunks(CHUNK).zip(student.chunks(CHUNK)) {
            let (o_c, rest) = std::mem::take(&mut out).split_at_mut(t.len());
            out = rest;
            pieces.push((t, s, o_c));
        }
    }
    let (keep, rest) = (momentum as f32, (1.0 - momentum) as f32);
    pieces.into_par_iter().for_each(|(t, s, out)| ema_chunk(t, s, out, keep, rest));
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw", "x86_64+avx2+fma"))]
fn ema_chunk(t: &[f32], s: &[f32], out: &mut [f32], momentum: f32, rest: f32) {
    for i in 0..t.len() {
        out[i] = t[i] * momentum + s[i] * rest;
    }
}
