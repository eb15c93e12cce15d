//! Data-parallel runs end to end (the `mpi` feature): `trainer train --nproc-per-node 2` on the tiny
//! config (the launcher, the loader's rank split, rank 0's checkpoints and history), a run stopped and
//! `--resume`d under 2 ranks that ends as an uninterrupted one, a resume with another world size refused,
//! and a rank killed mid-run that ends the whole job with the rank's name, leaving a checkpoint to resume.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use trainer::run::checkpoint;

mod util;

/// The tiny run with 256 images in 2 shards (a rank reads whole shards): 128 per rank, 4 steps of 32 per
/// rank and epoch (global batch 64).
fn sets(dir: &Path, epochs: usize) -> Vec<String> {
    let mut sets = util::tiny_sets(dir, "dp");
    sets.extend([
        "data.synth_count=256".into(),
        "run.batch_size=32".into(),
        format!("run.epochs={epochs}"),
        "data.workers=1".into(),
        // The ranks compare their teachers every 2 steps (they must agree, or the run stops).
        "run.check_ranks_every=2".into(),
    ]);
    sets
}

fn trainer(args: &[&str], sets: &[String], log: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trainer"));
    cmd.args(args);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let err = std::fs::File::create(log).unwrap();
    cmd.stdout(err.try_clone().unwrap()).stderr(err);
    cmd
}

fn run_ok(args: &[&str], sets: &[String], log: &Path) {
    let status = trainer(args, sets, log).status().unwrap();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(status.success(), "trainer {args:?} failed ({status}):\n{text}");
}

fn last_checkpoint(run: &Path) -> (usize, PathBuf) {
    checkpoint::list(&run.join("checkpoints")).pop().expect("a checkpoint")
}

/// The run in `run` (resumed to its end) is the uninterrupted one in `reference`: the same history
/// (without timings) and the same final weights.
fn same_run(run: &Path, reference: &Path) {
    assert_eq!(
        util::history(run),
        util::history(reference),
        "the resumed run's history is the uninterrupted one's"
    );
    let tensors = |dir: &Path| checkpoint::tensors(&std::fs::read(last_checkpoint(dir).1).unwrap()).unwrap();
    assert!(tensors(run) == tensors(reference), "the resumed run's weights are the uninterrupted one's");
}

#[test]
fn two_ranks_stop_resume_and_end_as_an_uninterrupted_run() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));

    // Uninterrupted: 3 epochs of 4 steps, each step's record written once (by rank 0).
    run_ok(&["train", "--quiet", "--nproc-per-node", "2"], &sets(&a, 3), &tmp.path().join("a.log"));
    let want = util::history(&a.join("runs/dp"));
    let its: Vec<u64> =
        want.iter().filter(|r| r["kind"] == "step").map(|r| r["it"].as_u64().unwrap()).collect();
    assert_eq!(its, (0..12).collect::<Vec<_>>(), "one record per global step");
    let (it, file) = last_checkpoint(&a.join("runs/dp"));
    let meta = checkpoint::meta(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!((it, meta.world_size, meta.cursor.epoch), (12, 2, 3));
    // The lr follows the global batch: after its 4-step warmup it peaks at optim.lr x 64 / 256 (the demo's
    // optim.lr = 0.004; one rank's batch of 32 would give half).
    let lr4 = want.iter().find(|r| r["kind"] == "step" && r["it"] == 4).unwrap()["lr"].as_f64().unwrap();
    assert!((lr4 - 0.004 * 64.0 / 256.0).abs() < 1e-12, "lr at step 4: {lr4}");

    // Stopped at step 7 (inside epoch 1), then resumed.
    let mut stop = sets(&b, 3);
    stop.push("run.max_steps=7".into());
    run_ok(&["train", "--quiet", "--nproc-per-node", "2"], &stop, &tmp.path().join("b1.log"));
    let run = b.join("runs/dp");
    assert_eq!(last_checkpoint(&run).0, 7);

    // One process cannot continue a 2-rank run: its cursor counts each rank's samples.
    let log = tmp.path().join("b-one.log");
    let run_s = run.to_str().unwrap();
    let status = trainer(&["train", "--quiet", "--resume", run_s], &[], &log).status().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success());
    assert!(text.contains("written by a job of 2 process(es); this one has 1"), "{text}");
    assert_eq!(last_checkpoint(&run).0, 7, "the refused resume leaves the run as it was");

    let resume = ["run.max_steps=0".to_string()];
    run_ok(
        &["train", "--quiet", "--nproc-per-node", "2", "--resume", run_s],
        &resume,
        &tmp.path().join("b2.log"),
    );
    same_run(&run, &a.join("runs/dp"));
}

#[test]
fn a_killed_rank_ends_the_job_with_its_name_and_the_run_resumes() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path().join("killed");
    let run = dir.join("runs/dp");
    let log = tmp.path().join("killed.log");
    // Long enough to be killed mid-run.
    let mut child = trainer(&["train", "--quiet", "--nproc-per-node", "2"], &sets(&dir, 200), &log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while checkpoint::list(&run.join("checkpoints")).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint after 2 minutes");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the job ended early: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = util::rank_pid(dir.to_str().unwrap(), 1).expect("rank 1's process");
    // SAFETY: a signal to a process this test started (through mpirun).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "the job still runs a minute after rank 1 died");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    eprintln!(
        "the job ended {:.1} s after rank 1 was killed, {status}; its last words:\n{}",
        killed.elapsed().as_secs_f64(),
        text.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    assert!(!status.success());
    assert!(
        text.contains("rank 1") && text.contains("signal 9"),
        "the message names the rank and the cause:\n{text}"
    );
    assert!(util::rank_pid(dir.to_str().unwrap(), 0).is_none(), "rank 0 is gone too");

    // The last checkpoint is whole, and the run continues from it under 2 ranks.
    let (it, file) = last_checkpoint(&run);
    checkpoint::verify(&std::fs::read(&file).unwrap()).unwrap();
    let resume = [format!("run.max_steps={}", it + 3)];
    let run_s = run.to_str().unwrap();
    run_ok(
        &["train", "--quiet", "--nproc-per-node", "2", "--resume", run_s],
        &resume,
        &tmp.path().join("resumed.log"),
    );
    assert_eq!(last_checkpoint(&run).0, it + 3);
}

/// One rank's shard cut in half: its epoch runs short, and the ranks stop together at the first step
/// where their data disagree, saying so, instead of one of them waiting forever in an all-reduce.
#[test]
fn a_rank_whose_data_runs_short_stops_the_job_with_a_message() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path();
    let mut first = sets(dir, 3);
    first.push("run.max_steps=1".into());
    run_ok(&["train", "--quiet", "--nproc-per-node", "2"], &first, &dir.join("first.log"));
    let shard = dir.join("synth/train-000001.tar");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();

    let mut again = sets(dir, 3);
    again.push("run.name=cut".into());
    let log = dir.join("cut.log");
    let t = Instant::now();
    let status = trainer(&["train", "--quiet", "--nproc-per-node", "2"], &again, &log).status().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(t.elapsed() < Duration::from_secs(120));
    let said =
        text.lines().find(|l| l.contains("the ranks' data disagree")).unwrap_or_else(|| panic!("{text}"));
    eprintln!("{said}");
    // Whichever rank holds the cut shard is an epoch ahead of the other.
    assert!(said.contains(": a batch of epoch 0") && said.contains(": a batch of epoch 1"), "{said}");
}

/// The demo itself (the embedded config, its 512 synthetic images in 4 shards: 2 per rank) on 2 ranks:
/// 10 steps, then `--resume` to 16, as a user would run it.
#[test]
fn the_demo_runs_on_two_ranks_and_resumes() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = vec![
        format!("run.out_dir=\"{}\"", tmp.path().join("runs").display()),
        format!("data.synth_dir=\"{}\"", tmp.path().join("synth").display()),
    ];
    let mut first = base.clone();
    first.push("run.max_steps=10".into());
    let log = tmp.path().join("demo.log");
    run_ok(&["train", "--nproc-per-node", "2"], &first, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("x 2 processes (Open MPI), global batch 64"), "{text}");
    let run = tmp.path().join("runs/default");
    let (it, file) = last_checkpoint(&run);
    assert_eq!((it, checkpoint::meta(&std::fs::read(file).unwrap()).unwrap().world_size), (10, 2));

    let run_s = run.to_str().unwrap();
    run_ok(&["train", "--nproc-per-node", "2", "--resume", run_s], &["run.max_steps=16".into()], &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("resuming") && text.contains("at step 10"), "{text}");
    let its: Vec<u64> = util::history(&run)
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| r["it"].as_u64().unwrap())
        .collect();
    assert_eq!(its, (0..16).collect::<Vec<_>>());
    assert_eq!(last_checkpoint(&run).0, 16);
}

/// SIGTERM (a scheduler's notice) and SIGINT (Ctrl-C) to the launcher of `--nproc-per-node 2`: it asks
/// every rank to stop (SIGUSR1 through mpirun), the ranks finish the same step, rank 0 writes its
/// checkpoint, and all of them are gone; the launcher ends with 128 + the signal. Resumed, the run ends
/// as an uninterrupted one, bit for bit. Before, SIGTERM ended the launcher and left both ranks training;
/// SIGINT was ignored.
#[test]
fn a_stop_signal_to_the_launcher_checkpoints_every_rank_and_the_resume_is_exact() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let epochs = 12; // 48 global steps
    run_ok(&["train", "--quiet", "--nproc-per-node", "2"], &sets(&a, epochs), &tmp.path().join("a.log"));
    let run = b.join("runs/dp");
    let run_s = run.to_str().unwrap().to_string();
    for (round, signal, code) in [(0, libc::SIGTERM, 143), (1, libc::SIGINT, 130)] {
        let log = tmp.path().join(format!("b{round}.log"));
        let mut args = vec!["train", "--quiet", "--nproc-per-node", "2"];
        let fresh = sets(&b, epochs);
        let mut cmd = if round == 0 {
            trainer(&args, &fresh, &log)
        } else {
            args.extend(["--resume", run_s.as_str()]);
            trainer(&args, &[], &log)
        };
        let mut child = cmd.stdin(Stdio::null()).spawn().unwrap();
        // Wait for a few steps of this process.
        let logged = || util::history(&run).iter().filter(|r| r["kind"] == "step").count();
        let start = if round == 0 { 0 } else { logged() };
        let t0 = Instant::now();
        while !run.join("metrics.jsonl").exists() || logged() < start + 3 {
            assert!(t0.elapsed() < Duration::from_secs(120), "no steps after 2 minutes");
            assert!(
                child.try_wait().unwrap().is_none(),
                "ended early: {}",
                std::fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: a signal to the launcher this test started.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let sent = Instant::now();
        let status = child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        eprintln!("signal {signal}: the job ended {:.1} s later, {status}", sent.elapsed().as_secs_f64());
        assert_eq!(status.code(), Some(code), "{text}");
        assert!(text.contains("stopped by SIGUSR1 after step"), "every rank said where it stopped:\n{text}");
        assert!(
            util::rank_pid(b.to_str().unwrap(), 0).is_none()
                && util::rank_pid(b.to_str().unwrap(), 1).is_none()
        );
        let steps = logged();
        assert!(steps < 48, "stopped before the end: {steps}");
        assert_eq!(last_checkpoint(&run).0, steps, "the checkpoint holds the last step logged");
    }
    run_ok(
        &["train", "--quiet", "--nproc-per-node", "2", "--resume", &run_s],
        &[],
        &tmp.path().join("b-end.log"),
    );
    same_run(&run, &a.join("runs/dp"));
}

/// One undecodable image in a 2-rank run costs that sample, not the job: the rank that reads it completes
/// its epoch's last batch with a copy (the loader's `pad_epochs`), so both ranks keep every epoch's 4
/// steps; the run finishes all 12, and a run stopped at step 5 and resumed ends bit-identical to it.
#[test]
fn one_undecodable_image_costs_its_sample_not_the_job_and_the_resume_is_exact() {
    use shard::format::ShardWriter;
    use shard::index::{INDEX_FILE, Index};
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (src, set) = (tmp.path().join("src"), tmp.path().join("set"));
    let opts = shard::synth::SynthOptions {
        count: 256,
        size: 48,
        per_shard: 128,
        quiet: true,
        ..Default::default()
    };
    shard::synth::synth(&src, &opts).unwrap();
    // Sample 40 of shard 1 (read by one rank in every epoch's deal) gets junk for its JPEG.
    let index = Index::load(&src).unwrap();
    std::fs::create_dir_all(&set).unwrap();
    let mut shards = vec![];
    for (i, s) in index.shards.iter().enumerate() {
        let mut w = ShardWriter::create(&set, &s.name, None).unwrap();
        let mut n = 0;
        shard::read_samples(shard::open_shard(&src.join(&s.name)).unwrap(), |sample| {
            let junk = i == 1 && n == 40;
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
    std::fs::write(set.join(INDEX_FILE), out.to_json()).unwrap();
    let with_set = |dir: &Path, epochs: usize| {
        let mut s = sets(dir, epochs);
        s.push(format!("data.shards=\"{}\"", set.display()));
        s
    };

    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let log = tmp.path().join("a.log");
    run_ok(&["train", "--nproc-per-node", "2"], &with_set(&a, 3), &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("warning: skipped sample") && text.contains("of shard train-000001.tar"), "{text}");
    assert!(!text.contains("the data ended") && !text.contains("disagree"), "{text}");
    let want = util::history(&a.join("runs/dp"));
    let its: Vec<u64> =
        want.iter().filter(|r| r["kind"] == "step").map(|r| r["it"].as_u64().unwrap()).collect();
    assert_eq!(its, (0..12).collect::<Vec<_>>(), "every step of every epoch ran");

    let mut stop = with_set(&b, 3);
    stop.push("run.max_steps=5".into());
    run_ok(&["train", "--quiet", "--nproc-per-node", "2"], &stop, &tmp.path().join("b1.log"));
    let run = b.join("runs/dp");
    assert_eq!(last_checkpoint(&run).0, 5);
    let resume = ["run.max_steps=0".to_string()];
    let run_s = run.to_str().unwrap();
    run_ok(
        &["train", "--quiet", "--nproc-per-node", "2", "--resume", run_s],
        &resume,
        &tmp.path().join("b2.log"),
    );
    same_run(&run, &a.join("runs/dp"));
}
