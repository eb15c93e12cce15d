//! shard → loader: exact replay across worker counts and channel depths, resume from a cursor, and bad
//! input that is skipped the same way every time.

use std::path::Path;

use common::config::ViewsConfig;
use common::{Batch, Cursor};
use e2e::batch_digest;
use loader::{LoaderOptions, start};
use shard::synth::{SynthOptions, synth};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn make_set(dir: &Path, count: usize) {
    make_set_with(dir, count, None)
}

fn make_set_with(dir: &Path, count: usize, zstd_level: Option<i32>) {
    let opts = SynthOptions {
        count,
        size: 64,
        seed: 3,
        per_shard: 20,
        zstd_level,
        quality: 90,
        force: true,
        quiet: true,
        ..Default::default()
    };
    synth(dir, &opts).unwrap();
}

fn small_views() -> ViewsConfig {
    ViewsConfig { global_size: 32, local_size: 16, num_local: 2, ..ViewsConfig::paper_main() }
}

fn run(dir: &Path, workers: usize, capacity: usize, start_at: Cursor, n: usize) -> Vec<Batch> {
    let rt = runtime();
    rt.block_on(async {
        let mut o = LoaderOptions::new(dir, small_views(), 8);
        o.workers = workers;
        o.capacity = capacity;
        o.seed = 11;
        o.shuffle_buffer = 16;
        o.interleave = 2;
        o.start = start_at;
        let l = start(o).unwrap();
        let mut out = vec![];
        for _ in 0..n {
            out.push(l.batches.recv().await.unwrap());
        }
        out
    })
}

#[test]
fn batches_are_identical_across_workers_channels_and_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    make_set(tmp.path(), 100);
    // 100 samples, batch 8: 12 batches per epoch; 20 batches cross an epoch boundary.
    let one: Vec<String> = run(tmp.path(), 1, 1, Cursor::default(), 20).iter().map(batch_digest).collect();
    let two: Vec<String> = run(tmp.path(), 2, 3, Cursor::default(), 20).iter().map(batch_digest).collect();
    let four = run(tmp.path(), 4, 8, Cursor::default(), 20);
    assert_eq!(one, two);
    assert_eq!(one, four.iter().map(batch_digest).collect::<Vec<_>>());
    assert_eq!(four[11].cursor, Cursor { epoch: 1, samples: 0 }, "epoch 0 ends after 12 batches");
    assert_eq!(four[12].epoch, 1);
    assert_ne!(batch_digest(&four[0]), batch_digest(&four[12]), "epoch 1 is reshuffled");
    // Resume after batch 5 (mid-epoch) and after batch 11 (epoch end).
    for k in [5usize, 11] {
        let resumed: Vec<String> =
            run(tmp.path(), 2, 2, four[k].cursor, 20 - k - 1).iter().map(batch_digest).collect();
        assert_eq!(resumed, one[k + 1..].to_vec(), "resume after batch {k}");
    }
    // Shapes of the contract.
    let b = &four[0];
    let cfg = small_views();
    assert_eq!(b.views.len(), 4);
    assert_eq!(b.views[0].data.len(), 8 * 3 * 32 * 32);
    assert_eq!(b.views[3].data.len(), 8 * 3 * 16 * 16);
    assert_eq!(b.teacher_points.len(), 2);
    assert_eq!(b.teacher_points[0].len(), 8 * 4 * cfg.num_points * 2);
    assert_eq!(b.student_points[3].len(), 8 * 2 * cfg.num_points * 2);
    assert!(b.labels.iter().all(|&l| (0..4).contains(&l)));
}

#[test]
fn a_corrupt_image_is_skipped_the_same_way_and_a_missing_set_is_one_error() {
    let tmp = tempfile::tempdir().unwrap();
    make_set(tmp.path(), 40);
    // Corrupt the first image of the first shard in place (its bytes become junk, sizes unchanged).
    let shard = tmp.path().join("train-000000.tar");
    let mut bytes = std::fs::read(&shard).unwrap();
    for b in &mut bytes[512..600] {
        *b = 0x11;
    }
    std::fs::write(&shard, bytes).unwrap();
    let a: Vec<String> = run(tmp.path(), 1, 1, Cursor::default(), 6).iter().map(batch_digest).collect();
    let b: Vec<String> = run(tmp.path(), 4, 4, Cursor::default(), 6).iter().map(batch_digest).collect();
    assert_eq!(a, b);
    let keys: Vec<String> =
        run(tmp.path(), 2, 2, Cursor::default(), 4).iter().flat_map(|b| b.keys.clone()).collect();
    assert!(!keys.contains(&"synth_0000000".to_string()), "the corrupt sample must be skipped");

    let empty = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = rt.block_on(async {
        start(LoaderOptions::new(empty.path(), small_views(), 8)).err().unwrap().to_string()
    });
    assert!(err.contains(&empty.path().display().to_string()), "{err}");
    let err = rt.block_on(async {
        start(LoaderOptions::new("/no/such/dir", small_views(), 8)).err().unwrap().to_string()
    });
    assert!(err.contains("/no/such/dir"), "{err}");
}

#[test]
fn a_truncated_shard_ends_with_a_warning_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    make_set(tmp.path(), 60);
    let shard = tmp.path().join("train-000001.tar");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    // 60 samples in 3 shards of 20, batch 8: 7 batches an epoch when intact. With half of shard 1
    // gone, epoch 0 keeps the 40 samples of the intact shards plus the complete part of shard 1
    // (5 or 6 batches), and the run goes on into epoch 1.
    let batches = run(tmp.path(), 2, 2, Cursor::default(), 10);
    let epoch0: Vec<&Batch> = batches.iter().filter(|b| b.epoch == 0).collect();
    assert!((5..7).contains(&epoch0.len()), "{} batches in epoch 0", epoch0.len());
    assert!(batches.iter().any(|b| b.epoch == 1));
    let keys: Vec<&String> = epoch0.iter().flat_map(|b| &b.keys).collect();
    let unique: std::collections::HashSet<&&String> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "no sample twice in an epoch");
}

#[test]
fn zstd_shards_give_the_same_batches_and_an_index_path_works_too() {
    let (plain, zst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    make_set(plain.path(), 48);
    make_set_with(zst.path(), 48, Some(3));
    assert!(zst.path().join("train-000000.tar.zst").is_file());
    let a: Vec<String> = run(plain.path(), 2, 2, Cursor::default(), 5).iter().map(batch_digest).collect();
    let b: Vec<String> =
        run(&zst.path().join("index.json"), 2, 2, Cursor::default(), 5).iter().map(batch_digest).collect();
    assert_eq!(a, b);
}

#[test]
fn dropping_the_receiver_shuts_every_stage_down() {
    let tmp = tempfile::tempdir().unwrap();
    make_set(tmp.path(), 100);
    let rt = runtime();
    rt.block_on(async {
        let mut o = LoaderOptions::new(tmp.path(), small_views(), 8);
        o.workers = 2;
        o.capacity = 1;
        let l = start(o).unwrap();
        l.batches.recv().await.unwrap();
        // The pipeline is now stalled on a full channel (back-pressure) with work in flight.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(l.batches.len(), 1, "the bounded channel holds exactly its capacity");
        let stats = l.stats.clone();
        tokio::time::timeout(std::time::Duration::from_secs(20), l.shutdown())
            .await
            .expect("every stage returns after the receiver is dropped");
        let n = stats.batches.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(
            stats.batches.load(std::sync::atomic::Ordering::Relaxed),
            n,
            "nothing runs after shutdown"
        );
    });
}
