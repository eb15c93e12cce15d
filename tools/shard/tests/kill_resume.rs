//! Fault injection: `shard pack` killed with a real SIGKILL at random moments, again and again, each time
//! followed by `--resume`. Whatever moment a kill lands on (start-up, mid-shard, between a shard's rename
//! and its journal entry, while the index is written), the finished set must be byte for byte the one an
//! uninterrupted run writes, with no `*.partial` left behind.
//!
//! Kill moments are drawn from a seeded RNG over the whole length of an uninterrupted run (measured
//! first, on this machine, so the test adapts to its speed and load). A kill that lands after the run
//! finished interrupts nothing; those are counted apart, and the test keeps going until at least
//! `KILLS` kills really interrupted a run.

mod util;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use util::*;

/// Kills that must interrupt a run.
const KILLS: usize = 40;
/// Kill moments are spread over this many equal slices of an uninterrupted run's length (plus a slice
/// beyond its end), visited in a shuffled order so that every part of the run is hit.
const SLICES: usize = 12;

/// 3 classes × 30 images, some PNG (re-encoded to JPEG, which takes a little time), plus two files that
/// are no image (skipped and recorded, so the journal's skip list is resumed too).
fn fixture(root: &Path) -> std::path::PathBuf {
    let input = root.join("in");
    for c in 0..3u8 {
        let dir = input.join(format!("class{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..30u8 {
            let (w, h) = (64 + 2 * i as u32, 48 + i as u32);
            if i % 3 == 0 {
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    image::Rgb([(x * 3) as u8 ^ i, (y * 5) as u8, c.wrapping_mul(70) ^ (x + y) as u8])
                });
                img.save(dir.join(format!("img_{i:03}.png"))).unwrap();
            } else {
                std::fs::write(dir.join(format!("img_{i:03}.jpg")), jpeg_rgb(w as u16, h as u16, c * 60 + i))
                    .unwrap();
            }
        }
    }
    std::fs::write(input.join("class1/broken.jpg"), b"not an image").unwrap();
    std::fs::write(input.join("class2/empty.jpg"), b"").unwrap();
    input
}

fn pack_command(input: &Path, out: &Path, log: &Path) -> Command {
    let mut cmd = Command::new(shard_bin());
    cmd.args(["pack", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    cmd.args(["--per-shard", "3", "--seed", "9", "--workers", "2", "-q", "--resume"]);
    cmd.stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap());
    cmd
}

/// Finished shards the journal lists (how far the interrupted run got), or 0 without a journal.
fn journaled_shards(out: &Path) -> usize {
    let Ok(text) = std::fs::read_to_string(out.join(".pack-journal.json")) else {
        return 0;
    };
    let journal: serde_json::Value = serde_json::from_str(&text).expect("the journal is written atomically");
    journal["shards"].as_array().map_or(0, Vec::len)
}

/// The names of the files that are missing, extra or different in `have` (bytes are too long to print).
fn differences(have: &BTreeMap<String, Vec<u8>>, want: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let names: std::collections::BTreeSet<&String> = have.keys().chain(want.keys()).collect();
    names.into_iter().filter(|n| have.get(*n) != want.get(*n)).cloned().collect()
}

/// What a killed run leaves must be consistent: the index (if written) and every journaled shard are
/// already those of the uninterrupted run.
fn check_leftovers(out: &Path, want: &BTreeMap<String, Vec<u8>>, kill: usize) {
    let have = if out.exists() { files(out) } else { BTreeMap::new() };
    if let Some(index) = have.get("index.json") {
        assert!(index == &want["index.json"], "kill {kill}: index.json differs");
    }
    if let Ok(text) = std::fs::read_to_string(out.join(".pack-journal.json")) {
        let journal: serde_json::Value = serde_json::from_str(&text).unwrap();
        for s in journal["shards"].as_array().unwrap() {
            let name = s["name"].as_str().unwrap();
            assert!(
                have.get(name) == want.get(name),
                "kill {kill}: journaled shard {name} missing or differs"
            );
        }
    }
}

#[test]
fn random_sigkills_then_resume_give_the_bytes_of_an_uninterrupted_run() {
    let started = Instant::now();
    // On disk, not a tmpfs: the shard writes and their fsyncs take the time they take in a real run.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let input = fixture(tmp.path());
    let log = tmp.path().join("log.txt");
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();

    // The reference, and how long an uninterrupted run takes here (the fastest of two).
    let mut full_run = Duration::MAX;
    let full = tmp.path().join("full");
    for _ in 0..2 {
        let _ = std::fs::remove_dir_all(&full);
        let t = Instant::now();
        let status = pack_command(&input, &full, &log).status().unwrap();
        full_run = full_run.min(t.elapsed());
        assert!(status.success(), "uninterrupted pack failed: {}", stderr());
    }
    let want = files(&full);
    let shards = want.keys().filter(|k| k.ends_with(".tar")).count();
    assert_eq!(shards, 30, "90 images, 3 per shard: {:?}", want.keys());

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20);
    let mut slices: Vec<usize> = vec![];
    let out = tmp.path().join("cut");
    // Per interrupting kill: finished shards at the kill (from the journal), to show the kills spread.
    let mut progress_at_kill = vec![];
    let (mut attempts, mut completed_sets, mut late_kills) = (0usize, 0usize, 0usize);
    loop {
        attempts += 1;
        assert!(attempts < 400, "too many attempts; kills so far {}", progress_at_kill.len());
        let done = progress_at_kill.len() >= KILLS;
        let mut child = pack_command(&input, &out, &log).spawn().unwrap();
        let status = if done {
            // Enough kills: the last --resume runs to the end.
            child.wait().unwrap()
        } else {
            if slices.is_empty() {
                slices = (0..=SLICES).collect();
                slices.shuffle(&mut rng);
            }
            let slice = slices.pop().unwrap();
            let fraction = (slice as f64 + rng.random::<f64>()) / SLICES as f64;
            std::thread::sleep(full_run.mul_f64(fraction));
            // SIGKILL on Unix: no unwinding, no cleanup, exactly as a power cut or the OOM killer.
            child.kill().unwrap();
            child.wait().unwrap()
        };
        let complete = out.join("index.json").is_file() && !out.join(".pack-journal.json").exists();
        if !complete {
            assert_eq!(status.signal(), Some(9), "attempt {attempts}: pack --resume failed\n{}", stderr());
            let k = progress_at_kill.len();
            progress_at_kill.push(journaled_shards(&out));
            check_leftovers(&out, &want, k);
            continue;
        }
        // The run finished before the kill (or was not to be killed; or the kill landed while it was
        // exiting): it must have written exactly the reference set.
        assert!(
            status.success() || status.signal() == Some(9),
            "attempt {attempts}: pack --resume failed: {status:?}\n{}",
            stderr()
        );
        let have = files(&out);
        assert!(!have.keys().any(|k| k.ends_with(".partial")), "a .partial is left: {:?}", have.keys());
        let diff = differences(&have, &want);
        assert!(
            diff.is_empty(),
            "attempt {attempts}: the resumed set differs from the uninterrupted one: {diff:?}"
        );
        completed_sets += 1;
        if done {
            break;
        }
        late_kills += 1;
        // Start a new set: its kills begin again at the start of a run.
        std::fs::remove_dir_all(&out).unwrap();
    }
    let kills = progress_at_kill.len();
    eprintln!(
        "{kills} kills interrupted a run ({late_kills} landed after it had finished) in {attempts} runs, \
         {completed_sets} sets completed; uninterrupted run {:.0} ms; finished shards at each kill: \
         {progress_at_kill:?}; test took {:.1} s",
        full_run.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64()
    );
    assert!(kills >= KILLS);
    // The kills covered the run: some before any shard was finished, some past its middle.
    assert!(progress_at_kill.contains(&0), "{progress_at_kill:?}");
    assert!(progress_at_kill.iter().any(|&p| p >= shards / 2), "{progress_at_kill:?}");
}
