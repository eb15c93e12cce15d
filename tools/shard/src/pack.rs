//! `shard pack` and the shard-set writer it shares with `synth`: shuffle, clean in parallel, write in
//! order, rotate shards by size or count, and survive a crash.
//!
//! Determinism: the plan (enumeration sorted, then a ChaCha shuffle of the seed) and each sample's bytes
//! are pure functions of the inputs and options, and samples are written in plan order whatever the
//! worker count, so the same seed gives the same shards byte for byte.
//!
//! Crash safety: a shard is written as `name.partial` and renamed when complete; after each rename a
//! journal records how far the plan got, so `--resume` re-does only the unfinished shard and produces
//! exactly the bytes of an uninterrupted run. `index.json` is written last.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::clean::{CleanOptions, clean};
use crate::error::{Error, Result};
use crate::format::{PARTIAL_SUFFIX, ShardInfo, ShardWriter, shard_name, write_atomic};
use crate::index::{INDEX_FILE, Index, PackRecord, Skipped};
use crate::input::{ClassInfo, Item, LayoutArgs, plan};
use crate::progress::Progress;

pub const JOURNAL_FILE: &str = ".pack-journal.json";
/// Test hook: abort the process (no unwinding, no cleanup) after this many samples were appended.
pub const CRASH_ENV: &str = "SHARD_CRASH_AFTER_SAMPLES";

/// What `pack` does. `Default` is `shard pack`'s command-line defaults (with no input or output).
#[derive(Clone, Debug)]
pub struct PackOptions {
    pub input: PathBuf,
    pub out: PathBuf,
    pub layout: LayoutArgs,
    pub seed: u64,
    pub prefix: String,
    pub shard_bytes: u64,
    pub per_shard: Option<u64>,
    pub quality: u8,
    pub max_side: Option<u32>,
    pub zstd_level: Option<i32>,
    pub workers: usize,
    pub strict: bool,
    pub resume: bool,
    pub force: bool,
    pub quiet: bool,
    /// A store's URL (`s3://…`) each shard is uploaded to as soon as it is complete, before the journal
    /// records it; `shard::remote::push` uploads the index at the end (`shard pack --out s3://…`).
    pub upload_to: Option<String>,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            input: PathBuf::new(),
            out: PathBuf::new(),
            layout: LayoutArgs::default(),
            seed: 0,
            prefix: "train".into(),
            shard_bytes: 1 << 30,
            per_shard: None,
            quality: 95,
            max_side: None,
            zstd_level: None,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            strict: false,
            resume: false,
            force: false,
            quiet: false,
            upload_to: None,
        }
    }
}

impl PackOptions {
    /// Refuses values that cannot make a set, naming the command-line option: a size or count of zero
    /// would write one sample per shard (or none), zero workers nothing at all.
    pub fn validate(&self) -> Result<()> {
        check_prefix(&self.prefix)?;
        at_least("--shard-bytes", self.shard_bytes, 1, "byte")?;
        if let Some(n) = self.per_shard {
            at_least("--per-shard", n, 1, "")?;
        }
        in_range("--quality", self.quality as i64, 1, 100)?;
        if let Some(side) = self.max_side {
            at_least("--max-side", side as u64, 1, "pixel")?;
        }
        if let Some(level) = self.zstd_level {
            in_range("--zstd", level as i64, 1, 22)?;
        }
        at_least("--workers", self.workers as u64, 1, "")
    }
}

/// `option` must be at least `min` (`unit` names what is counted, if the number alone is unclear).
pub(crate) fn at_least(option: &'static str, value: u64, min: u64, unit: &str) -> Result<()> {
    if value >= min {
        return Ok(());
    }
    let unit = if unit.is_empty() { String::new() } else { format!(" {unit}") };
    Err(Error::InvalidOption { option, problem: format!("must be at least {min}{unit}, got {value}") })
}

/// `option` must lie in `lo..=hi` (the command line checks this too; library callers are not parsed).
pub(crate) fn in_range(option: &'static str, value: i64, lo: i64, hi: i64) -> Result<()> {
    if (lo..=hi).contains(&value) {
        return Ok(());
    }
    Err(Error::InvalidOption { option, problem: format!("must be {lo} to {hi}, got {value}") })
}

/// Shard names are `{prefix}-000000.tar`: the prefix must be a plain, non-empty part of a file name.
pub(crate) fn check_prefix(prefix: &str) -> Result<()> {
    let problem = if prefix.is_empty() {
        "must not be empty".to_string()
    } else if prefix.contains(['/', '\\', '\0']) || prefix.starts_with('.') {
        format!("{prefix:?} must be a plain file name part (no '/', no leading '.')")
    } else {
        return Ok(());
    };
    Err(Error::InvalidOption { option: "--prefix", problem })
}

#[derive(Debug)]
pub struct Summary {
    /// Images written by this run (a resumed run counts only its own part).
    pub samples: u64,
    pub skipped: usize,
    pub shards: usize,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Summary {
    pub fn line(&self, verb: &str) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        format!(
            "{verb} {} images ({} skipped) into {} shards, {:.1} MB, in {:.1} s: {:.0} images/s, {:.1} MB/s",
            self.samples,
            self.skipped,
            self.shards,
            self.bytes as f64 / 1e6,
            secs,
            self.samples as f64 / secs,
            self.bytes as f64 / 1e6 / secs
        )
    }
}

/// How far an interrupted run got: rewritten (atomically) after every finished shard.
#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    options: PackRecord,
    plan_len: usize,
    /// SHA-256 of the shuffled plan (each input's path, key, class and mask): an input moved, added or
    /// removed between the crash and the resume changes it, where the length alone may not.
    #[serde(default)]
    plan_digest: String,
    /// Plan position of the first item not yet in a finished shard.
    next: usize,
    shards: Vec<ShardInfo>,
    skipped: Vec<Skipped>,
}

/// Writes a set of shards in order, rotating by size or count, with the journal and the index.
pub struct ShardSet {
    dir: PathBuf,
    record: PackRecord,
    plan_len: usize,
    plan_digest: String,
    current: Option<ShardWriter>,
    pub shards: Vec<ShardInfo>,
    pub skipped: Vec<Skipped>,
    appended: u64,
    crash_after: Option<u64>,
    /// Whether `open` created `dir`: a set abandoned before its first sample removes it again.
    created_dir: bool,
    /// Whether `open` removed an earlier set (`--force`).
    pub replaced: bool,
    /// Where each finished shard is uploaded ([`PackOptions::upload_to`]).
    upload: Option<std::sync::Arc<crate::remote::RemoteSet>>,
}

impl ShardSet {
    /// Prepares `dir` for a new set, or picks up an interrupted one. Returns the set and the plan position
    /// to continue from.
    pub fn open(
        dir: &Path,
        record: PackRecord,
        plan_len: usize,
        plan_digest: String,
        resume: bool,
        force: bool,
    ) -> Result<(Self, usize)> {
        let created_dir = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create", e))?;
        let journal_path = dir.join(JOURNAL_FILE);
        let existing = existing_files(dir, &record.prefix)?;
        let mut set = ShardSet {
            dir: dir.to_path_buf(),
            record,
            plan_len,
            plan_digest,
            current: None,
            shards: vec![],
            skipped: vec![],
            appended: 0,
            crash_after: std::env::var(CRASH_ENV).ok().and_then(|v| v.parse().ok()),
            created_dir,
            replaced: false,
            upload: None,
        };
        let mut start = 0;
        if resume && journal_path.is_file() {
            let text = common::files::read_text(&journal_path, common::files::MAX_TEXT_BYTES)
                .map_err(|e| Error::io(&journal_path, "cannot read", e))?;
            let journal: Journal = serde_json::from_str(&text).map_err(|e| {
                Error::output(&journal_path, format!("damaged journal ({e}); pack again with --force"))
            })?;
            if journal.options != set.record
                || journal.plan_len != plan_len
                || journal.plan_digest != set.plan_digest
            {
                return Err(Error::output(
                    &journal_path,
                    "the interrupted run used other options or inputs; pack again with --force",
                ));
            }
            for s in &journal.shards {
                let path = dir.join(&s.name);
                let len = std::fs::metadata(&path).map(|m| m.len()).ok();
                if len != Some(s.bytes) {
                    return Err(Error::output(
                        path,
                        "finished shard is missing or changed; pack again with --force",
                    ));
                }
            }
            let keep: Vec<&str> = journal.shards.iter().map(|s| s.name.as_str()).collect();
            for f in existing.iter().filter(|f| !keep.contains(&f.as_str()) && *f != JOURNAL_FILE) {
                remove(&dir.join(f))?;
            }
            start = journal.next;
            set.shards = journal.shards;
            set.skipped = journal.skipped;
        } else if resume && dir.join(INDEX_FILE).is_file() {
            return Err(Error::output(
                dir,
                "the set is already complete (index.json exists); nothing to resume",
            ));
        } else {
            // Killed while writing its very first journal: that half-written journal is all it left.
            let first_journal = format!("{JOURNAL_FILE}{PARTIAL_SUFFIX}");
            let killed_at_start =
                resume && !existing.is_empty() && existing.iter().all(|f| *f == first_journal);
            if !existing.is_empty() && !force && !killed_at_start {
                let problem = if resume {
                    // The journal is written before the first shard: without one, these files are not an
                    // interrupted pack's, and nothing here may remove them.
                    format!(
                        "holds {} but no pack journal, so they are no interrupted run to resume; use --force to \
                         replace them",
                        existing.join(", ")
                    )
                } else {
                    format!(
                        "already holds shards, an index or a journal ({}); use --force to replace them (or \
                         `shard pack --resume` to finish an interrupted pack)",
                        existing.join(", ")
                    )
                };
                return Err(Error::output(dir, problem));
            }
            // A fresh set's journal exists before anything else is done: it replaces an old set's journal
            // in one rename, so a run killed at any later moment (even while the old set's files are
            // removed) leaves a folder that `--resume` recognises as its own.
            set.write_journal(0)?;
            for f in existing.iter().filter(|f| *f != JOURNAL_FILE) {
                let path = dir.join(f);
                if path.exists() {
                    remove(&path)?;
                }
            }
            set.replaced = !existing.is_empty() && !killed_at_start;
        }
        Ok((set, start))
    }

    /// Appends a sample at plan position `pos`; starts a new shard first if this one is full.
    pub fn append(&mut self, pos: usize, key: &str, members: &[(&str, &[u8])]) -> Result<()> {
        let size = ShardWriter::sample_tar_bytes(key, members);
        let full = self.current.as_ref().is_some_and(|w| match self.record.per_shard {
            Some(n) => w.samples() >= n,
            None => w.tar_bytes() + size > self.record.shard_bytes,
        });
        if full {
            self.finish_shard(pos)?;
        }
        if self.current.is_none() {
            let name = shard_name(&self.record.prefix, self.shards.len(), self.record.zstd_level.is_some());
            let writer = ShardWriter::create(&self.dir, &name, self.record.zstd_level)?;
            self.current = Some(writer);
        }
        if let Some(w) = self.current.as_mut() {
            w.append(key, members)?;
        }
        self.appended += 1;
        if self.crash_after == Some(self.appended) {
            eprintln!("{CRASH_ENV}: aborting after {} samples, as asked", self.appended);
            std::process::abort();
        }
        Ok(())
    }

    fn finish_shard(&mut self, next: usize) -> Result<()> {
        if let Some(w) = self.current.take() {
            let info = w.finish()?;
            if let Some(store) = &self.upload {
                store.upload(&info.name, &self.dir.join(&info.name))?;
            }
            self.shards.push(info);
            self.write_journal(next)?;
        }
        Ok(())
    }

    /// Records the finished shards and the plan position `next` that follows them.
    fn write_journal(&self, next: usize) -> Result<()> {
        let journal = Journal {
            options: self.record.clone(),
            plan_len: self.plan_len,
            plan_digest: self.plan_digest.clone(),
            next,
            shards: self.shards.clone(),
            skipped: self.skipped.clone(),
        };
        let path = self.dir.join(JOURNAL_FILE);
        let bytes =
            serde_json::to_vec_pretty(&journal).map_err(|e| Error::io(&path, "cannot write", e.into()))?;
        write_atomic(&path, &bytes)
    }

    /// Whether the set holds no sample at all (none finished, none appended by this run).
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty() && self.current.is_none()
    }

    /// Abandons an empty set: removes its journal, and its folder if `open` created it (and it is still
    /// empty: what others put there stays).
    pub fn discard(self) -> Result<()> {
        let journal = self.dir.join(JOURNAL_FILE);
        if journal.exists() {
            remove(&journal)?;
        }
        if self.created_dir {
            let _ = std::fs::remove_dir(&self.dir);
        }
        Ok(())
    }

    /// Finishes the last shard, writes `index.json`, and removes the journal.
    pub fn finish(mut self, classes: Vec<ClassInfo>, members: Vec<String>) -> Result<Index> {
        self.finish_shard(self.plan_len)?;
        let index = Index::new(self.shards, classes, members, self.record, self.skipped);
        write_atomic(&self.dir.join(INDEX_FILE), &index.to_json())?;
        let journal = self.dir.join(JOURNAL_FILE);
        if journal.exists() {
            remove(&journal)?;
        }
        Ok(index)
    }
}

fn remove(path: &Path) -> Result<()> {
    std::fs::remove_file(path).map_err(|e| Error::io(path, "cannot remove", e))
}

/// Files of a set in `dir`: its shards (finished or partial), index and journal.
fn existing_files(dir: &Path, prefix: &str) -> Result<Vec<String>> {
    let mut out = vec![];
    let cannot_list = |e| Error::io(dir, "cannot list", e);
    for entry in std::fs::read_dir(dir).map_err(cannot_list)? {
        let name = entry.map_err(cannot_list)?.file_name().to_string_lossy().into_owned();
        // Only the set's own names, finished or `.partial`: other files in the folder are not ours to remove.
        let base = name.strip_suffix(PARTIAL_SUFFIX).unwrap_or(&name);
        let ours = is_shard_name(base, prefix) || base == JOURNAL_FILE || base == INDEX_FILE;
        if ours {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `name` is one of [`shard_name`]'s: `{prefix}-NNNNNN.tar` or `.tar.zst`.
fn is_shard_name(name: &str, prefix: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    let number = rest.strip_suffix(".tar").or_else(|| rest.strip_suffix(".tar.zst"));
    number.is_some_and(|n| n.len() >= 6 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The error of a pack whose every input was skipped: how many, and why (the most common reasons
/// first, each with its first input as an example).
fn no_readable_image(input: &Path, skipped: &[Skipped], replaced: bool) -> Error {
    let mut reasons: Vec<(&str, usize, &str)> = vec![];
    for s in skipped {
        match reasons.iter_mut().find(|r| r.0 == s.reason) {
            Some(r) => {
                r.1 += 1;
                r.2 = r.2.min(s.path.as_str());
            }
            None => reasons.push((&s.reason, 1, &s.path)),
        }
    }
    reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    const SHOWN: usize = 4;
    let mut why: Vec<String> =
        reasons.iter().take(SHOWN).map(|(r, n, p)| format!("{n} {r}, e.g. {p}")).collect();
    if reasons.len() > SHOWN {
        why.push(format!("{} other reasons (see the lines above)", reasons.len() - SHOWN));
    }
    Error::layout(
        input,
        format!(
            "no readable image: all {} inputs were skipped ({}); no set was written{}",
            skipped.len(),
            why.join("; "),
            if replaced { " (the output folder's earlier set was removed by --force)" } else { "" }
        ),
    )
}

/// The JSON member of a sample.
#[derive(Serialize)]
struct SampleMeta<'a> {
    source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    class: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    class_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    class_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mask: Option<&'a str>,
    width: u32,
    height: u32,
    channels: u8,
    cleaning: &'a [String],
}

/// A cleaned sample's members, or why it is skipped: an [`Error::Image`] that names the input.
type Processed = Result<Vec<(&'static str, Vec<u8>)>>;

fn process(
    item: &Item,
    input: &Path,
    confine: Option<&Path>,
    masks: Option<&Path>,
    classes: &[ClassInfo],
    opts: &CleanOptions,
) -> Processed {
    let path = input.join(&item.rel);
    // Every problem here is this input's: unreadable, unusable, or its mask is.
    let unusable = |e: Error| e.in_file(&path);
    // Without --follow-links-out the file read must still lie in the input (the walk checked the name;
    // this checks what is opened, after any swap since).
    let bytes = match confine {
        Some(root) => common::files::read_regular_inside(&path, root, common::files::MAX_IMAGE_BYTES),
        None => common::files::read_regular(&path, common::files::MAX_IMAGE_BYTES),
    }
    .map_err(|e| unusable(Error::image(format!("cannot read: {e}"))))?;
    let cleaned = clean(&bytes, opts).map_err(unusable)?;
    let mut members: Vec<(&'static str, Vec<u8>)> = vec![];
    let class = item.class.and_then(|c| classes.get(c));
    let meta = SampleMeta {
        source: &item.rel,
        class: item.class,
        class_id: class.map(|c| c.id.as_str()),
        class_name: class.and_then(|c| c.name.as_deref()),
        mask: item.mask.as_deref(),
        width: cleaned.width,
        height: cleaned.height,
        channels: cleaned.channels,
        cleaning: &cleaned.cleaning,
    };
    let json =
        serde_json::to_vec(&meta).map_err(|e| unusable(Error::image(format!("cannot describe: {e}"))))?;
    let mask = match (&item.mask, masks) {
        (Some(m), Some(dir)) => {
            Some(clean_mask(&dir.join(m), cleaned.width, cleaned.height).map_err(unusable)?)
        }
        _ => None,
    };
    members.push(("jpg", cleaned.jpeg));
    if let Some(c) = item.class {
        members.push(("cls", c.to_string().into_bytes()));
    }
    members.push(("json", json));
    if let Some(mask) = mask {
        members.push(("seg.png", mask));
    }
    Ok(members)
}

/// A label mask's values: 8-bit grayscale, or for palette PNGs (Pascal VOC) the palette indices
/// themselves, which a generic decoder would expand to colours. Other formats must be single-channel.
/// An error is an [`Error::Image`] without a path (the bytes may come from a file or a shard).
pub fn decode_mask(bytes: &[u8]) -> Result<image::GrayImage> {
    let unreadable = |e: &dyn std::fmt::Display| Error::image(format!("unreadable: {e}"));
    if image::guess_format(bytes).ok() != Some(image::ImageFormat::Png) {
        let img = image::load_from_memory(bytes).map_err(|e| unreadable(&e))?;
        if img.color().channel_count() != 1 {
            return Err(Error::image(format!("has {} channels, expected 1", img.color().channel_count())));
        }
        return Ok(img.into_luma8());
    }
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec.read_info().map_err(|e| unreadable(&e))?;
    let size = reader.output_buffer_size().ok_or_else(|| Error::image("too large"))?;
    let mut buf = vec![0; size];
    let info = reader.next_frame(&mut buf).map_err(|e| unreadable(&e))?;
    if info.bit_depth != png::BitDepth::Eight
        || !matches!(info.color_type, png::ColorType::Grayscale | png::ColorType::Indexed)
    {
        return Err(Error::image(format!(
            "is a {:?} {:?} PNG, expected 8-bit grayscale or palette indices",
            info.color_type, info.bit_depth
        )));
    }
    buf.truncate(info.buffer_size());
    image::GrayImage::from_raw(info.width, info.height, buf).ok_or_else(|| Error::image("bad size"))
}

/// A segmentation mask as an 8-bit gray PNG of the image's size (labels resized by nearest neighbour if
/// the image was capped); a valid gray PNG of the right size is kept byte for byte, a palette PNG is
/// rewritten as gray so that any reader sees the label values. Errors are the image's (the packer skips
/// the pair), so they name the mask in their text and leave the image's path to the caller.
fn clean_mask(path: &Path, width: u32, height: u32) -> Result<Vec<u8>> {
    let bad_mask =
        |problem: &dyn std::fmt::Display| Error::image(format!("mask {}: {problem}", path.display()));
    let bytes = common::files::read_regular(path, common::files::MAX_IMAGE_BYTES)
        .map_err(|e| bad_mask(&format!("cannot read: {e}")))?;
    let mut gray = decode_mask(&bytes).map_err(|e| bad_mask(&e))?;
    // The PNG header alone says whether the file is already what we store.
    let is_png_l8 = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().is_ok_and(|r| {
        let info = r.info();
        info.color_type == png::ColorType::Grayscale && info.bit_depth == png::BitDepth::Eight
    });
    if is_png_l8 && gray.dimensions() == (width, height) {
        return Ok(bytes);
    }
    if gray.dimensions() != (width, height) {
        let (w0, h0) = gray.dimensions();
        // Only a capped image may change size; a mask of another shape is an input error.
        if (w0 as u64 * height as u64).abs_diff(h0 as u64 * width as u64) > (w0.max(h0) as u64) * 2 {
            return Err(bad_mask(&format!("is {w0}x{h0}, the image {width}x{height}")));
        }
        gray = image::imageops::resize(&gray, width, height, image::imageops::FilterType::Nearest);
    }
    let mut out = vec![];
    gray.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| bad_mask(&format!("cannot encode as PNG: {e}")))?;
    Ok(out)
}

/// What a resume must find unchanged: every input of the shuffled plan, in order.
fn plan_digest(items: &[crate::input::Item]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for it in items {
        let line = format!("{}\0{}\0{:?}\0{:?}\n", it.rel, it.key, it.class, it.mask);
        h.update(line.as_bytes());
    }
    hex::encode(h.finalize())
}

pub fn pack(opts: &PackOptions) -> Result<(Index, Summary)> {
    opts.validate()?;
    let plan = plan(&opts.input, &opts.layout)?;
    let path_str = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let record = PackRecord {
        tool: format!("shard {}", env!("CARGO_PKG_VERSION")),
        layout: plan.layout.to_string(),
        input: opts.input.display().to_string(),
        list: path_str(&opts.layout.list).or(path_str(&opts.layout.val_labels)),
        masks: path_str(&opts.layout.masks),
        class_names: path_str(&plan.names_file),
        seed: opts.seed,
        prefix: opts.prefix.clone(),
        shard_bytes: opts.shard_bytes,
        per_shard: opts.per_shard,
        quality: opts.quality,
        max_side: opts.max_side,
        zstd_level: opts.zstd_level,
        follow_links_out: opts.layout.follow_links_out,
        extra: serde_json::Value::Null,
    };
    let mut items = plan.items;
    items.shuffle(&mut common::seed::rng(opts.seed, common::seed::Purpose::ShardShuffle, &[]));
    let digest = plan_digest(&items);
    let (mut set, start) = ShardSet::open(&opts.out, record, items.len(), digest, opts.resume, opts.force)?;
    if let Some(url) = &opts.upload_to {
        let store = crate::remote::RemoteSet::shared(url)?;
        // The shards about to be uploaded may replace an older set's: its index goes first.
        store.remove_index()?;
        set.upload = Some(store);
    }
    if start == 0 && !plan.skipped.is_empty() {
        // One line each up to a few, then a count: a folder of links can hold millions.
        for (rel, reason) in plan.skipped.iter().take(if opts.quiet { 0 } else { 5 }) {
            eprintln!("skipped {}: {reason}", opts.input.join(rel).display());
        }
        eprintln!(
            "{} inputs skipped before reading (listed in index.json with their reasons)",
            plan.skipped.len()
        );
        set.skipped.extend(plan.skipped.into_iter().map(|(path, reason)| Skipped { path, reason }));
    }
    if start > 0 {
        eprintln!("resuming at image {start} of {} after {} finished shards", items.len(), set.shards.len());
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(opts.workers).build().map_err(|e| {
        Error::InvalidOption {
            option: "--workers",
            problem: format!("cannot start {} threads: {e}", opts.workers),
        }
    })?;
    let clean_opts = CleanOptions { quality: opts.quality, max_side: opts.max_side };
    let masks = opts.layout.masks.as_deref();
    let confine = match opts.layout.follow_links_out {
        true => None,
        false => Some(
            std::fs::canonicalize(&opts.input).map_err(|e| Error::io(&opts.input, "cannot resolve", e))?,
        ),
    };
    let mut progress = Progress::new("pack", (items.len() - start) as u64, opts.quiet);
    let chunk = 64 * opts.workers;
    let mut pos = start;
    let mut written = 0u64;
    for batch in items[start..].chunks(chunk) {
        let results: Vec<Processed> = pool.install(|| {
            batch
                .par_iter()
                .map(|it| process(it, &opts.input, confine.as_deref(), masks, &plan.classes, &clean_opts))
                .collect()
        });
        let mut bytes = 0;
        for (item, result) in batch.iter().zip(results) {
            match result {
                Ok(members) => {
                    let refs: Vec<(&str, &[u8])> = members.iter().map(|(e, d)| (*e, d.as_slice())).collect();
                    bytes += refs.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
                    set.append(pos, &item.key, &refs)?;
                    written += 1;
                }
                Err(Error::Image { path, problem }) if opts.strict => {
                    return Err(Error::Image { path, problem: format!("{problem} (--strict)") });
                }
                // The record holds the input's path already: its reason is the problem alone.
                Err(Error::Image { problem, .. }) => {
                    eprintln!("skipped {}: {problem}", opts.input.join(&item.rel).display());
                    set.skipped.push(Skipped { path: item.rel.clone(), reason: problem });
                }
                Err(e) => return Err(e),
            }
            pos += 1;
        }
        progress.inc(batch.len() as u64, bytes);
    }
    if set.is_empty() {
        // Every input was skipped: an empty set would only fail later, in the loader, far from the cause.
        let (skipped, replaced) = (std::mem::take(&mut set.skipped), set.replaced);
        set.discard()?;
        return Err(no_readable_image(&opts.input, &skipped, replaced));
    }
    let mut members = vec!["jpg".to_string()];
    if !plan.classes.is_empty() {
        members.push("cls".into());
    }
    members.push("json".into());
    if masks.is_some() {
        members.push("seg.png".into());
    }
    let index = set.finish(plan.classes, members)?;
    let elapsed = progress.finish();
    let summary = Summary {
        samples: written,
        skipped: index.skipped.len(),
        shards: index.shards.len(),
        bytes: index.total_bytes,
        elapsed,
    };
    Ok((index, summary))
}
