//! Pixel operations of the DINO view pipeline (`DataAugmentationDINO` in `main_dino.py`) after the crop
//! and resize ([`crate::resize`]): flip, ColorJitter (the four operations in random order), grayscale,
//! Gaussian blur, solarise.
//! Each operation rounds back to `u8`, as PIL does between operations.
//!
//! Views are planar (`[3, S, S]`, the layout of `common::Batch`) from the resize on, so every loop runs
//! over contiguous channel planes, which the compiler vectorises, and no conversion is needed at the end.
//!
//! Brightness, contrast and saturation follow PIL's `ImageEnhance` (a blend with a degenerate image,
//! truncated to integers as PIL's `Image.blend` does); luma is PIL's `convert("L")`
//! (L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, i.e. 0.299/0.587/0.114); hue is Pillow's 8-bit HSV
//! path as torchvision's `adjust_hue` applies it to PIL images (RGB → HSV, the hue byte shifted with
//! wrap-around by `factor · 255` truncated, HSV → RGB), so it too is byte-exact with the official
//! pipeline; the blur is PIL's `GaussianBlur` (three extended box passes per axis). `tests/pil_parity.rs`
//! checks brightness, contrast, saturation, hue, grayscale, solarise and blur against Pillow's own
//! output (hue with torchvision's code inlined), byte for byte.

use rand::Rng;
use rand::seq::SliceRandom;

/// The three planes of a planar image.
#[inline(always)]
fn planes(px: &mut [u8]) -> (&mut [u8], &mut [u8], &mut [u8]) {
    let n = px.len() / 3;
    let (r, rest) = px.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    (r, g, b)
}

/// ITU-R 601-2 luma as PIL computes it.
#[inline(always)]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((19595 * r as u32 + 38470 * g as u32 + 7471 * b as u32 + 0x8000) >> 16) as u8
}

// max/min rather than clamp: clamp passes NaN through, and the unchecked cast below needs a number.
#[allow(clippy::manual_clamp)]
#[inline(always)]
fn blend(degenerate: f32, v: u8, factor: f32) -> u8 {
    // PIL's Image.blend: (int)(in1 + alpha·(in2 − in1)), clipped to 0..255.
    // f32::max returns the other operand when one is NaN, so x is a number in 0..=255 whatever the
    // inputs (NaN or infinite factors included).
    let x = (degenerate + factor * (v as f32 - degenerate)).max(0.0).min(255.0);
    // SAFETY: x is in 0..=255 (above), so it is representable as i32. The checked `as` cast carries
    // saturation fix-ups that stop these loops from vectorising.
    unsafe { x.to_int_unchecked::<i32>() as u8 }
}

#[inline(always)]
pub fn brightness(px: &mut [u8], factor: f32) {
    blend_all(px, 0.0, factor);
}

/// `blend(degenerate, v, factor)` on every byte. A byte's result depends on its value alone, so CPUs
/// with AVX-512 VBMI look it up in a 256-byte table (four registers, 64 bytes per two `vpermt2b`);
/// others compute the blend, which vectorises, where a scalar table lookup would not.
#[inline(always)]
fn blend_all(px: &mut [u8], degenerate: f32, factor: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512vbmi")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        let table: [u8; 256] = std::array::from_fn(|v| blend(degenerate, v as u8, factor));
        // SAFETY: the CPU supports AVX-512F, BW and VBMI, checked just above.
        unsafe { lookup_vbmi(px, &table) };
        return;
    }
    for v in px.iter_mut() {
        *v = blend(degenerate, *v, factor);
    }
}

/// `px[i] = table[px[i]]`, 64 bytes at a time: `vpermt2b` looks up the low 7 bits in either half of
/// the table, the high bit picks the half.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
fn lookup_vbmi(px: &mut [u8], table: &[u8; 256]) {
    use std::arch::x86_64::*;
    // SAFETY: four 64-byte loads from a 256-byte table.
    let t = |k: usize| unsafe { _mm512_loadu_si512(table.as_ptr().add(64 * k) as *const _) };
    let (t0, t1, t2, t3) = (t(0), t(1), t(2), t(3));
    let mut chunks = px.chunks_exact_mut(64);
    for c in &mut chunks {
        // SAFETY: 64-byte load and store within a 64-byte chunk.
        unsafe {
            let x = _mm512_loadu_si512(c.as_ptr() as *const _);
            let lo = _mm512_permutex2var_epi8(t0, x, t1);
            let hi = _mm512_permutex2var_epi8(t2, x, t3);
            let y = _mm512_mask_blend_epi8(_mm512_movepi8_mask(x), lo, hi);
            _mm512_storeu_si512(c.as_mut_ptr() as *mut _, y);
        }
    }
    for v in chunks.into_remainder() {
        *v = table[*v as usize];
    }
}

#[inline(always)]
pub fn contrast(px: &mut [u8], factor: f32) {
    let n = (px.len() / 3).max(1) as u64;
    let (r, g, b) = planes(px);
    let sum: u64 = r.iter().zip(g.iter()).zip(b.iter()).map(|((&r, &g), &b)| luma(r, g, b) as u64).sum();
    let mean = (sum as f64 / n as f64 + 0.5).floor() as f32;
    blend_all(px, mean, factor);
}

#[inline(always)]
pub fn saturation(px: &mut [u8], factor: f32) {
    // PIL blends each channel toward the pixel's luma, in f32, truncated: trunc(L + f·(v − L)). One pass
    // over the three planes at once: the luma of each pixel is taken before any of its channels changes.
    let (r, g, b) = planes(px);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let l = luma(*r, *g, *b) as f32;
        (*r, *g, *b) = (blend(l, *r, factor), blend(l, *g, factor), blend(l, *b, factor));
    }
}

/// The hue adjustment torchvision applies to PIL images (`adjust_hue` in
/// `torchvision/transforms/_functional_pil.py`, which DINO's `ColorJitter` runs), so views match the
/// official pipeline byte for byte: Pillow's 8-bit RGB → HSV conversion, the hue byte shifted by
/// `np.array(factor * 255).astype(np.uint8)` with wrap-around (`np_h += …` on a `uint8` array), then
/// Pillow's HSV → RGB. The conversions are `rgb2hsv_row` and `hsv2rgb` of Pillow's
/// `src/libImaging/Convert.c` ([`pil_rgb_to_hsv`], [`pil_hsv_to_rgb`]), computed in the precisions the C
/// code uses. `tests/pil_parity.rs` checks each conversion against Pillow on all 2^24 inputs, and this
/// function against torchvision's code on every colour for several factors. The work is done by
/// [`crate::hue::shift`], the same conversions in exact integer arithmetic, vectorised.
///
/// The round trip is not the identity (it changes 82 % of all colours, by up to 7 levels: hue and
/// saturation are truncated to 8 bits), so a factor of 0 still changes the image, as torchvision's
/// does; the pipeline skips the call when no hue jitter is configured (see `apply_photometric_body`).
///
/// The shift: numpy casts the float `factor · 255` to `uint8` through a C integer conversion, i.e. it
/// truncates toward zero and wraps modulo 256 (numpy 2.4 on x86-64, checked by
/// `make_pil_ops.py`: −0.5 → 129, −0.1 → 231 (−25.5 → −25), −0.013 → 253, −0.0039 → 0, 0.004 → 1,
/// 0.1 → 25, 0.5 → 127). `factor` is the `f32` torchvision draws (`torch.empty(1).uniform_(…).item()`),
/// widened to `f64` as Python does before multiplying. torchvision accepts factors in [−0.5, 0.5]; out
/// of that range this keeps truncating and wrapping (1.0 → 255, a shift of one step back).
#[inline(always)]
pub fn hue(px: &mut [u8], factor: f32) {
    // `as i32` truncates toward zero (NaN → 0), `as u8` wraps: numpy's cast on x86-64.
    crate::hue::shift(px, (factor as f64 * 255.0) as i32 as u8);
}

/// Pillow's `rgb2hsv_row` (libImaging/Convert.c), the 8-bit RGB → HSV of `Image.convert("HSV")`: the
/// same results for every one of the 2^24 colours (`tests/pil_parity.rs` checks them all against
/// Pillow). Computed as the C code does, with `float` where it has `float` variables, `double` where an
/// expression meets a `double` constant, truncating `(int)` casts, except for three rewrites that
/// spare divisions (it runs per pixel of every view) and give the same bits on every colour:
/// - of C's three quotients rc, gc, bc only the two the case uses are computed, and h = bc − gc (a
///   float subtraction) is done as (0.0 + bc − gc) in double, rounded to float: exact either way;
/// - `h / 6.0` is `h * (1.0 / 6.0)` (equal for every h a colour produces);
/// - `fmod(x, 1.0)` is x or x − 1: x ∈ [5/6, 11/6], and x − 1 is exact (Sterbenz).
///
/// The reference for [`crate::hue`]'s integer form (which the pipeline runs). A gray (maxc = minc), for
/// which the C code returns h = s = 0 without dividing, gets divisors of 1 and is selected to 0, 0 at
/// the end.
#[inline(always)]
pub fn pil_rgb_to_hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let gray = maxc == minc;
    let cr = (maxc - minc).max(1) as f32;
    let s = cr / maxc.max(1) as f32;
    // C: h = bc − gc if r is the max, 2.0 + rc − bc if g is, 4.0 + gc − rc if b is, where
    // xc = (maxc − x) / cr in float.
    let (base, n1, n2) = if r == maxc {
        (0.0, maxc - b, maxc - g)
    } else if g == maxc {
        (2.0, maxc - r, maxc - b)
    } else {
        (4.0, maxc - g, maxc - r)
    };
    let h = (base + (n1 as f32 / cr) as f64 - (n2 as f32 / cr) as f64) as f32;
    // C: h = fmod(h / 6.0 + 1.0, 1.0), stored as float.
    let x = h as f64 * (1.0 / 6.0) + 1.0;
    let h = (if x >= 1.0 { x - 1.0 } else { x }) as f32;
    // C: (int)(h * 255.0) and (int)(s * 255.0), then CLIP8.
    // SAFETY: h ∈ [0, 1] and s ∈ (0, 1], finite in every lane (above), so both products lie in
    // [0, 255], representable as i32. The checked `as` cast's saturation fix-ups would block vectorising.
    let (uh, us) = unsafe {
        ((h as f64 * 255.0).to_int_unchecked::<i32>(), (s as f64 * 255.0).to_int_unchecked::<i32>())
    };
    let clip8 = |x: i32| x.clamp(0, 255) as u8;
    if gray { (0, 0, maxc) } else { (clip8(uh), clip8(us), maxc) }
}

/// Pillow's `hsv2rgb` (libImaging/Convert.c), the 8-bit HSV → RGB of `Image.convert("RGB")` on an
/// HSV image: the same results for every one of the 2^24 (h, s, v) (`tests/pil_parity.rs` checks them
/// all against Pillow). In the C code's precisions: `f` and `fs` floats, `fs * f` a float product,
/// the rest double, C's `round` (half away from zero, as `f64::round`). Rewritten without divisions,
/// with the same values for all 256 h and all 256 s: the sector i = floor(h · 6.0 / 255.0) is the
/// integer quotient 6h / 255, and f = (float)(h · 6.0 / 255.0 − i) and fs = (float)(s / 255.0) are
/// (6h mod 255) and s times (1.0 / 255.0), rounded to float. The reference for [`crate::hue`].
#[inline(always)]
pub fn pil_hsv_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    let six_h = 6 * h as u16;
    let sector = six_h / 255; // 0..=6: 6 (h = 255) is C's i % 6 = 0
    let f = ((six_h - 255 * sector) as f64 * (1.0 / 255.0)) as f32;
    let fs = (s as f64 * (1.0 / 255.0)) as f32;
    let vf = v as f64;
    // round(), then CLIP8.
    // SAFETY: v ∈ [0, 255] and each factor below lies in [0, 1] (fs, f ∈ [0, 1]), so the rounded
    // product is in [0, 255], representable as i32.
    let level = |x: f64| unsafe { x.round().to_int_unchecked::<i32>() }.clamp(0, 255) as u8;
    let p = level(vf * (1.0 - fs as f64));
    let q = level(vf * (1.0 - (fs * f) as f64));
    let t = level(vf * (1.0 - fs as f64 * (1.0 - f as f64)));
    // C's switch (i % 6): 0 → (v, t, p), 1 → (q, v, p), 2 → (p, v, t), 3 → (p, q, v),
    // 4 → (t, p, v), 5 → (v, p, q); written per channel as selects.
    let rr = match sector {
        1 => q,
        2 | 3 => p,
        4 => t,
        _ => v,
    };
    let gg = match sector {
        1 | 2 => v,
        3 => q,
        4 | 5 => p,
        _ => t,
    };
    let bb = match sector {
        2 => t,
        3 | 4 => v,
        5 => q,
        _ => p,
    };
    if s == 0 { (v, v, v) } else { (rr, gg, bb) }
}

#[inline(always)]
pub fn grayscale(px: &mut [u8]) {
    let (r, g, b) = planes(px);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let l = luma(*r, *g, *b);
        (*r, *g, *b) = (l, l, l);
    }
}

#[inline(always)]
pub fn solarize(px: &mut [u8], threshold: u8) {
    for v in px.iter_mut() {
        *v = if *v >= threshold { 255 - *v } else { *v };
    }
}

/// Mirrors every row of every plane (`size` pixels per row).
#[inline(always)]
pub fn flip_horizontal(px: &mut [u8], size: usize) {
    for row in px.chunks_exact_mut(size) {
        row.reverse();
    }
}

/// The extended-box radius whose `passes`-fold repetition has the variance of a Gaussian of standard
/// deviation `sigma` (Gwosdek et al., "Theoretical foundations of Gaussian convolution by extended box
/// filtering", 2011: box length, its integer part, and the fractional part that matches the variance).
/// Computed in the precisions PIL uses, so the radius, and hence the result, matches PIL's.
pub fn box_radius(sigma: f32, passes: u32) -> f32 {
    let sigma2 = sigma * sigma / passes as f32;
    let length = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((length as f64 - 1.0) / 2.0).floor() as f32;
    let a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2) / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)));
    l + a
}

/// One pass of PIL's extended box filter (its `ImagingLineBoxBlur`): each output is the sum of the
/// 2r+1 pixels around it times `whole` plus the two next ones times `far`, in 8.24 fixed point with
/// rounding. `tap(k)` is the input aligned with the output for offset k − r − 1 (the plane shifted by
/// that many pixels for a row pass, by that many rows for a column pass), so every loop is elementwise
/// and vectorises. The sums are exact integers, so this equals PIL's
/// running-sum form. The radii of DINO's blur range (σ ≤ 2 gives r ≤ 1) get fused single loops.
#[inline(always)]
fn box_taps<'a>(
    tap: impl Fn(usize) -> &'a [u8],
    r: usize,
    out: &mut [u8],
    whole: u32,
    far: u32,
    acc: &mut [u32],
) {
    let finish = |inner: u32, lo: u8, hi: u8| box_finish(inner, lo as u32, hi as u32, whole, far) as u8;
    match r {
        0 => {
            let (t0, t1, t2) = (tap(0), tap(1), tap(2));
            for (((o, &a), &b), &c) in out.iter_mut().zip(t0).zip(t1).zip(t2) {
                *o = finish(b as u32, a, c);
            }
        }
        1 => {
            let (t0, t1, t2, t3, t4) = (tap(0), tap(1), tap(2), tap(3), tap(4));
            for (((((o, &a), &b), &c), &d), &e) in out.iter_mut().zip(t0).zip(t1).zip(t2).zip(t3).zip(t4) {
                *o = finish(b as u32 + c as u32 + d as u32, a, e);
            }
        }
        _ => {
            acc.fill(0);
            for k in 1..2 * r + 2 {
                for (a, &v) in acc.iter_mut().zip(tap(k)) {
                    *a += v as u32;
                }
            }
            for (((o, &a), &lo), &hi) in out.iter_mut().zip(acc.iter()).zip(tap(0)).zip(tap(2 * r + 2)) {
                *o = finish(a, lo, hi);
            }
        }
    }
}

/// PIL's `GaussianBlur`: three box passes along each axis.
const PASSES: u32 = 3;

/// Buffers the blur reuses from view to view.
#[derive(Default)]
pub struct BlurScratch {
    bytes: Vec<u8>,
    wide: Vec<u16>,
}

/// Gaussian blur of each `size`² plane as PIL's `ImageFilter.GaussianBlur(sigma)` computes it (DINO's
/// blur): three passes of an extended box filter along the rows, then three along the columns, edge
/// pixels repeated outwards, 8-bit rounding after each pass. `scratch` is reused between calls.
///
/// The six passes ping-pong between two buffers, and each runs as one loop over the whole plane: a row
/// pass treats the plane as one long row (then redoes the `r + 1` outputs at each end of every row,
/// whose taps crossed into the neighbouring row, with the edge repeated), a column pass takes the rows
/// whose taps stay inside at once and the `r + 1` rows at each edge one by one. Row by row, the loop
/// overhead of 224-pixel lines and the copies into padded lines cost more than the arithmetic. With
/// AVX-512 (F, BW), DINO's radii (r ≤ 1, σ ≤ 2) and planes wider than 2r + 2, the plane is
/// widened to 16 bits once and the passes keep their rounded bytes in 16-bit lanes ([`blur_wide`]):
/// each tap is then a plain load rather than a load and a widening shuffle.
#[inline(always)]
pub fn gaussian_blur(px: &mut [u8], size: usize, sigma: f32, scratch: &mut BlurScratch) {
    let radius = box_radius(sigma, PASSES);
    if radius == 0.0 || size == 0 {
        return;
    }
    let r = radius as usize;
    // PIL's weights: the float division truncated, the remainder split between the two outer pixels.
    let whole = (16_777_216f32 / (radius * 2.0 + 1.0)) as u32;
    let far = ((1u32 << 24) - (r as u32 * 2 + 1) * whole) / 2;
    let plane = size * size;
    #[cfg(target_arch = "x86_64")]
    if r <= 1
        && size > 2 * (r + 1)
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        scratch.wide.resize(2 * plane, 0);
        let (a, b) = scratch.wide.split_at_mut(plane);
        for channel in px.chunks_exact_mut(plane) {
            // SAFETY: the CPU supports AVX-512F and BW, checked just above.
            unsafe { blur_wide(channel, a, b, size, r, whole, far) };
        }
        return;
    }
    blur_bytes(px, size, r, whole, far, &mut scratch.bytes);
}

/// The six passes on bytes, each plane ping-ponging with `tmp`.
fn blur_bytes(px: &mut [u8], size: usize, r: usize, whole: u32, far: u32, tmp: &mut Vec<u8>) {
    let plane = size * size;
    tmp.resize(plane, 0);
    let tmp = &mut tmp[..plane];
    let mut acc = vec![];
    for channel in px.chunks_exact_mut(plane) {
        for pass in 0..2 * PASSES {
            let (src, dst): (&[u8], &mut [u8]) =
                if pass % 2 == 0 { (&*channel, &mut *tmp) } else { (&*tmp, &mut *channel) };
            if pass < PASSES {
                box_rows(src, dst, size, r, whole, far, &mut acc);
            } else {
                box_columns(src, dst, size, r, whole, far, &mut acc);
            }
        }
        // An even number of passes: the last one wrote the channel.
    }
}

/// One plane's six passes in 16-bit lanes (r ≤ 1, size > 2r + 2): widened into `a`, passes between `a`
/// and `b` (ending in `a`), narrowed back. The same sums and rounding as [`box_taps`] and
/// [`box_finish`], so the same bytes (`tests::the_16_bit_blur_equals_the_byte_blur`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn blur_wide(px: &mut [u8], a: &mut [u16], b: &mut [u16], size: usize, r: usize, whole: u32, far: u32) {
    use std::arch::x86_64::*;
    let n = px.len();
    for (w, chunk) in a.chunks_exact_mut(32).zip(px.chunks_exact(32)) {
        // SAFETY: 32 bytes in, 32 u16 out.
        unsafe {
            let x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(chunk.as_ptr() as *const __m256i));
            _mm512_storeu_si512(w.as_mut_ptr() as *mut _, x);
        }
    }
    for i in n / 32 * 32..n {
        a[i] = px[i] as u16;
    }
    let taps = 2 * r + 3;
    let pad = r + 1;
    for pass in 0..2 * PASSES {
        let (src, dst): (&[u16], &mut [u16]) = if pass % 2 == 0 { (&*a, &mut *b) } else { (&*b, &mut *a) };
        if pass < PASSES {
            // The plane as one long row, then each row's ends with its edge repeated.
            let len = n - 2 * pad;
            let tap: [&[u16]; 5] = std::array::from_fn(|k| if k < taps { &src[k..k + len] } else { &[][..] });
            box_wide(&tap[..taps], &mut dst[pad..n - pad], whole, far);
            row_ends(src, dst, size, r, whole, far, |v| v as u16);
        } else {
            // The rows whose taps stay inside at once, then the edge rows with their taps clamped.
            let len = (size - 2 * pad) * size;
            let tap: [&[u16]; 5] =
                std::array::from_fn(|k| if k < taps { &src[k * size..k * size + len] } else { &[][..] });
            box_wide(&tap[..taps], &mut dst[pad * size..pad * size + len], whole, far);
            for y in (0..pad).chain(size - pad..size) {
                let tap: [&[u16]; 5] = std::array::from_fn(|k| {
                    let sy = (y + k).saturating_sub(pad).min(size - 1);
                    if k < taps { &src[sy * size..(sy + 1) * size] } else { &[][..] }
                });
                box_wide(&tap[..taps], &mut dst[y * size..(y + 1) * size], whole, far);
            }
        }
    }
    // Six passes: the last wrote `a`.
    for (chunk, w) in px.chunks_exact_mut(64).zip(a.chunks_exact(64)) {
        // SAFETY: 64 u16 in (two loads), 64 bytes out; the values are bytes, so the packs' saturation
        // changes nothing and one `vpermq` puts their 128-bit lanes back in order.
        unsafe {
            let lo = _mm512_loadu_si512(w.as_ptr() as *const _);
            let hi = _mm512_loadu_si512(w.as_ptr().add(32) as *const _);
            let bytes = _mm512_permutexvar_epi64(
                _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0),
                _mm512_packus_epi16(lo, hi),
            );
            _mm512_storeu_si512(chunk.as_mut_ptr() as *mut _, bytes);
        }
    }
    for i in n / 64 * 64..n {
        px[i] = a[i] as u8;
    }
}

/// One extended-box pass over 16-bit lanes holding bytes, 32 outputs at a time (the last block masked):
/// `taps` are the 3 or 5 inputs aligned with the outputs (outer, inner…, outer), as in [`box_taps`].
/// The inner sum (≤ 765) and the outer pair's sum (≤ 510) are interleaved, and `vpmaddwd` multiplies
/// each pair by (whole, far) split into 12-bit halves, so inner·whole + outer·far = (high products) ·
/// 2^12 + (low products) exactly, below 2^32 (the weights sum to 2^24 at most).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn box_wide(taps: &[&[u16]], out: &mut [u16], whole: u32, far: u32) {
    use std::arch::x86_64::*;
    let last = taps.len() - 1;
    let len = out.len();
    assert!(taps.len() >= 2 && taps.iter().all(|t| t.len() == len), "taps as long as the outputs");
    let pair = |w: u32, f: u32| _mm512_set1_epi32(((f << 16) | w) as i32);
    let (high, low) = (pair(whole >> 12, far >> 12), pair(whole & 0xfff, far & 0xfff));
    let round = _mm512_set1_epi32(1 << 23);
    let weigh = |p: __m512i| {
        let hi = _mm512_slli_epi32::<12>(_mm512_madd_epi16(p, high));
        _mm512_srli_epi32::<24>(_mm512_add_epi32(_mm512_add_epi32(hi, _mm512_madd_epi16(p, low)), round))
    };
    let mut i = 0;
    while i < len {
        let mask: __mmask32 = if len - i >= 32 { !0 } else { (1u32 << (len - i)) - 1 };
        // SAFETY: every tap is `len` long (asserted above): a full block's 32 lanes from i lie inside it,
        // and the last block's mask selects lanes i..len.
        let full = len - i >= 32;
        let ld = |t: &[u16]| unsafe {
            if full {
                _mm512_loadu_si512(t.as_ptr().add(i) as *const _)
            } else {
                _mm512_maskz_loadu_epi16(mask, t.as_ptr().add(i) as *const i16)
            }
        };
        let mut inner = ld(taps[1]);
        for t in &taps[2..last] {
            inner = _mm512_add_epi16(inner, ld(t));
        }
        let outer = _mm512_add_epi16(ld(taps[0]), ld(taps[last]));
        let y = _mm512_packus_epi32(
            weigh(_mm512_unpacklo_epi16(inner, outer)),
            weigh(_mm512_unpackhi_epi16(inner, outer)),
        );
        // SAFETY: as for the loads: 32 lanes from i inside `out`, or the mask's lanes i..len.
        unsafe {
            if full {
                _mm512_storeu_si512(out.as_mut_ptr().add(i) as *mut _, y);
            } else {
                _mm512_mask_storeu_epi16(out.as_mut_ptr().add(i) as *mut i16, mask, y);
            }
        }
        i += 32;
    }
}

/// The `r + 1` outputs at each end of every row of a row pass, whose taps reach past the row (PIL
/// repeats the edge pixel), for DINO's radii written out (this runs for every row of every pass): r = 0
/// on rows of at least 2 pixels, r = 1 on rows of at least 4. Both blur paths use it; `narrow` puts a
/// result back into the path's lane type.
#[inline(always)]
fn row_ends<T: Copy + Into<u32>>(
    src: &[T],
    dst: &mut [T],
    size: usize,
    r: usize,
    whole: u32,
    far: u32,
    narrow: impl Fn(u32) -> T,
) {
    let f = |inner: u32, lo: T, hi: T| narrow(box_finish(inner, lo.into(), hi.into(), whole, far));
    let w = |x: T| -> u32 { x.into() };
    for (row, out) in src.chunks_exact(size).zip(dst.chunks_exact_mut(size)) {
        if r == 0 {
            let (a, z) = (&row[..2], &row[size - 2..]);
            out[0] = f(w(a[0]), a[0], a[1]);
            out[size - 1] = f(w(z[1]), z[0], z[1]);
        } else {
            let (a, z) = (&row[..4], &row[size - 4..]);
            out[0] = f(w(a[0]) + w(a[0]) + w(a[1]), a[0], a[2]);
            out[1] = f(w(a[0]) + w(a[1]) + w(a[2]), a[0], a[3]);
            out[size - 2] = f(w(z[1]) + w(z[2]) + w(z[3]), z[0], z[3]);
            out[size - 1] = f(w(z[2]) + w(z[3]) + w(z[3]), z[1], z[3]);
        }
    }
}

/// One pass of the extended box along the rows of a `size`² plane, `src` into `dst`.
#[inline(always)]
fn box_rows(src: &[u8], dst: &mut [u8], size: usize, r: usize, whole: u32, far: u32, acc: &mut Vec<u32>) {
    let pad = r + 1;
    let n = src.len();
    if n > 2 * pad {
        let len = n - 2 * pad;
        if r > 1 {
            acc.resize(len, 0); // the running sum of wider boxes; r ≤ 1 sums in registers
        }
        box_taps(|k| &src[k..k + len], r, &mut dst[pad..n - pad], whole, far, acc);
    }
    if (r == 0 && size >= 2) || (r == 1 && size >= 4) {
        row_ends(src, dst, size, r, whole, far, |v| v as u8);
        return;
    }
    let last = size as isize - 1;
    for (y, out) in dst.chunks_exact_mut(size).enumerate() {
        let row = &src[y * size..(y + 1) * size];
        let at = |x: isize| row[x.clamp(0, last) as usize];
        for x in (0..pad.min(size)).chain(size.saturating_sub(pad).max(pad)..size) {
            let x = x as isize;
            let inner: u32 = (x - r as isize..=x + r as isize).map(|j| at(j) as u32).sum();
            let (lo, hi) = (at(x - pad as isize) as u32, at(x + pad as isize) as u32);
            out[x as usize] = box_finish(inner, lo, hi, whole, far) as u8;
        }
    }
}

/// One pass of the extended box along the columns of a `size`² plane, `src` into `dst`.
#[inline(always)]
fn box_columns(src: &[u8], dst: &mut [u8], size: usize, r: usize, whole: u32, far: u32, acc: &mut Vec<u32>) {
    let pad = r + 1;
    let last = size - 1;
    let inside = if size > 2 * pad { pad..size - pad } else { 0..0 };
    if !inside.is_empty() {
        // Output row y reads rows y − pad ..= y + pad; from output row pad on, tap k starts at row k.
        let len = inside.len() * size;
        if r > 1 {
            acc.resize(len, 0);
        }
        box_taps(
            |k| &src[k * size..k * size + len],
            r,
            &mut dst[pad * size..pad * size + len],
            whole,
            far,
            acc,
        );
    }
    for y in (0..size).filter(|y| !inside.contains(y)) {
        let rows = |k: usize| {
            let sy = (y + k).saturating_sub(pad).min(last);
            &src[sy * size..(sy + 1) * size]
        };
        if r > 1 {
            acc.resize(size, 0);
        }
        box_taps(rows, r, &mut dst[y * size..(y + 1) * size], whole, far, acc);
    }
}

/// PIL's rounding of one output: the inner sum times `whole`, the two outer pixels times `far`, in 8.24
/// fixed point.
#[inline(always)]
fn box_finish(inner: u32, lo: u32, hi: u32, whole: u32, far: u32) -> u32 {
    let bulk = inner.wrapping_mul(whole).wrapping_add((lo + hi).wrapping_mul(far));
    bulk.wrapping_add(1 << 23) >> 24
}

/// Interleaved RGB `[S, S, 3]` to planar `[3, S, S]`. Dispatched to an AVX2 build where available
/// (the strided loads become shuffles there).
pub fn to_planar(src: &[u8], dst: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { to_planar_avx2(src, dst) };
        return;
    }
    to_planar_body(src, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn to_planar_avx2(src: &[u8], dst: &mut Vec<u8>) {
    to_planar_body(src, dst);
}

#[inline(always)]
fn to_planar_body(src: &[u8], dst: &mut Vec<u8>) {
    // Extending from exact-size iterators writes each byte once (no zero-fill first).
    dst.clear();
    dst.reserve(src.len());
    for c in 0..3 {
        dst.extend(src.chunks_exact(3).map(|p| p[c]));
    }
}

/// Planar `[3, S, S]` back to interleaved RGB `[S, S, 3]` (for writing a view as an image).
pub fn to_interleaved(planar: &[u8]) -> Vec<u8> {
    let n = planar.len() / 3;
    (0..n).flat_map(|i| [planar[i], planar[n + i], planar[2 * n + i]]).collect()
}

/// The random photometric choices of one view, drawn in a fixed order so a seed fixes them all.
#[derive(Clone, Debug, PartialEq)]
pub struct Photometric {
    pub flip: bool,
    /// (operation order: 0 brightness, 1 contrast, 2 saturation, 3 hue; factors) when jitter applies.
    pub jitter: Option<([usize; 4], [f32; 4])>,
    pub grayscale: bool,
    pub blur_sigma: Option<f32>,
    pub solarize: bool,
}

impl Photometric {
    /// No operation at all: the starting point for choosing single operations (tests, timings).
    pub const IDENTITY: Photometric =
        Photometric { flip: false, jitter: None, grayscale: false, blur_sigma: None, solarize: false };
}

/// Draws the photometric choices of view `v` (`kind` 0/1 for the global views, 2 for the others).
pub fn draw_photometric(rng: &mut impl Rng, cfg: &common::config::ViewsConfig, kind: usize) -> Photometric {
    let flip = rng.random::<f64>() < cfg.flip_p;
    let jitter = (rng.random::<f64>() < cfg.jitter_p).then(|| {
        let mut order = [0, 1, 2, 3];
        order.shuffle(rng);
        let mut f = |s: f64| {
            if s > 0.0 { rng.random_range(1.0 - s..=1.0 + s) as f32 } else { 1.0 }
        };
        let (b, c, s) = (f(cfg.brightness), f(cfg.contrast), f(cfg.saturation));
        let h = if cfg.hue > 0.0 { rng.random_range(-cfg.hue..=cfg.hue) as f32 } else { 0.0 };
        (order, [b, c, s, h])
    });
    let grayscale = rng.random::<f64>() < cfg.grayscale_p;
    // DINO's GaussianBlur applies when rand <= p.
    let blur_sigma = (rng.random::<f64>() <= cfg.blur_p[kind] && cfg.blur_p[kind] > 0.0)
        .then(|| rng.random_range(cfg.blur_sigma[0]..=cfg.blur_sigma[1]) as f32);
    let solarize = rng.random::<f64>() < cfg.solarize_p[kind];
    Photometric { flip, jitter, grayscale, blur_sigma, solarize }
}

/// Applies the photometric choices to a planar `[3, size, size]` view, in torchvision's order.
///
/// On x86-64 CPUs with AVX2 the same code is compiled a second time with AVX2 enabled and chosen at
/// run time: the loops are integer or plain float arithmetic without fused multiply-add, so both
/// versions give identical bytes.
pub fn apply_photometric(
    px: &mut [u8],
    size: usize,
    p: &Photometric,
    threshold: u8,
    scratch: &mut BlurScratch,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: the CPU supports AVX-512F and BW, checked just above.
        unsafe { apply_photometric_avx512(px, size, p, threshold, scratch) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { apply_photometric_avx2(px, size, p, threshold, scratch) };
        return;
    }
    apply_photometric_body(px, size, p, threshold, scratch);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn apply_photometric_avx2(
    px: &mut [u8],
    size: usize,
    p: &Photometric,
    threshold: u8,
    scratch: &mut BlurScratch,
) {
    apply_photometric_body(px, size, p, threshold, scratch);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn apply_photometric_avx512(
    px: &mut [u8],
    size: usize,
    p: &Photometric,
    threshold: u8,
    scratch: &mut BlurScratch,
) {
    apply_photometric_body(px, size, p, threshold, scratch);
}

#[inline(always)]
fn apply_photometric_body(
    px: &mut [u8],
    size: usize,
    p: &Photometric,
    threshold: u8,
    scratch: &mut BlurScratch,
) {
    if p.flip {
        flip_horizontal(px, size);
    }
    if let Some((order, f)) = &p.jitter {
        for &op in order {
            match op {
                0 if f[0] != 1.0 => brightness(px, f[0]),
                1 if f[1] != 1.0 => contrast(px, f[1]),
                2 if f[2] != 1.0 => saturation(px, f[2]),
                // Hue 0 is not a no-op for PIL (see `hue`), but `draw_photometric` gives exactly 0 only
                // when no hue jitter is configured, where torchvision's ColorJitter (hue = None) never
                // calls adjust_hue either. (A configured range drawing exactly 0.0 has probability
                // ~0; torchvision would round-trip that view.)
                3 if f[3] != 0.0 => hue(px, f[3]),
                _ => {}
            }
        }
    }
    if p.grayscale {
        grayscale(px);
    }
    if let Some(sigma) = p.blur_sigma {
        gaussian_blur(px, size, sigma, scratch);
    }
    if p.solarize {
        solarize(px, threshold);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize) -> Vec<u8> {
        (0..n * 3).map(|i| ((i * 7919 + 13) % 256) as u8).collect()
    }

    /// The table path gives the blend's bytes for every value (both table halves, the tail after the
    /// 64-byte blocks) at factors that clip both ways.
    #[test]
    fn blending_through_a_table_equals_the_blend() {
        let px: Vec<u8> = (0..3 * 256 + 13).map(|i| (i * 37 % 256) as u8).collect();
        for degenerate in [0.0f32, 77.0, 200.0] {
            for factor in [0.0f32, 0.6, 1.0, 1.4, 2.5, f32::INFINITY, f32::NAN] {
                let mut got = px.clone();
                blend_all(&mut got, degenerate, factor);
                let want: Vec<u8> = px.iter().map(|&v| blend(degenerate, v, factor)).collect();
                assert_eq!(got, want, "degenerate {degenerate}, factor {factor}");
            }
        }
    }

    #[test]
    fn solarize_inverts_from_the_threshold_up() {
        let mut px = vec![0, 127, 128, 200, 255, 1];
        solarize(&mut px, 128);
        assert_eq!(px, [0, 127, 127, 55, 0, 1]);
    }

    #[test]
    fn grayscale_uses_601_weights() {
        for (rgb, want) in
            [([255, 0, 0], 0.299), ([0, 255, 0], 0.587), ([0, 0, 255], 0.114), ([100, 150, 200], 0.0)]
        {
            let mut px = rgb.to_vec();
            grayscale(&mut px);
            let expect =
                if want > 0.0 { want * 255.0 } else { 0.299 * 100.0 + 0.587 * 150.0 + 0.114 * 200.0 };
            assert!((px[0] as f64 - expect).abs() <= 0.5, "{rgb:?}: {} vs {expect}", px[0]);
            assert!(px[0] == px[1] && px[1] == px[2]);
        }
    }

    #[test]
    fn zero_jitter_is_the_identity() {
        let orig = noise(64);
        let mut px = orig.clone();
        brightness(&mut px, 1.0);
        contrast(&mut px, 1.0);
        saturation(&mut px, 1.0);
        assert_eq!(px, orig);
        // Hue at 0 is not the identity (Pillow's HSV round trip), so the pipeline skips it, as
        // torchvision's ColorJitter does when no hue jitter is configured.
        hue(&mut px, 0.0);
        assert_ne!(px, orig);
        let mut px = orig.clone();
        let p = Photometric { jitter: Some(([3, 2, 1, 0], [1.0, 1.0, 1.0, 0.0])), ..Photometric::IDENTITY };
        apply_photometric(&mut px, 8, &p, 128, &mut BlurScratch::default());
        assert_eq!(px, orig);
    }

    #[test]
    fn hue_follows_pillows_8_bit_hsv() {
        // Planar: pixel 0 red, pixel 1 blue; a third of a turn (85 hue steps) makes them green and red.
        let mut px = vec![255, 0, 0, 0, 0, 255];
        hue(&mut px, 1.0 / 3.0);
        assert_eq!(px, [0, 255, 255, 0, 0, 0]);
        // Grays have no hue and stay as they are.
        let mut px = vec![0, 7, 255, 0, 7, 255, 0, 7, 255];
        hue(&mut px, 0.3);
        assert_eq!(px, [0, 7, 255, 0, 7, 255, 0, 7, 255]);
        // ±0.5 shift by 127 and 129 (−127) steps, not exactly a half turn: values from Pillow 13.
        for (factor, want) in [(0.5, [50, 200, 142]), (-0.5, [50, 200, 149]), (0.0, [200, 50, 103])] {
            let mut px = vec![200, 50, 100];
            hue(&mut px, factor);
            assert_eq!(px, want, "factor {factor}");
        }
        // The shift truncates toward zero and wraps: 1.0 → 255 (h 0 → 255, red again), −0.003 → 0.
        for factor in [1.0, -0.003] {
            let mut px = vec![255, 0, 0];
            hue(&mut px, factor);
            assert_eq!(px, [255, 0, 0], "factor {factor}");
        }
    }

    #[test]
    fn brightness_and_contrast_follow_their_closed_forms() {
        let mut px = vec![100, 200, 50];
        brightness(&mut px, 1.5);
        assert_eq!(px, [150, 255, 75]);
        // A two-pixel planar image, black and white: mean luma 127.5 → 128; contrast 0.5 pulls halfway.
        let mut px = vec![0, 255, 0, 255, 0, 255];
        contrast(&mut px, 0.5);
        assert_eq!(px, [64, 191, 64, 191, 64, 191]);
        // Saturation 0 is the luma image; 2 doubles the distance from it (clipped).
        let mut px = vec![200, 100, 50];
        saturation(&mut px, 0.0);
        assert_eq!(px, [luma(200, 100, 50); 3]);
        let mut px = [200u8, 100, 50];
        let l = luma(200, 100, 50) as i32;
        saturation(&mut px, 2.0);
        assert_eq!(px.map(|v| v as i32), [200, 100, 50].map(|v: i32| (l + 2 * (v - l)).clamp(0, 255)));
    }

    #[test]
    fn blur_keeps_a_constant_image_and_its_mean() {
        let mut scratch = BlurScratch::default();
        let mut px = vec![77u8; 32 * 32 * 3];
        gaussian_blur(&mut px, 32, 1.7, &mut scratch);
        assert!(px.iter().all(|&v| v == 77));
        let orig = noise(32 * 32);
        let mut px = orig.clone();
        gaussian_blur(&mut px, 32, 2.0, &mut scratch);
        let mean = |p: &[u8]| p.iter().map(|&v| v as f64).sum::<f64>() / p.len() as f64;
        assert!((mean(&px) - mean(&orig)).abs() < 2.0);
        let var = |p: &[u8]| {
            let m = mean(p);
            p.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>()
        };
        assert!(var(&px) < var(&orig) / 4.0, "blur must smooth noise");
    }

    /// The blur against PIL's definition written out per pixel (each pass: the 2r + 1 pixels around x
    /// times `whole`, the next two times `far`, indices clamped to the edge), on planes smaller than the
    /// taps, odd sizes and radii from 0 to 3.
    #[test]
    fn blur_equals_the_per_pixel_definition() {
        let pass = |p: &[u8], size: usize, sigma: f32, rows: bool| -> Vec<u8> {
            let radius = box_radius(sigma, 3);
            let r = radius as isize;
            let whole = (16_777_216f32 / (radius * 2.0 + 1.0)) as u64;
            let far = ((1u64 << 24) - (r as u64 * 2 + 1) * whole) / 2;
            let at = |y: isize, x: isize| {
                let c = |v: isize| v.clamp(0, size as isize - 1) as usize;
                p[c(y) * size + c(x)] as u64
            };
            let mut out = vec![0u8; size * size];
            for y in 0..size as isize {
                for x in 0..size as isize {
                    let v = |d: isize| if rows { at(y, x + d) } else { at(y + d, x) };
                    let inner: u64 = (-r..=r).map(v).sum();
                    let sum = inner * whole + (v(-r - 1) + v(r + 1)) * far;
                    out[(y * size as isize + x) as usize] = ((sum + (1 << 23)) >> 24) as u8;
                }
            }
            out
        };
        let mut scratch = BlurScratch::default();
        for size in [1usize, 2, 3, 4, 5, 6, 17, 40] {
            for sigma in [0.3f32, 1.0, 2.0, 3.3, 5.0] {
                let orig = noise(size * size);
                let mut want = orig.clone();
                for plane in want.chunks_exact_mut(size * size) {
                    let mut p = plane.to_vec();
                    for rows in [true, true, true, false, false, false] {
                        p = pass(&p, size, sigma, rows);
                    }
                    plane.copy_from_slice(&p);
                }
                let mut got = orig.clone();
                gaussian_blur(&mut got, size, sigma, &mut scratch);
                assert_eq!(got, want, "size {size}, sigma {sigma}");
            }
        }
    }

    /// The 16-bit blur (AVX-512BW, r ≤ 1) gives the byte path's bytes on view sizes, sizes just past
    /// its minimum, and σ across DINO's whole range (both radii and many fractional parts).
    #[test]
    fn the_16_bit_blur_equals_the_byte_blur() {
        #[cfg(target_arch = "x86_64")]
        {
            if !(std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw"))
            {
                eprintln!("no AVX-512BW here: nothing to compare");
                return;
            }
            let (mut a, mut b, mut tmp) = (vec![], vec![], vec![]);
            let mut radii = [0; 2];
            for size in [3usize, 4, 5, 6, 7, 31, 33, 64, 96, 224] {
                for step in 0..40 {
                    let sigma = 0.1 + 1.9 * step as f32 / 39.0;
                    let radius = box_radius(sigma, 3);
                    let r = radius as usize;
                    if radius == 0.0 || size <= 2 * (r + 1) {
                        continue;
                    }
                    radii[r] += 1;
                    let whole = (16_777_216f32 / (radius * 2.0 + 1.0)) as u32;
                    let far = ((1u32 << 24) - (r as u32 * 2 + 1) * whole) / 2;
                    let orig: Vec<u8> =
                        noise(size * size).iter().map(|&v| v.wrapping_mul(step as u8 | 1)).collect();
                    let mut want = orig.clone();
                    blur_bytes(&mut want, size, r, whole, far, &mut tmp);
                    let mut got = orig.clone();
                    a.resize(3 * size * size, 0);
                    b.resize(3 * size * size, 0);
                    for plane in got.chunks_exact_mut(size * size) {
                        // SAFETY: the CPU supports AVX-512F and BW, checked above.
                        unsafe {
                            blur_wide(
                                plane,
                                &mut a[..size * size],
                                &mut b[..size * size],
                                size,
                                r,
                                whole,
                                far,
                            )
                        };
                    }
                    assert_eq!(got, want, "size {size}, sigma {sigma}");
                }
            }
            assert!(radii.iter().all(|&n| n > 20), "{radii:?}");
        }
    }

    #[test]
    fn flip_reverses_columns_of_every_plane() {
        let mut px: Vec<u8> = (0..3 * 2 * 2).map(|i| i as u8).collect(); // 3 planes of 2x2
        flip_horizontal(&mut px, 2);
        assert_eq!(px, [1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10]);
    }

    #[test]
    fn planar_conversion_splits_channels() {
        let mut out = vec![];
        to_planar(&[1, 2, 3, 4, 5, 6], &mut out);
        assert_eq!(out, [1, 4, 2, 5, 3, 6]);
        assert_eq!(to_interleaved(&out), [1, 2, 3, 4, 5, 6]);
    }
}
