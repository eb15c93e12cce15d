//! `shard verify`: re-read every shard against `index.json` (presence, size, SHA-256, sample count,
//! members, class indices; optionally a full decode of every image) and report every mismatch.

use std::io::Read;
use std::path::Path;

use anyhow::Result;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::format::{ShardInfo, open_shard, read_samples};
use crate::index::Index;

#[derive(Debug, Default)]
pub struct Report {
    pub shards: usize,
    pub samples: u64,
    pub decoded: u64,
    pub problems: Vec<String>,
}

fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hex::encode(hasher.finalize())))
}

fn check_shard(
    dir: &Path,
    shard: &ShardInfo,
    index: &Index,
    decode: bool,
) -> (u64, u64, Vec<String>) {
    let path = dir.join(&shard.name);
    let mut problems = vec![];
    let (len, sha) = match sha256_file(&path) {
        Ok(x) => x,
        Err(e) => {
            return (
                0,
                0,
                vec![format!("{}: missing or unreadable: {e}", path.display())],
            );
        }
    };
    if len != shard.bytes {
        problems.push(format!(
            "{}: {len} bytes, the index says {}",
            path.display(),
            shard.bytes
        ));
    }
    if sha != shard.sha256 {
        problems.push(format!(
            "{}: SHA-256 {sha}, the index says {}",
            path.display(),
            shard.sha256
        ));
    }
    let (mut decoded, mut keys) = (0u64, std::collections::HashSet::new());
    let reader = match open_shard(&path) {
        Ok(r) => r,
        Err(e) => return (0, 0, vec![format!("{}: cannot open: {e}", path.display())]),
    };
    let result = read_samples(reader, |s| {
        if !keys.insert(s.key.clone()) {
            problems.push(format!("{}: key {} appears twice", path.display(), s.key));
        }
        for m in &index.members {
            if s.get(m).is_none() {
                problems.push(format!("{}: sample {} has no .{m}", path.display(), s.key));
            }
        }
        if let Some(cls) = s.get("cls") {
            let ok = std::str::from_utf8(cls)
                .ok()
                .and_then(|c| c.trim().parse::<usize>().ok())
                .is_some_and(|c| c < index.classes.len());
            if !ok {
                problems.push(format!(
                    "{}: sample {} has class {:?}, not an index below {}",
                    path.display(),
                    s.key,
                    String::from_utf8_lossy(cls),
                    index.classes.len()
                ));
            }
        }
        if decode && let Some(jpg) = s.get("jpg") {
            match image::load_from_memory(jpg) {
                Ok(_) => decoded += 1,
                Err(e) => problems.push(format!(
                    "{}: sample {}: image does not decode: {e}",
                    path.display(),
                    s.key
                )),
            }
        }
        true
    });
    let samples = match result {
        Ok(n) => n,
        Err((n, e)) => {
            problems.push(format!(
                "{}: damaged after {n} samples: {e}",
                path.display()
            ));
            n
        }
    };
    if samples != shard.samples {
        problems.push(format!(
            "{}: {samples} samples, the index says {}",
            path.display(),
            shard.samples
        ));
    }
    (samples, decoded, problems)
}

pub fn verify(dir: &Path, decode: bool) -> Result<Report> {
    let index = Index::load(dir)?;
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        dir.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let results: Vec<_> = index
        .shards
        .par_iter()
        .map(|s| check_shard(&dir, s, &index, decode))
        .collect();
    let mut report = Report {
        shards: index.shards.len(),
        ..Default::default()
    };
    for (samples, decoded, problems) in results {
        report.samples += samples;
        report.decoded += decoded;
        report.problems.extend(problems);
    }
    if report.samples != index.total_samples && report.problems.is_empty() {
        report.problems.push(format!(
            "{} samples in total, the index says {}",
            report.samples, index.total_samples
        ));
    }
    Ok(report)
}
