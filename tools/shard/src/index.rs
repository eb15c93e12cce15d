//! `index.json`: what a shard directory holds, written last (atomically) by `pack` and `synth`, read by
//! `verify` and by the loader. It holds no timestamps, so the same inputs and seed give the same bytes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::ShardInfo;
use crate::input::ClassInfo;

pub const INDEX_FILE: &str = "index.json";
pub const FORMAT: &str = "densedino-wds/1";

/// An input that was left out, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// The options a set was packed with: enough to reproduce it, and compared on `--resume`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackRecord {
    pub tool: String,
    pub layout: String,
    pub input: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub list: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub masks: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub class_names: Option<String>,
    pub seed: u64,
    pub prefix: String,
    pub shard_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub per_shard: Option<u64>,
    pub quality: u8,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_side: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub zstd_level: Option<i32>,
    /// `--follow-links-out`: symbolic links out of the input were followed.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub follow_links_out: bool,
    /// Extra settings of generators such as `synth` (count, size).
    #[serde(skip_serializing_if = "serde_json::Value::is_null", default)]
    pub extra: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub format: String,
    pub shards: Vec<ShardInfo>,
    pub total_samples: u64,
    pub total_bytes: u64,
    pub classes: Vec<ClassInfo>,
    /// Which members each sample has, e.g. ["jpg", "cls", "json"].
    pub members: Vec<String>,
    pub options: PackRecord,
    pub skipped: Vec<Skipped>,
}

impl Index {
    pub fn new(
        shards: Vec<ShardInfo>,
        classes: Vec<ClassInfo>,
        members: Vec<String>,
        options: PackRecord,
        skipped: Vec<Skipped>,
    ) -> Self {
        Index {
            format: FORMAT.to_string(),
            total_samples: shards.iter().map(|s| s.samples).sum(),
            total_bytes: shards.iter().map(|s| s.bytes).sum(),
            shards,
            classes,
            members,
            options,
            skipped,
        }
    }

    /// Loads an index from its path, or from the directory that holds it.
    /// A remote set's URL ([`crate::remote`]) is read from the store.
    pub fn load(path: &Path) -> Result<Index> {
        let (file, text) = match crate::remote::remote_url(path) {
            Some(url) => {
                let set = crate::remote::RemoteSet::shared(url)?;
                let bytes = set.read_small(INDEX_FILE, common::files::MAX_TEXT_BYTES)?;
                let file = PathBuf::from(set.file_url(INDEX_FILE));
                let text = String::from_utf8(bytes)
                    .map_err(|_| Error::Index { path: file.clone(), problem: "not UTF-8 text".into() })?;
                (file, text)
            }
            None => {
                let file = if path.is_dir() { path.join(INDEX_FILE) } else { path.to_path_buf() };
                let text = common::files::read_text(&file, common::files::MAX_TEXT_BYTES)
                    .map_err(|e| Error::io(&file, "cannot read the shard index", e))?;
                (file, text)
            }
        };
        let index: Index = serde_json::from_str(&text).map_err(|e| Error::Index {
            path: file.clone(),
            problem: format!("not a valid shard index: {e}"),
        })?;
        if index.format != FORMAT {
            return Err(Error::Index {
                path: file,
                problem: format!("format {:?}, expected {FORMAT:?}", index.format),
            });
        }
        index.check().map_err(|problem| Error::Index { path: file, problem })?;
        Ok(index)
    }

    /// What `load` refuses in an index that parses: a shard name that is not a plain file name of the
    /// set's folder (`../x.tar`, `/dev/zero`, `a/b.tar` would be opened outside it, as GNU tar's and
    /// Python's `tarfile` `data` filter refuse member paths), a shard listed twice (every epoch would
    /// read it twice), and totals that disagree with the shards.
    fn check(&self) -> std::result::Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for s in &self.shards {
            if !common::files::stays_inside(&s.name) || s.name.contains('/') {
                return Err(format!("shard name {:?} is not a file name in the set's folder", s.name));
            }
            if !seen.insert(s.name.as_str()) {
                return Err(format!("shard {:?} is listed twice", s.name));
            }
        }
        let (samples, bytes) = self
            .shards
            .iter()
            .fold((0u64, 0u64), |(n, b), s| (n.saturating_add(s.samples), b.saturating_add(s.bytes)));
        if samples != self.total_samples || bytes != self.total_bytes {
            return Err(format!(
                "total_samples {} and total_bytes {} disagree with the shards' sums ({samples}, {bytes})",
                self.total_samples, self.total_bytes
            ));
        }
        Ok(())
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}
