//! Input that tries to make `shard` read or write outside the place it names, allocate what a header
//! claims, or resume onto other inputs: an index naming shards outside its folder, list lines with `..`,
//! symbolic links out of the input or in a loop, a JPEG declaring 30000 x 30000 pixels, and an input
//! moved between a crash and `--resume`. Each is refused or skipped with its reason recorded.

mod util;

use std::path::Path;

use util::*;

fn write(dir: &Path, rel: &str, bytes: &[u8]) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn index(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("index.json")).unwrap()).unwrap()
}

/// A packed set of 6 images in 3 shards at `out`.
fn packed(tmp: &Path) -> std::path::PathBuf {
    let input = tmp.join("in");
    for i in 0..6u8 {
        write(&input, &format!("c{}/{i}.jpg", i % 2), &jpeg_rgb(24, 20, i));
    }
    let out = tmp.join("set");
    let args = ["pack", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"];
    ok(&run_shard(&[&args[..], &["--per-shard", "2"]].concat(), &[]));
    out
}

/// `verify` (and every reader: the loader, `pack --classes-from`) loads the index through one check.
fn verify(set: &Path) -> std::process::Output {
    run_shard(&["verify", set.to_str().unwrap()], &[])
}

#[test]
fn an_index_naming_shards_outside_its_folder_or_twice_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let set = packed(tmp.path());
    ok(&verify(&set));
    let good = index(&set);
    let first = good["shards"][0]["name"].as_str().unwrap().to_string();
    // A copy of a real shard outside the set: before, `verify` opened it and said "ok".
    std::fs::create_dir_all(tmp.path().join("outside")).unwrap();
    std::fs::copy(set.join(&first), tmp.path().join("outside/evil.tar")).unwrap();
    for (name, why) in [
        ("../outside/evil.tar", "is not a file name in the set's folder"),
        ("/dev/zero", "is not a file name in the set's folder"),
        ("sub/x.tar", "is not a file name in the set's folder"),
        ("..", "is not a file name in the set's folder"),
        ("", "is not a file name in the set's folder"),
    ] {
        let mut bad = good.clone();
        bad["shards"][0]["name"] = name.into();
        std::fs::write(set.join("index.json"), serde_json::to_vec(&bad).unwrap()).unwrap();
        let out = verify(&set);
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains(why) && err.contains("index.json"), "{name}: {err}");
    }
    let mut twice = good.clone();
    twice["shards"][1] = twice["shards"][0].clone();
    std::fs::write(set.join("index.json"), serde_json::to_vec(&twice).unwrap()).unwrap();
    let err = stderr(&verify(&set));
    assert!(err.contains(&format!("shard {first:?} is listed twice")), "{err}");
    let mut counts = good.clone();
    counts["shards"][0]["samples"] = 1.into();
    std::fs::write(set.join("index.json"), serde_json::to_vec(&counts).unwrap()).unwrap();
    let err = stderr(&verify(&set));
    assert!(err.contains("disagree with the shards' sums"), "{err}");

    // A shard that is a link to a device is not read (verify would read /dev/zero forever).
    std::fs::write(set.join("index.json"), serde_json::to_vec(&good).unwrap()).unwrap();
    std::fs::remove_file(set.join(&first)).unwrap();
    std::os::unix::fs::symlink("/dev/zero", set.join(&first)).unwrap();
    let out = verify(&set);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(!out.status.success() && text.contains("not a regular file"), "{text}");
    // An index.json that is itself a device is refused from its metadata.
    std::fs::remove_file(set.join("index.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", set.join("index.json")).unwrap();
    let err = stderr(&verify(&set));
    assert!(err.contains("not a regular file (a device)"), "{err}");
}

#[test]
fn list_lines_that_leave_the_input_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write(&input, "a/1.jpg", &jpeg_rgb(24, 20, 1));
    write(tmp.path(), "secret/x.jpg", &jpeg_rgb(24, 20, 2));
    for line in ["a/../../secret/x.jpg", "a/./1.jpg", "/abs/a.jpg", "a//1.jpg"] {
        let list = tmp.path().join("list.txt");
        std::fs::write(&list, format!("a/1.jpg\n{line}\n")).unwrap();
        let out = tmp.path().join("out");
        let args = ["pack", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"];
        let res = run_shard(&[&args[..], &["--list", list.to_str().unwrap()]].concat(), &[]);
        let err = stderr(&res);
        assert_eq!(res.status.code(), Some(2), "{line}: {err}");
        assert!(err.contains("line 2") && err.contains("is not a path inside the input"), "{line}: {err}");
        assert!(!out.join("index.json").exists());
    }
}

#[test]
fn symbolic_links_out_of_the_input_or_in_a_loop_are_skipped_and_recorded() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for i in 0..2u8 {
        write(&input, &format!("a/{i}.jpg"), &jpeg_rgb(24, 20, i));
        write(&input, &format!("b/{i}.jpg"), &jpeg_rgb(24, 20, 10 + i));
    }
    write(tmp.path(), "outside/c/secret.jpg", &jpeg_rgb(24, 20, 99));
    symlink("..", input.join("a/up")).unwrap(); // a loop back to the input
    symlink("../b", input.join("a/tob")).unwrap(); // b's images under a's label
    std::fs::create_dir_all(input.join("b/sub")).unwrap();
    symlink("../b/sub", input.join("a/tosub")).unwrap(); // a real folder of b, reached from a first
    symlink("../../outside/c/secret.jpg", input.join("b/leak.jpg")).unwrap();
    symlink("../outside/c", input.join("c")).unwrap(); // a class folder out of the input
    symlink("0.jpg", input.join("a/same.jpg")).unwrap(); // a link inside: followed, as ImageFolder does
    let pack = |out: &str, extra: &[&str]| {
        let out = tmp.path().join(out);
        let args = ["pack", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"];
        let res = run_shard(&[&args[..], extra].concat(), &[]);
        ok(&res);
        (index(&out), stderr(&res))
    };
    let (idx, err) = pack("out", &[]);
    // a/0, a/1, a/same, b/0, b/1: each image of the input once, under its own class.
    assert_eq!(idx["total_samples"], 5, "{err}\n{idx}");
    let skipped: Vec<(String, String)> = idx["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["path"].as_str().unwrap().into(), s["reason"].as_str().unwrap().into()))
        .collect();
    let reason = |p: &str| skipped.iter().find(|(q, _)| q == p).map(|(_, r)| r.clone()).unwrap_or_default();
    assert!(reason("a/up").contains("inside the input") && reason("a/up").contains("a loop"), "{skipped:?}");
    assert!(reason("a/tob").contains("inside the input"), "{skipped:?}");
    assert!(reason("a/tosub").contains("inside the input"), "{skipped:?}");
    assert_eq!(reason("b/sub"), "", "the real folder is walked under its own name: {skipped:?}");
    assert!(reason("b/leak.jpg").contains("out of the input folder"), "{skipped:?}");
    assert!(reason("c").contains("--follow-links-out"), "{skipped:?}");
    // Quiet (-q): a count, not a line per link (a folder of links can hold millions).
    assert!(err.contains("5 inputs skipped before reading (listed in index.json"), "{err}");
    assert!(!err.contains("leak.jpg"), "{err}");

    // Asked for, links out are followed (a subset made of links); the loop is still not.
    let (idx, err) = pack("out2", &["--follow-links-out"]);
    assert_eq!(idx["total_samples"], 7, "{err}\n{idx}");
    assert_eq!(idx["options"]["follow_links_out"], true);

    // Segmentation pairs: an image or a mask that links out of its folder is skipped too.
    let (images, masks) = (tmp.path().join("seg/images"), tmp.path().join("seg/masks"));
    let mask = {
        let mut png = vec![];
        image::GrayImage::new(24, 20)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png
    };
    for i in 0..2u8 {
        write(&images, &format!("{i}.jpg"), &jpeg_rgb(24, 20, i));
        write(&masks, &format!("{i}.png"), &mask);
    }
    write(tmp.path(), "outside/2.png", &mask);
    write(&images, "2.jpg", &jpeg_rgb(24, 20, 2));
    symlink("../../outside/2.png", masks.join("2.png")).unwrap();
    let out = tmp.path().join("seg-out");
    let args = ["pack", "--input", images.to_str().unwrap(), "--masks", masks.to_str().unwrap()];
    ok(&run_shard(&[&args[..], &["--out", out.to_str().unwrap(), "-q"]].concat(), &[]));
    let idx = index(&out);
    assert_eq!(idx["total_samples"], 2, "{idx}");
    assert_eq!(idx["skipped"][0]["path"], "2.png");
}

/// A baseline JPEG whose frame header is rewritten to declare `w` x `h`.
fn declaring(jpeg: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut j = jpeg.to_vec();
    let sof = j.windows(2).position(|m| m == [0xFF, 0xC0]).expect("a baseline SOF0");
    j[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    j[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    j
}

#[test]
fn a_small_file_declaring_a_huge_image_is_skipped_from_its_header() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write(&input, "a/fine.jpg", &jpeg_rgb(24, 20, 1));
    let huge = declaring(&jpeg_rgb(24, 20, 2), 30000, 30000);
    assert!(huge.len() < 4096);
    write(&input, "a/huge.jpg", &huge);
    let out = tmp.path().join("out");
    let args = ["pack", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"];
    ok(&run_shard(&args, &[]));
    let idx = index(&out);
    assert_eq!(idx["total_samples"], 1);
    assert_eq!(idx["skipped"][0]["path"], "a/huge.jpg");
    let reason = idx["skipped"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("30000x30000 is 900000000 pixels, over the limit"), "{reason}");
}

#[test]
fn resume_refuses_inputs_that_changed_since_the_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for i in 0..12u8 {
        write(&input, &format!("c{}/{i:02}.jpg", i % 3), &jpeg_rgb(24, 20, i));
    }
    let out = tmp.path().join("out");
    let args = ["pack", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"];
    let fresh = [&args[..], &["--per-shard", "2", "--workers", "1"]].concat();
    let resume = [&fresh[..], &["--resume"]].concat();
    let crashed = run_shard(&fresh, &[("SHARD_CRASH_AFTER_SAMPLES", "5")]);
    assert!(!crashed.status.success(), "the crash hook fired");
    // The same number of inputs, one of them another file: the plan's length is unchanged.
    std::fs::rename(input.join("c0/00.jpg"), input.join("c0/zz.jpg")).unwrap();
    let res = run_shard(&resume, &[]);
    let err = stderr(&res);
    assert_eq!(res.status.code(), Some(2), "{err}");
    assert!(err.contains("other options or inputs"), "{err}");
    // Put back, the resume finishes the set.
    std::fs::rename(input.join("c0/zz.jpg"), input.join("c0/00.jpg")).unwrap();
    ok(&run_shard(&resume, &[]));
    assert_eq!(index(&out)["total_samples"], 12);
}
