//! The photometric operations against PIL's own outputs (the library DINO's augmentation runs on):
//! `fixtures/pil_ops.json` is written by `fixtures/make_pil_ops.py` with Pillow; every case must match
//! byte for byte. (Hue is not here: we follow torchvision's float HSV path, not PIL's 8-bit one.)

use loader::augment::{Photometric, apply_photometric, to_planar};

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

fn interleave(planar: &[u8]) -> Vec<u8> {
    let n = planar.len() / 3;
    (0..n).flat_map(|i| [planar[i], planar[n + i], planar[2 * n + i]]).collect()
}

#[test]
fn photometric_ops_match_pillow_byte_for_byte() {
    let fixture: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let size = fixture["width"].as_u64().unwrap() as usize;
    assert_eq!(fixture["height"].as_u64(), Some(size as u64));
    let mut planar_input = vec![];
    to_planar(&test_image(size, size), &mut planar_input);
    let cases = fixture["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 20);
    let none = Photometric::IDENTITY;
    let jitter = |op: usize, f: f32| {
        let mut factors = [1.0, 1.0, 1.0, 0.0];
        factors[op] = f;
        Photometric { jitter: Some(([op, 4, 4, 4], factors)), ..none.clone() }
    };
    for (name, want) in cases {
        let (op, arg) = name.rsplit_once('_').unwrap_or((name.as_str(), ""));
        let f: f32 = arg.parse().unwrap_or(0.0);
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
        apply_photometric(&mut px, size, &p, 128, &mut vec![]);
        let ours = interleave(&px);
        let want = hex::decode(want.as_str().unwrap()).unwrap();
        let diff = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{name}: {diff} of {} bytes differ from Pillow", want.len());
    }
}
