//! Pillow's hue shift (torchvision's `adjust_hue` on PIL images: `convert("HSV")`, the hue byte shifted,
//! `convert("RGB")`) in integer arithmetic, vectorised. The float reference is
//! [`crate::augment::pil_rgb_to_hsv`] and [`crate::augment::pil_hsv_to_rgb`], Pillow's C code computed in
//! its own precisions; this module gives the same bytes for every colour and shift (tested on all 2^24
//! colours), in a fraction of the time, because every float step of the C code has an exact rational
//! value that its rounding never moves across an integer, with one exception:
//!
//! - s = (int)(255 · (float)(cr / maxc)) is ⌊255 cr / maxc⌋ (cr = maxc − minc): the float quotient is
//!   within 2^-24 relative of a rational that, when not an integer, is at least 1/maxc from one.
//! - h = (int)(255 · fmod(h6 / 6 + 1, 1)) is ⌊255 H / (6 cr)⌋, H the hue in sixths of cr (g − b, 2cr + b − r
//!   or 4cr + r − g by the largest channel, plus 6cr if negative), except where that quotient is an exact
//!   integer k: then the float path lands on k − 1 for some k (its 1/3, 1/6 roundings fall below). Which
//!   k do is a property of k alone (checked on every colour); [`down_set`] reads it off Pillow's own
//!   formula at one colour per k.
//! - HSV → RGB: p, q, t = round(v · (1 − s/255)), round(v · (1 − (s/255)(m/255))), round(v · (1 −
//!   (s/255)(1 − m/255))), m = 6h mod 255, are the integer roundings of v(255 − s)/255 and
//!   v(65025 − s·m')/65025: those rationals are never half-integers (an even numerator over an odd
//!   denominator) and the float errors stay below their distance to one.
//!
//! The kernels work on 16 pixels in 16-bit lanes and take the quotients with variable or large operands
//! (s, h, and q/t, whose numerators reach 2^24) in f32, where an exact integer division of numbers below
//! 2^24 is a correctly rounded division truncated (the quotient's half-ulp is below the distance of a
//! non-integer quotient to the next integer): the AVX2 kernel in two 8-lane halves, the AVX-512 one in
//! one 16-lane vector.

use std::sync::LazyLock;

/// Shifts the hue of a planar image (`[3, n]`) by `shift` steps of 1/256 turn, as Pillow's 8-bit HSV
/// round trip does (grays unchanged; every other colour re-quantised, even at shift 0).
pub fn shift(px: &mut [u8], shift: u8) {
    let n = px.len() / 3;
    let (r, rest) = px.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    let b = &mut b[..n];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
    {
        // SAFETY: the CPU supports AVX-512F, BW and VL, checked just above.
        unsafe { shift_avx512(r, g, b, shift) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { shift_avx2(r, g, b, shift) };
        return;
    }
    let down = down_set();
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        (*r, *g, *b) = shift_pixel(*r, *g, *b, shift, &down);
    }
}

/// The values of k = 255 H / (6 cr), met as exact integers, at which Pillow's float hue is k − 1, as a
/// 256-bit set (bit k of word k / 32). Read from [`crate::augment::pil_rgb_to_hsv`] at a colour of full
/// chroma (max 255, min 0) whose H is 6k, so 255 H / (6 · 255) = k exactly.
pub fn down_set() -> [u32; 8] {
    static SET: LazyLock<[u32; 8]> = LazyLock::new(|| {
        let mut set = [0u32; 8];
        for k in 1..256u32 {
            let h = 6 * k as i32; // H in 6..=1530, max 255, min 0, the middle channel from H
            let (r, g, b) = match h {
                0..=255 => (255, h, 0),
                256..=510 => (510 - h, 255, 0),
                511..=765 => (0, 255, h - 510),
                766..=1020 => (0, 1020 - h, 255),
                1021..=1275 => (h - 1020, 0, 255),
                _ => (255, 0, 1530 - h),
            };
            let (ph, _, _) = crate::augment::pil_rgb_to_hsv(r as u8, g as u8, b as u8);
            if ph as u32 + 1 == k {
                set[(k / 32) as usize] |= 1 << (k % 32);
            }
        }
        set
    });
    *SET
}

/// One pixel, the integer form of the module docs; the reference for the vectorised kernel. `down` is
/// [`down_set`], taken once per image by the caller.
#[inline(always)]
pub fn shift_pixel(r: u8, g: u8, b: u8, shift: u8, down: &[u32; 8]) -> (u8, u8, u8) {
    let (r, g, b) = (r as i32, g as i32, b as i32);
    let v = r.max(g).max(b);
    let cr = v - r.min(g).min(b);
    if cr == 0 {
        return (r as u8, g as u8, b as u8); // s = 0: Pillow gives (v, v, v) back
    }
    let s = 255 * cr / v;
    let hh = if r == v {
        g - b
    } else if g == v {
        2 * cr + b - r
    } else {
        4 * cr + r - g
    };
    let hh = if hh < 0 { hh + 6 * cr } else { hh };
    let k = 255 * hh / (6 * cr);
    let exact = k * 6 * cr == 255 * hh;
    let h = k - (exact && (down[(k / 32) as usize] >> (k % 32)) & 1 == 1) as i32;
    let six = 6 * ((h + shift as i32) & 255);
    let sector = six / 255; // 0..=6; 6 (h = 255) is sector 0 again
    let m = six - 255 * sector;
    let p = (v * (255 - s) + 127) / 255;
    let q = (v * (65025 - s * m) + 32512) / 65025;
    let t = (v * (65025 - s * (255 - m)) + 32512) / 65025;
    let (rr, gg, bb) = match sector {
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        5 => (v, p, q),
        _ => (v, t, p),
    };
    (rr as u8, gg as u8, bb as u8)
}

/// The 16-bit steps of HSV → RGB that both kernels share, for h' = (h + shift) mod 256: the sector
/// 6h' / 255, p = round(v (255 − s) / 255) (< 2^16: x / 255 = (x + 1 + (x >> 8)) >> 8), and the factors
/// 65025 − s·m' of q and t = round(v (65025 − s·m') / 65025), m' = m and 255 − m with m = 6h' mod 255
/// (s·m' ≤ 65025 fits u16; each kernel divides v·(…) < 2^24 in its own f32 width).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsv_parts(
    h: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
    v: std::arch::x86_64::__m256i,
    shift: u8,
) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees AVX2; these are register-only operations.
    unsafe {
        let c16 = |x: i16| _mm256_set1_epi16(x);
        let six =
            _mm256_mullo_epi16(_mm256_and_si256(_mm256_add_epi16(h, c16(shift as i16)), c16(255)), c16(6));
        let sector =
            _mm256_srli_epi16(_mm256_add_epi16(_mm256_add_epi16(six, c16(1)), _mm256_srli_epi16(six, 8)), 8);
        let m = _mm256_sub_epi16(six, _mm256_mullo_epi16(sector, c16(255)));
        let pz = _mm256_add_epi16(_mm256_mullo_epi16(v, _mm256_sub_epi16(c16(255), s)), c16(127));
        let p =
            _mm256_srli_epi16(_mm256_add_epi16(_mm256_add_epi16(pz, c16(1)), _mm256_srli_epi16(pz, 8)), 8);
        let fq = _mm256_sub_epi16(c16(65025u16 as i16), _mm256_mullo_epi16(s, m));
        let ft = _mm256_sub_epi16(c16(65025u16 as i16), _mm256_mullo_epi16(s, _mm256_sub_epi16(c16(255), m)));
        [sector, p, fq, ft]
    }
}

/// The planes' pixels 16 at a time; the tail per pixel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn shift_avx2(r: &mut [u8], g: &mut [u8], b: &mut [u8], shift: u8) {
    assert!(g.len() == r.len() && b.len() == r.len(), "three planes of one length");
    use std::arch::x86_64::*;
    let n = r.len() / 16 * 16;
    let c16 = |x: i16| _mm256_set1_epi16(x);
    let c32 = |x: i32| _mm256_set1_epi32(x);
    let cf = |x: f32| _mm256_set1_ps(x);
    let set = down_set();
    // SAFETY: 8 words are 32 bytes.
    let down = unsafe { _mm256_loadu_si256(set.as_ptr() as *const __m256i) };
    // The two 8-lane f32 halves of 16 u16 lanes, and back (packus interleaves 128-bit lanes).
    let lo_f = |x: __m256i| _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(x)));
    let hi_f = |x: __m256i| _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(x, 1)));
    let join = |lo: __m256i, hi: __m256i| _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
    let trunc = |x: __m256| _mm256_cvttps_epi32(x);
    let mut i = 0;
    while i < n {
        // SAFETY (loads and stores): i + 16 <= n <= each plane's length.
        let ld =
            |p: &[u8]| _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(p.as_ptr().add(i) as *const __m128i) });
        let (vr, vg, vb) = (ld(r), ld(g), ld(b));
        let v = _mm256_max_epu16(vr, _mm256_max_epu16(vg, vb));
        let cr = _mm256_sub_epi16(v, _mm256_min_epu16(vr, _mm256_min_epu16(vg, vb)));
        let gray = _mm256_cmpeq_epi16(cr, _mm256_setzero_si256());
        let cr = _mm256_max_epu16(cr, c16(1)); // grays are selected back at the end
        let vs = _mm256_max_epu16(v, c16(1));
        // s = floor(255 cr / v): 255 cr < 2^16.
        let cr255 = _mm256_mullo_epi16(cr, c16(255));
        let s =
            join(trunc(_mm256_div_ps(lo_f(cr255), lo_f(vs))), trunc(_mm256_div_ps(hi_f(cr255), hi_f(vs))));
        // H: g − b (r max), 2cr + b − r (g max), 4cr + r − g (b max), plus 6cr if negative; in -255..1530.
        let rmax = _mm256_cmpeq_epi16(vr, v);
        let gmax = _mm256_andnot_si256(rmax, _mm256_cmpeq_epi16(vg, v));
        let cr2 = _mm256_add_epi16(cr, cr);
        let cr4 = _mm256_add_epi16(cr2, cr2);
        let hh = _mm256_blendv_epi8(
            _mm256_add_epi16(cr4, _mm256_sub_epi16(vr, vg)),
            _mm256_add_epi16(cr2, _mm256_sub_epi16(vb, vr)),
            gmax,
        );
        let hh = _mm256_blendv_epi8(hh, _mm256_sub_epi16(vg, vb), rmax);
        let cr6 = _mm256_add_epi16(cr4, cr2);
        let hh = _mm256_add_epi16(hh, _mm256_and_si256(_mm256_srai_epi16(hh, 15), cr6));
        // k = floor(255 H / 6cr), one less where exact and DOWN says Pillow's float lands below.
        let hue_half = |h: __m256, d: __m256| {
            let a = _mm256_mul_ps(h, cf(255.0));
            let kf = _mm256_round_ps(_mm256_div_ps(a, d), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let exact = _mm256_castps_si256(_mm256_cmp_ps(_mm256_mul_ps(kf, d), a, _CMP_EQ_OQ));
            let k = _mm256_cvttps_epi32(kf);
            let word = _mm256_permutevar8x32_epi32(down, _mm256_srli_epi32(k, 5));
            let bit = _mm256_and_si256(_mm256_srlv_epi32(word, _mm256_and_si256(k, c32(31))), c32(1));
            _mm256_sub_epi32(k, _mm256_and_si256(bit, exact))
        };
        let h = join(hue_half(lo_f(hh), lo_f(cr6)), hue_half(hi_f(hh), hi_f(cr6)));
        // SAFETY: the CPU supports AVX2 (this kernel's features include it).
        let [sector, p, fq, ft] = unsafe { hsv_parts(h, s, v, shift) };
        let (vlo, vhi) = (lo_f(v), hi_f(v));
        let round = |vf: __m256, f: __m256| {
            trunc(_mm256_div_ps(_mm256_add_ps(_mm256_mul_ps(vf, f), cf(32512.0)), cf(65025.0)))
        };
        let q = join(round(vlo, lo_f(fq)), round(vhi, hi_f(fq)));
        let t = join(round(vlo, lo_f(ft)), round(vhi, hi_f(ft)));
        let is = |k: i16| _mm256_cmpeq_epi16(sector, c16(k));
        let (s1, s2, s3, s4, s5) = (is(1), is(2), is(3), is(4), is(5));
        let or = _mm256_or_si256;
        let sel = |base: __m256i, x: __m256i, mask: __m256i| _mm256_blendv_epi8(base, x, mask);
        let rr = sel(sel(sel(sel(v, q, s1), p, or(s2, s3)), t, s4), vr, gray);
        let gg = sel(sel(sel(sel(t, v, or(s1, s2)), q, s3), p, or(s4, s5)), vg, gray);
        let bb = sel(sel(sel(sel(p, t, s2), v, or(s3, s4)), q, s5), vb, gray);
        let st = |p: &mut [u8], x: __m256i| {
            let x8 = _mm256_permute4x64_epi64(_mm256_packus_epi16(x, x), 0xD8);
            unsafe { _mm_storeu_si128(p.as_mut_ptr().add(i) as *mut __m128i, _mm256_castsi256_si128(x8)) };
        };
        st(r, rr);
        st(g, gg);
        st(b, bb);
        i += 16;
    }
    for j in n..r.len() {
        (r[j], g[j], b[j]) = shift_pixel(r[j], g[j], b[j], shift, &set);
    }
}

/// [`shift_avx2`] with AVX-512: the 16-bit work stays in 256-bit vectors, and each quotient is taken in
/// one 512-bit f32 vector of all 16 pixels (one widening and one narrowing instead of two halves split,
/// converted and joined), with mask registers for the compares and selects. A gray pixel needs no
/// select of its own: its s is 0, so p = q = t = v and every sector gives (v, v, v) back.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn shift_avx512(r: &mut [u8], g: &mut [u8], b: &mut [u8], shift: u8) {
    assert!(g.len() == r.len() && b.len() == r.len(), "three planes of one length");
    use std::arch::x86_64::*;
    let n = r.len() / 16 * 16;
    let c16 = |x: i16| _mm256_set1_epi16(x);
    let cf = |x: f32| _mm512_set1_ps(x);
    let set = down_set();
    // SAFETY: 8 words are 32 bytes.
    let down = _mm512_castsi256_si512(unsafe { _mm256_loadu_si256(set.as_ptr() as *const __m256i) });
    // 16 u16 lanes as 16 f32, and 16 i32 back to u16 lanes.
    let wide = |x: __m256i| _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(x));
    let narrow = |x: __m512i| _mm512_cvtepi32_epi16(x);
    let trunc = |x: __m512| _mm512_cvttps_epi32(x);
    let mut i = 0;
    while i < n {
        // SAFETY (loads and stores): i + 16 <= n <= each plane's length.
        let ld =
            |p: &[u8]| _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(p.as_ptr().add(i) as *const __m128i) });
        let (vr, vg, vb) = (ld(r), ld(g), ld(b));
        let v = _mm256_max_epu16(vr, _mm256_max_epu16(vg, vb));
        let cr0 = _mm256_sub_epi16(v, _mm256_min_epu16(vr, _mm256_min_epu16(vg, vb)));
        // s = floor(255 cr / v): 255 cr < 2^16; 0 for grays (v ≥ 1 as divisor).
        let vs = _mm256_max_epu16(v, c16(1));
        let s = narrow(trunc(_mm512_div_ps(wide(_mm256_mullo_epi16(cr0, c16(255))), wide(vs))));
        let cr = _mm256_max_epu16(cr0, c16(1)); // grays: any hue (their s is 0)
        // H: g − b (r max), 2cr + b − r (g max), 4cr + r − g (b max), plus 6cr if negative; in -255..1530.
        let rmax = _mm256_cmpeq_epi16_mask(vr, v);
        let gmax = _mm256_cmpeq_epi16_mask(vg, v) & !rmax;
        let cr2 = _mm256_add_epi16(cr, cr);
        let cr4 = _mm256_add_epi16(cr2, cr2);
        let hh = _mm256_mask_blend_epi16(
            gmax,
            _mm256_add_epi16(cr4, _mm256_sub_epi16(vr, vg)),
            _mm256_add_epi16(cr2, _mm256_sub_epi16(vb, vr)),
        );
        let hh = _mm256_mask_blend_epi16(rmax, hh, _mm256_sub_epi16(vg, vb));
        let cr6 = _mm256_add_epi16(cr4, cr2);
        let negative = _mm256_cmplt_epi16_mask(hh, _mm256_setzero_si256());
        let hh = _mm256_mask_add_epi16(hh, negative, hh, cr6);
        // k = floor(255 H / 6cr), one less where exact and DOWN says Pillow's float lands below.
        let (a, d) = (_mm512_mul_ps(wide(hh), cf(255.0)), wide(cr6));
        let kf = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm512_div_ps(a, d));
        let exact = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_mul_ps(kf, d), a);
        let k = _mm512_cvttps_epi32(kf);
        let word = _mm512_permutexvar_epi32(_mm512_srli_epi32::<5>(k), down);
        let bit = _mm512_srlv_epi32(word, _mm512_and_si512(k, _mm512_set1_epi32(31)));
        let lower = _mm512_mask_test_epi32_mask(exact, bit, _mm512_set1_epi32(1));
        let h = narrow(_mm512_mask_sub_epi32(k, lower, k, _mm512_set1_epi32(1)));
        // SAFETY: the CPU supports AVX2 (this kernel's features include it).
        let [sector, p, fq, ft] = unsafe { hsv_parts(h, s, v, shift) };
        let vf = wide(v);
        let round = |f: __m256i| {
            narrow(trunc(_mm512_div_ps(_mm512_add_ps(_mm512_mul_ps(vf, wide(f)), cf(32512.0)), cf(65025.0))))
        };
        let (q, t) = (round(fq), round(ft));
        let is = |k: i16| _mm256_cmpeq_epi16_mask(sector, c16(k));
        let (s1, s2, s3, s4, s5) = (is(1), is(2), is(3), is(4), is(5));
        let sel = |base: __m256i, x: __m256i, mask: __mmask16| _mm256_mask_blend_epi16(mask, base, x);
        let rr = sel(sel(sel(v, q, s1), p, s2 | s3), t, s4);
        let gg = sel(sel(sel(t, v, s1 | s2), q, s3), p, s4 | s5);
        let bb = sel(sel(sel(p, t, s2), v, s3 | s4), q, s5);
        let st = |p: &mut [u8], x: __m256i| {
            // SAFETY: 16 bytes at i.
            unsafe { _mm_storeu_si128(p.as_mut_ptr().add(i) as *mut __m128i, _mm256_cvtepi16_epi8(x)) };
        };
        st(r, rr);
        st(g, gg);
        st(b, bb);
        i += 16;
    }
    for j in n..r.len() {
        (r[j], g[j], b[j]) = shift_pixel(r[j], g[j], b[j], shift, &set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::{pil_hsv_to_rgb, pil_rgb_to_hsv};

    /// Every colour once, planar.
    fn cube() -> Vec<u8> {
        let n = 1usize << 24;
        (0..3).flat_map(|c| (0..n).map(move |i| (i >> (16 - 8 * c)) as u8)).collect()
    }

    /// The integer form and the kernel against Pillow's float formulas on all 2^24 colours, at shifts
    /// that cover no turn, small ones both ways, about half a turn both ways, and a whole turn less one.
    #[test]
    fn the_integer_forms_equal_pillows_float_round_trip_on_every_colour() {
        let cube = cube();
        let n = cube.len() / 3;
        let down = down_set();
        for shift in [0u8, 1, 25, 127, 129, 231, 255] {
            let mut want = cube.clone();
            let (r, rest) = want.split_at_mut(n);
            let (g, b) = rest.split_at_mut(n);
            for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
                let (h, s, v) = pil_rgb_to_hsv(*r, *g, *b);
                (*r, *g, *b) = pil_hsv_to_rgb(h.wrapping_add(shift), s, v);
            }
            let mut scalar = cube.clone();
            let (r, rest) = scalar.split_at_mut(n);
            let (g, b) = rest.split_at_mut(n);
            for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
                (*r, *g, *b) = shift_pixel(*r, *g, *b, shift, &down);
            }
            let mut fast = cube.clone();
            super::shift(&mut fast, shift);
            let mut got = vec![("shift_pixel", scalar), ("shift", fast)];
            // Each SIMD kernel the CPU has, called directly (`shift` runs only the widest).
            #[cfg(target_arch = "x86_64")]
            {
                let kernel = |f: unsafe fn(&mut [u8], &mut [u8], &mut [u8], u8)| {
                    let mut px = cube.clone();
                    let (r, rest) = px.split_at_mut(n);
                    let (g, b) = rest.split_at_mut(n);
                    // SAFETY: called only where the CPU has the kernel's features (checked below).
                    unsafe { f(r, g, b, shift) };
                    px
                };
                if std::arch::is_x86_feature_detected!("avx2") {
                    got.push(("shift_avx2", kernel(shift_avx2)));
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    got.push(("shift_avx512", kernel(shift_avx512)));
                }
            }
            for (name, got) in &got {
                let bad = want.iter().zip(got.iter()).filter(|(a, b)| a != b).count();
                assert_eq!(bad, 0, "{name}, shift {shift}: {bad} bytes differ from Pillow's formulas");
            }
        }
    }

    /// The exceptions are real (without them the integer form is wrong) and read as Pillow has them.
    #[test]
    fn the_exact_quotients_pillow_rounds_down_are_found() {
        let set = down_set();
        let count: u32 = set.iter().map(|w| w.count_ones()).sum();
        assert!(count > 0 && count < 255, "{count}");
        // Full-chroma yellow-orange, H = 6: 255·6 / (6·255) = 1 exactly, and Pillow's float gives 0.
        assert_eq!(pil_rgb_to_hsv(255, 6, 0).0, 0);
        assert_eq!(set[0] & 0b10, 0b10);
        // Pure green, H = 510: k = 85 exactly, and Pillow's float gives 85 (1/3 rounds up in float).
        assert_eq!(pil_rgb_to_hsv(0, 255, 0).0, 85);
        assert_eq!(set[85 / 32] & (1 << (85 % 32)), 0);
    }

    /// Lengths that leave tails of every size after the 16-pixel blocks.
    #[test]
    fn tails_are_shifted_like_the_blocks() {
        for n in [1usize, 7, 15, 16, 17, 33, 50] {
            let px: Vec<u8> = (0..3 * n).map(|i| ((i * 7919 + 13) % 251) as u8).collect();
            let mut fast = px.clone();
            shift(&mut fast, 40);
            let mut want = px.clone();
            for i in 0..n {
                (want[i], want[n + i], want[2 * n + i]) =
                    shift_pixel(px[i], px[n + i], px[2 * n + i], 40, &down_set());
            }
            assert_eq!(fast, want, "{n} pixels");
        }
    }
}
