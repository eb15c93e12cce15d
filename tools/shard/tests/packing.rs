//! Packing behaviour on fixtures made here: crash and resume, zstd, verify catching damage, and an
//! independent reader (the `webdataset` crate) agreeing with ours.

mod util;

use std::path::{Path, PathBuf};

use shard::format::{open_shard, read_samples};
use shard::index::Index;
use util::*;

/// 3 classes × 40 small JPEGs.
fn fixture_set(root: &Path) -> PathBuf {
    let input = root.join("in");
    for c in 0..3u8 {
        let dir = input.join(format!("class{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..40u8 {
            std::fs::write(dir.join(format!("img_{i:03}.jpg")), jpeg_rgb(24 + i as u16, 20, c * 50 + i))
                .unwrap();
        }
    }
    input
}

/// (key, members) of every sample in shard order, with our reader.
type Members = Vec<(String, Vec<u8>)>;

fn samples(dir: &Path) -> Vec<(String, Members)> {
    let index = Index::load(dir).unwrap();
    let mut out = vec![];
    for s in &index.shards {
        read_samples(open_shard(&dir.join(&s.name)).unwrap(), |x| {
            out.push((x.key, x.members));
            true
        })
        .unwrap();
    }
    out
}

fn pack_args<'a>(input: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["pack", "--input", input, "--out", out, "--per-shard", "16", "-q"];
    a.extend_from_slice(extra);
    if !extra.contains(&"--seed") {
        a.extend(["--seed", "5"]);
    }
    a
}

#[test]
fn a_crash_then_resume_gives_the_bytes_of_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture_set(tmp.path());
    let (input, full, cut) = (input.to_str().unwrap(), tmp.path().join("full"), tmp.path().join("cut"));
    ok(&run_shard(&pack_args(input, full.to_str().unwrap(), &[]), &[]));

    // Abort (no unwinding, like a kill) in the middle of the fourth shard.
    let crashed =
        run_shard(&pack_args(input, cut.to_str().unwrap(), &[]), &[("SHARD_CRASH_AFTER_SAMPLES", "55")]);
    assert!(!crashed.status.success());
    let left = files(&cut);
    assert!(!left.contains_key("index.json"), "no index after a crash: {:?}", left.keys());
    assert!(
        left.contains_key("train-000002.tar") && !left.contains_key("train-000003.tar"),
        "{:?}",
        left.keys()
    );
    assert!(left.contains_key("train-000003.tar.partial"), "{:?}", left.keys());
    // What is there under a final name is complete and identical to the uninterrupted run.
    let full_files = files(&full);
    for name in ["train-000000.tar", "train-000001.tar", "train-000002.tar"] {
        assert_eq!(left[name], full_files[name], "{name}");
    }

    // Without --resume the half-done folder is refused, with a hint.
    let refused = run_shard(&pack_args(input, cut.to_str().unwrap(), &[]), &[]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));
    let stdout = ok(&run_shard(&pack_args(input, cut.to_str().unwrap(), &["--resume"]), &[]));
    assert!(stdout.contains("packed 72 images"), "the resumed run packs only the rest: {stdout}");
    assert_eq!(files(&cut), full_files, "resumed set differs from the uninterrupted one");
}

#[test]
fn same_seed_same_bytes_any_worker_count_other_seed_other_order() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture_set(tmp.path());
    let input = input.to_str().unwrap();
    let dirs: Vec<PathBuf> = ["w1", "w2", "s6"].iter().map(|d| tmp.path().join(d)).collect();
    ok(&run_shard(&pack_args(input, dirs[0].to_str().unwrap(), &["--workers", "1"]), &[]));
    ok(&run_shard(&pack_args(input, dirs[1].to_str().unwrap(), &["--workers", "2"]), &[]));
    ok(&run_shard(&pack_args(input, dirs[2].to_str().unwrap(), &["--seed", "6"]), &[]));
    assert_eq!(files(&dirs[0]), files(&dirs[1]));
    let keys = |d: &Path| samples(d).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let (a, b) = (keys(&dirs[0]), keys(&dirs[2]));
    assert_ne!(a, b, "another seed must give another order");
    let (mut sa, mut sb) = (a.clone(), b.clone());
    sa.sort();
    sb.sort();
    assert_eq!(sa, sb, "the same samples in both");
    // Each shard mixes classes.
    for chunk in a.chunks(16) {
        let classes: std::collections::HashSet<&str> =
            chunk.iter().map(|k| k.split('/').next().unwrap()).collect();
        assert!(classes.len() >= 2, "a shard of one class: {chunk:?}");
    }
}

#[test]
fn zstd_shards_hold_the_same_samples_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture_set(tmp.path());
    let input = input.to_str().unwrap();
    let (plain, zst) = (tmp.path().join("plain"), tmp.path().join("zst"));
    ok(&run_shard(&pack_args(input, plain.to_str().unwrap(), &[]), &[]));
    ok(&run_shard(&pack_args(input, zst.to_str().unwrap(), &["--zstd", "3"]), &[]));
    let index = Index::load(&zst).unwrap();
    assert!(index.shards.iter().all(|s| s.name.ends_with(".tar.zst")));
    // zstd's own decoder, not ours, restores the exact tar bytes.
    for s in &index.shards {
        let raw = zstd::decode_all(std::fs::File::open(zst.join(&s.name)).unwrap()).unwrap();
        assert_eq!(raw, std::fs::read(plain.join(s.name.trim_end_matches(".zst"))).unwrap(), "{}", s.name);
    }
    assert_eq!(samples(&plain), samples(&zst));
    let out = ok(&run_shard(&["verify", zst.to_str().unwrap(), "--decode"], &[]));
    assert!(out.contains("ok: 8 shards, 120 samples, 120 images decoded"), "{out}");
}

#[test]
fn verify_reports_a_corrupted_byte_and_a_missing_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixture_set(tmp.path());
    let set = tmp.path().join("set");
    ok(&run_shard(&pack_args(input.to_str().unwrap(), set.to_str().unwrap(), &[]), &[]));
    assert!(ok(&run_shard(&["verify", set.to_str().unwrap()], &[])).starts_with("ok: 8 shards, 120 samples"));

    let victim = set.join("train-000004.tar");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[512 + 300] ^= 0x01; // inside the first image's data: the tar structure stays intact
    std::fs::write(&victim, bytes).unwrap();
    std::fs::remove_file(set.join("train-000006.tar")).unwrap();
    let out = run_shard(&["verify", set.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train-000004.tar: SHA-256"), "{err}");
    assert!(err.contains("train-000006.tar: missing"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAILED: 2 problems"));
}

#[test]
fn gnu_tar_and_the_webdataset_crate_read_our_shards() {
    use webdataset::pipeline::DataPipeline;
    use webdataset::shardlists::SimpleShardList;
    use webdataset::sources::ShardsToSamples;

    let tmp = tempfile::tempdir().unwrap();
    let input = fixture_set(tmp.path());
    for (dir, extra) in [("plain", vec![]), ("zst", vec!["--zstd", "5"])] {
        let set = tmp.path().join(dir);
        ok(&run_shard(&pack_args(input.to_str().unwrap(), set.to_str().unwrap(), &extra), &[]));
        let index = Index::load(&set).unwrap();
        let ours = samples(&set);
        if dir == "plain" {
            let listing = std::process::Command::new("tar")
                .arg("-tf")
                .arg(set.join(&index.shards[0].name))
                .output()
                .unwrap();
            assert!(listing.status.success());
            let names: Vec<String> =
                String::from_utf8_lossy(&listing.stdout).lines().map(String::from).collect();
            let want: Vec<String> =
                ours[..16].iter().flat_map(|(k, m)| m.iter().map(move |(e, _)| format!("{k}.{e}"))).collect();
            assert_eq!(names, want);
        }
        let urls: Vec<String> =
            index.shards.iter().map(|s| set.join(&s.name).display().to_string()).collect();
        let pipeline =
            DataPipeline::new().with(SimpleShardList::verbatim(urls)).with(ShardsToSamples::streaming());
        let mut theirs = vec![];
        for sample in pipeline.iter() {
            let sample = sample.expect("webdataset read error");
            let key = sample.key().unwrap().to_string();
            let jpg = match sample.get("jpg") {
                Some(webdataset::Value::Bytes(b)) => b.to_vec(),
                other => panic!("{key}: jpg is {other:?}"),
            };
            theirs.push((key, jpg));
        }
        let ours: Vec<(String, Vec<u8>)> =
            ours.into_iter().map(|(k, m)| (k, m.into_iter().find(|(e, _)| e == "jpg").unwrap().1)).collect();
        assert_eq!(theirs.len(), 120, "{dir}");
        assert_eq!(theirs, ours, "{dir}");
    }
}
