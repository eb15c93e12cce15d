//! `loader preview`: pictures of what the trainer receives, for a person to check by eye.
//!
//! [`render_pairs`] (the default) draws one view pair per row, a global view on the left and the view it
//! is matched to on the right, large, with a few reference points: each in the same colour in both views,
//! numbered, and joined by a line, and a flipped view framed in orange and tagged FLIP (its points are
//! mirrored with it). [`render`] is the dense grid: one row per image, all its views, every point.

use image::{Rgb, RgbImage};

use common::{Batch, ViewPixels};

/// A colour per (pair, point): golden-angle hues, so neighbours differ.
fn colour(i: usize) -> Rgb<u8> {
    let h = (i as f32 * 0.618_034).fract() * 6.0;
    let x = 1.0 - (h % 2.0 - 1.0).abs();
    let (r, g, b) = match h as u32 {
        0 => (1.0, x, 0.0),
        1 => (x, 1.0, 0.0),
        2 => (0.0, 1.0, x),
        3 => (0.0, x, 1.0),
        4 => (x, 0.0, 1.0),
        _ => (1.0, 0.0, x),
    };
    Rgb([(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8])
}

/// Draws a filled disc with a dark outline (visible on any background).
fn mark(img: &mut RgbImage, cx: f32, cy: f32, radius: f32, c: Rgb<u8>) {
    let r_out = radius + 1.5;
    let (x0, x1) =
        ((cx - r_out).floor().max(0.0) as u32, (cx + r_out).ceil().min(img.width() as f32 - 1.0) as u32);
    let (y0, y1) =
        ((cy - r_out).floor().max(0.0) as u32, (cy + r_out).ceil().min(img.height() as f32 - 1.0) as u32);
    for y in y0..=y1 {
        for x in x0..=x1 {
            let d = ((x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2)).sqrt();
            if d <= radius {
                img.put_pixel(x, y, c);
            } else if d <= r_out {
                img.put_pixel(x, y, Rgb([0, 0, 0]));
            }
        }
    }
}

/// Image `i` of `view` scaled (nearest neighbour) to `cell` pixels square, its top left at `origin`.
fn blit(img: &mut RgbImage, view: &ViewPixels, i: usize, (ox, oy): (u32, u32), cell: u32) {
    let s = view.size;
    let plane = s * s;
    let px = &view.data[i * 3 * plane..(i + 1) * 3 * plane];
    for y in 0..cell {
        for x in 0..cell {
            let (sx, sy) = ((x as usize * s) / cell as usize, (y as usize * s) / cell as usize);
            let k = sy * s + sx;
            img.put_pixel(ox + x, oy + y, Rgb([px[k], px[plane + k], px[2 * plane + k]]));
        }
    }
}

/// The dense grid: one row per image, all its views side by side, every point of every pair, `cell`
/// pixels per view side.
pub fn render(batch: &Batch, cell: u32) -> RgbImage {
    let (b, v_n, m) = (batch.batch_size, batch.num_views(), batch.num_points);
    let gap = 4;
    let mut img = RgbImage::from_pixel(
        v_n as u32 * (cell + gap) + gap,
        b as u32 * (cell + gap) + gap,
        Rgb([40, 40, 40]),
    );
    let origin = |i: usize, v: usize| (gap + v as u32 * (cell + gap), gap + i as u32 * (cell + gap));
    for i in 0..b {
        for (v, view) in batch.views.iter().enumerate() {
            let (ox, oy) = origin(i, v);
            blit(&mut img, view, i, (ox, oy), cell);
        }
        // Point j of pair (g, v): teacher frame in view g, student frame in view v.
        let to_px = |p: &[f32], v: usize| {
            let (ox, oy) = origin(i, v);
            (ox as f32 + (p[0] + 1.0) * 0.5 * cell as f32, oy as f32 + (p[1] + 1.0) * 0.5 * cell as f32)
        };
        let g_n = batch.teacher_points.len();
        for g in 0..g_n {
            for v in 0..v_n {
                for j in 0..m {
                    let c = colour((g * v_n + v) * m + j);
                    let t = &batch.teacher_points[g][((i * v_n + v) * m + j) * 2..][..2];
                    let s = &batch.student_points[v][((i * g_n + g) * m + j) * 2..][..2];
                    let (tx, ty) = to_px(t, g);
                    let (sx, sy) = to_px(s, v);
                    mark(&mut img, tx, ty, 3.0, c);
                    mark(&mut img, sx, sy, 3.0, c);
                }
            }
        }
    }
    img
}

/// Glyphs of a 3x5 pixel font, rows top down, 3 bits each (high bit left): the digits and F, L, I, P.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 2, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'F' => [7, 4, 6, 4, 4],
        'L' => [4, 4, 4, 4, 7],
        'I' => [7, 2, 2, 2, 7],
        'P' => [6, 5, 6, 4, 4],
        _ => [0; 5],
    }
}

/// Writes `text` with its top left at (x, y), each font pixel `scale` pixels, on a black shadow.
fn text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: i64, c: Rgb<u8>) {
    for (shadow, colour) in [(1, Rgb([0, 0, 0])), (0, c)] {
        for (k, ch) in text.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) == 0 {
                        continue;
                    }
                    let (px, py) =
                        (x + (k as i64 * 4 + col) * scale + shadow, y + row as i64 * scale + shadow);
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(img, px + dx, py + dy, colour);
                        }
                    }
                }
            }
        }
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// A line two pixels wide from (x0, y0) to (x1, y1).
fn line(img: &mut RgbImage, (x0, y0): (f32, f32), (x1, y1): (f32, f32), c: Rgb<u8>) {
    let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
    for k in 0..=steps {
        let t = k as f32 / steps as f32;
        let (x, y) = ((x0 + t * (x1 - x0)) as i64, (y0 + t * (y1 - y0)) as i64);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            put(img, x + dx, y + dy, c);
        }
    }
}

/// The orange of a flipped view's frame and tag.
pub const FLIP_COLOUR: Rgb<u8> = Rgb([255, 140, 0]);

/// One row per (image, global view g, view v ≠ g) of the batch: view g left, view v right, each
/// `cell` pixels square, and the first `points` reference points of the pair (g, v) in both, numbered,
/// in one colour per point, joined by a line across the gap. A flipped view gets an orange frame and a
/// FLIP tag.
pub fn render_pairs(batch: &Batch, cell: u32, points: usize) -> RgbImage {
    let (b, v_n, m) = (batch.batch_size, batch.num_views(), batch.num_points);
    let g_n = batch.teacher_points.len();
    let points = points.min(m);
    let (gap, middle) = (8u32, 48u32);
    let rows: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|i| (0..g_n).flat_map(move |g| (0..v_n).filter(move |&v| v != g).map(move |v| (i, g, v))))
        .collect();
    let width = 2 * cell + middle + 2 * gap;
    let mut img = RgbImage::from_pixel(width, rows.len() as u32 * (cell + gap) + gap, Rgb([40, 40, 40]));
    let scale = (cell as i64 / 160).max(1) * 2;
    for (row, &(i, g, v)) in rows.iter().enumerate() {
        let oy = gap + row as u32 * (cell + gap);
        let left = gap;
        let right = gap + cell + middle;
        for (view, ox) in [(g, left), (v, right)] {
            blit(&mut img, &batch.views[view], i, (ox, oy), cell);
            if batch.flips[i * v_n + view] {
                for t in 0..3i64 {
                    let (x0, y0, x1, y1) = (
                        ox as i64 + t,
                        oy as i64 + t,
                        (ox + cell) as i64 - 1 - t,
                        (oy + cell) as i64 - 1 - t,
                    );
                    for x in x0..=x1 {
                        put(&mut img, x, y0, FLIP_COLOUR);
                        put(&mut img, x, y1, FLIP_COLOUR);
                    }
                    for y in y0..=y1 {
                        put(&mut img, x0, y, FLIP_COLOUR);
                        put(&mut img, x1, y, FLIP_COLOUR);
                    }
                }
                text(&mut img, ox as i64 + 8, oy as i64 + 8, "FLIP", scale, FLIP_COLOUR);
            }
        }
        // The view numbers in the middle column: g above, v below.
        text(&mut img, (left + cell + 10) as i64, oy as i64 + 8, &g.to_string(), scale, Rgb([255, 255, 255]));
        text(
            &mut img,
            (left + cell + 10) as i64,
            (oy + cell) as i64 - 8 - 5 * scale,
            &v.to_string(),
            scale,
            Rgb([255, 255, 255]),
        );
        let at = |p: &[f32], ox: u32| {
            (ox as f32 + (p[0] + 1.0) * 0.5 * cell as f32, oy as f32 + (p[1] + 1.0) * 0.5 * cell as f32)
        };
        let pairs: Vec<((f32, f32), (f32, f32))> = (0..points)
            .map(|j| {
                let t = &batch.teacher_points[g][((i * v_n + v) * m + j) * 2..][..2];
                let s = &batch.student_points[v][((i * g_n + g) * m + j) * 2..][..2];
                (at(t, left), at(s, right))
            })
            .collect();
        for (j, &(t, s)) in pairs.iter().enumerate() {
            line(&mut img, t, s, colour(j));
        }
        let radius = (cell as f32 / 60.0).max(3.0);
        for (j, &(t, s)) in pairs.iter().enumerate() {
            for (x, y) in [t, s] {
                mark(&mut img, x, y, radius, colour(j));
                text(
                    &mut img,
                    (x + radius + 2.0) as i64,
                    (y - radius - 2.0) as i64 - 5 * scale / 2,
                    &j.to_string(),
                    scale,
                    colour(j),
                );
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::Cursor;

    /// Two images, three gray views of 8 px (view 2 of image 1 flipped), one point per pair at a known
    /// place: the top-left quarter's centre in the teacher's frame, the bottom-right's in the student's.
    fn batch() -> Batch {
        let (b, v, m) = (2usize, 3usize, 1usize);
        let gray = ViewPixels { size: 8, data: vec![128; b * 3 * 64] };
        Batch {
            batch_size: b,
            num_points: m,
            views: vec![gray.clone(), gray.clone(), gray],
            teacher_points: vec![[-0.5f32, -0.5].repeat(b * v * m); 2],
            student_points: vec![[0.5f32, 0.5].repeat(b * 2 * m); v],
            flips: vec![false, false, false, false, false, true],
            labels: vec![-1; b],
            keys: vec!["a".into(), "b".into()],
            seq: vec![0, 1],
            epoch: 0,
            cursor: Cursor::default(),
        }
    }

    #[test]
    fn each_pair_is_a_row_with_its_points_in_both_views_and_flips_framed() {
        let (cell, gap, middle) = (320u32, 8u32, 48u32);
        let img = render_pairs(&batch(), cell, 4);
        // 2 images x 2 global views x 2 partners each.
        assert_eq!((img.width(), img.height()), (2 * cell + middle + 2 * gap, 8 * (cell + gap) + gap));
        let rows = [(0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 2), (1, 0, 1), (1, 0, 2), (1, 1, 0), (1, 1, 2)];
        for (row, &(i, _g, v)) in rows.iter().enumerate() {
            let oy = gap + row as u32 * (cell + gap);
            let (left, right) = (gap, gap + cell + middle);
            // Point 0's colour at its place in both views: a quarter in on the left, three quarters on the right.
            assert_eq!(
                *img.get_pixel(left + cell / 4, oy + cell / 4),
                colour(0),
                "row {row}: teacher's point"
            );
            assert_eq!(
                *img.get_pixel(right + 3 * cell / 4, oy + 3 * cell / 4),
                colour(0),
                "row {row}: student's point"
            );
            // Away from points, lines and labels: the view's own gray.
            assert_eq!(*img.get_pixel(left + cell - 20, oy + cell / 2), Rgb([128, 128, 128]), "row {row}");
            // The right view's frame: orange exactly when it is flipped (image 1, view 2).
            let framed = *img.get_pixel(right + 1, oy + cell / 2) == FLIP_COLOUR;
            assert_eq!(framed, i == 1 && v == 2, "row {row}: flip frame");
        }
    }
}
