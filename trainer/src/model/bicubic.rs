//! Bicubic sampling of the positional grid as weight matrices, built on the host.
//!
//! burn 0.22's `grid_sample_2d` has no bicubic mode under autodiff, and `interpolate` maps coordinates by the
//! output size rather than by the `scale_factor` that DINO passes (`interpolate_pos_encoding` in
//! `vision_transformer.py`). Both operations are linear in the grid and the coordinates never need a
//! gradient, so each one becomes a row-sparse matrix `W` (16 taps per output row) that multiplies the
//! `[N, D]` grid: exact, differentiable in the grid, one matmul on the device.

/// PyTorch's cubic convolution constant (`A = -0.75`, as in `upsample_bicubic2d` and `grid_sample`).
pub const CUBIC_A: f64 = -0.75;

/// The four cubic-convolution weights for the taps at offsets -1, 0, 1, 2 from `floor(x)`, where `t` is
/// `x - floor(x)`. Keys' kernel, as PyTorch's `get_cubic_upsample_coefficients`.
pub fn cubic_weights(t: f64) -> [f64; 4] {
    let a = CUBIC_A;
    // |x| <= 1: ((a + 2)|x| - (a + 3))|x|^2 + 1;  1 < |x| < 2: ((a|x| - 5a)|x| + 8a)|x| - 4a.
    let near = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Grid-sample weights of one point over a `grid_h x grid_w` grid (row-major, `y * grid_w + x`), written
/// into `row` (length `grid_h * grid_w`, zeroed by the caller). `(x, y)` are grid_sample coordinates
/// (-1..1 edge to edge, align_corners false); taps outside the grid read zero (padding_mode zeros).
pub fn grid_sample_row(x: f32, y: f32, grid_h: usize, grid_w: usize, row: &mut [f32]) {
    // align_corners=false unnormalisation: ((c + 1) * size - 1) / 2, so a patch centre lands on an integer.
    let ix = ((x as f64 + 1.0) * grid_w as f64 - 1.0) / 2.0;
    let iy = ((y as f64 + 1.0) * grid_h as f64 - 1.0) / 2.0;
    // A patch centre given in f32 lands within ~1e-7 of an integer; snap it so that it returns the grid row
    // exactly (PyTorch would blend in neighbours at the 1e-7 level: below f32 noise either way).
    let snap = |v: f64| {
        if (v - v.round()).abs() < 1e-5 { v.round() } else { v }
    };
    let (ix, iy) = (snap(ix), snap(iy));
    let (x0, y0) = (ix.floor(), iy.floor());
    let (wx, wy) = (cubic_weights(ix - x0), cubic_weights(iy - y0));
    for (j, wyj) in wy.iter().enumerate() {
        let r = y0 as i64 - 1 + j as i64;
        if r < 0 || r >= grid_h as i64 {
            continue;
        }
        for (i, wxi) in wx.iter().enumerate() {
            let c = x0 as i64 - 1 + i as i64;
            if c < 0 || c >= grid_w as i64 {
                continue;
            }
            row[r as usize * grid_w + c as usize] += (wyj * wxi) as f32;
        }
    }
}

/// `[P, grid_h * grid_w]` weights for `P` points given as interleaved `(x, y)` pairs.
pub fn grid_sample_matrix(points: &[f32], grid_h: usize, grid_w: usize) -> Vec<f32> {
    let n = grid_h * grid_w;
    let mut w = vec![0.0f32; points.len() / 2 * n];
    for (p, row) in points.chunks_exact(2).zip(w.chunks_exact_mut(n)) {
        grid_sample_row(p[0], p[1], grid_h, grid_w, row);
    }
    w
}

/// 1-D weights `[out, in]` of PyTorch's `interpolate(mode="bicubic", align_corners=False,
/// scale_factor=scale)`: source coordinate `(dst + 0.5) / scale - 0.5`, border taps clamped (replicated).
pub fn upsample_matrix_1d(input: usize, output: usize, scale: f64) -> Vec<f64> {
    let mut w = vec![0.0f64; output * input];
    for d in 0..output {
        let src = (d as f64 + 0.5) / scale - 0.5;
        let s0 = src.floor();
        let k = cubic_weights(src - s0);
        for (i, ki) in k.iter().enumerate() {
            let c = (s0 as i64 - 1 + i as i64).clamp(0, input as i64 - 1) as usize;
            w[d * input + c] += ki;
        }
    }
    w
}

/// `[out_h * out_w, grid * grid]` weights that resize a square positional grid to `out_h x out_w`
/// exactly as DINO's `interpolate_pos_encoding` does: `scale_factor = (out + 0.1) / grid` per axis
/// (the +0.1 of dino issue #8), so coordinates map with `grid / (out + 0.1)`, not `grid / out`.
pub fn pos_resize_matrix(grid: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    let wy = upsample_matrix_1d(grid, out_h, (out_h as f64 + 0.1) / grid as f64);
    let wx = upsample_matrix_1d(grid, out_w, (out_w as f64 + 0.1) / grid as f64);
    let n = grid * grid;
    let mut w = vec![0.0f32; out_h * out_w * n];
    for oy in 0..out_h {
        for ox in 0..out_w {
            let row = &mut w[(oy * out_w + ox) * n..][..n];
            for gy in 0..grid {
                let a = wy[oy * grid + gy];
                if a == 0.0 {
                    continue;
                }
                for gx in 0..grid {
                    row[gy * grid + gx] = (a * wx[ox * grid + gx]) as f32;
                }
            }
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_weights_interpolate_and_sum_to_one() {
        assert_eq!(cubic_weights(0.0), [0.0, 1.0, 0.0, 0.0]);
        for t in [0.1, 0.25, 0.5, 0.9] {
            let s: f64 = cubic_weights(t).iter().sum();
            assert!((s - 1.0).abs() < 1e-12, "partition of unity at {t}: {s}");
        }
        // Keys' kernel at |x| = 0.5 with A = -0.75: (1.25 * 0.5 - 2.25) * 0.25 + 1 = 0.59375.
        assert!((cubic_weights(0.5)[1] - 0.59375).abs() < 1e-12);
    }

    #[test]
    fn resize_to_same_size_is_close_to_identity_but_not_exact() {
        // With the +0.1 offset a 14 -> 14 resize is *not* the identity (PyTorch's quirk): the source step
        // is 14 / 14.1. The matrix must still be a partition of unity per row.
        let w = pos_resize_matrix(14, 14, 14);
        for row in w.chunks_exact(196) {
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-5);
        }
        assert!(w[0] != 1.0 && (w[0] - 1.0).abs() < 0.01, "{}", w[0]);
    }
}
