//! The photometric operations against PIL's own outputs (the library DINO's augmentation runs on):
//! `fixtures/pil_ops.json` is written by `fixtures/make_pil_ops.py` with Pillow; every case must match
//! byte for byte. Hue is torchvision's `adjust_hue` for PIL images (inlined in the script: Pillow's 8-bit
//! HSV round trip with the hue byte shifted by numpy), on the test image, on an image of edge-case pixels
//! and, as SHA-256 digests, on every one of the 2^24 colours; Pillow's two HSV conversions on their own,
//! on all 2^24 inputs each.

use loader::augment::{
    Photometric, apply_photometric, hue, pil_hsv_to_rgb, pil_rgb_to_hsv, to_interleaved, to_planar,
};
use sha2::{Digest, Sha256};

const FIXTURE: &str = include_str!("fixtures/pil_ops.json");

/// The fixture's input image, interleaved RGB (the same formula as the Python script).
fn test_image(w: usize, h: usize) -> Vec<u8> {
    let mut px = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            px.extend(
                [(x * 37 + y * 11) % 256, (x * x + 3 * y * y) % 256, (x * y * 7 + 91) % 256].map(|v| v as u8),
            );
        }
    }
    px
}

/// The hue factor in a case name (`hue_-0.1`), parsed as the `f32` the pipeline draws.
fn hue_factor(name: &str) -> f32 {
    name.strip_prefix("hue_").and_then(|f| f.parse().ok()).unwrap_or_else(|| panic!("bad hue case {name}"))
}

/// Hue on a planar image as the pipeline applies it, checked to be `augment::hue` itself; the
/// pipeline skips a factor of exactly 0 (no hue jitter configured, as torchvision's ColorJitter then
/// skips it), so 0 goes to `hue` directly, which is what torchvision's `adjust_hue(img, 0.0)` would do.
fn apply_hue(planar: &[u8], size: usize, f: f32) -> Vec<u8> {
    let mut direct = planar.to_vec();
    hue(&mut direct, f);
    let mut px = planar.to_vec();
    let p = Photometric { jitter: Some(([3, 4, 4, 4], [1.0, 1.0, 1.0, f])), ..Photometric::IDENTITY };
    apply_photometric(&mut px, size, &p, 128, &mut Default::default());
    if f == 0.0 {
        assert_eq!(px, planar, "the pipeline skips hue 0");
    } else {
        assert_eq!(px, direct, "hue {f}: the pipeline and augment::hue differ");
    }
    direct
}

fn assert_same(name: &str, ours: &[u8], want: &str) {
    let want = hex::decode(want).unwrap();
    assert_eq!(ours.len(), want.len(), "{name}");
    let diff = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
    let first = ours.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(
        diff,
        0,
        "{name}: {diff} of {} bytes differ from Pillow, the first at byte {first:?}",
        want.len()
    );
}

#[test]
fn photometric_ops_match_pillow_byte_for_byte() {
    let fixture: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let size = fixture["width"].as_u64().unwrap() as usize;
    assert_eq!(fixture["height"].as_u64(), Some(size as u64));
    let mut planar_input = vec![];
    to_planar(&test_image(size, size), &mut planar_input);
    let cases = fixture["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 30);
    let none = Photometric::IDENTITY;
    let jitter = |op: usize, f: f32| {
        let mut factors = [1.0, 1.0, 1.0, 0.0];
        factors[op] = f;
        Photometric { jitter: Some(([op, 4, 4, 4], factors)), ..none.clone() }
    };
    for (name, want) in cases {
        let (op, arg) = name.rsplit_once('_').unwrap_or((name.as_str(), ""));
        let f: f32 = arg.parse().unwrap_or(0.0);
        if op == "hue" {
            assert_same(name, &to_interleaved(&apply_hue(&planar_input, size, f)), want.as_str().unwrap());
            continue;
        }
        let p = match op {
            "blur" => Photometric { blur_sigma: Some(f), ..none.clone() },
            "brightness" => jitter(0, f),
            "contrast" => jitter(1, f),
            "saturation" => jitter(2, f),
            "grayscale" => Photometric { grayscale: true, ..none.clone() },
            "solarize" => Photometric { solarize: true, ..none.clone() },
            other => panic!("unknown case {other}"),
        };
        let mut px = planar_input.clone();
        apply_photometric(&mut px, size, &p, 128, &mut Default::default());
        assert_same(name, &to_interleaved(&px), want.as_str().unwrap());
    }
}

/// Grays (hue undefined), saturated primaries, near-grays, the darkest colours and sector boundaries.
#[test]
fn hue_matches_torchvision_on_pil_for_edge_case_pixels() {
    let fixture: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let edge = &fixture["hue_edge"];
    let input = hex::decode(edge["input"].as_str().unwrap()).unwrap();
    let size = ((input.len() / 3) as f64).sqrt() as usize;
    assert_eq!(size * size * 3, input.len());
    let mut planar = vec![];
    to_planar(&input, &mut planar);
    let cases = edge["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 10);
    for (name, want) in cases {
        let ours = to_interleaved(&apply_hue(&planar, size, hue_factor(name)));
        assert_same(&format!("edge {name}"), &ours, want.as_str().unwrap());
    }
}

/// Every colour once, in the layout the script hashes: planar, pixel i = colour i (R the high byte).
fn cube() -> Vec<u8> {
    let n = 1usize << 24;
    (0..3).flat_map(|c| (0..n).map(move |i| (i >> (16 - 8 * c)) as u8)).collect()
}

fn all_colours_digest(name: &str) -> String {
    let fixture: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    fixture["all_colours_sha256"][name].as_str().unwrap_or_else(|| panic!("no digest {name}")).to_string()
}

#[test]
fn hue_matches_torchvision_on_pil_for_every_colour() {
    let fixture: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let digests = fixture["all_colours_sha256"].as_object().unwrap();
    let hues: Vec<&String> = digests.keys().filter(|k| k.starts_with("hue_")).collect();
    assert_eq!(hues.len(), 7);
    let cube = cube();
    for name in hues {
        let mut px = cube.clone();
        hue(&mut px, hue_factor(name));
        let ours = hex::encode(Sha256::digest(&px));
        assert_eq!(ours, all_colours_digest(name), "{name}: some of the 2^24 colours differ from Pillow");
    }
}

/// Each conversion on its own, on all 2^24 inputs, in the same planar layout (for HSV → RGB, h is the
/// high byte of the index).
#[test]
fn pillows_hsv_conversions_match_on_every_input() {
    for (name, convert) in
        [("rgb_to_hsv", pil_rgb_to_hsv as fn(u8, u8, u8) -> (u8, u8, u8)), ("hsv_to_rgb", pil_hsv_to_rgb)]
    {
        let mut px = cube();
        let n = px.len() / 3;
        let (a, rest) = px.split_at_mut(n);
        let (b, c) = rest.split_at_mut(n);
        for ((a, b), c) in a.iter_mut().zip(b.iter_mut()).zip(c.iter_mut()) {
            (*a, *b, *c) = convert(*a, *b, *c);
        }
        let ours = hex::encode(Sha256::digest(&px));
        assert_eq!(ours, all_colours_digest(name), "{name}: some of the 2^24 inputs differ from Pillow");
    }
}
