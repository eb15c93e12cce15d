//! Helpers shared by the shard integration tests: fixture images made here (never taken from the code
//! under test), the shared real-data folder, and running the `shard` binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

/// The data set `name` (e.g. `imagenet-sample`) in the shared data folder: `../shared/data` beside the
/// checkout, or `$DENSEDINO_SHARED_DATA`. Real-data tests fail (they never skip) when it is missing, with
/// a message naming the path expected, whether the data folder itself exists, and how to point elsewhere.
pub fn shared_data(name: &str) -> PathBuf {
    let (data, whence) = match std::env::var_os("DENSEDINO_SHARED_DATA") {
        Some(d) => (PathBuf::from(d), "set by DENSEDINO_SHARED_DATA".to_string()),
        None => {
            // tools/shard -> the checkout -> the folder that holds it.
            let beside = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(3).unwrap_or(Path::new("/"));
            (
                beside.join("shared/data"),
                "../shared/data beside the checkout; set DENSEDINO_SHARED_DATA to use another folder"
                    .to_string(),
            )
        }
    };
    let dir = data.join(name);
    if !dir.is_dir() {
        let parent = if data.is_dir() {
            format!("the data folder {} exists but holds no {name}", data.display())
        } else {
            format!("the data folder {} does not exist either", data.display())
        };
        panic!("real-data test: {} not found: {parent} (the data folder is {whence})", dir.display());
    }
    dir
}

pub fn shard_bin() -> &'static str {
    env!("CARGO_BIN_EXE_shard")
}

pub fn run_shard(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(shard_bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run shard")
}

pub fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "shard failed: {:?}\n{stderr}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A JPEG of `w`×`h` with a smooth pattern, via jpeg-encoder.
pub fn jpeg_rgb(w: u16, h: u16, seed: u8) -> Vec<u8> {
    let mut px = Vec::with_capacity(w as usize * h as usize * 3);
    for y in 0..h {
        for x in 0..w {
            px.extend([
                (x as u8).wrapping_mul(3).wrapping_add(seed),
                (y as u8).wrapping_mul(5),
                seed.wrapping_mul(7),
            ]);
        }
    }
    let mut out = vec![];
    jpeg_encoder::Encoder::new(&mut out, 90).encode(&px, w, h, jpeg_encoder::ColorType::Rgb).unwrap();
    out
}

/// Removes every APP14 ("Adobe") segment from a JPEG.
pub fn strip_app14(jpeg: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    let mut pos = 2;
    while pos + 4 <= jpeg.len() && jpeg[pos] == 0xFF && jpeg[pos + 1] != 0xDA {
        let len = u16::from_be_bytes([jpeg[pos + 2], jpeg[pos + 3]]) as usize;
        if jpeg[pos + 1] != 0xEE {
            out.extend_from_slice(&jpeg[pos..pos + 2 + len]);
        }
        pos += 2 + len;
    }
    out.extend_from_slice(&jpeg[pos..]);
    out
}

/// The colour blocks of the CMYK fixtures: 16×16 blocks side by side, (plain CMYK ink, expected RGB).
pub const CMYK_BLOCKS: [([u8; 4], [u8; 3]); 5] = [
    ([255, 0, 0, 0], [0, 255, 255]),   // cyan
    ([0, 255, 0, 0], [255, 0, 255]),   // magenta
    ([0, 0, 255, 0], [255, 255, 0]),   // yellow
    ([0, 255, 255, 0], [255, 0, 0]),   // red
    ([0, 0, 0, 128], [127, 127, 127]), // half black
];

/// Plain CMYK pixels (ink amounts) of the block fixture: 80×16.
pub fn cmyk_blocks_pixels() -> Vec<u8> {
    let mut px = vec![];
    for _y in 0..16 {
        for (ink, _) in CMYK_BLOCKS {
            for _x in 0..16 {
                px.extend(ink);
            }
        }
    }
    px
}

/// The fixture as an Adobe CMYK JPEG: jpeg-encoder stores the values inverted and writes an APP14
/// segment (transform 0), as Photoshop does.
pub fn cmyk_adobe_jpeg() -> Vec<u8> {
    let mut out = vec![];
    jpeg_encoder::Encoder::new(&mut out, 100)
        .encode(&cmyk_blocks_pixels(), 80, 16, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    out
}

/// The fixture as an Adobe YCCK JPEG (APP14 transform 2).
pub fn ycck_jpeg() -> Vec<u8> {
    let mut out = vec![];
    jpeg_encoder::Encoder::new(&mut out, 100)
        .encode(&cmyk_blocks_pixels(), 80, 16, jpeg_encoder::ColorType::CmykAsYcck)
        .unwrap();
    out
}

/// The fixture as a plain CMYK JPEG without an Adobe marker: the stored values are the ink amounts
/// (pre-inverted so that jpeg-encoder's inversion cancels, then the APP14 segment removed).
pub fn cmyk_plain_jpeg() -> Vec<u8> {
    let inv: Vec<u8> = cmyk_blocks_pixels().iter().map(|v| 255 - v).collect();
    let mut out = vec![];
    jpeg_encoder::Encoder::new(&mut out, 100).encode(&inv, 80, 16, jpeg_encoder::ColorType::Cmyk).unwrap();
    strip_app14(&out)
}

/// Checks the centre pixel of each block of a decoded RGB image against the expected colours.
pub fn assert_blocks(rgb: &image::RgbImage, tol: i32) {
    for (i, (ink, want)) in CMYK_BLOCKS.iter().enumerate() {
        let p = rgb.get_pixel(i as u32 * 16 + 8, 8).0;
        for c in 0..3 {
            assert!(
                (p[c] as i32 - want[c] as i32).abs() <= tol,
                "block {i} (CMYK {ink:?}): got RGB {p:?}, expected {want:?}"
            );
        }
    }
}

/// Every file directly in `dir`, name → bytes, to compare whole sets byte for byte.
pub fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}
