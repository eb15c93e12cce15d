//! Cleaning quirks, with fixtures made here: CMYK (plain and Adobe-inverted), YCCK, a PNG named .JPEG, a
//! grayscale JPEG, a truncated JPEG, a zero-byte file and a text file, packed as a class-folder set.

mod util;

use std::collections::HashMap;
use std::path::Path;

use shard::format::{Sample, open_shard, read_samples};
use shard::index::Index;
use util::*;

fn write(dir: &Path, rel: &str, bytes: &[u8]) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn read_set(dir: &Path) -> (Index, HashMap<String, Sample>) {
    let index = Index::load(dir).unwrap();
    let mut samples = HashMap::new();
    for s in &index.shards {
        read_samples(open_shard(&dir.join(&s.name)).unwrap(), |sample| {
            samples.insert(sample.key.clone(), sample);
            true
        })
        .unwrap();
    }
    (index, samples)
}

fn meta(s: &Sample) -> serde_json::Value {
    serde_json::from_slice(s.get("json").unwrap()).unwrap()
}

#[test]
fn quirky_inputs_are_cleaned_or_skipped_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let good = jpeg_rgb(40, 30, 1);
    write(&input, "a_cmyk/plain.JPEG", &cmyk_plain_jpeg());
    write(&input, "a_cmyk/adobe.JPEG", &cmyk_adobe_jpeg());
    write(&input, "a_cmyk/ycck.JPEG", &ycck_jpeg());
    let png_rgb = image::RgbImage::from_fn(24, 20, |x, y| image::Rgb([x as u8 * 10, y as u8 * 12, 200]));
    let mut png = vec![];
    png_rgb.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    write(&input, "b_other/png_named.JPEG", &png);
    let gray: Vec<u8> = (0..32 * 32).map(|i| (i % 256) as u8).collect();
    let mut gray_jpeg = vec![];
    jpeg_encoder::Encoder::new(&mut gray_jpeg, 90)
        .encode(&gray, 32, 32, jpeg_encoder::ColorType::Luma)
        .unwrap();
    write(&input, "b_other/gray.JPEG", &gray_jpeg);
    write(&input, "b_other/good.JPEG", &good);
    write(&input, "c_bad/truncated.JPEG", &good[..good.len() / 2]);
    write(&input, "c_bad/empty.JPEG", b"");
    write(&input, "c_bad/notes.JPEG", b"this is not an image\n");

    let out = tmp.path().join("out");
    let stdout = ok(&run_shard(
        &[
            "pack",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--per-shard",
            "4",
            "-q",
        ],
        &[],
    ));
    assert!(stdout.contains("packed 6 images (3 skipped)"), "{stdout}");
    let (index, samples) = read_set(&out);
    assert_eq!(index.total_samples, 6);
    let ids: Vec<&str> = index.classes.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["a_cmyk", "b_other", "c_bad"]);

    // Every skipped input is recorded with a reason that says what is wrong.
    let skipped: HashMap<&str, &str> =
        index.skipped.iter().map(|s| (s.path.as_str(), s.reason.as_str())).collect();
    assert_eq!(skipped.len(), 3);
    assert!(skipped["c_bad/truncated.JPEG"].contains("truncated"), "{skipped:?}");
    assert!(skipped["c_bad/empty.JPEG"].contains("empty"), "{skipped:?}");
    assert!(skipped["c_bad/notes.JPEG"].contains("not an image"), "{skipped:?}");

    // CMYK in all three storages becomes the same RGB colours.
    for (key, cleaning) in [
        ("a_cmyk/plain", "cmyk_to_rgb"),
        ("a_cmyk/adobe", "adobe_inverted_cmyk_to_rgb"),
        ("a_cmyk/ycck", "ycck_to_rgb"),
    ] {
        let s = &samples[key];
        assert_eq!(meta(s)["cleaning"][0], cleaning, "{key}");
        assert_eq!(s.get("cls").unwrap(), b"0");
        let rgb = image::load_from_memory(s.get("jpg").unwrap()).unwrap().to_rgb8();
        assert_eq!(rgb.dimensions(), (80, 16));
        assert_blocks(&rgb, 12);
        assert_eq!(shard::clean::parse_jpeg_header(s.get("jpg").unwrap()).unwrap().components, 3);
    }

    // A PNG named .JPEG is now a JPEG with (nearly) the same pixels.
    let s = &samples["b_other/png_named"];
    assert_eq!(image::guess_format(s.get("jpg").unwrap()).unwrap(), image::ImageFormat::Jpeg);
    assert_eq!(meta(s)["cleaning"][0], "reencoded_from_png");
    let back = image::load_from_memory(s.get("jpg").unwrap()).unwrap().to_rgb8();
    let err: f64 =
        back.as_raw().iter().zip(png_rgb.as_raw()).map(|(&a, &b)| (a as f64 - b as f64).abs()).sum::<f64>()
            / png_rgb.as_raw().len() as f64;
    assert!(err < 4.0, "mean abs error {err}");

    // Grayscale and ordinary JPEGs are kept byte for byte.
    assert_eq!(samples["b_other/gray"].get("jpg").unwrap(), gray_jpeg.as_slice());
    assert_eq!(meta(&samples["b_other/gray"])["channels"], 1);
    assert_eq!(samples["b_other/good"].get("jpg").unwrap(), good.as_slice());
    let m = meta(&samples["b_other/good"]);
    assert_eq!(
        (m["width"].as_u64(), m["height"].as_u64(), m["class_id"].as_str()),
        (Some(40), Some(30), Some("b_other"))
    );
    assert_eq!(m["source"], "b_other/good.JPEG");

    // --strict turns a bad input into an error that names the file.
    let strict = run_shard(
        &[
            "pack",
            "--input",
            input.to_str().unwrap(),
            "--out",
            tmp.path().join("strict").to_str().unwrap(),
            "--strict",
            "-q",
        ],
        &[],
    );
    assert_eq!(strict.status.code(), Some(2));
    let err = String::from_utf8_lossy(&strict.stderr);
    assert!(err.contains("c_bad/") && err.contains("--strict"), "{err}");
    assert!(!tmp.path().join("strict/index.json").exists());
}

#[test]
fn max_side_caps_the_long_side() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write(&input, "k/wide.jpg", &jpeg_rgb(200, 50, 3));
    write(&input, "k/small.jpg", &jpeg_rgb(20, 10, 3));
    let out = tmp.path().join("out");
    ok(&run_shard(
        &[
            "pack",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-side",
            "64",
            "-q",
        ],
        &[],
    ));
    let (_, samples) = read_set(&out);
    let wide = image::load_from_memory(samples["k/wide"].get("jpg").unwrap()).unwrap();
    assert_eq!((wide.width(), wide.height()), (64, 16));
    assert_eq!(meta(&samples["k/wide"])["cleaning"][0], "resized_200x50_to_64x16");
    assert_eq!(samples["k/small"].get("jpg").unwrap(), jpeg_rgb(20, 10, 3).as_slice());
}

#[test]
fn refuses_to_overwrite_a_set_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write(&input, "k/a.jpg", &jpeg_rgb(16, 16, 0));
    let out = tmp.path().join("out");
    let args = ["pack", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"];
    ok(&run_shard(&args, &[]));
    let again = run_shard(&args, &[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let mut forced = args.to_vec();
    forced.push("--force");
    ok(&run_shard(&forced, &[]));
    // A missing input folder is one clear line naming it.
    let missing = run_shard(&["pack", "--input", "/nonexistent/x", "--out", out.to_str().unwrap()], &[]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/x"));
}
