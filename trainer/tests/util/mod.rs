//! What the trainer's end-to-end tests share: one tiny run, and how far its history has come.

use std::path::Path;

/// A tiny run in `dir` (`dir/runs/<name>`, its synthetic set in `dir/synth`): a 32 px ViT of depth 2 on 40
/// synthetic 48 px images, batch 8 (5 steps per epoch), 4 epochs, a checkpoint every 2 steps. Later
/// `--set`s override these.
pub fn tiny_sets(dir: &Path, name: &str) -> Vec<String> {
    vec![
        format!("run.name={name}"),
        format!("run.out_dir=\"{}\"", dir.join("runs").display()),
        "run.epochs=4".into(),
        "run.batch_size=8".into(),
        "run.checkpoint_every=2".into(),
        format!("data.synth_dir=\"{}\"", dir.join("synth").display()),
        "data.synth_count=40".into(),
        "data.synth_size=48".into(),
        "data.workers=2".into(),
        "views.global_size=32".into(),
        "views.local_size=32".into(),
        "views.num_points=2".into(),
        "model.embed_dim=32".into(),
        "model.depth=2".into(),
        "model.num_heads=2".into(),
        "model.img_size=32".into(),
        "head.out_dim=64".into(),
        "head.hidden_dim=32".into(),
        "head.bottleneck_dim=16".into(),
        "optim.warmup_epochs=1".into(),
    ]
}

/// Step records in `run/metrics.jsonl`, a line cut by a kill excepted.
#[allow(dead_code)] // not every test binary that includes `util` watches a run's history
pub fn steps_logged(run: &Path) -> usize {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines().filter(|l| l.contains("\"kind\":\"step\"") && l.ends_with('}')).count()
}

/// `run/metrics.jsonl` without its timings (wall-clock seconds differ from run to run; nothing else may).
#[allow(dead_code)] // not every test binary that includes `util` compares histories
pub fn history(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for timing in ["step_time", "data_wait", "images_per_s", "data_wait_fraction"] {
                v.as_object_mut().unwrap().remove(timing);
            }
            v
        })
        .collect()
}

/// The trainer process that is rank `rank` of a job whose command line mentions `marker`.
#[allow(dead_code)] // only the data-parallel tests kill a rank
pub fn rank_pid(marker: &str, rank: usize) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let has = |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
        if has(&cmdline, marker)
            && !has(&cmdline, "mpirun")
            && has(&environ, &format!("OMPI_COMM_WORLD_RANK={rank}\0"))
        {
            return Some(pid);
        }
    }
    None
}
