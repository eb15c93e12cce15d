//! TensorBoard's event files in the run folder, written as the run goes, so that `tensorboard --logdir
//! runs` shows every run side by side. `metrics.jsonl` stays the source of truth: each of its records
//! becomes one event holding every number of the record (a step's as `train/<key>` at its step, an
//! epoch's as `epoch/<key>` at the epoch's last step), so a metric added to the record reaches TensorBoard
//! without a second list to keep in step.
//!
//! The format (TensorFlow's `event.proto`, `summary.proto`, `record_writer.cc`): a file
//! `events.out.tfevents.<seconds>.<host>.<pid>.densedino` of TFRecord frames (u64 length, masked CRC-32C
//! of the length, the bytes, masked CRC-32C of the bytes), each holding one `Event` protobuf: first the
//! file version `brain.Event:2`, then the scalars (`Summary.Value.simple_value`, f32).
//!
//! Resume: one file per process (rank 0 of a data-parallel job). Every training process starts its file
//! with a `SessionLog` START at its first step, and TensorBoard's Python loader (its event accumulator
//! purges orphaned data by default) then drops what the earlier files hold at or after that step: the
//! steps a killed process ran past its checkpoint, which `metrics.jsonl` drops too, appear once. This is
//! what PyTorch's `SummaryWriter(purge_step=...)` writes; at step 0 it also clears a run started over.
//! TensorBoard's Rust data server (its default loader on Linux x86-64) ignores the marker and drops a
//! series' points from a step that arrives again, which the resumed steps do: checked on a killed run, it
//! serves each step once too. TensorBoard reads a folder's files in name order, and a START must come
//! after the events it drops, so a new file's seconds are bumped past any existing one's.
//!
//! A crash mid-write leaves a cut last frame, which readers see by its length and CRC and stop before.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

use crate::run::metrics::Record;

/// The file name's fixed part; TensorBoard finds event files by it.
const PREFIX: &str = "events.out.tfevents.";

/// One process's event file.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `run_dir`. `purge_from`: the first step this process runs (a training process;
    /// TensorBoard then drops the earlier files' events from that step on); `None` for a file that only
    /// adds to the run (the k-NN at its end).
    pub fn create(run_dir: &Path, purge_from: Option<usize>) -> Result<Self> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let latest = files(run_dir)
            .iter()
            .filter_map(|p| {
                p.file_name()?.to_str()?.strip_prefix(PREFIX)?.split('.').next()?.parse::<u64>().ok()
            })
            .max();
        let seconds = latest.map_or(now.as_secs(), |t| now.as_secs().max(t + 1));
        let path =
            run_dir.join(format!("{PREFIX}{seconds:010}.{}.{}.densedino", hostname(), std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self { file, path };
        w.event(0, What::FileVersion("brain.Event:2".into()))?;
        if let Some(step) = purge_from {
            w.event(step, What::SessionLog(SessionLog { status: SessionLog::START }))?;
        }
        Ok(w)
    }

    /// Every number of a `metrics.jsonl` record, as one event at the record's step.
    pub fn record(&mut self, r: &Record) -> Result<()> {
        let (step, group, position): (usize, &str, [&str; 2]) = match r {
            Record::Step { m, .. } => (m.it, "train", ["it", "epoch"]),
            // At the epoch's last step (`steps` counts the steps up to its end): an epoch ending at a
            // checkpoint from which a run resumes stays below the resumed step, as its line in
            // metrics.jsonl is kept.
            Record::Epoch { steps, .. } => (steps.saturating_sub(1), "epoch", ["epoch", "steps"]),
        };
        let serde_json::Value::Object(fields) = serde_json::to_value(r)? else {
            anyhow::bail!("a metrics record serialises to a JSON object");
        };
        // The record's numbers; a part the run does not have (null) is left out, as is the tag `kind`.
        let scalars: Vec<(String, f64)> = fields
            .iter()
            .filter(|(k, _)| !position.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((format!("{group}/{k}"), v.as_f64()?)))
            .collect();
        self.scalars(step, &scalars)
    }

    /// Named numbers at `step`, as one event (TensorBoard keeps them as f32).
    pub fn scalars(&mut self, step: usize, values: &[(String, f64)]) -> Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| Value { tag: tag.clone(), value: Some(ValueKind::SimpleValue(*v as f32)) })
            .collect();
        self.event(step, What::Summary(Summary { value }))
    }

    fn event(&mut self, step: usize, what: What) -> Result<()> {
        let wall_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let event = Event { wall_time, step: step as i64, what: Some(what) };
        // One write per frame: a crash leaves at most the last frame cut, never two half frames.
        self.file
            .write_all(&frame(&event.encode_to_vec()))
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// For a run from before event files (none in its folder): one written from its `metrics.jsonl`, so that
/// it shows in TensorBoard beside newer runs. Returns the file, or `None` where the run has event files.
pub fn from_history(run_dir: &Path) -> Result<Option<PathBuf>> {
    if !files(run_dir).is_empty() {
        return Ok(None);
    }
    let records = crate::run::metrics::read(&run_dir.join("metrics.jsonl"))?;
    let mut w = EventWriter::create(run_dir, Some(0))?;
    for r in &records {
        w.record(r)?;
    }
    Ok(Some(w.path))
}

/// The event files in `dir`.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(PREFIX)))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// A TFRecord frame around `data`.
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's CRC-32C, rotated and offset (a CRC of bytes that themselves hold CRCs is weak otherwise).
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// This machine's name for the file name (as TensorFlow's writers put it there), reduced to characters
/// that are safe in a file name.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name: String = buf[..if ok { end } else { 0 }]
        .iter()
        .map(|&b| if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' { b as char } else { '_' })
        .collect();
    if name.is_empty() { "localhost".into() } else { name }
}

// The three messages we write, with TensorFlow's field numbers (tensorflow/core/util/event.proto,
// tensorflow/core/framework/summary.proto); fields we never write are left out.

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    /// In a oneof, as in TensorFlow's proto: a plain proto3 float would leave 0.0 out of the bytes, and
    /// TensorBoard would then see a value of no kind, not a scalar of 0.
    #[prost(oneof = "ValueKind", tags = "2")]
    value: Option<ValueKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
}

#[derive(Clone, PartialEq, Message)]
struct SessionLog {
    #[prost(int32, tag = "1")]
    status: i32,
}

impl SessionLog {
    /// `SessionLog.SessionStatus.START`.
    const START: i32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes TensorBoard's own protobuf classes (`tensorboard.compat.proto.event_pb2`, 2.21.0) give
    /// for the same three events, and its `masked_crc32c` of b"123456789".
    #[test]
    fn events_and_frames_are_the_bytes_tensorboard_writes() {
        let bytes = |step, what| Event { wall_time: 1.5, step, what: Some(what) }.encode_to_vec();
        let hex = |b: Vec<u8>| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let summary = Summary {
            value: vec![Value { tag: "train/loss".into(), value: Some(ValueKind::SimpleValue(0.0)) }],
        };
        assert_eq!(
            hex(bytes(7, What::Summary(summary))),
            "09000000000000f83f10072a130a110a0a747261696e2f6c6f73731500000000"
        );
        let start = What::SessionLog(SessionLog { status: SessionLog::START });
        assert_eq!(hex(bytes(3, start)), "09000000000000f83f10033a020801");
        let version = What::FileVersion("brain.Event:2".into());
        assert_eq!(hex(bytes(0, version)), "09000000000000f83f1a0d627261696e2e4576656e743a32");
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc(&5u64.to_le_bytes()), 0x3e04_b2ea);
        let f = frame(b"hello");
        assert_eq!((f.len(), &f[..8], &f[12..17]), (21, &5u64.to_le_bytes()[..], &b"hello"[..]));
        assert_eq!(f[8..12], 0x3e04_b2eau32.to_le_bytes());
    }

    #[test]
    fn files_sort_in_creation_order_and_a_records_numbers_are_its_scalars() {
        let dir = tempfile::tempdir().unwrap();
        // A file from "the future" (a clock set back, or two starts in one second): the next sorts after it.
        let earlier = dir.path().join(format!("{PREFIX}9000000000.host.99999.densedino"));
        std::fs::write(&earlier, b"").unwrap();
        let mut w = EventWriter::create(dir.path(), Some(4)).unwrap();
        let name = w.path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with(&format!("{PREFIX}9000000001.")), "{name}");
        assert_eq!(files(dir.path()), [earlier, w.path.clone()], "name order is creation order");
        let epoch = Record::Epoch {
            epoch: 1,
            steps: 10,
            loss: 2.5,
            cls_loss: Some(1.0),
            ref_loss: None,
            images_per_s: 30.0,
            data_wait_fraction: 0.0,
        };
        w.record(&epoch).unwrap();
        let bytes = std::fs::read(&w.path).unwrap();
        // version, START at 4, the epoch's scalars: three frames, each its length plus 16.
        let mut frames = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            frames.push(Event::decode(&bytes[at + 12..at + 12 + len]).unwrap());
            at += len + 16;
        }
        assert_eq!(at, bytes.len());
        assert_eq!(frames.len(), 3);
        assert_eq!((frames[1].step, &frames[1].what), (4, &Some(What::SessionLog(SessionLog { status: 1 }))));
        let Some(What::Summary(s)) = &frames[2].what else { panic!("{:?}", frames[2]) };
        let got: Vec<(&str, f32)> = s
            .value
            .iter()
            .map(|v| match v.value {
                Some(ValueKind::SimpleValue(x)) => (v.tag.as_str(), x),
                None => panic!("{v:?}"),
            })
            .collect();
        assert_eq!(frames[2].step, 9, "the epoch's last step");
        assert_eq!(
            got,
            [
                ("epoch/cls_loss", 1.0),
                ("epoch/data_wait_fraction", 0.0),
                ("epoch/images_per_s", 30.0),
                ("epoch/loss", 2.5)
            ],
            "every number but the position; no ref_loss (absent), no kind"
        );
    }
}
