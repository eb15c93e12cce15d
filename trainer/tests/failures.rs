//! The failure paths a real run meets, through the `trainer` binary as a user meets them: nothing is lost,
//! nothing is silently wrong, and every refusal says what to do. One test per case.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod util;

use trainer::run::checkpoint;
use trainer::run::metrics::{self, Record};

/// [`util::tiny_sets`] for `max_steps` steps (0: the whole 4 epochs), keeping 3 checkpoints.
fn tiny_sets(dir: &Path, name: &str, max_steps: usize) -> Vec<String> {
    let mut sets = util::tiny_sets(dir, name);
    sets.extend([format!("run.max_steps={max_steps}"), "run.keep_checkpoints=3".into()]);
    sets
}

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).output().expect("run the trainer binary")
}

fn with_sets<'a>(mut args: Vec<&'a str>, sets: &'a [String]) -> Vec<&'a str> {
    for s in sets {
        args.extend(["--set", s.as_str()]);
    }
    args
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "the trainer failed:\n{}\n{}", stdout(out), stderr(out));
    stdout(out)
}

fn fails(out: &Output) -> String {
    assert!(!out.status.success(), "the trainer should have refused:\n{}\n{}", stdout(out), stderr(out));
    stderr(out)
}

/// A finished tiny run of `steps` steps; returns its folder.
fn run(dir: &Path, name: &str, steps: usize) -> PathBuf {
    let sets = tiny_sets(dir, name, steps);
    ok(&trainer(&with_sets(vec!["train", "--quiet"], &sets)));
    dir.join("runs").join(name)
}

fn steps_logged(run_dir: &Path) -> Vec<usize> {
    metrics::read(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Step { m, .. } => Some(m.it),
            _ => None,
        })
        .collect()
}

fn checkpoints(run_dir: &Path) -> Vec<usize> {
    checkpoint::list(&run_dir.join("checkpoints")).into_iter().map(|(it, _)| it).collect()
}

// 1. `trainer import --out DIR` over an existing run.
#[test]
fn import_refuses_a_folder_that_holds_a_run_and_prints_only_what_is_there() {
    let tmp = tempfile::tempdir().unwrap();
    let existing = run(tmp.path(), "existing", 6);
    let before = checkpoints(&existing);
    // Official-layout weights: the existing run's teacher, exported.
    let weights = tmp.path().join("weights.safetensors");
    ok(&trainer(&["export", "--checkpoint", existing.to_str().unwrap(), "--out", weights.to_str().unwrap()]));
    let sets = tiny_sets(tmp.path(), "x", 0);
    let w = weights.to_str().unwrap();
    let err = fails(&trainer(&with_sets(
        vec!["import", "--weights", w, "--out", existing.to_str().unwrap()],
        &sets,
    )));
    assert!(err.contains("already holds a run") && err.contains("--force"), "{err}");
    assert_eq!(checkpoints(&existing), before, "the existing run is untouched");

    // With --force the folder becomes the imported run, and every path printed exists.
    let args = vec!["import", "--weights", w, "--out", existing.to_str().unwrap(), "--force"];
    let out = ok(&trainer(&with_sets(args, &sets)));
    assert_eq!(checkpoints(&existing), vec![0], "only the imported step-0 checkpoint: {out}");
    assert!(!existing.join("metrics.jsonl").exists(), "the old run's history is gone with it");
    let printed: Vec<&str> = out.split_whitespace().filter(|w| w.contains("ckpt-")).collect();
    assert!(!printed.is_empty(), "{out}");
    for p in printed {
        assert!(Path::new(p.trim_end_matches([':', ','])).exists(), "printed {p}, which is not there: {out}");
    }
}

// 2. Resuming from an older checkpoint than the newest.
#[test]
fn resuming_from_an_older_checkpoint_is_an_explicit_branch_that_never_mixes_histories() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(tmp.path(), "main", 12); // checkpoints at 8, 10, 12 kept
    let (ckpts, logged) = (checkpoints(&dir), steps_logged(&dir));
    assert_eq!(ckpts, vec![8, 10, 12]);
    let old = dir.join("checkpoints").join(checkpoint::file_name(8));
    let err = fails(&trainer(&["train", "--quiet", "--resume", old.to_str().unwrap()]));
    assert!(err.contains("not the newest") && err.contains("--branch"), "{err}");
    assert_eq!(
        (checkpoints(&dir), steps_logged(&dir)),
        (ckpts.clone(), logged.clone()),
        "the run is untouched"
    );

    let branch = tmp.path().join("branch");
    let args = ["train", "--quiet", "--resume", old.to_str().unwrap(), "--branch", branch.to_str().unwrap()];
    ok(&trainer(&args));
    assert_eq!((checkpoints(&dir), steps_logged(&dir)), (ckpts, logged), "the original run is untouched");
    assert_eq!(
        steps_logged(&branch),
        (0..12).collect::<Vec<_>>(),
        "the branch's history: 0..8, then its own"
    );
    assert_eq!(checkpoints(&branch).last(), Some(&12));
    // A plain resume of the branch continues the branch.
    ok(&trainer(&["train", "--quiet", "--resume", branch.to_str().unwrap(), "--set", "run.max_steps=14"]));
    assert_eq!(steps_logged(&branch), (0..14).collect::<Vec<_>>());
}

// 3. A failed checkpoint write leaves nothing behind, and stale `.partial` files are swept.
#[test]
fn a_failed_checkpoint_write_leaves_no_partial_and_stale_ones_are_swept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(tmp.path(), "p", 4);
    let ckpt_dir = dir.join("checkpoints");
    // A crashed process's leftover: the next start removes it.
    let stale = ckpt_dir.join("ckpt-00000099.safetensors.partial");
    std::fs::write(&stale, vec![0u8; 1000]).unwrap();
    ok(&trainer(&["train", "--quiet", "--resume", dir.to_str().unwrap(), "--set", "run.max_steps=6"]));
    assert!(!stale.exists(), "a stale .partial survived a run");
    // A crash between a save and its pruning leaves one checkpoint too many; a run resumed at its last
    // step saves nothing, and still leaves only run.keep_checkpoints.
    let kept = checkpoints(&dir);
    std::fs::copy(ckpt_dir.join(checkpoint::file_name(kept[0])), ckpt_dir.join(checkpoint::file_name(1)))
        .unwrap();
    ok(&trainer(&["train", "--quiet", "--resume", dir.to_str().unwrap(), "--set", "run.max_steps=6"]));
    assert_eq!(checkpoints(&dir), kept);
    // A checkpoint that cannot fit: refused before writing, naming what it needs.
    let err = checkpoint::check_free_space(&ckpt_dir, u64::MAX / 4).expect_err("no disk holds that");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("needs") && msg.contains("free") && msg.contains(&ckpt_dir.display().to_string()),
        "{msg}"
    );
}

// 4. A checkpoint with flipped bytes inside a tensor.
#[test]
fn a_corrupted_checkpoint_is_refused_and_resume_falls_back_to_an_older_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(tmp.path(), "c", 6); // checkpoints at 2, 4, 5 (epoch end), 6
    let newest = dir.join("checkpoints").join(checkpoint::file_name(6));
    let mut bytes = std::fs::read(&newest).unwrap();
    // Flip bytes well inside the tensor data (after the JSON header).
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = 8 + header + (bytes.len() - 8 - header) / 2;
    for b in &mut bytes[at..at + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&newest, &bytes).unwrap();
    let bytes_damaged = bytes.clone();
    // The metadata is covered too: a different step in the header (same length) is caught.
    let mut meta_flipped = std::fs::read(dir.join("checkpoints").join(checkpoint::file_name(5))).unwrap();
    let at = meta_flipped.windows(8).position(|w| w == b"\"it\":\"5\"").expect("the step in the header");
    meta_flipped[at + 6] = b'7';
    let err = checkpoint::verify(&meta_flipped).expect_err("a changed step must not pass");
    assert!(format!("{err:#}").contains("metadata do not match their digest"), "{err:#}");
    let err = checkpoint::verify(&bytes).expect_err("the digest must catch it");
    assert!(format!("{err:#}").contains("digest"), "{err:#}");
    let (file, bytes) = checkpoint::latest(&dir).expect("an older good checkpoint");
    assert_eq!(
        (checkpoint::meta(&bytes).unwrap().it, file.file_name().unwrap()),
        (5, checkpoint::file_name(5).as_ref())
    );
    let out = trainer(&["train", "--resume", dir.to_str().unwrap(), "--set", "run.max_steps=6"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&newest.display().to_string()) && err.contains("digest"),
        "the fallback is said: {err}"
    );
    // The damaged file is kept aside for inspection, and the run's history is one again: 2..6, once each.
    let aside = newest.with_extension("safetensors.damaged");
    assert!(
        err.contains(&format!("moved the damaged {} aside to {}", newest.display(), aside.display())),
        "{err}"
    );
    assert_eq!(std::fs::read(&aside).unwrap(), bytes_damaged);
    assert_eq!(checkpoints(&dir).last(), Some(&6));
    assert!(checkpoint::verify(&std::fs::read(&newest).unwrap()).is_ok(), "step 6 written again, intact");
    assert_eq!(steps_logged(&dir), (0..6).collect::<Vec<_>>(), "steps 0..5 once each");
}

// 5. Training on a damaged set.
/// A synthetic set of 40 images in 4 shards of 10, as `tiny_sets` trains on (48 px).
fn four_shard_set(dir: &Path) -> PathBuf {
    let set = dir.join("four");
    let opts =
        shard::synth::SynthOptions { count: 40, size: 48, per_shard: 10, quiet: true, ..Default::default() };
    shard::synth::synth(&set, &opts).unwrap();
    set
}

#[test]
fn a_damaged_set_is_refused_at_start_or_reported_and_never_passes_for_the_planned_run() {
    let tmp = tempfile::tempdir().unwrap();
    let set = four_shard_set(tmp.path());
    let data = format!("data.shards=\"{}\"", set.display());
    let sets = |name: &str, steps: usize| {
        let mut s = tiny_sets(tmp.path(), name, steps);
        s.push(data.clone());
        s
    };

    // Shards missing: refused before a step is run, naming them.
    for n in 1..4 {
        std::fs::remove_file(set.join(format!("train-00000{n}.tar"))).unwrap();
    }
    let err = fails(&trainer(&with_sets(vec!["train", "--quiet"], &sets("missing", 0))));
    assert!(
        err.contains(&format!(
            "{}: 3 of the 4 shards its index.json lists are missing: train-000001.tar, train-000002.tar, \
             train-000003.tar",
            set.display()
        )),
        "{err}"
    );
    assert!(checkpoints(&tmp.path().join("runs/missing")).is_empty(), "no step was run");

    // A shard cut in half (the others back): the run is told once, and a run that cannot reach its
    // planned step fails, saying how far it got and why, instead of ending "done" on part of the data.
    std::fs::remove_dir_all(&set).unwrap();
    let set = four_shard_set(tmp.path());
    let shard = set.join("train-000002.tar");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let out = trainer(&with_sets(vec!["train"], &sets("cut", 0)));
    let (err, summary) = (stderr(&out), ok(&out));
    let about: Vec<&str> = err.lines().filter(|l| l.contains("train-000002.tar")).collect();
    assert_eq!(about.len(), 1, "one warning for the damaged shard, not one per epoch:\n{err}");
    assert!(
        about[0].contains("damaged after") && about[0].contains("of its 10 samples are lost"),
        "{}",
        about[0]
    );
    assert!(!err.contains("skipped sample"), "{err}");
    // 34 or 35 whole samples an epoch: 4 batches of 8 where 5 were planned, in each of the 4 epochs.
    assert!(
        err.contains(
            "warning: the data ended after 16 of the planned 20 steps (4 epochs x 5): 1 damaged shard ("
        ),
        "{err}"
    );
    assert!(summary.contains("data problems: 1 damaged shard ("), "{summary}");
    assert!(summary.contains("the run took 16 of its planned 20 steps: its data ended first"), "{summary}");
    // Every epoch end is still seen (the shortened epochs' last batches do not say so themselves), and
    // the run ends with its checkpoint at the data's end.
    let run_dir = tmp.path().join("runs/cut");
    let epochs: Vec<(usize, usize)> = metrics::read(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Epoch { epoch, steps, .. } => Some((epoch, steps)),
            _ => None,
        })
        .collect();
    assert_eq!(epochs, vec![(0, 4), (1, 8), (2, 12), (3, 16)]);
    let (_, last) = checkpoint::latest(&run_dir).unwrap();
    let meta = checkpoint::meta(&last).unwrap();
    assert_eq!((meta.it, meta.cursor.epoch, meta.cursor.samples), (16, 4, 0));

    // A run whose steps the damaged set still covers finishes, and its summary names the damage.
    let out = ok(&trainer(&with_sets(vec!["train", "--quiet"], &sets("short", 3))));
    assert!(out.contains("data problems: 1 damaged shard ("), "{out}");
    // An intact set reports none.
    let out = ok(&trainer(&with_sets(vec!["train", "--quiet"], &tiny_sets(tmp.path(), "intact", 3))));
    assert!(!out.contains("data problems"), "{out}");
}

// 6. k-NN on sets whose labels cannot be compared.
#[test]
fn knn_refuses_sets_with_different_classes_or_no_labels_and_keys_its_cache_by_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(tmp.path(), "k", 2);
    let set = |name: &str, kind: shard::synth::SynthKind, seed: u64| {
        let out = tmp.path().join(name);
        let opts = shard::synth::SynthOptions {
            kind,
            count: 24,
            size: 32,
            seed,
            per_shard: 24,
            quiet: true,
            ..Default::default()
        };
        shard::synth::synth(&out, &opts).unwrap();
        out
    };
    use shard::synth::SynthKind::{Palettes, Shapes};
    let shapes = set("shapes", Shapes, 1);
    let shapes_val = set("shapes-val", Shapes, 2);
    let palettes = set("palettes", Palettes, 3);
    let ckpt = dir.to_str().unwrap();
    let knn = |train: &Path, val: &Path, cache: Option<&Path>| {
        let mut args = vec!["eval", "knn", "--checkpoint", ckpt, "--train", train.to_str().unwrap()];
        args.extend(["--val", val.to_str().unwrap(), "--k", "5"]);
        if let Some(c) = cache {
            args.extend(["--cache", c.to_str().unwrap()]);
        }
        trainer(&args)
    };
    let err = fails(&knn(&shapes, &palettes, None));
    assert!(err.contains("class") && err.contains(&palettes.display().to_string()), "{err}");
    // A set without labels: its index lists no classes (as `shard pack` writes for an unlabelled folder).
    let unlabelled = tmp.path().join("unlabelled");
    copy_dir(&shapes, &unlabelled);
    let index_path = unlabelled.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["classes"] = serde_json::json!([]);
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let err = fails(&knn(&unlabelled, &shapes_val, None));
    assert!(err.contains("label") && err.contains(&unlabelled.display().to_string()), "{err}");

    // The cache is keyed by the checkpoint: after the run moves on, the features are extracted again.
    let cache = tmp.path().join("cache");
    ok(&knn(&shapes, &shapes_val, Some(&cache)));
    let cached = std::fs::read_dir(&cache).unwrap().count();
    ok(&knn(&shapes, &shapes_val, Some(&cache)));
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), cached, "the same checkpoint reuses its features");
    ok(&trainer(&["train", "--quiet", "--resume", ckpt, "--set", "run.max_steps=4"]));
    ok(&knn(&shapes, &shapes_val, Some(&cache)));
    assert!(
        std::fs::read_dir(&cache).unwrap().count() > cached,
        "a moved-on checkpoint is not evaluated from the old features"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

// 7. `--resume` with `--config`.
#[test]
fn resume_with_a_config_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(tmp.path(), "r", 2);
    let cfg = tmp.path().join("other.toml");
    std::fs::write(&cfg, "[run]\nepochs = 9\n").unwrap();
    let args = ["train", "--quiet", "--resume", dir.to_str().unwrap(), "--config", cfg.to_str().unwrap()];
    let err = fails(&trainer(&args));
    assert!(err.contains("--resume") && err.contains("--config") && err.contains("--set run."), "{err}");
    // Nor may --set change what shapes every step.
    for set in ["run.seed=5", "run.batch_size=4", "run.epochs=9"] {
        let err = fails(&trainer(&["train", "--quiet", "--resume", dir.to_str().unwrap(), "--set", set]));
        assert!(
            err.contains(&format!(
                "--set {set}: run.seed, run.batch_size, run.epochs cannot change on resume"
            )),
            "{err}"
        );
    }
}

/// Two processes on one run folder would interleave their histories: the second is refused while the
/// first holds the folder's lock (released by the kernel however the first ends).
#[test]
fn a_second_process_on_a_running_run_folder_is_refused() {
    use std::os::fd::AsRawFd;
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(tmp.path(), "l", 2);
    let lock = std::fs::File::open(dir.join(".lock")).expect("a run keeps its lock file");
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    let args = ["train", "--quiet", "--resume", dir.to_str().unwrap(), "--set", "run.max_steps=4"];
    let err = fails(&trainer(&args));
    assert!(err.contains("another trainer process is running in this run folder"), "{err}");
    drop(lock);
    ok(&trainer(&args));
    assert_eq!(checkpoints(&dir).last(), Some(&4));
}

// 8. Config values out of range, and type errors, name the key and where it came from.
#[test]
fn bad_config_values_name_the_key_and_their_origin() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = tiny_sets(tmp.path(), "v", 1);
    for (bad, key) in [
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("loss.teacher_temp=0", "loss.teacher_temp"),
        ("loss.alpha=1.5", "loss.alpha"),
        ("optim.momentum_teacher=2", "optim.momentum_teacher"),
        ("head.out_dim=0", "head.out_dim"),
        ("run.keep_checkpoints=0", "run.keep_checkpoints"),
        ("data.synth_count=0", "data.synth_count"),
        // Values that size an allocation: a typo must be refused, not allocated.
        ("views.num_points=5000", "views.num_points"),
        ("views.global_size=100000", "views.global_size"),
        ("data.shuffle_buffer=2000000000", "data.shuffle_buffer"),
        ("views.blur_sigma=[0.1, 1e30]", "views.blur_sigma"),
        // The run's folder is out_dir/name: nothing may put it elsewhere.
        ("run.name=../escaped", "run.name"),
        ("run.name=\"/tmp/abs-run\"", "run.name"),
        ("run.name=\".\"", "run.name"),
        ("run.name=\"..\"", "run.name"),
        ("run.name=\"a//b\"", "run.name"),
    ] {
        let mut s = sets.clone();
        s.push(bad.into());
        let err = fails(&trainer(&with_sets(vec!["train", "--quiet"], &s)));
        assert!(err.contains(key), "{bad}: {err}");
    }
    assert!(!tmp.path().join("escaped").exists() && !Path::new("/tmp/abs-run").exists());
    assert!(!tmp.path().join("runs").exists(), "no run folder was made for a refused config");
    // TOML reads `inf` in a file (a --set refuses bare inf/nan): a jitter of infinite strength panicked
    // a loader thread.
    let file = tmp.path().join("inf.toml");
    std::fs::write(&file, "[views]\nbrightness = inf\n").unwrap();
    let err =
        fails(&trainer(&with_sets(vec!["train", "--quiet", "--config", file.to_str().unwrap()], &sets)));
    assert!(err.contains("views.brightness") && err.contains("finite"), "{err}");
    let file = tmp.path().join("typo.toml");
    std::fs::write(&file, "[run]\nbatch_size = \"32\"\n").unwrap();
    let err = fails(&trainer(&["train", "--quiet", "--config", file.to_str().unwrap()]));
    assert!(err.contains("run.batch_size") && err.contains(&file.display().to_string()), "{err}");
    let err = fails(&trainer(&["train", "--quiet", "--set", "run.batch_size=\"32\""]));
    assert!(err.contains("run.batch_size") && err.contains("--set"), "{err}");
}

// 9. `trainer attention` with a size the model cannot take.
#[test]
fn attention_refuses_sizes_the_model_cannot_take_before_writing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(tmp.path(), "a", 2);
    let image = tmp.path().join("photo.png");
    image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 90])).save(&image).unwrap();
    for size in ["100", "7", "0"] {
        let out_dir = tmp.path().join(format!("attn-{size}"));
        let args = ["attention", "--checkpoint", dir.to_str().unwrap(), "--image", image.to_str().unwrap()];
        let err =
            fails(&trainer(&[&args[..], &["--out", out_dir.to_str().unwrap(), "--size", size]].concat()));
        assert!(err.contains("--size") && err.contains("patch"), "{size}: {err}");
        assert!(!out_dir.exists(), "nothing written for --size {size}");
    }
}

// 10. The demo's synthetic set never replaces a set it did not make.
#[test]
fn a_run_never_replaces_a_synthetic_set_it_did_not_make() {
    let tmp = tempfile::tempdir().unwrap();
    let synth = tmp.path().join("synth");
    // The README's own command, with other settings than the run's.
    let opts = shard::synth::SynthOptions { count: 16, size: 64, quiet: true, ..Default::default() };
    shard::synth::synth(&synth, &opts).unwrap();
    let index = std::fs::read(synth.join("index.json")).unwrap();
    let err = fails(&trainer(&with_sets(vec!["train", "--quiet"], &tiny_sets(tmp.path(), "s", 1))));
    assert!(err.contains(&synth.display().to_string()) && err.contains("data.synth_dir"), "{err}");
    assert_eq!(std::fs::read(synth.join("index.json")).unwrap(), index, "the set is untouched");
}

/// A torchrun-style launch (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`): the ranks meet at rank 0's
/// rendezvous; one that cannot reach it stops within the timeout, naming itself and the address; on the
/// CPU the ranks meet and then refuse, since that launch's collectives are NCCL's.
#[test]
fn torchrun_style_ranks_meet_at_the_rendezvous_or_stop_within_its_timeout() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let sets = tiny_sets(tmp.path(), "rdzv", 2);
    let args = with_sets(vec!["train", "--quiet"], &sets);
    let port =
        || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    // `timeout`: 2 s where a rank is to give up; ample where the two must meet (this test runs beside
    // others that load the machine, and a process start can take seconds then).
    let rank = |rank: &str, port: &str, timeout: &str| {
        Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(&args)
            .envs([
                ("RANK", rank),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", rank),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", port),
                ("DENSEDINO_RENDEZVOUS_TIMEOUT", timeout),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };

    // Rank 1 alone: nobody serves the rendezvous.
    let lonely = port();
    let t = std::time::Instant::now();
    let out = rank("1", &lonely, "2").wait_with_output().unwrap();
    let err = fails(&out);
    assert!(t.elapsed() < std::time::Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(
        err.contains(&format!("rank 1: could not reach the rendezvous at 127.0.0.1:{lonely}"))
            && err.contains("within 2 s"),
        "{err}"
    );

    // Rank 0 alone: it serves, and waits for rank 1 no longer than the timeout.
    let out = rank("0", &port(), "2").wait_with_output().unwrap();
    let err = fails(&out);
    assert!(err.contains("rank 0 waited for rank 1 of 2") && err.contains("did not get there"), "{err}");

    // Both ranks: they meet (rank 1 may come first), then the CPU run is refused on each, clearly.
    let p = port();
    let (r1, r0) = (rank("1", &p, "120"), rank("0", &p, "120"));
    for out in [r0.wait_with_output().unwrap(), r1.wait_with_output().unwrap()] {
        let err = fails(&out);
        assert!(err.contains("collectives on NCCL: run.device must be cuda"), "{err}");
    }
}

// 11. `trainer export --out` onto something that is not a new plain file.
#[test]
fn export_never_replaces_a_device_a_folder_a_checkpoint_or_a_file_without_force() {
    use std::os::unix::fs::FileTypeExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(tmp.path(), "e", 4);
    let (_, newest) = checkpoint::list(&dir.join("checkpoints")).pop().unwrap();
    let before = std::fs::read(&newest).unwrap();
    let d = dir.to_str().unwrap();
    let export = |out: &Path, force: bool| {
        let mut args = vec!["export", "--checkpoint", d, "--out", out.to_str().unwrap()];
        args.extend(force.then_some("--force"));
        trainer(&args)
    };
    // A FIFO stands in for a device node (a test must not risk /dev/full): before, the export was
    // renamed onto it and it became a regular file.
    let fifo = tmp.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let err = fails(&export(&fifo, true));
    assert!(err.contains("not a regular file"), "{err}");
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    let folder = tmp.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    let err = fails(&export(&folder, true));
    assert!(err.contains("a folder"), "{err}");
    assert!(!tmp.path().join("folder.partial").exists(), "no half-written file is left beside it");
    // A run's checkpoint is never the target, even with --force (its resume would fail).
    let err = fails(&export(&newest, true));
    assert!(err.contains("is a training checkpoint"), "{err}");
    assert_eq!(std::fs::read(&newest).unwrap(), before);
    // An existing file needs --force.
    let weights = tmp.path().join("w.safetensors");
    ok(&export(&weights, false));
    let err = fails(&export(&weights, false));
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    ok(&export(&weights, true));
}

// 12. Files that are not files, and option values no evaluation can use.
#[test]
fn devices_as_inputs_and_evaluation_options_out_of_range_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(tmp.path(), "o", 2);
    let d = dir.to_str().unwrap();
    // Before, `--image /dev/zero` read until memory ran out.
    let out_dir = tmp.path().join("attn");
    let err = fails(&trainer(&[
        "attention",
        "--checkpoint",
        d,
        "--image",
        "/dev/zero",
        "--out",
        out_dir.to_str().unwrap(),
    ]));
    assert!(err.contains("/dev/zero") && err.contains("not a regular file"), "{err}");
    let err = fails(&trainer(&["train", "--quiet", "--config", "/dev/zero"]));
    assert!(err.contains("not a regular file"), "{err}");

    let synth = tmp.path().join("synth");
    let s = synth.to_str().unwrap();
    let knn = |extra: &[&str]| {
        trainer(&[&["eval", "knn", "--checkpoint", d, "--train", s, "--val", s][..], extra].concat())
    };
    for (extra, option) in [
        (&["--temperature", "0"][..], "--temperature"),
        (&["--temperature", "nan"], "--temperature"),
        (&["--temperature=-1"], "--temperature"),
        (&["--k", "0"], "--k"),
        (&["--crop", "0"], "--crop"),
        (&["--crop", "100000"], "--crop"),
        (&["--batch", "0"], "--batch"),
    ] {
        let out = knn(extra);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(option), "{extra:?}: {}", stderr(&out));
    }
    // A crop the model's patches do not tile: refused before any feature is computed.
    let err = fails(&knn(&["--crop", "7"]));
    assert!(err.contains("--crop 7") && err.contains("patch size"), "{err}");
    for (args, option) in [
        (&["seg", "--size", "0"][..], "--size"),
        (&["seg", "--epochs", "0"], "--epochs"),
        (&["seg", "--probe-seeds", "0"], "--probe-seeds"),
        (&["match", "--images", "0"], "--images"),
    ] {
        let out =
            trainer(&[&["eval"][..], &args[..1], &["--checkpoint", d, "--data", s], &args[1..]].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(option), "{args:?}: {}", stderr(&out));
    }
}

// 13. A history cut by hand or by a crash before the checkpoint it resumes from.
#[test]
fn a_damaged_history_is_said_on_resume_not_dropped_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(tmp.path(), "h", 6);
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Steps 0-2 whole, step 3 cut in half, the rest gone: the checkpoint (step 6) is past them.
    let cut = format!("{}\n{}", lines[..3].join("\n"), &lines[3][..lines[3].len() / 2]);
    std::fs::write(&path, cut).unwrap();
    let sets = ["run.max_steps=8".to_string()];
    let out = trainer(&with_sets(vec!["train", "--quiet", "--resume", dir.to_str().unwrap()], &sets));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("metrics.jsonl: line(s) 4 do not parse") && err.contains("3 of the steps before 6"),
        "{err}"
    );
    // A cut last line past the checkpoint (a crash mid-write) is the normal case: no warning.
    let dir = run(tmp.path(), "h2", 6);
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}{{\"kind\":\"st")).unwrap();
    let out = trainer(&with_sets(vec!["train", "--quiet", "--resume", dir.to_str().unwrap()], &sets));
    assert!(out.status.success() && !stderr(&out).contains("do not parse"), "{}", stderr(&out));
}

// 14. A run's config.toml edited by hand, then resumed.
#[test]
fn an_edited_config_toml_is_kept_and_said_not_overwritten_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(tmp.path(), "c", 4);
    let path = dir.join("config.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let lr_line = original.lines().find(|l| l.starts_with("lr = ")).expect("an lr line").to_string();
    let edited = original.replacen(&lr_line, "lr = 0.5", 1);
    std::fs::write(&path, &edited).unwrap();
    let sets = ["run.max_steps=6".to_string()];
    let out = trainer(&with_sets(vec!["train", "--quiet", "--resume", dir.to_str().unwrap()], &sets));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("config.toml was edited") && err.contains("config.toml.edited"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("config.toml.edited")).unwrap(), edited);
    let now = std::fs::read_to_string(&path).unwrap();
    assert!(now.contains(&lr_line) && !now.contains("lr = 0.5"), "the run's own config is back:\n{now}");
    // A resume that only changes run.* (as --set allows) is not an edit: no warning.
    let sets = ["run.max_steps=8".to_string()];
    let out = trainer(&with_sets(vec!["train", "--quiet", "--resume", dir.to_str().unwrap()], &sets));
    assert!(out.status.success() && !stderr(&out).contains("was edited"), "{}", stderr(&out));
}

// 15. Another run's checkpoint copied into a run's checkpoints/.
#[test]
fn another_runs_checkpoint_in_the_folder_is_refused_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let a = run(tmp.path(), "a", 4);
    let mut sets = tiny_sets(tmp.path(), "b", 8);
    sets.extend(["model.depth=1".into(), "run.seed=7".into()]);
    ok(&trainer(&with_sets(vec!["train", "--quiet"], &sets)));
    let b = tmp.path().join("runs/b");
    let (it, foreign) = checkpoint::list(&b.join("checkpoints")).pop().unwrap();
    assert_eq!(it, 8);
    std::fs::copy(&foreign, a.join("checkpoints").join(foreign.file_name().unwrap())).unwrap();
    let history = std::fs::read(a.join("metrics.jsonl")).unwrap();
    let config = std::fs::read(a.join("config.toml")).unwrap();
    let err = fails(&trainer(&["train", "--quiet", "--resume", a.to_str().unwrap()]));
    assert!(err.contains("belongs to another run") && err.contains("\"b\""), "{err}");
    assert_eq!(std::fs::read(a.join("metrics.jsonl")).unwrap(), history, "the history is untouched");
    assert_eq!(std::fs::read(a.join("config.toml")).unwrap(), config, "the config is untouched");
}

// 16. A run's checkpoints/ deleted, then resumed.
#[test]
fn a_history_without_its_checkpoints_is_refused_not_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(tmp.path(), "d", 4); // checkpoints at steps 2 and 4
    std::fs::remove_dir_all(dir.join("checkpoints")).unwrap();
    let history = std::fs::read(dir.join("metrics.jsonl")).unwrap();
    let err = fails(&trainer(&["train", "--quiet", "--resume", dir.to_str().unwrap()]));
    assert!(
        err.contains("has no checkpoint") && err.contains("step 2, logged after the checkpoint at step 2"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("metrics.jsonl")).unwrap(), history, "the history is untouched");
    // A run killed before its first checkpoint (steps 0 and 1 logged, killed before the step-2 save)
    // still starts over.
    let first: String =
        String::from_utf8(history).unwrap().lines().take(2).map(|l| l.to_string() + "\n").collect();
    std::fs::write(dir.join("metrics.jsonl"), first).unwrap();
    let out = trainer(&["train", "--quiet", "--resume", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(steps_logged(&dir), (0..4).collect::<Vec<_>>());
}

// 17. The data set regenerated in place between a checkpoint and its resume.
#[test]
fn a_data_set_changed_since_the_checkpoint_is_refused_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let set = tmp.path().join("set");
    let make = |count: usize| {
        let opts = shard::synth::SynthOptions {
            count,
            size: 48,
            per_shard: 16,
            force: true,
            quiet: true,
            ..Default::default()
        };
        shard::synth::synth(&set, &opts).unwrap();
    };
    make(40);
    let mut sets = tiny_sets(tmp.path(), "s", 4);
    sets.push(format!("data.shards=\"{}\"", set.display()));
    ok(&trainer(&with_sets(vec!["train", "--quiet"], &sets)));
    let dir = tmp.path().join("runs/s");
    let history = std::fs::read(dir.join("metrics.jsonl")).unwrap();
    make(56);
    let resume = ["train", "--quiet", "--resume", dir.to_str().unwrap(), "--set", "run.max_steps=6"];
    let err = fails(&trainer(&resume));
    assert!(err.contains("a set of 40 samples in 3 shards") && err.contains("now holds 56 samples"), "{err}");
    assert_eq!(std::fs::read(dir.join("metrics.jsonl")).unwrap(), history, "the history is untouched");
    assert_eq!(checkpoints(&dir), vec![2, 4]);
    // The same set made again (same images, same shards) is the same set: the resume goes on.
    make(40);
    let out = trainer(&resume);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(checkpoints(&dir).last(), Some(&6), "the run went on to step 6");
}
