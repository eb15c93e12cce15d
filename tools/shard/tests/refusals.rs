//! What `shard` refuses, and that a refusal leaves nothing behind: a folder with no readable image, and
//! numeric options that cannot make a set (zero samples per shard, zero workers, …). Each refusal names
//! the folder or the option, so a person knows what to change.

mod util;

use std::path::Path;
use std::process::Output;

use util::*;

fn write(dir: &Path, rel: &str, bytes: &[u8]) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A failed run's stderr; it must exit 2 (an error, not a crash or success).
fn refused(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "expected a refusal (rc 2), got {:?}\n{stderr}", out.status);
    stderr
}

#[test]
fn a_folder_with_no_readable_image_is_an_error_and_writes_no_set() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write(&input, "a/empty.jpg", b"");
    write(&input, "a/notes.jpg", b"this is not an image\n");
    write(&input, "b/other.jpg", b"neither is this\n");
    write(&input, "b/cut.jpg", &jpeg_rgb(40, 30, 1)[..100]);
    let out = tmp.path().join("out");
    let args = ["pack", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"];
    let err = refused(&run_shard(&args, &[]));
    assert!(err.contains(&format!("error: {}: no readable image", input.display())), "{err}");
    assert!(err.contains("all 4 inputs were skipped"), "{err}");
    // The reasons, most common first, each with an example.
    assert!(err.contains("2 not an image (unknown format), e.g. a/notes.jpg"), "{err}");
    assert!(err.contains("1 empty file, e.g. a/empty.jpg"), "{err}");
    assert!(!out.exists(), "no set, not even an empty folder: {:?}", std::fs::read_dir(&out).ok());

    // An output folder that existed before stays, empty.
    std::fs::create_dir_all(&out).unwrap();
    refused(&run_shard(&args, &[]));
    assert!(files(&out).is_empty(), "{:?}", files(&out).keys());
}

#[test]
fn numeric_options_that_cannot_make_a_set_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for i in 0..3u8 {
        write(&input, &format!("c/{i}.jpg"), &jpeg_rgb(24, 20, i));
    }
    let (input, out) = (input.to_str().unwrap(), tmp.path().join("out"));
    let out_s = out.to_str().unwrap();
    for (extra, option) in [
        (&["--per-shard", "0"][..], "--per-shard"),
        (&["--shard-bytes", "0"], "--shard-bytes"),
        // Parses as a size, but rounds down to 0 bytes.
        (&["--shard-bytes", "0.4"], "--shard-bytes"),
        (&["--workers", "0"], "--workers"),
        (&["--max-side", "0"], "--max-side"),
        (&["--quality", "0"], "--quality"),
        (&["--zstd", "0"], "--zstd"),
        (&["--prefix", ""], "--prefix"),
        (&["--prefix", "a/b"], "--prefix"),
    ] {
        let mut args = vec!["pack", "--input", input, "--out", out_s, "-q"];
        args.extend_from_slice(extra);
        let err = refused(&run_shard(&args, &[]));
        assert!(err.contains(option), "{extra:?}: the error must name {option}: {err}");
        assert!(!out.exists(), "{extra:?}: a refused run writes nothing");
    }
    for (extra, option) in [
        (&["--count", "0"][..], "--count"),
        (&["--per-shard", "0"], "--per-shard"),
        (&["--max-shapes", "0"], "--max-shapes"),
        (&["--size", "8"], "--size"),
        (&["--prefix", ""], "--prefix"),
    ] {
        let mut args = vec!["synth", "--out", out_s, "-q"];
        args.extend_from_slice(extra);
        let err = refused(&run_shard(&args, &[]));
        assert!(err.contains(option), "synth {extra:?}: the error must name {option}: {err}");
        assert!(!out.exists(), "synth {extra:?}: a refused run writes nothing");
    }
    // The library refuses the same values (the command line is not the only caller).
    let opts = shard::pack::PackOptions {
        input: input.into(),
        out: out.clone(),
        per_shard: Some(0),
        quiet: true,
        ..Default::default()
    };
    let err = shard::pack::pack(&opts).unwrap_err().to_string();
    assert_eq!(err, "--per-shard: must be at least 1, got 0");
    let opts = shard::pack::PackOptions { per_shard: None, quality: 101, ..opts };
    let err = shard::pack::pack(&opts).unwrap_err().to_string();
    assert_eq!(err, "--quality: must be 1 to 100, got 101");
    assert!(!out.exists());
}

/// A run killed before its first shard is journaled leaves the (empty) journal and a `.partial` shard, or
/// the first shard renamed but not yet journaled: `--resume` finishes the set. A folder of files without
/// a journal is nobody's interrupted run: refused, and nothing in it is removed.
#[test]
fn resume_after_a_crash_before_the_first_shard_is_journaled_finishes_the_set() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for i in 0..12u8 {
        write(&input, &format!("c{}/{i}.jpg", i % 2), &jpeg_rgb(24 + i as u16, 20, i));
    }
    let input = input.to_str().unwrap();
    let pack = |out: &Path, extra: &[&str]| {
        let mut args = vec!["pack", "--input", input, "--out", out.to_str().unwrap(), "-q"];
        args.extend(["--per-shard", "5", "--seed", "2"]);
        args.extend_from_slice(extra);
        run_shard(&args, &[])
    };
    let full = tmp.path().join("full");
    ok(&pack(&full, &[]));
    let want = files(&full);
    assert_eq!(want.len(), 4, "3 shards and the index: {:?}", want.keys());

    // Crashed while writing the first shard: the journal, written before any shard, makes the folder
    // recognisably this run's, and --resume finishes it.
    let cut = tmp.path().join("cut");
    let crash = |out: &Path| {
        run_shard(
            &[
                "pack",
                "--input",
                input,
                "--out",
                out.to_str().unwrap(),
                "-q",
                "--per-shard",
                "5",
                "--seed",
                "2",
            ],
            &[("SHARD_CRASH_AFTER_SAMPLES", "2")],
        )
    };
    assert!(!crash(&cut).status.success());
    let left = files(&cut);
    assert!(
        left.contains_key(".pack-journal.json") && left.contains_key("train-000000.tar.partial"),
        "{:?}",
        left.keys()
    );
    ok(&pack(&cut, &["--resume"]));
    assert_eq!(files(&cut), want);

    // Killed between the first shard's rename and its journal entry: the shard is not journaled, so it
    // is made again.
    let cut = tmp.path().join("cut2");
    assert!(!crash(&cut).status.success());
    std::fs::remove_file(cut.join("train-000000.tar.partial")).unwrap();
    write(&cut, "train-000000.tar", &want["train-000000.tar"][..2048]);
    ok(&pack(&cut, &["--resume"]));
    assert_eq!(files(&cut), want);

    // Files without a journal are not an interrupted run's: refused, nothing removed.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    write(&other, "train-000000.tar", b"somebody's shard");
    write(&other, "notes.partial", b"somebody's download");
    write(&other, "train-images.tar.gz", b"somebody's archive");
    let err = refused(&pack(&other, &["--resume"]));
    assert!(err.contains("no pack journal") && err.contains("--force"), "{err}");
    assert!(other.join("train-000000.tar").is_file() && other.join("notes.partial").is_file());
    // --force replaces the set's own files only.
    ok(&pack(&other, &["--force"]));
    let mut want_other = want.clone();
    want_other.insert("notes.partial".into(), b"somebody's download".to_vec());
    want_other.insert("train-images.tar.gz".into(), b"somebody's archive".to_vec());
    assert_eq!(files(&other), want_other);
}
