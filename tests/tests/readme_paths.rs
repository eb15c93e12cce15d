//! The README's commands and the configs name the same folders: every shard set a config trains on, and
//! every set a README command reads (`--shards`, `--train`, `--val`, `--classes-from`, `shard verify`), is
//! one that a README command before it writes (`shard pack --out`, `shard synth --out`). A user who
//! follows the README top to bottom never meets "no such shard directory".

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use trainer::recipe::config::TrainConfig;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The README's shell commands in order, continuation lines joined, comments dropped.
fn readme_commands() -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let (mut commands, mut in_sh, mut line) = (vec![], false, String::new());
    for l in text.lines() {
        if l.trim_start().starts_with("```") {
            in_sh = !in_sh && l.trim() == "```sh";
            continue;
        }
        if !in_sh || l.trim_start().starts_with('#') {
            continue;
        }
        line.push_str(l.trim_end_matches('\\'));
        line.push(' ');
        if !l.ends_with('\\') {
            let words: Vec<String> = line.split_whitespace().map(String::from).collect();
            if !words.is_empty() {
                commands.push(words);
            }
            line.clear();
        }
    }
    commands
}

/// The value after `flag` in `words`.
fn after<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    words.iter().position(|w| w == flag).and_then(|i| words.get(i + 1)).map(String::as_str)
}

/// A path as the README and the configs write it, relative to the repository: `data/x/` and
/// `data/x/index.json` are the set `data/x`.
fn set_of(path: &str) -> String {
    path.trim_end_matches('/').trim_end_matches("/index.json").to_string()
}

#[test]
fn every_set_a_config_or_a_readme_command_reads_is_written_by_a_readme_command() {
    let commands = readme_commands();
    let mut written = BTreeSet::new();
    let mut reads = 0;
    for words in &commands {
        // `cargo run --release -p loader -- bench …` is `loader bench …`.
        let words: Vec<String> = match words.iter().position(|w| w == "--") {
            Some(i) if words[0] == "cargo" => {
                let tool = after(words, "-p").unwrap().to_string();
                std::iter::once(tool).chain(words[i + 1..].iter().cloned()).collect()
            }
            _ => words.clone(),
        };
        let mut read = vec![];
        for flag in ["--shards", "--train", "--val", "--classes-from"] {
            read.extend(after(&words, flag).map(set_of));
        }
        let verb = |tool: &str, v: &str| words.len() > 2 && words[0] == tool && words[1] == v;
        if verb("shard", "verify") {
            read.push(set_of(&words[2]));
        }
        for set in read {
            assert!(
                written.contains(&set),
                "README: `{}` reads {set}, which no README command before it writes",
                words.join(" ")
            );
            reads += 1;
        }
        if verb("shard", "pack") || verb("shard", "synth") {
            written.insert(set_of(after(&words, "--out").expect("shard pack/synth writes --out")));
        }
    }
    assert!(
        written.contains("data/caltech-train") && written.contains("data/imagenet-sample"),
        "{written:?}"
    );
    assert!(reads >= 8, "the README's readers were found: {reads}");

    let mut configs: Vec<PathBuf> = std::fs::read_dir(root().join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    configs.sort();
    let mut trained_on = vec![];
    for file in &configs {
        let cfg = TrainConfig::load(Some(file), &[]).unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
        let name = file.file_name().unwrap().to_string_lossy();
        match &cfg.data.shards {
            Some(shards) => {
                let set = set_of(&shards.to_string_lossy());
                assert!(
                    written.contains(&set),
                    "configs/{name} trains on {set}, which no README command writes: {written:?}"
                );
                trained_on.push(set);
            }
            // The synthetic set is the trainer's own: it must not be one a README command writes (a run
            // never replaces a set it did not make).
            None => {
                let synth = cfg.data.synth_dir.to_string_lossy().into_owned();
                assert!(
                    !written.contains(&synth),
                    "configs/{name}'s own synthetic set {synth} is one the README writes"
                );
            }
        }
    }
    assert!(trained_on.contains(&"data/caltech-train".to_string()), "{trained_on:?}");
    assert!(trained_on.contains(&"data/imagenet-train".to_string()), "{trained_on:?}");
}
