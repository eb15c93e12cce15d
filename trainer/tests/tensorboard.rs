//! TensorBoard's view of a killed and resumed run: the `trainer` binary is killed (SIGKILL) twice, once
//! early (usually before its first checkpoint: the run starts over) and once with steps logged past its
//! checkpoint (the resume runs them again), then resumed to the end. TensorBoard's own
//! `EventAccumulator` (`fixtures/read_events.py`) must then find every number of `metrics.jsonl` at its
//! step, each step once, though the event files hold the repeated steps.
//!
//! Needs the `tensorboard` package, so it is ignored by default; `.ci/run` runs it with the venv of
//! `scripts/torch-venv.sh`:
//!
//!     DENSEDINO_PYTHON=$(scripts/torch-venv.sh) cargo test --workspace --release --test tensorboard -- --ignored

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod util;

/// Starts the run (or resumes it once it has a config) and SIGKILLs it once `kill_at` steps are logged;
/// `None` runs it to the end.
fn run_until(dir: &Path, kill_at: Option<usize>) {
    let run = dir.join("runs/tb");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trainer"));
    cmd.args(["train", "--quiet"]);
    if run.join("config.toml").is_file() {
        cmd.args(["--resume", run.to_str().unwrap()]);
    } else {
        let mut sets = util::tiny_sets(dir, "tb");
        sets.push("run.checkpoint_every=3".into());
        for s in &sets {
            cmd.args(["--set", s]);
        }
    }
    let mut child = cmd.stdout(Stdio::null()).spawn().expect("the trainer binary starts");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(kill_at.is_none() && status.success(), "the trainer ended on its own: {status}");
            return;
        }
        if kill_at.is_some_and(|n| util::steps_logged(&run) >= n) {
            child.kill().unwrap();
            child.wait().unwrap();
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(600), "the trainer ran for ten minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
#[ignore = "needs tensorboard: DENSEDINO_PYTHON=$(scripts/torch-venv.sh) ... -- --ignored (run by .ci/run)"]
fn tensorboard_shows_every_metric_of_a_killed_and_resumed_run_once() {
    let python = std::env::var("DENSEDINO_PYTHON")
        .expect("DENSEDINO_PYTHON: a python with tensorboard (scripts/torch-venv.sh)");
    let dir = tempfile::tempdir().unwrap();
    // 20 steps (4 epochs of 5), checkpoints after 3, 5 (the epoch's end), 6, 9, 10, ...
    run_until(dir.path(), Some(2));
    // Killed with 7 steps logged, two steps before the checkpoint after 9: the resume repeats step 6 on.
    run_until(dir.path(), Some(7));
    run_until(dir.path(), None);

    let run = dir.path().join("runs/tb");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/read_events.py");
    let out = Command::new(&python).arg(script).arg(&run).output().expect("python runs");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "TensorBoard disagrees with metrics.jsonl:\n{report}");
    // The purge had work to do: the files hold more train/loss events than the run has steps.
    let counts = report.lines().find(|l| l.contains("events in the files")).expect("the summary line");
    let number_before = |word: &str| -> usize {
        let words: Vec<&str> = counts.split_whitespace().collect();
        let i = words.iter().position(|w| *w == word).unwrap();
        words[i - 1].trim_end_matches(',').parse().unwrap()
    };
    let (raw, kept) = (number_before("events"), number_before("after"));
    assert_eq!(kept, 20, "{counts}");
    assert!(raw > kept, "no step was repeated, so nothing was purged: {counts}");
    assert!(counts.starts_with("4 event files"), "three training processes and the k-NN's: {counts}");

    // A run from before event files: `trainer plot` writes one from its metrics.jsonl.
    let old = dir.path().join("old");
    std::fs::create_dir(&old).unwrap();
    std::fs::copy(run.join("metrics.jsonl"), old.join("metrics.jsonl")).unwrap();
    let plot = Command::new(env!("CARGO_BIN_EXE_trainer")).arg("plot").arg(&old).output().unwrap();
    assert!(plot.status.success(), "{}", String::from_utf8_lossy(&plot.stderr));
    let out = Command::new(&python).arg(script).arg(&old).output().expect("python runs");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    assert!(out.status.success() && report.starts_with("1 event files"), "from metrics.jsonl:\n{report}");
}
