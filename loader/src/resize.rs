//! Crop + bicubic resize of an interleaved RGB image into a planar view (`[3, S, S]`), byte for byte
//! what `fast_image_resize` (fir) gives for the same crop followed by a planar split
//! ([`crop_resize_fir`], the reference and the fallback).
//!
//! fir resizes 8-bit images with the vertical pass first (into a temporary image over the columns the
//! horizontal pass reads), then the horizontal one, both in 16-bit fixed point; its horizontal pass on
//! interleaved RGB works one output pixel at a time and was the largest share of a view's time. Here
//! both passes are AVX-512 kernels with fir's arithmetic, run a row at a time (so the temporary is one
//! row, in cache): the vertical one is fir's AVX2 pass (two source rows interleaved into 16-bit pairs)
//! with `vpdpwssd` doing each multiply-add-accumulate; its row is split into three plane rows by byte
//! permutes; the horizontal one makes 16 outputs of a row at once in each plane: the 64 source pixels
//! they read are widened to 16 bits once, and each pair of taps is one `vpermt2w` (gathering every
//! lane's two source pixels) and one `vpdpwssd` (with every lane's two weights), the three planes
//! sharing the pair's tables. The weights are fir's, recomputed here 8 taps at a time (`taps_avx512`:
//! its `precompute_coefficients` for Catmull-Rom with the adaptive kernel, then its `Normalizer16`,
//! checked against a line-by-line transcription in the tests), and every sum is exact in `i32`, so the
//! order of the additions does not matter: the bytes are fir's, which the tests check on crops of every
//! kind. CPUs without AVX-512 (F, BW, VL, VNNI and VBMI) take fir's own path.

use fast_image_resize as fr;

use crate::CropBox;
use crate::error::{Error, Result};

/// Buffers reused from view to view.
#[derive(Default)]
pub struct Resampler {
    fir: fr::Resizer,
    /// One row of the vertical pass's output, interleaved (W pixels: the columns the horizontal pass
    /// reads).
    row: Vec<u8>,
    /// That row split into planes `[3, W + PAD]`: padded so every 64-pixel window load of the
    /// horizontal pass stays inside.
    planes: Vec<u8>,
    /// The fallback's interleaved view.
    interleaved: Vec<u8>,
    /// The two axes' weights and the f64 weights they are rounded from.
    h: Taps,
    v: Taps,
    coeffs: Vec<f64>,
    /// The horizontal pass's plan ([`plan_blocks`]).
    blocks: Vec<Block>,
    pairs: Vec<Pair>,
}

/// Padding of a plane row: a block's window is 64 pixels from its first tap.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the AVX-512 path only
const PAD: usize = 64;

/// One axis's weights in fir's fixed point: output `i` is
/// `clamp((2^(precision−1) + Σ_k values[i·window + k] · src[start[i] + k]) >> precision, 0, 255)`
/// over `k < size[i]`; the rest of each window is zero.
#[derive(Debug, Default, PartialEq)]
pub struct Taps {
    pub precision: u32,
    pub window: usize,
    pub start: Vec<u32>,
    pub size: Vec<u32>,
    pub values: Vec<i16>,
}

/// fir's `precompute_coefficients(in_size, in0, in1, out_size, catmul_filter, 2.0, adaptive = true)`
/// followed by its `Normalizer16::new`, into `t` (its buffers reused), with AVX-512: the same f64
/// operations on every weight, so the same weights and precision as a line-by-line transcription of
/// fir's code (`tests::taps`; `tests::vectorised_taps_equal_the_transcription`). It runs twice per
/// view, and the transcription's per-weight branches, pushes, scalar divisions and allocations cost a
/// fifth of a view's resize. Here each output's window is weighed 8 taps at a time, without branches,
/// and divided by its sum 8 at a time; what stays sequential is what fixes the bits: the sum adds the
/// weights in fir's order. fir skips an output's leading zero weights (moving its start) and keeps
/// trailing ones out of its size; a sum that starts with zeros is the same sum without them (0 + ±0 is
/// +0), and the window always holds every tap (`x_max − x_min ≤ 2·radius + 1 ≤ window`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw")]
fn taps_avx512(t: &mut Taps, coeffs: &mut Vec<f64>, in_size: u32, in0: f64, in1: f64, out_size: u32) {
    use std::arch::x86_64::*;
    (t.precision, t.window) = (0, 0);
    t.start.clear();
    t.size.clear();
    t.values.clear();
    if in_size == 0 || out_size == 0 {
        return;
    }
    let scale = (in1 - in0) / out_size as f64;
    if scale <= 0. {
        return;
    }
    let filter_scale = scale.max(1.0);
    let radius = 2.0 * filter_scale;
    let window = radius.ceil() as usize * 2 + 1;
    let recip = 1.0 / filter_scale;
    let out = out_size as usize;
    // Each output's weights at `stride` (the window rounded up to whole vectors), normalised. Past an
    // output's taps the row holds stale values, which no read below uses (the loads are masked or their
    // lanes are masked out at the store), so the buffer is not cleared.
    let stride = window.next_multiple_of(8);
    if coeffs.len() < stride * out {
        coeffs.resize(stride * out, 0.0);
    }
    let iota = _mm512_set_pd(7., 6., 5., 4., 3., 2., 1., 0.);
    let abs = |x: __m512d| _mm512_abs_pd(x);
    let c = |x: f64| _mm512_set1_pd(x);
    const A: f64 = -0.5;
    let mut max = _mm512_setzero_pd();
    let mut raw = [0f64; 8];
    for out_x in 0..out {
        let in_center = in0 + (out_x as f64 + 0.5) * scale;
        let x_min = (in_center - radius).floor().max(0.) as u32;
        let x_max = (in_center + radius).ceil().min(in_size as f64) as u32;
        let center = _mm512_set1_pd(in_center - 0.5);
        let n = (x_max.saturating_sub(x_min) as usize).min(window);
        let row = &mut coeffs[out_x * stride..][..stride];
        // The raw weights, in place: catmull_rom((x − center) · recip) for x = x_min + k, k < n.
        let (mut lead, mut last, mut ww) = (n, 0, 0.0f64);
        for k in (0..n).step_by(8) {
            let live: __mmask8 = if n - k >= 8 { 0xff } else { (1u8 << (n - k)) - 1 };
            let x = _mm512_add_pd(_mm512_set1_pd((x_min as usize + k) as f64), iota);
            let d = abs(_mm512_mul_pd(_mm512_sub_pd(x, center), c(recip)));
            // ((A + 2)·d − (A + 3))·d·d + 1 within 1, (((d − 5)·d + 8)·d − 4)·A within 2, else 0.
            let near = _mm512_add_pd(
                _mm512_mul_pd(_mm512_mul_pd(_mm512_sub_pd(_mm512_mul_pd(c(A + 2.), d), c(A + 3.)), d), d),
                c(1.),
            );
            let far = _mm512_mul_pd(
                _mm512_sub_pd(
                    _mm512_mul_pd(_mm512_add_pd(_mm512_mul_pd(_mm512_sub_pd(d, c(5.)), d), c(8.)), d),
                    c(4.),
                ),
                c(A),
            );
            let within1 = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(d, c(1.)) & live;
            let within2 = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(d, c(2.)) & live;
            let w = _mm512_mask_blend_pd(within1, _mm512_maskz_mov_pd(within2, far), near);
            // SAFETY: 8 f64 into `raw` (8 long) and into `row` at k: k is a multiple of 8 below n <= window
            // <= stride, a multiple of 8, so k + 8 <= stride = row.len().
            unsafe {
                _mm512_storeu_pd(raw.as_mut_ptr(), w);
                _mm512_storeu_pd(row.as_mut_ptr().add(k), w);
            }
            let nonzero = _mm512_cmp_pd_mask::<_CMP_NEQ_UQ>(w, _mm512_setzero_pd()) & live;
            if nonzero != 0 {
                lead = lead.min(k + nonzero.trailing_zeros() as usize);
                last = k + 8 - nonzero.leading_zeros() as usize;
            }
            for &w in &raw[..(n - k).min(8)] {
                ww += w;
            }
        }
        // Normalise and move the kept weights to the row's start (`lead` is 0 but for weights exactly at
        // the kernel's zeros).
        let kept = n - lead;
        let norm = _mm512_set1_pd(ww);
        let mut k = 0;
        while k < kept {
            let live: __mmask8 = if kept - k >= 8 { 0xff } else { (1u8 << (kept - k)) - 1 };
            // SAFETY: the mask selects lanes lead + k.. < lead + kept = n <= stride.
            let w = unsafe { _mm512_maskz_loadu_pd(live, row.as_ptr().add(lead + k)) };
            let w = if ww != 0.0 { _mm512_div_pd(w, norm) } else { w };
            max = _mm512_max_pd(max, w);
            // SAFETY: k is a multiple of 8 below kept <= stride, so k + 8 <= stride = row.len().
            unsafe { _mm512_storeu_pd(row.as_mut_ptr().add(k), w) };
            k += 8;
        }
        t.start.push(x_min + lead as u32);
        t.size.push(last.saturating_sub(lead) as u32);
    }
    // Normalizer16: the largest precision (below 22 bits) at which the largest weight, doubled, still
    // fits an i16.
    let max = _mm512_reduce_max_pd(max).max(0.0);
    let mut precision = 0u32;
    for p in 0..22u32 {
        precision = p;
        if (max * (1u64 << (p + 1)) as f64).round() as i32 >= 1 << 15 {
            break;
        }
    }
    let fixed = _mm512_set1_pd((1u64 << precision) as f64);
    t.values.resize(window * out, 0);
    for (out_x, &n) in t.size.iter().enumerate() {
        let (row, dst) = (&coeffs[out_x * stride..], &mut t.values[out_x * window..]);
        let n = n as usize;
        for k in (0..n).step_by(8) {
            let live: __mmask8 = if n - k >= 8 { 0xff } else { (1u8 << (n - k)) - 1 };
            // f64::round (half away from zero): the truncation, plus or minus one where the dropped part
            // is at least a half (x − trunc(x) is exact).
            // SAFETY: k is a multiple of 8 below size <= window <= stride (a multiple of 8), so k + 8 <=
            // stride, and the row has at least stride entries from here.
            let x = _mm512_mul_pd(unsafe { _mm512_loadu_pd(row.as_ptr().add(k)) }, fixed);
            let tr = _mm512_roundscale_pd::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
            let frac = _mm512_sub_pd(x, tr);
            let up = _mm512_cmp_pd_mask::<_CMP_GE_OQ>(frac, c(0.5));
            let down = _mm512_cmp_pd_mask::<_CMP_LE_OQ>(frac, c(-0.5));
            let r = _mm512_mask_sub_pd(_mm512_mask_add_pd(tr, up, tr, c(1.)), down, tr, c(1.));
            let r = _mm256_cvtepi32_epi16(_mm512_cvttpd_epi32(r));
            // SAFETY: the mask selects entries k.. < size <= window of this output's `window` entries.
            unsafe { _mm_mask_storeu_epi16(dst.as_mut_ptr().add(k), live, r) };
        }
    }
    (t.precision, t.window) = (precision, window);
}

/// Crops `b` of `src` (interleaved RGB) and resizes it to `size`² into `out` (planar `[3, size,
/// size]`), as [`crop_resize_fir`] does.
pub fn crop_resize_planar(
    rs: &mut Resampler,
    src: &fr::images::ImageRef<'_>,
    b: &CropBox,
    size: usize,
    out: &mut Vec<u8>,
) -> Result<()> {
    // Checked here for both paths: fir would leave an empty crop's view as the buffer held it.
    if b.w == 0 || b.h == 0 {
        return Err(resize_error(format!("an empty crop box ({} x {})", b.w, b.h)));
    }
    if b.x1 as u64 + b.w as u64 > src.width() as u64 || b.y1 as u64 + b.h as u64 > src.height() as u64 {
        return Err(resize_error("the crop box lies outside the image"));
    }
    if size == 0 {
        out.clear();
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx512vbmi")
    {
        // SAFETY: the CPU supports AVX-512F, BW, VL, VNNI and VBMI, checked just above.
        return unsafe { crop_resize_avx512(rs, src, b, size, out) };
    }
    crop_resize_fir(rs, src, b, size, out)
}

/// fir's own path (the reference, and the path of CPUs without the AVX-512 kernels): its bicubic
/// convolution (Catmull-Rom, PIL's a = −0.5, antialiased when shrinking as PIL is) on the interleaved
/// image, then the planar split.
pub fn crop_resize_fir(
    rs: &mut Resampler,
    src: &fr::images::ImageRef<'_>,
    b: &CropBox,
    size: usize,
    out: &mut Vec<u8>,
) -> Result<()> {
    // Reused between views: resizing a buffer of the right length writes nothing.
    rs.interleaved.resize(size * size * 3, 0);
    let mut dst =
        fr::images::Image::from_slice_u8(size as u32, size as u32, &mut rs.interleaved, fr::PixelType::U8x3)
            .map_err(resize_error)?;
    let opts = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom))
        .crop(b.x1 as f64, b.y1 as f64, b.w as f64, b.h as f64);
    rs.fir.resize(src, &mut dst, &opts).map_err(resize_error)?;
    crate::augment::to_planar(&rs.interleaved, out);
    Ok(())
}

fn resize_error(e: impl std::fmt::Display) -> Error {
    Error::image(format!("resize: {e}"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn crop_resize_avx512(
    rs: &mut Resampler,
    src: &fr::images::ImageRef<'_>,
    b: &CropBox,
    size: usize,
    out: &mut Vec<u8>,
) -> Result<()> {
    // `crop_resize_planar` checked the box (inside the image, not empty) and the size (not 0).
    let (x1, w) = (b.x1 as f64, b.w as f64);
    // fir skips the horizontal pass for a crop as wide as the output with an integer left edge (ours
    // always are integers): then the vertical pass alone makes the view, and fir's path is that.
    if size as f64 == w {
        return crop_resize_fir(rs, src, b, size, out);
    }
    let (h, v, coeffs) = (&mut rs.h, &mut rs.v, &mut rs.coeffs);
    taps_avx512(h, coeffs, src.width(), x1, x1 + w, size as u32);
    let first = h.start[0] as usize;
    let last = h.start.iter().zip(&h.size).map(|(&s, &n)| (s + n) as usize).max().unwrap_or(first);
    let width = last - first;
    // fir copies the rows when the crop is as tall as the view (an integer top, as ours are).
    let v = (b.h as usize != size).then(|| {
        taps_avx512(v, coeffs, src.height(), b.y1 as f64, (b.y1 + b.h) as f64, size as u32);
        &*v
    });
    let too_tall = v.is_some_and(|v| v.size.iter().any(|&n| n as usize > 2 * MAX_PAIRS));
    let (blocks, pairs) = (&mut rs.blocks, &mut rs.pairs);
    if too_tall || !plan_blocks(h, first, blocks, pairs) {
        return crop_resize_fir(rs, src, b, size, out);
    }
    // Row by row: the vertical pass over the columns the horizontal pass reads (one row of fir's
    // temporary image), that row split into three plane rows, each plane row resized horizontally into
    // its row of the view. Plane rows are padded so every 64-pixel window load stays inside; the
    // padding's bytes only ever meet zero weights.
    let row_bytes = src.width() as usize * 3;
    // The whole image: the kernel reaches up to two source rows (times the shrink) past the crop.
    let rows = src.buffer();
    let used = first * 3..(first + width) * 3;
    let stride = width + PAD;
    assert!(blocks.iter().all(|b| b.window + 64 <= stride), "a block's window past its plane row");
    let (row, planes) = (&mut rs.row, &mut rs.planes);
    planes.resize(3 * stride, 0);
    row.resize(width * 3, 0);
    // Written once each below, without zero-filling first (a fresh view is 150 KB).
    let n = 3 * size * size;
    out.clear();
    out.reserve_exact(n);
    let view = &mut out.spare_capacity_mut()[..n];
    for y in 0..size {
        let line: &[u8] = match v {
            None => &rows[(b.y1 as usize + y) * row_bytes..][used.clone()],
            Some(v) => {
                let tap_rows = v.start[y] as usize..(v.start[y] + v.size[y]) as usize;
                let weights = &v.values[y * v.window..][..v.size[y] as usize];
                vertical_row_avx512(rows, row_bytes, first * 3, tap_rows, weights, v.precision, row);
                row
            }
        };
        split_row_avx512(line, planes, stride);
        // SAFETY: the blocks' windows were checked against `stride` above.
        unsafe { horizontal_rows_avx512(planes, stride, view, y, size, h.precision, blocks, pairs) };
    }
    // SAFETY: the loop above wrote all n bytes: every (plane, row) once, and `plan_blocks`'s blocks cover
    // the outputs 0..size of a row one after another.
    unsafe { out.set_len(n) };
    Ok(())
}

/// One output row of the vertical pass: `dst[i] = clamp((round + Σ_k weights[k] · rows[tap_rows.start + k]
/// [offset + i]) >> precision)` over the interleaved bytes, 64 at a time (the last block masked). Two
/// source rows are interleaved byte by byte, widened to 16-bit pairs and multiplied by the pair of
/// weights with `vpdpwssd` (multiply, add pairs and accumulate in one instruction): fir's AVX2 pass,
/// with a third fewer instructions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn vertical_row_avx512(
    rows: &[u8],
    row_bytes: usize,
    offset: usize,
    tap_rows: std::ops::Range<usize>,
    weights: &[i16],
    precision: u32,
    dst: &mut [u8],
) {
    use std::arch::x86_64::*;
    let round = _mm512_set1_epi32(1 << (precision - 1));
    let shift = _mm_cvtsi32_si128(precision as i32);
    let zero = _mm512_setzero_si512();
    let len = dst.len();
    // Per pair of taps, once per row: its two source rows (an odd last tap pairs its row with itself
    // at weight 0) and its two weights broadcast as (w0, w1) pairs.
    let pairs = weights.len().div_ceil(2);
    assert!(
        pairs <= MAX_PAIRS,
        "{} vertical taps: callers take fir's path past {}",
        weights.len(),
        2 * MAX_PAIRS
    );
    let mut src: [&[u8]; 2 * MAX_PAIRS] = [&[]; 2 * MAX_PAIRS];
    let mut w = [zero; MAX_PAIRS];
    for (k, (pair, rows_of)) in w[..pairs].iter_mut().zip(src.chunks_exact_mut(2)).enumerate() {
        let (k0, k1) = (2 * k, (2 * k + 1).min(weights.len() - 1));
        rows_of[0] = &rows[(tap_rows.start + k0) * row_bytes + offset..][..len];
        rows_of[1] = &rows[(tap_rows.start + k1) * row_bytes + offset..][..len];
        let w1 = if k1 > k0 { weights[k1] } else { 0 };
        *pair = _mm512_set1_epi32(((w1 as i32) << 16) | (weights[k0] as u16 as i32));
    }
    let mut x = 0;
    while x < len {
        let mask: __mmask64 = if len - x >= 64 { !0 } else { (1u64 << (len - x)) - 1 };
        // Masked only on the last block: a masked load costs more than a plain one on AMD's Zen 4 (the
        // blur measured so).
        let full = len - x >= 64;
        // SAFETY: every source row slice is `len` long; a full block's 64 bytes from x lie inside it, and
        // the last block's mask selects bytes x..len.
        let load = |row: &[u8]| unsafe {
            if full {
                _mm512_loadu_si512(row.as_ptr().add(x) as *const _)
            } else {
                _mm512_maskz_loadu_epi8(mask, row.as_ptr().add(x) as *const i8)
            }
        };
        let mut acc = [round; 4];
        for (rows, &w) in src[..2 * pairs].chunks_exact(2).zip(&w[..pairs]) {
            let (a, b) = (load(rows[0]), load(rows[1]));
            let (lo, hi) = (_mm512_unpacklo_epi8(a, b), _mm512_unpackhi_epi8(a, b));
            acc[0] = _mm512_dpwssd_epi32(acc[0], _mm512_unpacklo_epi8(lo, zero), w);
            acc[1] = _mm512_dpwssd_epi32(acc[1], _mm512_unpackhi_epi8(lo, zero), w);
            acc[2] = _mm512_dpwssd_epi32(acc[2], _mm512_unpacklo_epi8(hi, zero), w);
            acc[3] = _mm512_dpwssd_epi32(acc[3], _mm512_unpackhi_epi8(hi, zero), w);
        }
        let s = acc.map(|a| _mm512_sra_epi32(a, shift));
        // The packs undo the unpacks' order within each 128-bit lane; saturation is the clamp to 0..=255.
        let bytes = _mm512_packus_epi16(_mm512_packs_epi32(s[0], s[1]), _mm512_packs_epi32(s[2], s[3]));
        // SAFETY: a full block's 64 bytes from x lie inside dst; the last block's mask selects bytes x.. of
        // dst that exist.
        unsafe {
            if full {
                _mm512_storeu_si512(dst.as_mut_ptr().add(x) as *mut _, bytes);
            } else {
                _mm512_mask_storeu_epi8(dst.as_mut_ptr().add(x) as *mut i8, mask, bytes);
            }
        }
        x += 64;
    }
}

/// The most tap pairs a vertical output row takes here (64 taps: a crop shrunk up to ~15x, the
/// horizontal kernel's limit too).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the AVX-512 path only
const MAX_PAIRS: usize = 32;

/// One block of up to 16 consecutive outputs of a row whose taps all lie in one 64-pixel window: the
/// first output, the window's start (in the temporary's columns) and its pairs of taps (a range of the
/// plan's list: per pair, every lane's two source indices in the window and two weights, interleaved as
/// `vpermt2w` and `vpdpwssd` take them). Crops shrunk by up to about 3x fill all 16 lanes; stronger
/// shrinking packs fewer outputs per block (their taps spread further).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the AVX-512 path only
struct Block {
    out: usize,
    lanes: usize,
    window: usize,
    /// Its pairs of taps in the plan's list: per pair, (the lanes' source indices, their weights).
    pairs: std::ops::Range<usize>,
}

/// One pair of taps of a block: every lane's two source indices and two weights.
type Pair = ([i16; 32], [i16; 32]);

/// The blocks of one axis, into `blocks` and `pairs` (reused from view to view), or false when one
/// output's taps alone span more than the window (a crop shrunk by more than 15x), which fir's own
/// path then computes.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the AVX-512 path only
fn plan_blocks(t: &Taps, first: usize, blocks: &mut Vec<Block>, pairs: &mut Vec<Pair>) -> bool {
    blocks.clear();
    pairs.clear();
    let n = t.start.len();
    let start = |i: usize| t.start[i] as usize - first;
    let end = |i: usize| start(i) + t.size[i] as usize;
    let mut out = 0;
    while out < n {
        let window = start(out);
        // Starts and ends grow with the output (the kernel's centre moves right), so the block's taps
        // span from its first output's start to the largest end among its lanes.
        let fits = |lanes: usize| (out..out + lanes).all(|i| start(i) >= window && end(i) <= window + 64);
        let mut lanes = 16.min(n - out);
        while lanes > 0 && !fits(lanes) {
            lanes -= 1;
        }
        if lanes == 0 {
            return false;
        }
        let first_pair = pairs.len();
        let count = (out..out + lanes).map(|i| t.size[i] as usize).max().unwrap_or(0).div_ceil(2);
        pairs.resize(first_pair + count, ([0; 32], [0; 32]));
        let block_pairs = &mut pairs[first_pair..];
        for (lane, i) in (out..out + lanes).enumerate() {
            for k in 0..t.size[i] as usize {
                let (idx, coef) = &mut block_pairs[k / 2];
                idx[2 * lane + k % 2] = (start(i) - window + k) as i16;
                coef[2 * lane + k % 2] = t.values[i * t.window + k];
            }
        }
        blocks.push(Block { out, lanes, window, pairs: first_pair..first_pair + count });
        out += lanes;
    }
    true
}

/// The split's byte permutes, per plane c: output j takes byte 3j + c of 192 interleaved bytes; below
/// 128 from the first two vectors, from 128 on from the third (index − 128, in the lanes of the mask).
const SPLIT_INDEX: [[u8; 64]; 3] = {
    let mut t = [[0u8; 64]; 3];
    let mut c = 0;
    while c < 3 {
        let mut j = 0;
        while j < 64 {
            t[c][j] = ((3 * j + c) % 128) as u8;
            j += 1;
        }
        c += 1;
    }
    t
};
const SPLIT_UPPER: [u64; 3] = {
    let mut m = [0u64; 3];
    let mut c = 0;
    while c < 3 {
        let mut j = 0;
        while j < 64 {
            if 3 * j + c >= 128 {
                m[c] |= 1 << j;
            }
            j += 1;
        }
        c += 1;
    }
    m
};

/// An interleaved row (`line`, W pixels) split into the first W bytes of three plane rows (`planes`, one
/// every `stride` bytes): 64 pixels of a plane from 192 bytes with one `vpermt2b` (the bytes within the
/// first 128) and one masked `vpermb` (the rest); the tail per pixel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
fn split_row_avx512(line: &[u8], planes: &mut [u8], stride: usize) {
    use std::arch::x86_64::*;
    let width = line.len() / 3;
    assert!(stride >= width && planes.len() >= 2 * stride + width, "three plane rows of {width} bytes");
    // SAFETY: 64 bytes each.
    let idx = SPLIT_INDEX.map(|t| unsafe { _mm512_loadu_si512(t.as_ptr() as *const _) });
    let upper = SPLIT_UPPER;
    let full = width / 64 * 64;
    for j in (0..full).step_by(64) {
        // SAFETY: bytes 3j..3j + 192 of the line exist (j + 64 <= width), and each plane row has
        // j + 64 <= width bytes from its start (planes are `stride` >= width apart).
        unsafe {
            let at = line.as_ptr().add(3 * j);
            let (a, b, c) = (
                _mm512_loadu_si512(at as *const _),
                _mm512_loadu_si512(at.add(64) as *const _),
                _mm512_loadu_si512(at.add(128) as *const _),
            );
            for p in 0..3 {
                let low = _mm512_permutex2var_epi8(a, idx[p], b);
                let plane = _mm512_mask_permutexvar_epi8(low, upper[p], idx[p], c);
                _mm512_storeu_si512(planes.as_mut_ptr().add(p * stride + j) as *mut _, plane);
            }
        }
    }
    for (j, px) in line.chunks_exact(3).enumerate().skip(full) {
        for (p, &v) in px.iter().enumerate() {
            planes[p * stride + j] = v;
        }
    }
}

/// One output row `y` of all three planes of the view: the padded plane rows (`planes`, one every
/// `stride` bytes) resized horizontally into `view` (planar, `size`² per plane; each output written
/// once). Each block's 16 outputs per plane: its 64-pixel window widened to 16 bits, then per pair of
/// taps one `vpermt2w` (gathering every lane's two source pixels) and one `vpdpwssd` (with every lane's
/// two weights); the three planes share each pair's index and weight loads, which one plane at a time
/// spent most of its time on.
///
/// # Safety
/// Besides the features: every block's window must lie inside a padded plane row
/// (`block.window + 64 <= stride`), which the caller checks once per view rather than per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn horizontal_rows_avx512(
    planes: &[u8],
    stride: usize,
    view: &mut [std::mem::MaybeUninit<u8>],
    y: usize,
    size: usize,
    precision: u32,
    blocks: &[Block],
    pairs: &[Pair],
) {
    use std::arch::x86_64::*;
    assert!(planes.len() >= 3 * stride, "three padded plane rows");
    let round = _mm512_set1_epi32(1 << (precision - 1));
    let shift = _mm_cvtsi32_si128(precision as i32);
    for block in blocks {
        let (mut lo, mut hi) = ([_mm512_setzero_si512(); 3], [_mm512_setzero_si512(); 3]);
        for c in 0..3 {
            // SAFETY: `block.window + 64 <= stride` (each plane row's padding), within `planes`.
            let bytes =
                unsafe { _mm512_loadu_si512(planes.as_ptr().add(c * stride + block.window) as *const _) };
            lo[c] = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(bytes));
            hi[c] = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(bytes, 1));
        }
        let mut acc = [round; 3];
        for (idx, coef) in &pairs[block.pairs.clone()] {
            // SAFETY: 32 i16 are 64 bytes.
            let (idx, coef) = unsafe {
                (_mm512_loadu_si512(idx.as_ptr() as *const _), _mm512_loadu_si512(coef.as_ptr() as *const _))
            };
            for c in 0..3 {
                acc[c] = _mm512_dpwssd_epi32(acc[c], _mm512_permutex2var_epi16(lo[c], idx, hi[c]), coef);
            }
        }
        for (c, acc) in acc.into_iter().enumerate() {
            let v = _mm512_max_epi32(_mm512_sra_epi32(acc, shift), _mm512_setzero_si512());
            let packed = _mm512_cvtusepi32_epi8(v);
            let out = &mut view[(c * size + y) * size + block.out..][..block.lanes];
            if block.lanes == 16 {
                // SAFETY: 16 bytes to a 16-byte slice.
                unsafe { _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, packed) };
            } else {
                let mut all = [0u8; 16];
                // SAFETY: 16 bytes to a 16-byte array.
                unsafe { _mm_storeu_si128(all.as_mut_ptr() as *mut __m128i, packed) };
                for (o, &v) in out.iter_mut().zip(&all) {
                    o.write(v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Catmull-Rom (a = −0.5), fir's `catmul_filter`, support 2.
    fn catmull_rom(x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.) * x - (A + 3.)) * x * x + 1.
        } else if x < 2.0 {
            (((x - 5.) * x + 8.) * x - 4.) * A
        } else {
            0.0
        }
    }

    /// fir's `precompute_coefficients(in_size, in0, in1, out_size, catmul_filter, 2.0, adaptive = true)`
    /// followed by its `Normalizer16::new`, step for step (the same f64 operations in the same order, so
    /// the same weights and the same precision): the reference for the kernel path's [`taps_avx512`].
    fn taps(in_size: u32, in0: f64, in1: f64, out_size: u32) -> Taps {
        let empty = Taps { precision: 0, window: 0, start: vec![], size: vec![], values: vec![] };
        if in_size == 0 || out_size == 0 {
            return empty;
        }
        let scale = (in1 - in0) / out_size as f64;
        if scale <= 0. {
            return empty;
        }
        let filter_scale = scale.max(1.0);
        let radius = 2.0 * filter_scale;
        let window = radius.ceil() as usize * 2 + 1;
        let recip = 1.0 / filter_scale;
        let mut coeffs: Vec<f64> = Vec::with_capacity(window * out_size as usize);
        let (mut start, mut size) =
            (Vec::with_capacity(out_size as usize), Vec::with_capacity(out_size as usize));
        for out_x in 0..out_size {
            let in_center = in0 + (out_x as f64 + 0.5) * scale;
            let x_min = (in_center - radius).floor().max(0.) as u32;
            let x_max = (in_center + radius).ceil().min(in_size as f64) as u32;
            let cur = coeffs.len();
            let mut ww = 0.0;
            let center = in_center - 0.5;
            let (mut bound_start, mut bound_end) = (x_min, x_max);
            for x in x_min..x_max {
                let w = catmull_rom((x as f64 - center) * recip);
                if x == bound_start && w == 0. {
                    bound_start += 1;
                } else {
                    coeffs.push(w);
                    ww += w;
                }
            }
            for &c in coeffs.iter().rev() {
                if bound_end <= bound_start || c != 0. {
                    break;
                }
                bound_end -= 1;
            }
            if ww != 0.0 {
                coeffs[cur..].iter_mut().for_each(|w| *w /= ww);
            }
            coeffs.resize(cur + window, 0.);
            start.push(bound_start);
            size.push(bound_end - bound_start);
        }
        // Normalizer16: the largest precision (below 22 bits) at which the largest weight, doubled, still
        // fits an i16.
        let max = coeffs.iter().copied().fold(f64::NEG_INFINITY, f64::max).max(0.0);
        let mut precision = 0u32;
        for p in 0..22u32 {
            precision = p;
            if (max * (1u64 << (p + 1)) as f64).round() as i32 >= 1 << 15 {
                break;
            }
        }
        let scale = (1u64 << precision) as f64;
        let mut values = vec![0i16; window * out_size as usize];
        for (i, (chunk, &n)) in coeffs.chunks_exact(window).zip(&size).enumerate() {
            for (k, &w) in chunk[..n as usize].iter().enumerate() {
                values[i * window + k] = (w * scale).round() as i16;
            }
        }
        Taps { precision, window, start, size, values }
    }

    /// Photo-like content (smooth gradients), hard edges and noise, so negative lobes and clipping
    /// both occur.
    fn image(w: u32, h: u32, seed: u64) -> Vec<u8> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let mut px = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let edge = if (x / 7 + y / 5) % 2 == 0 { 255 } else { 0 };
                px.push(((x * 255) / w.max(1)) as u8);
                px.push(edge);
                px.push(r.random());
            }
        }
        px
    }

    /// The fast path gives fir's bytes for crops of every kind: shrinking by up to ~6x (blocks wider
    /// than the window included), enlarging, full width, one-pixel crops, output sizes with and without
    /// a partial last block.
    #[test]
    fn planar_resize_equals_fir_followed_by_the_planar_split() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (mut fast, mut slow) = (Resampler::default(), Resampler::default());
        let (mut a, mut b) = (vec![], vec![]);
        let mut cases = 0;
        // Views whose blocks are all full, views with narrower blocks, views left to fir.
        let mut kinds = [0; 3];
        for (w, h) in [(500u32, 375u32), (333, 500), (64, 48), (1000, 40)] {
            let px = image(w, h, w as u64);
            let src = fr::images::ImageRef::new(w, h, &px, fr::PixelType::U8x3).unwrap();
            for size in [1usize, 7, 16, 17, 32, 64, 96, 224, 250] {
                for _ in 0..6 {
                    let bw = rng.random_range(1..=w);
                    let bh = rng.random_range(1..=h);
                    let crop = CropBox {
                        x1: rng.random_range(0..=w - bw),
                        y1: rng.random_range(0..=h - bh),
                        w: bw,
                        h: bh,
                    };
                    crop_resize_planar(&mut fast, &src, &crop, size, &mut a).unwrap();
                    crop_resize_fir(&mut slow, &src, &crop, size, &mut b).unwrap();
                    assert_eq!(a.len(), 3 * size * size);
                    assert!(
                        a == b,
                        "{w}x{h} crop {crop:?} to {size}: {} bytes differ",
                        a.iter().zip(&b).filter(|(x, y)| x != y).count()
                    );
                    cases += 1;
                    let t = taps(w, crop.x1 as f64, (crop.x1 + crop.w) as f64, size as u32);
                    let (mut blocks, mut pairs) = (vec![], vec![]);
                    if !plan_blocks(&t, t.start[0] as usize, &mut blocks, &mut pairs) {
                        kinds[2] += 1;
                    } else if blocks.iter().all(|b| b.lanes == 16.min(size)) {
                        kinds[0] += 1;
                    } else {
                        kinds[1] += 1;
                    }
                }
            }
            // The whole image, a crop as wide as the view, and one as tall.
            for crop in [
                CropBox { x1: 0, y1: 0, w, h },
                CropBox { x1: 1, y1: 0, w: 32.min(w - 1), h: h / 2 },
                CropBox { x1: 0, y1: 1, w: w / 2, h: 32.min(h - 1) },
            ] {
                crop_resize_planar(&mut fast, &src, &crop, 32, &mut a).unwrap();
                crop_resize_fir(&mut slow, &src, &crop, 32, &mut b).unwrap();
                assert!(a == b, "{w}x{h} crop {crop:?}");
            }
        }
        assert_eq!(cases, 4 * 9 * 6);
        assert!(kinds.iter().all(|&k| k > 0), "{kinds:?}");
    }

    /// The vectorised weights equal the transcription of fir's, bit for bit, on every kind of axis:
    /// enlarging (scale < 1, where weights fall exactly on the kernel's zeros and are skipped), shrinking
    /// by up to ~15x, crops touching either edge, one-pixel crops and outputs.
    #[test]
    fn vectorised_taps_equal_the_transcription() {
        #[cfg(target_arch = "x86_64")]
        {
            if !(std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bw"))
            {
                eprintln!("no AVX-512 here: nothing to compare");
                return;
            }
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            let (mut t, mut coeffs) = (Taps::default(), vec![]);
            let mut cases = vec![
                (8u32, 0u32, 8u32, 4u32),
                (8, 0, 8, 16),
                (10, 3, 5, 10),
                (500, 0, 500, 224),
                (1, 0, 1, 1),
            ];
            for _ in 0..3000 {
                let in_size = rng.random_range(1..=1200u32);
                let w = rng.random_range(1..=in_size);
                let x0 = rng.random_range(0..=in_size - w);
                let out = *[1u32, 7, 16, 96, 224, 250, rng.random_range(1..=600)]
                    .get(rng.random_range(0..7))
                    .unwrap();
                cases.push((in_size, x0, w, out));
            }
            let (mut shrunk, mut skipped) = (0, 0);
            for (in_size, x0, w, out) in cases {
                let want = taps(in_size, x0 as f64, (x0 + w) as f64, out);
                // SAFETY: the CPU supports AVX-512F, VL and BW, checked above.
                unsafe { taps_avx512(&mut t, &mut coeffs, in_size, x0 as f64, (x0 + w) as f64, out) };
                assert_eq!(t, want, "{in_size} px, crop {x0}+{w} to {out}");
                shrunk += (w > 8 * out) as usize;
                skipped += want.start.iter().enumerate().any(|(i, &s)| {
                    let c = x0 as f64 + (i as f64 + 0.5) * w as f64 / out as f64
                        - 2.0 * (w as f64 / out as f64).max(1.0);
                    s > c.floor().max(0.0) as u32
                }) as usize;
            }
            assert!(
                shrunk > 50 && skipped > 50,
                "{shrunk} strongly shrunk axes, {skipped} with skipped weights"
            );
        }
    }

    /// A box that is empty or reaches outside the image is an error naming the problem, on every CPU
    /// (fir alone would leave an empty crop's view as the buffer held it); a zero size is an empty view.
    #[test]
    fn empty_and_outside_boxes_are_errors() {
        let px = image(40, 30, 1);
        let src = fr::images::ImageRef::new(40, 30, &px, fr::PixelType::U8x3).unwrap();
        let (mut rs, mut out) = (Resampler::default(), vec![1u8; 5]);
        for (crop, want) in [
            (CropBox { x1: 3, y1: 3, w: 0, h: 10 }, "empty crop box"),
            (CropBox { x1: 3, y1: 3, w: 10, h: 0 }, "empty crop box"),
            (CropBox { x1: 35, y1: 0, w: 10, h: 10 }, "outside the image"),
            (CropBox { x1: 0, y1: u32::MAX, w: 10, h: 10 }, "outside the image"),
        ] {
            let err = crop_resize_planar(&mut rs, &src, &crop, 16, &mut out).unwrap_err().to_string();
            assert!(err.contains(want), "{crop:?}: {err}");
        }
        crop_resize_planar(&mut rs, &src, &CropBox { x1: 0, y1: 0, w: 40, h: 30 }, 0, &mut out).unwrap();
        assert!(out.is_empty());
    }

    /// The weights in a case worked by hand: an exact 2x shrink has output 0 centred on source
    /// pixel centre 1.0, so the kernel (widened 2x: radius 4) reaches pixels 0..=4 (pixel 5 would be at
    /// x_max), at distances (x + 0.5 − 1) / 2 = −0.25, 0.25, 0.75, 1.25, 1.75 from it; the weights are
    /// Catmull-Rom's there, normalised to sum 1, in fixed point.
    #[test]
    fn the_weights_are_catmull_rom_normalised() {
        let t = taps(8, 0.0, 8.0, 4);
        assert_eq!(t.window, 9); // radius 4
        assert_eq!((t.start[0], t.size[0]), (0, 5));
        // Catmull-Rom in its textbook form: 1.5|x|³ − 2.5|x|² + 1 inside 1, −0.5|x|³ + 2.5|x|² − 4|x| + 2
        // from 1 to 2.
        let cr = |x: f64| {
            let x = x.abs();
            if x < 1.0 {
                1.5 * x.powi(3) - 2.5 * x * x + 1.0
            } else {
                -0.5 * x.powi(3) + 2.5 * x * x - 4.0 * x + 2.0
            }
        };
        let w: Vec<f64> = [-0.25f64, 0.25, 0.75, 1.25, 1.75].iter().map(|&d| cr(d)).collect();
        let sum: f64 = w.iter().sum();
        let scale = (1u64 << t.precision) as f64;
        for (k, wk) in w.iter().enumerate() {
            assert_eq!(t.values[k], (wk / sum * scale).round() as i16, "tap {k}");
        }
        // The largest weight doubled fits an i16 at this precision and would not at the next.
        let max = w.iter().copied().fold(0.0, f64::max) / sum;
        assert!((max * scale * 2.0).round() >= 32768.0 && (max * scale).round() < 32768.0);
    }
}
