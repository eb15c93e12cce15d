//! Fault injection: the `trainer` binary killed with a real SIGKILL again and again, each time followed by
//! `train --resume RUN` (which starts the run over when it was killed before its first checkpoint). At the
//! end the run's history and weights must be those of an uninterrupted run, bit for bit, with no
//! `.partial` file left.
//!
//! Four kinds of kill, in turn, each at a moment the test does not control:
//! - as soon as the process has rewritten the run's `config.toml` (start-up, before its first step);
//! - at a random time, drawn from a seeded RNG over the length of an uninterrupted run (measured first,
//!   on this machine, so the test adapts to its speed and load);
//! - as soon as a `.partial` checkpoint shows up (inside a checkpoint write);
//! - as soon as a new epoch record shows up in `metrics.jsonl` (at an epoch end, before or while its
//!   checkpoint is written).
//!
//! A kill that lands after the run finished interrupts nothing; such runs are checked against the
//! reference and started again, and the test keeps going until `KILLS` kills really interrupted a run and
//! the kills covered the run (see [`covered`]). Where the kills land depends on this machine's speed, so
//! coverage is waited for, not expected from a fixed number of kills.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
mod util;

use trainer::run::checkpoint;

/// Kills that must interrupt a run.
const KILLS: usize = 48;

/// [`util::tiny_sets`] for 6 epochs (30 steps), a checkpoint every 2 steps and at every epoch end, the last
/// 2 kept (so pruning is interrupted too).
fn sets(dir: &Path) -> Vec<String> {
    let mut sets = util::tiny_sets(dir, "k");
    sets.extend(["run.epochs=6".into(), "run.keep_checkpoints=2".into()]);
    sets
}

const STEPS: usize = 30;

/// `train` of the tiny config in `dir`, or `train --resume` of its run once the run has a config.
fn spawn(dir: &Path, log: &Path) -> Child {
    spawn_with(dir, log, &[])
}

/// [`spawn`] with `extra` settings for a fresh run.
fn spawn_with(dir: &Path, log: &Path, extra: &[&str]) -> Child {
    let run = dir.join("runs/k");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trainer"));
    cmd.args(["train", "--quiet"]);
    if run.join("config.toml").is_file() {
        cmd.args(["--resume", run.to_str().unwrap()]);
    } else {
        for s in sets(dir).iter().map(String::as_str).chain(extra.iter().copied()) {
            cmd.args(["--set", s]);
        }
    }
    let err = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    cmd.stdout(Stdio::null()).stderr(err).spawn().expect("start the trainer")
}

/// `metrics.jsonl` without its timings (wall-clock seconds differ from run to run; nothing else may).
fn history(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let o = v.as_object_mut().unwrap();
            for timing in ["step_time", "data_wait", "images_per_s", "data_wait_fraction"] {
                o.remove(timing);
            }
            v
        })
        .collect()
}

/// Every kept checkpoint: step → (cursor and step metadata, tensors by name with their f32 bits).
type Weights = BTreeMap<usize, (String, BTreeMap<String, (Vec<usize>, Vec<u32>)>)>;

fn weights(run: &Path) -> Weights {
    checkpoint::list(&run.join("checkpoints"))
        .into_iter()
        .map(|(it, file)| {
            let bytes = std::fs::read(&file).unwrap();
            let meta = checkpoint::meta(&bytes).unwrap();
            let tensors = checkpoint::tensors(&bytes)
                .unwrap()
                .into_iter()
                .map(|(name, (dims, values))| (name, (dims, values.iter().map(|x| x.to_bits()).collect())))
                .collect();
            (it, (format!("it {} cursor {:?}", meta.it, meta.cursor), tensors))
        })
        .collect()
}

/// Files under `dir` whose name ends in `.partial`.
fn partials(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(partials(&p));
        } else if p.to_string_lossy().ends_with(".partial") {
            out.push(p);
        }
    }
    out
}

fn epoch_records(run: &Path) -> usize {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines().filter(|l| l.contains("\"kind\":\"epoch\"")).count()
}

/// The `steps` of the last line of `metrics.jsonl` if that is a (whole) epoch record.
fn last_epoch_end(run: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).ok()?;
    let last: serde_json::Value = serde_json::from_str(text.lines().last()?).ok()?;
    (last["kind"] == "epoch").then(|| last["steps"].as_u64()).flatten()
}

/// Whether the kills so far (trigger, step resumed from, steps logged when it landed) cover the run: every
/// kind of kill several times, some well into a process's steps, some in the run's last two epochs.
fn covered(kills: &[(Trigger, usize, usize)]) -> bool {
    let count = |f: fn(&Trigger) -> bool| kills.iter().filter(|(t, ..)| f(t)).count();
    let kinds = [
        count(|t| *t == Trigger::StartUp),
        count(|t| matches!(t, Trigger::Time(_))),
        count(|t| *t == Trigger::CheckpointWrite),
        count(|t| *t == Trigger::EpochEnd),
    ];
    kinds.iter().all(|&n| n >= 5)
        && kills.iter().any(|&(_, from, logged)| logged > from + 2)
        && kills.iter().any(|&(.., logged)| logged > STEPS - 10)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Trigger {
    /// As soon as the process has (re)written the run's `config.toml`: in its start-up, after the lock,
    /// before the metrics are cut back and before its first step.
    StartUp,
    /// At a random time into the process.
    Time(Duration),
    /// When a `.partial` checkpoint appears (one left by an earlier kill is first swept by the run).
    CheckpointWrite,
    /// When this process logs an epoch end (an epoch record past the checkpoint it resumed from).
    EpochEnd,
}

/// Waits for `trigger` (polling the run folder), then SIGKILLs `child`; if the process ends first, its
/// own exit status.
fn kill_on(child: &mut Child, trigger: Trigger, run: &Path) -> ExitStatus {
    let t0 = Instant::now();
    let ckpts = run.join("checkpoints");
    let resumed_at = checkpoint::list(&ckpts).last().map_or(0, |c| c.0 as u64);
    let mut armed = partials(&ckpts).is_empty();
    let config_stamp = || std::fs::metadata(run.join("config.toml")).and_then(|m| m.modified()).ok();
    let config_before = config_stamp();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        let fire = match trigger {
            Trigger::StartUp => config_stamp().is_some_and(|t| Some(t) != config_before),
            Trigger::Time(at) => t0.elapsed() >= at,
            Trigger::CheckpointWrite => {
                let seen = !partials(&ckpts).is_empty();
                let fire = armed && seen;
                armed |= !seen;
                fire
            }
            Trigger::EpochEnd => last_epoch_end(run).is_some_and(|s| s > resumed_at),
        };
        if fire {
            // SIGKILL: no unwinding, no cleanup, exactly as a power cut or the OOM killer.
            child.kill().unwrap();
            return child.wait().unwrap();
        }
        if matches!(trigger, Trigger::Time(_)) {
            std::thread::sleep(Duration::from_micros(200));
        } else {
            std::thread::yield_now();
        }
    }
}

#[test]
fn random_sigkills_then_resume_give_the_history_and_weights_of_an_uninterrupted_run() {
    let started = Instant::now();
    // On disk, not a tmpfs: a checkpoint write (and its fsync) must take the time it takes in a real run.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let log = tmp.path().join("stderr.txt");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // The reference, and how long an uninterrupted run takes here (its synthetic set is made before).
    let reference = tmp.path().join("reference");
    let status = spawn(&reference, &log).wait().unwrap();
    assert!(status.success(), "the reference run failed: {}", log_text());
    let t = Instant::now();
    std::fs::remove_dir_all(reference.join("runs")).unwrap();
    let status = spawn(&reference, &log).wait().unwrap();
    let full_run = t.elapsed();
    assert!(status.success(), "the reference run failed: {}", log_text());
    let ref_run = reference.join("runs/k");
    let (want_history, want_weights) = (history(&ref_run), weights(&ref_run));
    let steps = want_history.iter().filter(|r| r["kind"] == "step").count();
    assert_eq!((steps, epoch_records(&ref_run)), (STEPS, 6));
    assert_eq!(want_weights.keys().copied().collect::<Vec<_>>(), vec![28, 30], "the last 2 checkpoints");

    // The interrupted runs share the reference's synthetic set (made once, by the trainer, so reused).
    let dir = tmp.path().join("cut");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy(&reference.join("synth"), &dir.join("synth"));
    let run = dir.join("runs/k");

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
    // Per interrupting kill: its trigger, the step the process started from and the steps logged when
    // the kill landed.
    let mut kills: Vec<(Trigger, usize, usize)> = vec![];
    let (mut attempts, mut completed) = (0usize, 0usize);
    loop {
        attempts += 1;
        let spans = || kills.iter().map(|(_, from, logged)| format!("{from}->{logged}")).collect::<Vec<_>>();
        assert!(attempts < 600, "too many attempts; kills so far {}: {:?}", kills.len(), spans());
        let done = kills.len() >= KILLS && covered(&kills);
        let trigger = match attempts % 4 {
            _ if done => Trigger::Time(Duration::MAX),
            0 => Trigger::CheckpointWrite,
            1 => Trigger::EpochEnd,
            2 => Trigger::StartUp,
            _ => Trigger::Time(full_run.mul_f64(rng.random::<f64>())),
        };
        let from = checkpoint::list(&run.join("checkpoints")).last().map_or(0, |c| c.0);
        let mut child = spawn(&dir, &log);
        let status = kill_on(&mut child, trigger, &run);
        if status.signal() == Some(9) {
            kills.push((trigger, from, util::steps_logged(&run)));
            continue;
        }
        assert!(
            status.success(),
            "attempt {attempts} ({trigger:?}): the run failed: {status:?}\n{}",
            log_text()
        );
        // The run finished (not killed, or the trigger never came): exactly the reference.
        assert!(partials(&run).is_empty(), "a .partial is left: {:?}", partials(&run));
        let (history, weights) = (history(&run), weights(&run));
        if let Some(i) =
            (0..history.len().max(want_history.len())).find(|&i| history.get(i) != want_history.get(i))
        {
            panic!(
                "attempt {attempts}: the history differs from the uninterrupted run's at line {i}:\n  {:?}\nvs\n  {:?}",
                history.get(i),
                want_history.get(i)
            );
        }
        if weights != want_weights {
            let steps = |w: &Weights| w.keys().copied().collect::<Vec<_>>();
            let differing: Vec<String> = weights
                .iter()
                .filter_map(|(it, (meta, tensors))| {
                    let (want_meta, want_tensors) = want_weights.get(it)?;
                    let names: Vec<&String> =
                        tensors.keys().filter(|n| tensors.get(*n) != want_tensors.get(*n)).collect();
                    (meta != want_meta || !names.is_empty())
                        .then(|| format!("step {it}: {meta} vs {want_meta}; tensors {names:?}"))
                })
                .collect();
            panic!(
                "attempt {attempts}: the checkpoints differ from the uninterrupted run's: steps {:?} vs {:?}; {differing:?}",
                steps(&weights),
                steps(&want_weights)
            );
        }
        completed += 1;
        if done {
            break;
        }
        // A new run: its kills begin again at its start.
        std::fs::remove_dir_all(dir.join("runs")).unwrap();
    }

    let count = |f: fn(&Trigger) -> bool| kills.iter().filter(|(t, ..)| f(t)).count();
    let (at_start, at_time, in_write, at_epoch) = (
        count(|t| *t == Trigger::StartUp),
        count(|t| matches!(t, Trigger::Time(_))),
        count(|t| *t == Trigger::CheckpointWrite),
        count(|t| *t == Trigger::EpochEnd),
    );
    let spans: Vec<String> = kills.iter().map(|(_, from, logged)| format!("{from}->{logged}")).collect();
    eprintln!(
        "{} kills interrupted a run ({at_start} in start-up, {at_time} at a random time, {in_write} inside a checkpoint \
         write, {at_epoch} at an epoch end) in {attempts} runs, {completed} runs completed; uninterrupted run {:.0} ms; each kill as the step \
         its process resumed from -> the steps logged when it landed: {}; test took {:.1} s",
        kills.len(),
        full_run.as_secs_f64() * 1e3,
        spans.join(" "),
        started.elapsed().as_secs_f64()
    );
}

/// SIGTERM at a moment the test does not control (a few steps into each process): the run finishes the
/// step it is in, writes that step's checkpoint, and exits with 143 (128 + SIGTERM) saying how to
/// continue; after several such stops the resumed run's history and weights are the uninterrupted run's,
/// bit for bit. Before, SIGTERM ended the run at once (rc 143, no message), losing every step since the
/// last periodic checkpoint.
#[test]
fn sigterm_checkpoints_the_step_in_progress_and_the_resume_is_exact() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let log = tmp.path().join("stderr.txt");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    // Checkpoints at epoch ends only (every 5 steps): a stop inside an epoch has none but its own.
    let extra = ["run.checkpoint_every=1000"];
    let reference = tmp.path().join("reference");
    let status = spawn_with(&reference, &log, &extra).wait().unwrap();
    assert!(status.success(), "the reference run failed: {}", log_text());
    let ref_run = reference.join("runs/k");
    let (want_history, want_weights) = (history(&ref_run), weights(&ref_run));

    let dir = tmp.path().join("cut");
    std::fs::create_dir_all(dir.join("synth")).unwrap();
    for e in std::fs::read_dir(reference.join("synth")).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join("synth").join(e.file_name())).unwrap();
    }
    let run = dir.join("runs/k");
    let mut stops = vec![];
    while util::steps_logged(&run) + 6 < STEPS {
        let before = util::steps_logged(&run);
        let mut child = spawn_with(&dir, &log, &extra);
        let t0 = Instant::now();
        while util::steps_logged(&run) < before + 3 {
            assert!(t0.elapsed() < Duration::from_secs(120), "no steps: {}", log_text());
            assert!(child.try_wait().unwrap().is_none(), "ended before the signal: {}", log_text());
            std::thread::sleep(Duration::from_millis(2));
        }
        // SAFETY: a signal to the process this test started.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(143), "{}", log_text());
        let logged = util::steps_logged(&run);
        let newest = checkpoint::list(&run.join("checkpoints")).last().map_or(0, |c| c.0);
        assert_eq!(newest, logged, "the checkpoint holds the last step logged: {}", log_text());
        assert!(log_text().contains(&format!("stopped by SIGTERM after step {logged}")), "{}", log_text());
        assert!(partials(&run.join("checkpoints")).is_empty());
        stops.push(logged);
    }
    assert!(spawn(&dir, &log).wait().unwrap().success(), "the resume failed: {}", log_text());
    assert_eq!(history(&run), want_history, "the history after the stops is the uninterrupted run's");
    // The last checkpoint (the one before it may be a stop's, which the reference does not have).
    let last = |w: Weights| w.into_iter().next_back().expect("a checkpoint");
    assert!(last(weights(&run)) == last(want_weights), "the final weights are the uninterrupted run's");
    eprintln!("SIGTERM stops after steps {stops:?} (checkpoints at epoch ends, every 5 steps)");
    assert!(stops.iter().any(|s| s % 5 != 0), "a stop inside an epoch: {stops:?}");
}

/// SIGTERM during start-up (here: while a large synthetic set is being made) ends the process at once,
/// 128 + 15, saying so: there is nothing to checkpoint, and waiting for the first step could take minutes.
#[test]
fn sigterm_during_start_up_ends_the_process_at_once() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let log = tmp.path().join("stderr.txt");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trainer"));
    cmd.arg("train");
    for s in sets(tmp.path()).iter().map(String::as_str).chain(["data.synth_count=50000"]) {
        cmd.args(["--set", s]);
    }
    let err = std::fs::File::create(&log).unwrap();
    let mut child = cmd.stdout(Stdio::null()).stderr(err).spawn().unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let t0 = Instant::now();
    while !log_text().contains("making a synthetic data set") {
        assert!(t0.elapsed() < Duration::from_secs(60), "no start-up: {}", log_text());
        assert!(child.try_wait().unwrap().is_none(), "ended early: {}", log_text());
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: a signal to the process this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let t1 = Instant::now();
    let status = child.wait().unwrap();
    assert!(t1.elapsed() < Duration::from_secs(3), "took {:?} to stop", t1.elapsed());
    assert_eq!(status.code(), Some(143), "{}", log_text());
    assert!(log_text().contains("during start-up, before the first step: nothing to save"), "{}", log_text());
    assert!(checkpoint::list(&tmp.path().join("runs/k/checkpoints")).is_empty());
}
