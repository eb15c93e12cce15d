//! `loader preview`: a PNG grid of what the trainer receives. One row per image, its views side by
//! side (scaled to a common height), and every reference point drawn in each of the two views of its
//! pair in the same colour, so a person can check that the points correspond, flips included.

use image::{Rgb, RgbImage};

use common::Batch;

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

/// Renders the batch: `cell` pixels per view side.
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
            let s = view.size;
            let plane = s * s;
            let px = &view.data[i * 3 * plane..(i + 1) * 3 * plane];
            let (ox, oy) = origin(i, v);
            for y in 0..cell {
                for x in 0..cell {
                    let (sx, sy) = ((x as usize * s) / cell as usize, (y as usize * s) / cell as usize);
                    let k = sy * s + sx;
                    img.put_pixel(ox + x, oy + y, Rgb([px[k], px[plane + k], px[2 * plane + k]]));
                }
            }
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
