//! Checkpoints: one safetensors file per save holding the student, the teacher, AdamW's moments, both
//! centers, and (as string metadata) the step, the loader cursor, the per-tensor AdamW step counts and the
//! resolved config. That is the whole state: every random draw derives from (seed, step), so no RNG state
//! needs saving.
//!
//! Crash safety: a checkpoint is written to `*.partial`, flushed to disk, then renamed; a reader never
//! sees a half-written file under the final name, and `latest` skips anything that does not parse. The
//! last `keep` checkpoints stay.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::{Tensor, TensorData};
use common::Cursor;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::model::params::{self, host};
use crate::train::config::{RunConfig, TrainConfig};
use crate::train::optim::AdamState;
use crate::train::step::Trainer;

const FORMAT: &str = "densedino-checkpoint/1";

/// What a checkpoint knows besides the tensors.
#[derive(Clone, Debug)]
pub struct Meta {
    /// Steps done (the next global iteration).
    pub it: usize,
    /// Where the loader resumes.
    pub cursor: Cursor,
    pub config: TrainConfig,
}

pub fn file_name(it: usize) -> String {
    format!("ckpt-{it:08}.safetensors")
}

/// Test hook: the save of step `it` into `dir` stops after half its bytes, as a crash or a full disk
/// would (`tests/run.rs` resumes from such a failure). Keyed by the folder, so that tests running in
/// parallel never see another's failure; each injected failure fires once.
#[doc(hidden)]
pub fn inject_failure(dir: &Path, it: usize) {
    INJECTED.lock().unwrap_or_else(|e| e.into_inner()).push((dir.to_path_buf(), it));
}

static INJECTED: std::sync::Mutex<Vec<(PathBuf, usize)>> = std::sync::Mutex::new(Vec::new());

/// Whether a failure was injected for this save (and takes it).
fn injected(dir: &Path, it: usize) -> bool {
    let mut all = INJECTED.lock().unwrap_or_else(|e| e.into_inner());
    let at = all.iter().position(|(d, i)| *i == it && d == dir);
    at.map(|at| all.remove(at)).is_some()
}

/// Writes the trainer's state after `it` steps into `dir`, atomically, and prunes to the last `keep`.
pub fn save(dir: &Path, trainer: &mut Trainer, meta: &Meta, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (prefix, model) in [("student.", &mut trainer.student), ("teacher.", &mut trainer.teacher)] {
        tensors.extend(params::to_host(model).into_iter().map(|(n, d, v)| (format!("{prefix}{n}"), d, v)));
    }
    let mut steps = BTreeMap::new();
    for (name, st) in &trainer.optim.state {
        let n = st.m.dims()[0];
        tensors.push((format!("optim.m.{name}"), vec![n], host(st.m.clone())));
        tensors.push((format!("optim.v.{name}"), vec![n], host(st.v.clone())));
        steps.insert(name.clone(), st.step);
    }
    let (c, rc) = trainer.loss.centers_to_host();
    tensors.push(("loss.center".into(), vec![1, c.len()], c));
    tensors.push(("loss.ref_center".into(), vec![1, rc.len()], rc));

    let info = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("it".to_string(), meta.it.to_string()),
        ("cursor".to_string(), serde_json::to_string(&meta.cursor)?),
        ("optim_steps".to_string(), serde_json::to_string(&steps)?),
        ("config".to_string(), meta.config.to_toml()),
    ]);
    let data = serialize(&tensors, info)?;

    let path = dir.join(file_name(meta.it));
    let partial = path.with_extension("safetensors.partial");
    let mut f = std::fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
    if injected(dir, meta.it) {
        f.write_all(&data[..data.len() / 2])?;
        bail!("injected failure: stopped half way through writing {}", partial.display());
    }
    f.write_all(&data).with_context(|| format!("writing {}", partial.display()))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&partial, &path).with_context(|| format!("renaming {} into place", partial.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all(); // the rename itself durable where the platform allows
    }
    for old in list(dir).into_iter().rev().skip(keep.max(1)) {
        let _ = std::fs::remove_file(old.1);
    }
    Ok(path)
}

/// When a run saves: every `run.checkpoint_every` steps, at each epoch end and at the run's last step,
/// keeping the newest `run.keep_checkpoints`. It remembers the run's last good checkpoint.
pub struct Policy {
    dir: PathBuf,
    every: usize,
    keep: usize,
    /// The run's last good checkpoint and the step it holds: the last one written, or the one a resumed
    /// run started from until it writes another.
    pub last: Option<(usize, PathBuf)>,
}

impl Policy {
    pub fn new(dir: PathBuf, run: &RunConfig) -> Self {
        Self { dir, every: run.checkpoint_every, keep: run.keep_checkpoints, last: None }
    }

    /// Whether the state after step `it` (of `total`) is saved.
    pub fn due(&self, it: usize, epoch_end: bool, total: usize) -> bool {
        epoch_end || it == total || (self.every > 0 && it.is_multiple_of(self.every))
    }

    pub fn save(&mut self, trainer: &mut Trainer, meta: &Meta) -> Result<()> {
        let path = save(&self.dir, trainer, meta, self.keep)?;
        self.last = Some((meta.it, path));
        Ok(())
    }

    /// The run's last good checkpoint, for messages.
    pub fn describe_last(&self) -> String {
        self.last.as_ref().map_or("none yet".into(), |(_, p)| p.display().to_string())
    }
}

/// Named f32 tensors (name, shape, values) as safetensors bytes with string metadata.
pub fn serialize(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, dims, _), b)| Ok((name.clone(), TensorView::new(Dtype::F32, dims.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, Some(metadata))?)
}

/// Complete checkpoints in `dir`, oldest first, by step.
pub fn list(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let it = name.strip_prefix("ckpt-")?.strip_suffix(".safetensors")?.parse().ok()?;
            Some((it, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest checkpoint that loads, from a run folder, its `checkpoints/` folder, or a file.
pub fn latest(path: &Path) -> Result<(PathBuf, Vec<u8>)> {
    if path.is_file() {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: not a checkpoint: {e}", path.display()))?;
        return Ok((path.to_path_buf(), bytes));
    }
    let dir = if path.join("checkpoints").is_dir() { path.join("checkpoints") } else { path.to_path_buf() };
    for (_, p) in list(&dir).into_iter().rev() {
        match std::fs::read(&p) {
            Ok(bytes) if SafeTensors::deserialize(&bytes).is_ok() => return Ok((p, bytes)),
            _ => eprintln!("warning: {}: unreadable checkpoint, trying an older one", p.display()),
        }
    }
    bail!("{}: no checkpoint found", dir.display())
}

/// Reads the metadata of checkpoint bytes.
pub fn meta(bytes: &[u8]) -> Result<Meta> {
    let (_, header) = SafeTensors::read_metadata(bytes)?;
    let info = header.metadata().clone().ok_or_else(|| anyhow!("checkpoint has no metadata"))?;
    let get = |k: &str| info.get(k).cloned().ok_or_else(|| anyhow!("checkpoint metadata lacks {k}"));
    if get("format")? != FORMAT {
        bail!("unknown checkpoint format {:?} (expected {FORMAT})", get("format")?);
    }
    Ok(Meta {
        it: get("it")?.parse()?,
        cursor: serde_json::from_str(&get("cursor")?)?,
        config: TrainConfig::from_resolved(&get("config")?)?,
    })
}

/// All tensors of checkpoint bytes by name: (shape, values).
pub fn tensors(bytes: &[u8]) -> Result<params::Named> {
    let st = SafeTensors::deserialize(bytes)?;
    let mut map = params::Named::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!("{name}: dtype {:?}, expected F32", view.dtype());
        }
        let values =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        map.insert(name, (view.shape().to_vec(), values));
    }
    Ok(map)
}

/// Restores a trainer built from the checkpoint's own config.
pub fn restore(trainer: &mut Trainer, bytes: &[u8]) -> Result<Meta> {
    let meta = meta(bytes)?;
    let map = tensors(bytes)?;
    let get = |name: &str| map.get(name).cloned();
    let device = trainer.device.clone();
    params::load(&mut trainer.student, "student.", &get, &device.clone().autodiff(), false)?;
    params::load(&mut trainer.teacher, "teacher.", &get, &device, false)?;
    let (_, header) = SafeTensors::read_metadata(bytes)?;
    let steps: BTreeMap<String, u64> = serde_json::from_str(
        header.metadata().as_ref().and_then(|m| m.get("optim_steps")).map_or("{}", |s| s.as_str()),
    )?;
    trainer.optim.state.clear();
    let vec1 = |name: &str| -> Result<Tensor<1>> {
        let (_, v) = map.get(name).ok_or_else(|| anyhow!("checkpoint lacks {name}"))?;
        Ok(Tensor::from_data(TensorData::new(v.clone(), [v.len()]), &device))
    };
    for (name, step) in steps {
        let st =
            AdamState { m: vec1(&format!("optim.m.{name}"))?, v: vec1(&format!("optim.v.{name}"))?, step };
        trainer.optim.state.insert(name, st);
    }
    let center = map.get("loss.center").ok_or_else(|| anyhow!("checkpoint lacks loss.center"))?.1.clone();
    let ref_center =
        map.get("loss.ref_center").ok_or_else(|| anyhow!("checkpoint lacks loss.ref_center"))?.1.clone();
    trainer.loss.set_centers(center, ref_center, &device);
    trainer.it = meta.it;
    Ok(meta)
}
