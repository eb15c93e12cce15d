//! The fused kernels on burn's pure-Rust `flex` backend: f32 rows in, f32 rows out, one pass where the
//! decomposed formulation makes five to ten. Rows are split over rayon's pool (the one flex itself uses);
//! the two small matrix products of attention go to `gemm` (flex's own GEMM), single-threaded inside a
//! rayon task.
//!
//! Reductions run over 16 lanes in a fixed order, in fixed blocks summed in order, so on one machine a
//! result does not depend on the thread count: replay is bit-exact. (Across machines it may differ in
//! the last bits: `gemm` picks its kernel and blocking from the CPU, and `ln` is libm's.)

use std::mem::MaybeUninit;

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::{Bytes, DType, Shape};
use multiversion::multiversion;
use rayon::prelude::*;

/// Lanes of every reduction (one AVX-512 register, two AVX2 registers).
const LANES: usize = 16;

/// A contiguous f32 copy (or the tensor itself when it already is one).
pub fn contiguous(t: FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "the fused flex kernels take f32 tensors");
    if t.as_slice::<f32>().is_some() { t } else { t.to_contiguous() }
}

pub fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

pub fn tensor(data: Vec<f32>, dims: &[usize]) -> FlexTensor {
    debug_assert_eq!(data.len(), dims.iter().product::<usize>());
    FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(Shape::from(dims.to_vec())), DType::F32)
}

pub fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

/// `e^x` to about 2 ulp on the range that matters (`x ≥ −87`; below, a denormal-free tiny value), written
/// without branches or libm so that a loop over it vectorises (Cephes' `expf`: `x = n ln2 + r`,
/// `|r| ≤ ln2/2`, a degree-6 polynomial in `r`, and `2^n` put in the exponent bits).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round-to-nearest by the 1.5·2^23 trick: vectorises, unlike `round`.
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Maximum of a row.
#[inline(always)]
fn max_row(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j]);
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in tail {
        m = m.max(v);
    }
    m
}

/// `Σ_j f(x_j)`, lanes summed pairwise at the end.
#[inline(always)]
fn sum_row(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += f(c[j]);
        }
    }
    let mut s = lanes_sum(acc);
    for &v in tail {
        s += f(v);
    }
    s
}

/// `Σ_j f(x_j, y_j)`.
#[inline(always)]
fn sum_rows2(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    debug_assert_eq!(x.len(), y.len());
    let mut acc = [0f32; LANES];
    let n = x.len() / LANES * LANES;
    for (cx, cy) in x[..n].chunks_exact(LANES).zip(y[..n].chunks_exact(LANES)) {
        for j in 0..LANES {
            acc[j] += f(cx[j], cy[j]);
        }
    }
    let mut s = lanes_sum(acc);
    for (&a, &b) in x[n..].iter().zip(&y[n..]) {
        s += f(a, b);
    }
    s
}

/// `Σ_j f(x_j, y_j, z_j)`.
#[inline(always)]
fn sum_rows3(x: &[f32], y: &[f32], z: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let n = x.len() / LANES * LANES;
    for c in (0..n).step_by(LANES) {
        let (x, y, z) = (&x[c..c + LANES], &y[c..c + LANES], &z[c..c + LANES]);
        for j in 0..LANES {
            acc[j] += f(x[j], y[j], z[j]);
        }
    }
    let mut s = lanes_sum(acc);
    for j in n..x.len() {
        s += f(x[j], y[j], z[j]);
    }
    s
}

#[inline(always)]
fn lanes_sum(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for j in 0..w {
            acc[j] += acc[j + w];
        }
        w /= 2;
    }
    acc[0]
}

// ---------------------------------------------------------------------------------------------------------
// Linear layers: one GEMM each way, outputs written once.
//
// burn's `linear` on flex costs three passes besides the GEMM: its matmul output is a zero-filled buffer
// copied into an aligned one (`FlexTensor::empty`: `vec![0u8; n]`, whose alignment of 1 makes
// `Bytes::from_bytes_vec` copy it), the bias is added in a pass of its own, and a `[B, S, K]` input is
// multiplied as B separate `[S, K]` matrices, each packing the weights again. Here the rows of all the
// batch go to one GEMM, the bias rows are written first and the GEMM adds onto them, and the gradients
// are written into fresh uninitialised buffers.

/// Products at least this large (m·n·k) run over rayon's pool, as flex's own matmul decides.
const GEMM_PARALLEL: usize = 192 * 192 * 192;

fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m.saturating_mul(n).saturating_mul(k) >= GEMM_PARALLEL {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// A new `rows × cols` matrix written by one GEMM over uninitialised memory (see [`gemm_strided`]).
fn gemm_new(rows: usize, cols: usize, product: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut out = Vec::<f32>::with_capacity(rows * cols);
    product(out.as_mut_ptr());
    // SAFETY: `product` wrote every element of the `rows × cols` result (gemm without `add`).
    unsafe { out.set_len(rows * cols) };
    out
}

/// `x·w + b` for row-major `x` `[m, k]`, `w` `[k, n]` and `b` `[n]`: `[m, n]`.
pub fn linear(x: &[f32], w: &[f32], b: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
    assert!(
        x.len() == m * k && w.len() == k * n && b.len() == n,
        "linear: operands of [{m}, {k}] x [{k}, {n}]"
    );
    // Whole rows per task: every chunk is rows of n.
    let mut y = par_fill(m * n, (TASK_ROWS * n).max(1), |_, rows| {
        for row in rows.chunks_exact_mut(n) {
            for (slot, &v) in row.iter_mut().zip(b) {
                slot.write(v);
            }
        }
    });
    // SAFETY: x is [m, k] (row stride k), w is [k, n] (row stride n), y is [m, n] and its own buffer.
    unsafe {
        gemm_strided(
            (m, n, k),
            y.as_mut_ptr(),
            n,
            true,
            x.as_ptr(),
            (k, 1),
            w.as_ptr(),
            (n, 1),
            1.0,
            parallelism(m, n, k),
        )
    };
    y
}

/// The gradients of [`linear`] for the output gradient `dy` `[m, n]`: `dx = dy·wᵀ` `[m, k]`,
/// `dw = xᵀ·dy` `[k, n]`, `db = Σ_rows dy` `[n]` (in fixed blocks of rows summed in order, so the bits do
/// not depend on the thread count).
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    (m, k, n): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(
        x.len() == m * k && w.len() == k * n && dy.len() == m * n,
        "linear_backward: operands of [{m}, {k}] x [{k}, {n}]"
    );
    // SAFETY (both products): dy is [m, n] (row stride n); wᵀ is w read with strides (1, n), [n, k]; xᵀ
    // is x read with strides (1, k), [k, m]; each output is its own buffer of the product's shape.
    let dx = gemm_new(m, k, |dst| unsafe {
        gemm_strided(
            (m, k, n),
            dst,
            k,
            false,
            dy.as_ptr(),
            (n, 1),
            w.as_ptr(),
            (1, n),
            1.0,
            parallelism(m, k, n),
        )
    });
    let dw = gemm_new(k, n, |dst| unsafe {
        gemm_strided(
            (k, n, m),
            dst,
            n,
            false,
            x.as_ptr(),
            (1, k),
            dy.as_ptr(),
            (n, 1),
            1.0,
            parallelism(k, n, m),
        )
    });
    let mut db = vec![0.0f32; n];
    if n > 0 {
        let blocks: Vec<Vec<f32>> = dy
            .par_chunks(TASK_ROWS * n)
            .map(|rows| {
                let mut sum = vec![0.0f32; n];
                for row in rows.chunks_exact(n) {
                    add_row(&mut sum, row);
                }
                sum
            })
            .collect();
        for block in &blocks {
            add_row(&mut db, block);
        }
    }
    (dx, dw, db)
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw", "x86_64+avx2+fma"))]
fn add_row(acc: &mut [f32], row: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(row) {
        *a += v;
    }
}

// ---------------------------------------------------------------------------------------------------------
// GELU, elementwise.

/// Elements per rayon task.
const GELU_CHUNK: usize = 1 << 14;

/// The standard normal CDF Φ(x) = ½·(1 + erf(x/√2)) as PyTorch's vectorised CPU GELU computes it
/// (`Vectorized<float>::erf` in ATen's `vec256_float.h`: Abramowitz & Stegun 7.1.26, erf(z) = 1 −
/// t·P(t)·e^{−z²} with t = 1/(1 + 0.3275911·|z|) and P of degree 4, absolute error below 1.5e-7),
/// without branches or libm, so that GELU's loops vectorise (flex's own GELU calls libm's scalar
/// `erff` per element: 6% of a step). Like PyTorch's, it is accurate in absolute terms, not relative to
/// Φ in the lower tail (1 + erf cancels there).
#[inline(always)]
pub fn normal_cdf(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = 1.061_405_4_f32;
    let p = p * t - 1.453_152;
    let p = p * t + 1.421_413_7;
    let p = p * t - 0.284_496_74;
    let p = p * t + 0.254_829_6;
    let erf_abs = 1.0 - t * p * exp(-a * a);
    let erf = if z < 0.0 { -erf_abs } else { erf_abs };
    0.5 * (1.0 + erf)
}

/// The standard normal density φ(x) = e^{−x²/2}/√(2π), in GELU's derivative Φ(x) + x·φ(x).
#[inline(always)]
fn normal_pdf(x: f32) -> f32 {
    // 1/√(2π)
    0.398_942_3 * exp(-0.5 * x * x)
}

/// A new vector of `n` values written once, `chunk` values per rayon task, by `fill(start, slots)` (which
/// must write every slot of its chunk): no zero-fill pass before the real one.
fn par_fill(n: usize, chunk: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(c, slots)| fill(c * chunk, slots));
    // SAFETY: the chunks cover the first n slots, and `fill` writes every slot of each.
    unsafe { out.set_len(n) };
    out
}

/// GELU in its exact (erf) form, `x·Φ(x)`: PyTorch's `nn.GELU()` default, DINO's MLP activation.
pub fn gelu(x: &[f32]) -> Vec<f32> {
    par_fill(x.len(), GELU_CHUNK, |start, y| gelu_chunk(&x[start..start + y.len()], y))
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw", "x86_64+avx2+fma"))]
fn gelu_chunk(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    for (y, &x) in y.iter_mut().zip(x) {
        y.write(x * normal_cdf(x));
    }
}

/// `dy·(Φ(x) + x·φ(x))`, GELU's backward from its input.
pub fn gelu_backward(x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), dy.len(), "gelu_backward: x and dy differ in length");
    par_fill(x.len(), GELU_CHUNK, |start, dx| {
        let end = start + dx.len();
        gelu_backward_chunk(&x[start..end], &dy[start..end], dx)
    })
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw", "x86_64+avx2+fma"))]
fn gelu_backward_chunk(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
        dx.write(dy * (normal_cdf(x) + x * normal_pdf(x)));
    }
}

// ---------------------------------------------------------------------------------------------------------
// LayerNorm over the last dimension.

/// Rows handled by one rayon task in the row kernels (LayerNorm; the linear layer's bias and its
/// gradient), and so one partial sum of their parameter gradients.
const TASK_ROWS: usize = 64;

/// `y = (x − μ)·rstd·γ + β` per row of `x` `[rows, d]`. Returns y and, per row, μ and rstd (the backward's
/// state).
pub fn layer_norm(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    d: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / d;
    let mut y = vec![0f32; x.len()];
    let mut mean = vec![0f32; rows];
    let mut rstd = vec![0f32; rows];
    y.par_chunks_mut(TASK_ROWS * d)
        .zip(x.par_chunks(TASK_ROWS * d))
        .zip(mean.par_chunks_mut(TASK_ROWS).zip(rstd.par_chunks_mut(TASK_ROWS)))
        .for_each(|((y, x), (mean, rstd))| layer_norm_rows(x, gamma, beta, d, eps, y, mean, rstd));
    (y, mean, rstd)
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
fn layer_norm_rows(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    d: usize,
    eps: f32,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    for (r, (x, y)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
        let mu = sum_row(x, |v| v) / d as f32;
        let var = sum_row(x, |v| (v - mu) * (v - mu)) / d as f32;
        let rs = 1.0 / (var + eps).sqrt();
        for j in 0..d {
            y[j] = (x[j] - mu) * rs * gamma[j] + beta[j];
        }
        mean[r] = mu;
        rstd[r] = rs;
    }
}

/// The LayerNorm backward: `dx` `[rows, d]`, `dγ` and `dβ` `[d]`.
pub fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    d: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; x.len()];
    // One partial (dγ, dβ) per task, summed in task order: the same bits whatever the thread count.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(TASK_ROWS * d)
        .zip(x.par_chunks(TASK_ROWS * d).zip(dy.par_chunks(TASK_ROWS * d)))
        .zip(mean.par_chunks(TASK_ROWS).zip(rstd.par_chunks(TASK_ROWS)))
        .map(|((dx, (x, dy)), (mean, rstd))| {
            let mut dg = vec![0f32; d];
            let mut db = vec![0f32; d];
            layer_norm_backward_rows(x, gamma, mean, rstd, dy, d, dx, &mut dg, &mut db);
            (dg, db)
        })
        .collect();
    let mut dgamma = vec![0f32; d];
    let mut dbeta = vec![0f32; d];
    for (dg, db) in partials {
        for j in 0..d {
            dgamma[j] += dg[j];
            dbeta[j] += db[j];
        }
    }
    (dx, dgamma, dbeta)
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
fn layer_norm_backward_rows(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    d: usize,
    dx: &mut [f32],
    dg: &mut [f32],
    db: &mut [f32],
) {
    for (r, ((x, dy), dx)) in
        x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)).enumerate()
    {
        let (mu, rs) = (mean[r], rstd[r]);
        // With x̂ = (x − μ)·rstd and g = dy·γ: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)).
        let a = sum_rows2(dy, gamma, |dy, g| dy * g) / d as f32;
        let b = sum_rows3(dy, gamma, x, |dy, g, x| dy * g * (x - mu) * rs) / d as f32;
        for j in 0..d {
            let xhat = (x[j] - mu) * rs;
            dx[j] = rs * (dy[j] * gamma[j] - a - xhat * b);
            dg[j] += dy[j] * xhat;
            db[j] += dy[j];
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Attention with DenseDINO's reference rows, straight from the qkv projection.

/// The shape of one fused attention call. The sequence is `[CLS, PATCH_1..PATCH_N, REF_1..REF_R]`:
/// `main` = 1 + N tokens that attend to each other, then `seq − main` reference rows that attend to the
/// patches and to themselves only (the official `all2pos_pos2cls_eye` mask); nothing attends to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub main: usize,
    pub heads: usize,
    /// D = heads · head_dim.
    pub dim: usize,
}

impl AttnShape {
    fn head_dim(&self) -> usize {
        self.dim / self.heads
    }
}

/// Softmax of one score row in place under the reference mask; masked entries become exactly 0. Returns
/// the row's log-sum-exp (the backward recomputes the probabilities from it).
#[inline(always)]
fn masked_softmax_row(row: &mut [f32], i: usize, main: usize) -> f32 {
    let (lo, own) = if i < main { (0, None) } else { (1, Some(i)) };
    let mut m = max_row(&row[lo..main]);
    if let Some(i) = own {
        m = m.max(row[i]);
    }
    let mut z = 0f32;
    {
        let r = &mut row[lo..main];
        let mut acc = [0f32; LANES];
        let n = r.len() / LANES * LANES;
        for c in r[..n].chunks_exact_mut(LANES) {
            for j in 0..LANES {
                c[j] = exp(c[j] - m);
                acc[j] += c[j];
            }
        }
        z += lanes_sum(acc);
        for v in &mut r[n..] {
            *v = exp(*v - m);
            z += *v;
        }
    }
    let own_e = own.map(|i| exp(row[i] - m));
    if let Some(e) = own_e {
        z += e;
    }
    let inv = 1.0 / z;
    for v in &mut row[lo..main] {
        *v *= inv;
    }
    row[..lo].fill(0.0);
    row[main..].fill(0.0);
    if let (Some(i), Some(e)) = (own, own_e) {
        row[i] = e * inv;
    }
    m + z.ln()
}

/// `dst = beta · lhs · rhs` for strided row-major operands (strides in elements), single-threaded.
///
/// # Safety
/// As [`gemm_strided`].
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_strides: (usize, usize),
    rhs: *const f32,
    rhs_strides: (usize, usize),
    beta: f32,
) {
    unsafe {
        gemm_strided(
            (m, n, k),
            dst,
            dst_rs,
            false,
            lhs,
            lhs_strides,
            rhs,
            rhs_strides,
            beta,
            gemm::Parallelism::None,
        )
    }
}

/// `dst = beta · lhs · rhs`, or with `add` `dst += beta · lhs · rhs`, for strided row-major operands
/// (`(row, column)` strides in elements; `dst` has unit column stride), `(m, n, k)` the product's shape.
///
/// # Safety
/// Every `(row, col)` of `m × k`, `k × n` and `m × n` at the given strides must lie inside the buffers
/// behind `lhs`, `rhs` and `dst`, and `dst` must not overlap the others; without `add`, `dst` may be
/// uninitialised (gemm never reads it then).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    add: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            add,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            if add { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `qkv` `[B, S, 3D]` (PyTorch's `reshape(B, S, 3, H, dh)` order) → the attention output `[B, S, D]` with
/// heads merged, and the log-sum-exp `[B, H, S]` of every score row.
pub fn attention(qkv: &[f32], s: AttnShape, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let AttnShape { batch, seq, main, heads, dim } = s;
    let dh = s.head_dim();
    assert_eq!(qkv.len(), batch * seq * 3 * dim, "qkv is not [B, S, 3D]");
    let mut out = vec![0f32; batch * seq * dim];
    let mut lse = vec![0f32; batch * heads * seq];
    out.par_chunks_mut(seq * dim)
        .zip(lse.par_chunks_mut(heads * seq))
        .zip(qkv.par_chunks(seq * 3 * dim))
        .for_each_init(
            || vec![0f32; seq * seq],
            |p, ((out, lse), qkv)| {
                for h in 0..heads {
                    let q = qkv[h * dh..].as_ptr();
                    let k = qkv[dim + h * dh..].as_ptr();
                    let v = qkv[2 * dim + h * dh..].as_ptr();
                    // SAFETY: q, k, v are S rows of dh at row stride 3D inside this item's [S, 3D] block;
                    // p is [S, S]; the output is S rows of dh at row stride D inside this item's [S, D].
                    unsafe {
                        // [S, dh] @ [dh, S] → [S, S]
                        matmul(seq, seq, dh, p.as_mut_ptr(), seq, q, (3 * dim, 1), k, (1, 3 * dim), scale);
                    }
                    for (i, row) in p.chunks_exact_mut(seq).enumerate() {
                        lse[h * seq + i] = masked_softmax_row(row, i, main);
                    }
                    unsafe {
                        // [S, S] @ [S, dh] → [S, dh] into the merged-heads output
                        matmul(
                            seq,
                            dh,
                            seq,
                            out[h * dh..].as_mut_ptr(),
                            dim,
                            p.as_ptr(),
                            (seq, 1),
                            v,
                            (3 * dim, 1),
                            1.0,
                        );
                    }
                }
            },
        );
    (out, lse)
}

/// The attention backward: `d qkv` `[B, S, 3D]` from the forward's input, output and log-sum-exp and the
/// output's gradient `dout` `[B, S, D]`. The probabilities are recomputed, not stored (FlashAttention's
/// trade: one more small matmul against an `[B, H, S, S]` buffer kept alive through the step).
pub fn attention_backward(
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    s: AttnShape,
    scale: f32,
) -> Vec<f32> {
    let AttnShape { batch, seq, main, heads, dim } = s;
    let dh = s.head_dim();
    let mut dqkv = vec![0f32; batch * seq * 3 * dim];
    dqkv.par_chunks_mut(seq * 3 * dim)
        .zip(qkv.par_chunks(seq * 3 * dim))
        .zip(out.par_chunks(seq * dim).zip(dout.par_chunks(seq * dim)))
        .zip(lse.par_chunks(heads * seq))
        .for_each_init(
            || (vec![0f32; seq * seq], vec![0f32; seq * seq]),
            |(p, dp), (((dqkv, qkv), (out, dout)), lse)| {
                for h in 0..heads {
                    let q = qkv[h * dh..].as_ptr();
                    let k = qkv[dim + h * dh..].as_ptr();
                    let v = qkv[2 * dim + h * dh..].as_ptr();
                    let d_o = dout[h * dh..].as_ptr();
                    // SAFETY (every call below): operands are S rows of dh inside this item's [S, 3D] or
                    // [S, D] blocks at their row strides, or the [S, S] scratch buffers; the three
                    // destinations are disjoint column bands of this item's [S, 3D] gradient block.
                    unsafe {
                        matmul(seq, seq, dh, p.as_mut_ptr(), seq, q, (3 * dim, 1), k, (1, 3 * dim), scale);
                    }
                    for (i, row) in p.chunks_exact_mut(seq).enumerate() {
                        recompute_probs(row, i, main, lse[h * seq + i]);
                    }
                    unsafe {
                        // dV = Pᵀ dO: [S, S]ᵀ @ [S, dh]
                        matmul(
                            seq,
                            dh,
                            seq,
                            dqkv[2 * dim + h * dh..].as_mut_ptr(),
                            3 * dim,
                            p.as_ptr(),
                            (1, seq),
                            d_o,
                            (dim, 1),
                            1.0,
                        );
                        // dP = dO Vᵀ: [S, dh] @ [dh, S]
                        matmul(seq, seq, dh, dp.as_mut_ptr(), seq, d_o, (dim, 1), v, (1, 3 * dim), 1.0);
                    }
                    for i in 0..seq {
                        // dS = P ⊙ (dP − Σ_c dO·O): zero wherever P is (the masked entries).
                        let o = &out[i * dim + h * dh..i * dim + (h + 1) * dh];
                        let g = &dout[i * dim + h * dh..i * dim + (h + 1) * dh];
                        let di = sum_rows2(o, g, |a, b| a * b);
                        let (pr, dr) = (&p[i * seq..(i + 1) * seq], &mut dp[i * seq..(i + 1) * seq]);
                        for j in 0..seq {
                            dr[j] = pr[j] * (dr[j] - di);
                        }
                    }
                    unsafe {
                        // dQ = dS K · scale, dK = dSᵀ Q · scale
                        matmul(
                            seq,
                            dh,
                            seq,
                            dqkv[h * dh..].as_mut_ptr(),
                            3 * dim,
                            dp.as_ptr(),
                            (seq, 1),
                            k,
                            (3 * dim, 1),
                            scale,
                        );
                        matmul(
                            seq,
                            dh,
                            seq,
                            dqkv[dim + h * dh..].as_mut_ptr(),
                            3 * dim,
                            dp.as_ptr(),
                            (1, seq),
                            q,
                            (3 * dim, 1),
                            scale,
                        );
                    }
                }
            },
        );
    dqkv
}

/// Scores → probabilities `exp(s − lse)` under the reference mask (masked entries exactly 0).
#[inline(always)]
fn recompute_probs(row: &mut [f32], i: usize, main: usize, lse: f32) {
    let lo = if i < main { 0 } else { 1 };
    let own = (i >= main).then(|| exp(row[i] - lse));
    for v in &mut row[lo..main] {
        *v = exp(*v - lse);
    }
    row[..lo].fill(0.0);
    row[main..].fill(0.0);
    if let Some(e) = own {
        row[i] = e;
    }
}

// ---------------------------------------------------------------------------------------------------------
// DINO's cross-entropy between teacher targets and student log-probabilities.

/// For every student row, the teacher rows it is matched with (none, one or two).
pub type Partners = Vec<Vec<u32>>;

/// `Σ_{(i, j) matched} Σ_k p_jk · log_softmax(s_i / τ)_k` over the student rows `s` `[n_s, K]` and the
/// targets `p` `[n_t, K]` (the caller negates and scales). Returns that sum and, per student row, its
/// log-sum-exp (0 for a row without partners, which is never read).
pub fn dino_ce(s: &[f32], p: &[f32], k: usize, partners: &Partners, inv_tau: f32) -> (f64, Vec<f32>) {
    let per_row: Vec<(f32, f64)> = s
        .par_chunks(k)
        .zip(partners.par_iter())
        .map(
            |(s, partners)| {
                if partners.is_empty() { (0.0, 0.0) } else { dino_ce_row(s, p, k, partners, inv_tau) }
            },
        )
        .collect();
    let total = per_row.iter().map(|&(_, t)| t).sum();
    (total, per_row.into_iter().map(|(l, _)| l).collect())
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw", "x86_64+avx2+fma"))]
fn dino_ce_row(s: &[f32], p: &[f32], k: usize, partners: &[u32], inv_tau: f32) -> (f32, f64) {
    let m = max_row(s);
    let z = sum_row(s, |v| exp((v - m) * inv_tau));
    let lse = m * inv_tau + z.ln();
    let mut total = 0f64;
    for &j in partners {
        let pj = &p[j as usize * k..(j as usize + 1) * k];
        let ps = sum_rows2(pj, s, |p, s| p * s);
        let p_sum = sum_row(pj, |v| v);
        total += (inv_tau * ps) as f64 - (lse * p_sum) as f64;
    }
    (lse, total)
}

/// The gradient of `coef · Σ_{(i, j)} Σ_k p_jk · log_softmax(s_i / τ)_k` with respect to `s`:
/// `coef/τ · Σ_j (p_j − softmax(s_i/τ) · Σ_k p_jk)` per student row.
pub fn dino_ce_backward(
    s: &[f32],
    p: &[f32],
    lse: &[f32],
    k: usize,
    partners: &Partners,
    inv_tau: f32,
    coef: f32,
) -> Vec<f32> {
    let mut ds = vec![0f32; s.len()];
    ds.par_chunks_mut(k).zip(s.par_chunks(k)).zip(lse.par_iter().zip(partners.par_iter())).for_each(
        |((ds, s), (&lse, partners))| {
            if !partners.is_empty() {
                dino_ce_backward_row(ds, s, p, lse, k, partners, inv_tau, coef);
            }
        },
    );
    ds
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
fn dino_ce_backward_row(
    ds: &mut [f32],
    s: &[f32],
    p: &[f32],
    lse: f32,
    k: usize,
    partners: &[u32],
    inv_tau: f32,
    coef: f32,
) {
    let row = |j: u32| &p[j as usize * k..(j as usize + 1) * k];
    let mass: f32 = partners.iter().map(|&j| sum_row(row(j), |v| v)).sum();
    let c = coef * inv_tau;
    let first = row(partners[0]);
    for i in 0..k {
        ds[i] = c * (first[i] - exp(s[i] * inv_tau - lse) * mass);
    }
    for &j in &partners[1..] {
        let pj = row(j);
        for i in 0..k {
            ds[i] += c * pj[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Φ(x) in f64 from two formulas independent of the one under test: erf's Taylor series where it
    /// converges quickly, the continued fraction of erfc in the tails (both exact to ~1e-13 there).
    fn normal_cdf_f64(x: f64) -> f64 {
        let z = x.abs() / std::f64::consts::SQRT_2;
        let erfc = if z < 3.0 {
            let (mut term, mut sum) = (z, z);
            for n in 1..200 {
                term *= -z * z / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            1.0 - sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(z) = e^{−z²}/√π · 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + …)))), evaluated from the bottom.
            let mut f = z;
            for k in (1..200).rev() {
                f = z + (k as f64 / 2.0) / f;
            }
            (-z * z).exp() / std::f64::consts::PI.sqrt() / f
        };
        if x >= 0.0 { 1.0 - erfc / 2.0 } else { erfc / 2.0 }
    }

    #[test]
    fn the_normal_cdf_is_within_pytorchs_error_bound_everywhere() {
        let mut worst = 0f64;
        for i in -12_000..=12_000 {
            let x = i as f32 * 1e-3;
            worst = worst.max((normal_cdf(x) as f64 - normal_cdf_f64(x as f64)).abs());
        }
        // A&S 7.1.26's 1.5e-7 on erf is 7.5e-8 on Φ; f32 evaluation adds about as much again. PyTorch
        // 2.9's own CPU GELU (AVX2, the same formula with FMA), gelu(x)/x on this grid: 2.1e-7; ours 2.4e-7.
        assert!(worst < 3e-7, "worst absolute error {worst:e}");
        assert_eq!(normal_cdf(f32::INFINITY), 1.0);
        assert_eq!(normal_cdf(f32::NEG_INFINITY), 0.0);
        assert!(normal_cdf(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_and_its_derivative_follow_their_closed_forms() {
        let xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 2.5e-3 + 1e-4).collect();
        let dy: Vec<f32> = (0..xs.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let (y, dx) = (gelu(&xs), gelu_backward(&xs, &dy));
        for (i, &x) in xs.iter().enumerate() {
            let x64 = x as f64;
            let phi = (-0.5 * x64 * x64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let want_y = x64 * normal_cdf_f64(x64);
            let want_dx = dy[i] as f64 * (normal_cdf_f64(x64) + x64 * phi);
            assert!(
                (y[i] as f64 - want_y).abs() <= 2e-7 * x64.abs().max(1.0),
                "gelu({x}) = {} vs {want_y}",
                y[i]
            );
            assert!(
                (dx[i] as f64 - want_dx).abs() <= 1e-6 * want_dx.abs().max(1.0),
                "gelu'({x}) {} vs {want_dx}",
                dx[i]
            );
        }
    }
}
