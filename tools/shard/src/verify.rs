//! `shard verify`: re-read every shard against `index.json` (presence, size, SHA-256, sample count,
//! members, class indices; optionally a full decode of every image) and report every mismatch. A remote
//! set ([`crate::remote`]) is read from its store.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::Digest;

use crate::error::{Error, Result};
use crate::format::{HashingReader, ShardInfo, read_samples, tar_stream};
use crate::index::Index;

#[derive(Debug, Default)]
pub struct Report {
    pub shards: usize,
    pub samples: u64,
    pub decoded: u64,
    pub problems: Vec<String>,
}

fn check_shard(dir: &Path, shard: &ShardInfo, index: &Index, decode: bool) -> (u64, u64, Vec<String>) {
    let path = dir.join(&shard.name);
    let mut problems = vec![];
    // A remote shard through the plain reader: its size and digest are checked below, with the rest.
    let remote = crate::remote::remote_url(dir).map(crate::remote::RemoteSet::shared);
    let file: Box<dyn Read + Send> = match remote {
        Some(Ok(set)) => match set.reader(&shard.name) {
            Ok(r) => r,
            Err(e) => return (0, 0, vec![e.to_string()]),
        },
        Some(Err(e)) => return (0, 0, vec![e.to_string()]),
        None => match crate::format::open_regular(&path) {
            Ok(f) => Box::new(f),
            Err(Error::Io { cause, .. }) => {
                return (0, 0, vec![format!("{}: missing or unreadable: {cause}", path.display())]);
            }
            Err(e) => return (0, 0, vec![e.to_string()]),
        },
    };
    let mut raw = HashingReader::new(file);
    let (mut decoded, mut keys) = (0u64, std::collections::HashSet::new());
    let reader = match tar_stream(&path, BufReader::with_capacity(1 << 20, &mut raw)) {
        Ok(r) => r,
        Err(e) => return (0, 0, vec![e.to_string()]),
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
                Err(e) => {
                    problems.push(format!("{}: sample {}: image does not decode: {e}", path.display(), s.key))
                }
            }
        }
        true
    });
    let samples = match result {
        Ok(n) => n,
        Err(e) => {
            let n = match &e {
                Error::Shard { samples, .. } => *samples,
                _ => 0,
            };
            problems.push(e.in_file(&path).to_string());
            n
        }
    };
    // The tar reader stops at the end-of-archive marker: hash whatever follows it too.
    if let Err(e) = std::io::copy(&mut raw, &mut std::io::sink()) {
        problems.push(format!("{}: read error: {e}", path.display()));
    }
    let sha = hex::encode(raw.hasher.finalize());
    if raw.bytes != shard.bytes {
        problems.push(format!("{}: {} bytes, the index says {}", path.display(), raw.bytes, shard.bytes));
    }
    if sha != shard.sha256 {
        problems.push(format!("{}: SHA-256 {sha}, the index says {}", path.display(), shard.sha256));
    }
    if samples != shard.samples {
        problems.push(format!("{}: {samples} samples, the index says {}", path.display(), shard.samples));
    }
    (samples, decoded, problems)
}

pub fn verify(dir: &Path, decode: bool) -> Result<Report> {
    let index = Index::load(dir)?;
    let dir = match crate::remote::remote_url(dir) {
        Some(url) => PathBuf::from(crate::remote::RemoteSet::shared(url)?.url.clone()),
        None if dir.is_dir() => dir.to_path_buf(),
        None => dir.parent().unwrap_or(Path::new(".")).to_path_buf(),
    };
    let results: Vec<_> = index.shards.par_iter().map(|s| check_shard(&dir, s, &index, decode)).collect();
    let mut report = Report { shards: index.shards.len(), ..Default::default() };
    for (samples, decoded, problems) in results {
        report.samples += samples;
        report.decoded += decoded;
        report.problems.extend(problems);
    }
    if report.samples != index.total_samples && report.problems.is_empty() {
        report
            .problems
            .push(format!("{} samples in total, the index says {}", report.samples, index.total_samples));
    }
    Ok(report)
}
