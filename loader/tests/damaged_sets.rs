//! Sets with missing or damaged parts, through the library and the `loader` command: a shard the index
//! lists but the disk lacks stops the run at start-up; a truncated shard is reported once per run and
//! counted (in `Stats`, the stats line and the end-of-run summary); undecodable samples are skipped with
//! a few warnings, then only counted.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::Ordering;

use common::config::ViewsConfig;
use loader::{LoaderOptions, Stats, start};
use shard::format::ShardWriter;
use shard::index::{INDEX_FILE, Index};
use shard::synth::{SynthOptions, synth};
use shard::{open_shard, read_samples};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A synthetic set of `count` 64-px images, 20 per shard.
fn make_set(dir: &Path, count: usize) {
    let opts = SynthOptions {
        count,
        size: 64,
        seed: 3,
        per_shard: 20,
        quality: 90,
        quiet: true,
        ..Default::default()
    };
    synth(dir, &opts).unwrap();
}

fn small_views() -> ViewsConfig {
    ViewsConfig { global_size: 32, local_size: 16, num_local: 2, ..ViewsConfig::paper_main() }
}

/// Runs the loader over `epochs` whole epochs; the batches' keys and the final counters.
fn run_epochs(dir: &Path, epochs: u64) -> (Vec<String>, std::sync::Arc<Stats>) {
    runtime().block_on(async {
        let mut o = LoaderOptions::new(dir, small_views(), 8);
        o.workers = 2;
        o.shuffle_buffer = 16;
        o.end_epoch = Some(epochs);
        let l = start(o).unwrap();
        let mut keys = vec![];
        while let Ok(b) = l.batches.recv().await {
            keys.extend(b.keys);
        }
        let stats = l.stats.clone();
        l.shutdown().await;
        (keys, stats)
    })
}

fn loader_cmd(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_loader")).args(args).output().expect("run loader")
}

/// `loader soak` of `epochs` epochs over `dir`, batch 8 on 2 workers.
fn soak(dir: &Path, epochs: u32) -> Output {
    let epochs = epochs.to_string();
    let dir = dir.to_str().unwrap();
    loader_cmd(&["soak", "--shards", dir, "--epochs", &epochs, "--batch-size", "8", "--workers", "2"])
}

/// Cuts shard 1 of a 3-shard set in half; the samples it loses (20 less those before the cut).
fn truncate_shard_1(dir: &Path) -> u64 {
    let shard = dir.join("train-000001.tar");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    match read_samples(open_shard(&shard).unwrap(), |_| true) {
        Err(shard::Error::Shard { samples, .. }) => 20 - samples,
        other => panic!("the cut shard must read as damaged: {other:?}"),
    }
}

#[test]
fn a_shard_missing_on_disk_stops_start_up_naming_the_files_and_the_set() {
    let tmp = tempfile::tempdir().unwrap();
    make_set(tmp.path(), 80);
    for n in 1..4 {
        std::fs::remove_file(tmp.path().join(format!("train-00000{n}.tar"))).unwrap();
    }
    let err = runtime().block_on(async {
        start(LoaderOptions::new(tmp.path(), small_views(), 8)).err().expect("start must refuse").to_string()
    });
    assert_eq!(
        err,
        format!(
            "{}: 3 of the 4 shards its index.json lists are missing: train-000001.tar, train-000002.tar, \
             train-000003.tar",
            tmp.path().display()
        )
    );
}

#[test]
fn soak_preview_and_bench_refuse_a_set_with_missing_shards() {
    let tmp = tempfile::tempdir().unwrap();
    make_set(tmp.path(), 80);
    std::fs::remove_file(tmp.path().join("train-000002.tar")).unwrap();
    let dir = tmp.path().to_str().unwrap();
    let png = tmp.path().join("p.png");
    let commands: [Vec<&str>; 3] = [
        vec!["soak", "--shards", dir, "--epochs", "2", "--batch-size", "8", "--workers", "2"],
        vec!["preview", "--shards", dir, "--out", png.to_str().unwrap()],
        vec!["bench", "--shards", dir, "--seconds", "0.5", "--rounds", "1", "--batch-size", "8"],
    ];
    for args in commands {
        let out = loader_cmd(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: must refuse\n{stderr}", args[0]);
        let want =
            format!("error: {dir}: 1 of the 4 shards its index.json lists is missing: train-000002.tar");
        assert!(stderr.contains(&want), "{}: {stderr}", args[0]);
    }
    assert!(!png.exists());
}

#[test]
fn a_truncated_shard_is_counted_once_and_summarised() {
    let tmp = tempfile::tempdir().unwrap();
    make_set(tmp.path(), 60);
    let lost = truncate_shard_1(tmp.path());
    let (keys, stats) = run_epochs(tmp.path(), 3);
    // 60 - lost samples an epoch, in whole batches of 8.
    assert_eq!(keys.len() as u64, 3 * ((60 - lost) / 8 * 8), "lost {lost}");
    assert_eq!(stats.truncated_shards.load(Ordering::Relaxed), 1, "one damaged shard, read in 3 epochs");
    assert_eq!(stats.skipped.load(Ordering::Relaxed), 0, "lost samples are not skipped samples");
    let s = if lost == 1 { "" } else { "s" };
    let line = loader::report::stats_line(&stats, std::time::Duration::from_secs(1), 0, 4);
    assert!(line.ends_with(&format!(", damaged shards 1 ({lost} sample{s} lost)")), "{line}");
    assert_eq!(stats.problems().unwrap(), format!("1 damaged shard ({lost} sample{s} lost)"));

    // An intact set has no problems to report.
    let clean = tempfile::tempdir().unwrap();
    make_set(clean.path(), 40);
    let (keys, stats) = run_epochs(clean.path(), 1);
    assert_eq!(keys.len(), 40);
    assert_eq!(stats.problems(), None);
    assert!(!loader::report::stats_line(&stats, std::time::Duration::from_secs(1), 0, 4).contains("damaged"));
}

#[test]
fn soak_warns_once_about_a_truncated_shard_and_ends_with_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    make_set(tmp.path(), 60);
    let lost = truncate_shard_1(tmp.path());
    let out = soak(tmp.path(), 3);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a damaged shard does not stop the run: {stderr}");
    let about: Vec<&str> = stderr.lines().filter(|l| l.contains("train-000001.tar")).collect();
    assert_eq!(about.len(), 1, "one warning per damaged shard per run, not per epoch:\n{stderr}");
    assert!(about[0].contains("damaged after"), "{}", about[0]);
    assert!(about[0].contains(&format!("{lost} of its 20 samples are lost")), "{}", about[0]);
    assert!(!stderr.contains("skipped sample"), "lost samples are not skipped samples:\n{stderr}");
    assert!(stderr.lines().count() <= 3, "a quiet run:\n{stderr}");
    assert!(stderr.contains(&format!("data problems: 1 damaged shard ({lost} samples lost)")), "{stderr}");
}

/// Rewrites a synthetic set with every third sample's image replaced by junk (the tar stays intact).
fn corrupt_every_third_image(src: &Path, dst: &Path) -> u64 {
    corrupt_images(src, dst, |n| n % 3 == 0)
}

/// A copy of the set at `src` in `dst` whose `n`-th image (in shard order) is junk where `bad(n)`.
fn corrupt_images(src: &Path, dst: &Path, bad_at: impl Fn(u64) -> bool) -> u64 {
    let index = Index::load(src).unwrap();
    std::fs::create_dir_all(dst).unwrap();
    let (mut shards, mut n, mut bad) = (vec![], 0u64, 0u64);
    for s in &index.shards {
        let mut w = ShardWriter::create(dst, &s.name, None).unwrap();
        read_samples(open_shard(&src.join(&s.name)).unwrap(), |sample| {
            let junk = bad_at(n);
            bad += junk as u64;
            n += 1;
            let members: Vec<(&str, &[u8])> = sample
                .members
                .iter()
                .map(|(e, d)| (e.as_str(), if junk && e == "jpg" { &b"junk"[..] } else { d.as_slice() }))
                .collect();
            w.append(&sample.key, &members).unwrap();
            true
        })
        .unwrap();
        shards.push(w.finish().unwrap());
    }
    let out = Index::new(shards, index.classes, index.members, index.options, vec![]);
    std::fs::write(dst.join(INDEX_FILE), out.to_json()).unwrap();
    bad
}

#[test]
fn skipped_sample_warnings_stop_after_a_few_and_the_rest_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst): (PathBuf, PathBuf) = (tmp.path().join("src"), tmp.path().join("bad"));
    make_set(&src, 40);
    let bad = corrupt_every_third_image(&src, &dst);
    assert_eq!(bad, 14);
    let (_, stats) = run_epochs(&dst, 2);
    assert_eq!(stats.skipped.load(Ordering::Relaxed), 2 * bad, "every skip is counted");

    let out = soak(&dst, 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning: skipped sample")).collect();
    assert_eq!(warnings.len(), 5, "the first 5 in full:\n{stderr}");
    assert!(
        warnings[0].contains(" of shard train-00000") && warnings[0].contains("synth_"),
        "{}",
        warnings[0]
    );
    let rest: Vec<&str> = stderr.lines().filter(|l| l.contains("further skipped samples")).collect();
    assert_eq!(rest, ["warning: further skipped samples are not shown; they are counted in the stats line"]);
    assert!(stderr.contains("data problems: ") && stderr.contains("samples skipped"), "{stderr}");
}

#[test]
fn an_intact_shard_with_fewer_samples_than_its_index_lists_is_reported_too() {
    let tmp = tempfile::tempdir().unwrap();
    make_set(tmp.path(), 60);
    // Shard 1 rewritten as a whole tar of its first 15 samples (replaced, or packed by another tool).
    let name = "train-000001.tar";
    let mut samples = vec![];
    read_samples(open_shard(&tmp.path().join(name)).unwrap(), |s| {
        samples.push(s);
        samples.len() < 15
    })
    .unwrap();
    let mut w = ShardWriter::create(tmp.path(), name, None).unwrap();
    for s in &samples {
        let members: Vec<(&str, &[u8])> = s.members.iter().map(|(e, d)| (e.as_str(), d.as_slice())).collect();
        w.append(&s.key, &members).unwrap();
    }
    w.finish().unwrap();
    let (keys, stats) = run_epochs(tmp.path(), 2);
    assert_eq!(keys.len(), 2 * (55 / 8 * 8));
    assert_eq!(stats.problems().unwrap(), "1 damaged shard (5 samples lost)");
}

#[test]
fn a_shard_that_is_a_device_or_named_outside_the_set_stops_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    make_set(tmp.path(), 40);
    let index_path = tmp.path().join(INDEX_FILE);
    let good: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let first = good["shards"][0]["name"].as_str().unwrap().to_string();
    let refusal = || {
        start(LoaderOptions::new(tmp.path(), small_views(), 8)).err().expect("start must refuse").to_string()
    };
    // An index whose shard name leaves the folder (or is absolute) is refused as an index.
    for name in ["../elsewhere.tar", "/dev/zero"] {
        let mut bad = good.clone();
        bad["shards"][0]["name"] = name.into();
        std::fs::write(&index_path, serde_json::to_vec(&bad).unwrap()).unwrap();
        let err = refusal();
        assert!(err.contains("is not a file name in the set's folder"), "{name}: {err}");
    }
    // A listed shard that is a link to a device is refused at start, not read forever.
    std::fs::write(&index_path, serde_json::to_vec(&good).unwrap()).unwrap();
    std::fs::remove_file(tmp.path().join(&first)).unwrap();
    std::os::unix::fs::symlink("/dev/zero", tmp.path().join(&first)).unwrap();
    let err = refusal();
    assert!(err.contains("cannot be used") && err.contains("not a regular file"), "{err}");
}

#[test]
fn pipeline_sizes_out_of_range_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    make_set(tmp.path(), 40);
    for (shuffle, interleave, option) in [
        (0, 4, "shuffle_buffer"),
        (usize::MAX, 4, "shuffle_buffer"),
        (2_000_000_000, 4, "shuffle_buffer"),
        (16, 0, "interleave"),
        (16, 1 << 20, "interleave"),
    ] {
        let mut o = LoaderOptions::new(tmp.path(), small_views(), 8);
        o.shuffle_buffer = shuffle;
        o.interleave = interleave;
        let err = runtime().block_on(async { start(o).err().expect("start must refuse").to_string() });
        assert!(err.contains(option) && err.contains("is not within 1..="), "{shuffle} {interleave}: {err}");
    }
    let set = tmp.path().to_str().unwrap();
    for (args, option) in [
        (&["--workers", "0"][..], "--workers"),
        (&["--seconds", "0"], "--seconds"),
        (&["--seconds", "nan"], "--seconds"),
        (&["--shuffle-buffer", "18446744073709551615"], "--shuffle-buffer"),
        (&["--rounds", "0"], "--rounds"),
    ] {
        let out = loader_cmd(&[&["bench", "--shards", set][..], args].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(option), "{args:?}: {err}");
    }
}

#[test]
fn an_index_under_stating_a_shard_is_said_and_the_plan_kept() {
    // Totals that agree, one shard's count under-stated (8 of its 20) and the next over-stated: the
    // under-stated shard gives only its 8 (it would otherwise crowd the others out of the epoch), said
    // once; the over-stated one is short, said as before.
    let tmp = tempfile::tempdir().unwrap();
    make_set(tmp.path(), 60);
    let path = tmp.path().join(INDEX_FILE);
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    index["shards"][0]["samples"] = 8.into();
    index["shards"][1]["samples"] = 32.into();
    std::fs::write(&path, serde_json::to_string(&index).unwrap()).unwrap();
    let (keys, stats) = run_epochs(tmp.path(), 1);
    let shard0: Vec<String> = {
        let mut v = vec![];
        read_samples(open_shard(&tmp.path().join("train-000000.tar")).unwrap(), |s| {
            v.push(s.key);
            true
        })
        .unwrap();
        v
    };
    let read0 = keys.iter().filter(|k| shard0.contains(k)).count();
    assert_eq!(read0, 8, "shard 0 gives the 8 its entry lists");
    assert_eq!(stats.problems().unwrap(), "2 damaged shards (12 samples lost)");
    // A shard longer than its entry is not the index's shard: refused at start-up, named.
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    index["shards"][0]["samples"] = 20.into();
    index["shards"][1]["samples"] = 20.into();
    let bytes = index["shards"][2]["bytes"].as_u64().unwrap();
    index["shards"][2]["bytes"] = (bytes - 512).into();
    index["total_bytes"] = (index["total_bytes"].as_u64().unwrap() - 512).into();
    std::fs::write(&path, serde_json::to_string(&index).unwrap()).unwrap();
    let err = runtime().block_on(async { start(LoaderOptions::new(tmp.path(), small_views(), 8)).err() });
    let err = err.expect("refused").to_string();
    assert!(err.contains("train-000002.tar") && err.contains(&format!("{bytes} bytes where")), "{err}");
}

#[test]
fn a_padded_epoch_keeps_its_batch_count_and_replays_from_a_cursor() {
    // A data-parallel rank's epoch of 64 positions with one undecodable image: padded, it still gives 8
    // batches of 8, the last completed by a copy of its own first sample; from a cursor inside the epoch
    // the same batches come again.
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("bad"));
    make_set(&src, 64);
    assert_eq!(corrupt_images(&src, &dst, |n| n == 10), 1);
    let batches = |from: common::Cursor| {
        runtime().block_on(async {
            let mut o = LoaderOptions::new(&dst, small_views(), 8);
            (o.workers, o.shuffle_buffer, o.end_epoch, o.epoch_samples, o.pad_epochs) =
                (2, 16, Some(1), Some(64), true);
            o.start = from;
            let l = start(o).unwrap();
            let mut out = vec![];
            while let Ok(b) = l.batches.recv().await {
                out.push(b);
            }
            let stats = l.stats.clone();
            l.shutdown().await;
            (out, stats)
        })
    };
    let (all, stats) = batches(common::Cursor::default());
    assert_eq!(all.len(), 8, "the epoch keeps its 8 batches");
    let last = &all[7];
    assert_eq!(last.keys.len(), 8);
    assert_eq!(last.keys[7], last.keys[0], "the copy is of the batch's first sample");
    assert_eq!(last.cursor, common::Cursor { epoch: 1, samples: 0 });
    let px = last.views[0].data.len() / 8;
    assert_eq!(last.views[0].data[7 * px..], last.views[0].data[..px], "its pixels too");
    assert_eq!(stats.repeated.load(Ordering::Relaxed), 1);
    assert_eq!(
        stats.problems().unwrap(),
        "1 sample skipped, 1 sample repeated to complete an epoch's last batch"
    );
    // Without padding the short tail is dropped, as one process does.
    let (kept, _) = run_epochs(&dst, 1);
    assert_eq!(kept.len(), 56);
    // From the cursor after batch 5: batches 6 and 7 again, bit for bit.
    let (again, _) = batches(all[5].cursor);
    assert_eq!(again.len(), 2);
    for (a, b) in again.iter().zip(&all[6..]) {
        assert_eq!(
            (&a.keys, &a.views, &a.teacher_points, &a.cursor),
            (&b.keys, &b.views, &b.teacher_points, &b.cursor)
        );
    }
}

#[test]
fn a_shard_that_cannot_be_read_stops_start_up_as_a_missing_one_does() {
    // Permissions bind only a user other than root: as root the loader runs as `nobody` (setpriv).
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    make_set(tmp.path(), 60);
    let shard = tmp.path().join("train-000001.tar");
    std::fs::set_permissions(&shard, std::fs::Permissions::from_mode(0o000)).unwrap();
    let (dir, bin) = (tmp.path().to_str().unwrap(), env!("CARGO_BIN_EXE_loader"));
    let args = ["soak", "--shards", dir, "--epochs", "1", "--batch-size", "8", "--workers", "1"];
    // SAFETY: geteuid has no preconditions.
    let out = if unsafe { libc::geteuid() } == 0 {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", bin])
            .args(args)
            .output()
            .expect("setpriv (util-linux)")
    } else {
        loader_cmd(&args)
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("1 of the 3 shards its index.json lists cannot be used")
            && err.contains("train-000001.tar")
            && err.contains("ermission denied"),
        "{err}"
    );
}
