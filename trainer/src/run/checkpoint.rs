//! Checkpoints: one safetensors file per save holding the student, the teacher, AdamW's moments, both
//! centers, and (as string metadata) the step, the loader cursor, the per-tensor AdamW step counts, fp16's
//! loss-scaler state and the resolved config. That is the whole state: every random draw derives from
//! (seed, step), so no RNG state needs saving.
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

use crate::model::DenseDino;
use crate::model::params::{self, host};
use crate::parallel::World;
use crate::recipe::config::{RunConfig, TrainConfig};
use crate::recipe::optim::AdamState;
use crate::recipe::scaler::GradScaler;
use crate::recipe::step::Trainer;
use crate::run::data::DataIdentity;

const FORMAT: &str = "densedino-checkpoint/1";

/// What a checkpoint knows besides the tensors.
#[derive(Clone, Debug)]
pub struct Meta {
    /// Steps done (the next global iteration).
    pub it: usize,
    /// Where the loader resumes.
    pub cursor: Cursor,
    pub config: TrainConfig,
    /// The processes of the job that wrote it: the loader's cursor counts one rank's samples, so the run
    /// continues only with as many (checkpoints before data parallelism hold none: one).
    pub world_size: usize,
    /// The data set the run trained on (checkpoints before this was recorded hold none).
    pub data: Option<DataIdentity>,
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

    let mut info = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("it".to_string(), meta.it.to_string()),
        ("cursor".to_string(), serde_json::to_string(&meta.cursor)?),
        ("optim_steps".to_string(), serde_json::to_string(&steps)?),
        ("config".to_string(), meta.config.to_toml()),
        ("world_size".to_string(), meta.world_size.to_string()),
    ]);
    if let Some(data) = &meta.data {
        info.insert("data".to_string(), serde_json::to_string(data)?);
    }
    if let Some(scaler) = &trainer.scaler {
        info.insert("grad_scaler".to_string(), serde_json::to_string(scaler)?);
    }
    let le: Vec<std::borrow::Cow<[u8]>> = tensors.iter().map(|(_, _, v)| le_bytes(v)).collect();
    let sum = digest(tensors.iter().zip(&le).map(|((n, d, _), b)| (n.as_str(), d.as_slice(), &b[..])), &info);
    drop(le);
    info.insert("digest".to_string(), sum);
    let data = serialize(&tensors, info)?;

    let path = dir.join(file_name(meta.it));
    let partial = path.with_extension("safetensors.partial");
    check_free_space(dir, data.len() as u64)?;
    // A write that fails (a full disk, a test's injected failure) removes its `.partial`: left behind, it
    // would hold the space the next attempt needs.
    let written = write_partial(dir, &partial, &data, meta.it).and_then(|()| {
        std::fs::rename(&partial, &path).with_context(|| format!("renaming {} into place", partial.display()))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all(); // the rename itself durable where the platform allows
    }
    prune(dir, keep);
    Ok(path)
}

/// Keeps the newest `keep` checkpoints in `dir` (at least one). A save prunes; so does the end of a run,
/// which may have saved nothing (resumed at its last step after a crash that came between a save and
/// its pruning).
pub fn prune(dir: &Path, keep: usize) {
    for old in list(dir).into_iter().rev().skip(keep.max(1)) {
        let _ = std::fs::remove_file(old.1);
    }
}

/// Writes `data` to `partial` and flushes it to disk.
fn write_partial(dir: &Path, partial: &Path, data: &[u8], it: usize) -> Result<()> {
    let mut f = std::fs::File::create(partial).with_context(|| format!("creating {}", partial.display()))?;
    if injected(dir, it) {
        f.write_all(&data[..data.len() / 2])?;
        bail!("injected failure: stopped half way through writing {}", partial.display());
    }
    f.write_all(data).with_context(|| format!("writing {}", partial.display()))?;
    f.sync_all().with_context(|| format!("flushing {}", partial.display()))
}

/// Refuses a write of `needed` bytes into `dir` that the file system has no room for, saying how much is
/// needed and free (a full disk would otherwise fail half way through).
pub fn check_free_space(dir: &Path, needed: u64) -> Result<()> {
    let free = free_space(dir).with_context(|| format!("checking the free space in {}", dir.display()))?;
    if free < needed {
        bail!(
            "{}: a checkpoint needs {:.1} MB, and only {:.1} MB are free: make room (or lower \
             run.keep_checkpoints) and resume from the last checkpoint",
            dir.display(),
            needed as f64 / 1e6,
            free as f64 / 1e6
        );
    }
    Ok(())
}

/// Bytes available to this user on the file system holding `dir`.
#[cfg(unix)]
fn free_space(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs struct for the kernel to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(not(unix))]
fn free_space(_dir: &Path) -> std::io::Result<u64> {
    Ok(u64::MAX) // no check where statvfs is missing
}

/// Removes the `.partial` files a crashed process left in `dir` (a finished write renames its own);
/// returns what it removed.
pub fn sweep_partials(dir: &Path) -> Vec<PathBuf> {
    let partials: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".partial"))
        .collect();
    partials.into_iter().filter(|p| std::fs::remove_file(p).is_ok()).collect()
}

/// `sha256:<hex>` over every tensor, by name (its name, shape and little-endian f32 bytes, as stored), and
/// over the metadata but the digest itself (the step, the cursor and the config steer a resume as much as
/// the tensors do).
pub(crate) fn digest<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a [usize], &'a [u8])>,
    metadata: &HashMap<String, String>,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    let mut sorted: Vec<_> = tensors.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (name, dims, bytes) in sorted {
        field(name.as_bytes());
        let dims: Vec<u8> = dims.iter().flat_map(|d| (*d as u64).to_le_bytes()).collect();
        field(&dims);
        field(bytes);
    }
    let mut meta: Vec<_> = metadata.iter().filter(|(k, _)| *k != "digest").collect();
    meta.sort();
    for (k, v) in meta {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// The little-endian bytes of `v`, as safetensors stores them (borrowed where that is the memory order).
pub(crate) fn le_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: f32 has no padding and any byte is a valid u8; the length is the slice's size in bytes.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v))
        })
    } else {
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// The checkpoints' digest over a teacher's parameters (names, shapes, f32 bits): what the ranks of a
/// data-parallel run compare to see that they hold one teacher.
pub fn teacher_digest(teacher: &mut DenseDino) -> Vec<u8> {
    let tensors = params::to_host(teacher);
    let bytes: Vec<_> = tensors.iter().map(|(_, _, v)| le_bytes(v)).collect();
    let named = tensors.iter().zip(&bytes).map(|((n, d, _), b)| (n.as_str(), d.as_slice(), &b[..]));
    digest(named, &Default::default()).into_bytes()
}

/// What identifies a checkpoint's contents: the digest it carries, or (for one written before digests) the
/// SHA-256 of its bytes.
pub fn identity(bytes: &[u8]) -> String {
    let stored = SafeTensors::read_metadata(bytes)
        .ok()
        .and_then(|(_, h)| h.metadata().as_ref().and_then(|m| m.get("digest")).cloned());
    stored.unwrap_or_else(|| {
        use sha2::{Digest, Sha256};
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    })
}

/// Checks checkpoint bytes against the digest they carry: flipped bits anywhere in a tensor or in the
/// metadata are caught.
/// (Checkpoints written before the digest existed carry none and pass.)
pub fn verify(bytes: &[u8]) -> Result<()> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow!("not a checkpoint: {e}"))?;
    let (_, header) = SafeTensors::read_metadata(bytes)?;
    let Some(want) = header.metadata().as_ref().and_then(|m| m.get("digest")).cloned() else {
        return Ok(());
    };
    let views = st.tensors();
    let metadata = header.metadata().clone().unwrap_or_default();
    let got = digest(views.iter().map(|(n, v)| (n.as_str(), v.shape(), v.data())), &metadata);
    if got != want {
        bail!(
            "its tensors and metadata do not match their digest (stored {want}, computed {got}): the file is \
             damaged"
        );
    }
    Ok(())
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
    /// False on the ranks other than 0 of a data-parallel run: they hold the same state, rank 0 saves it.
    writes: bool,
    /// The run's data set, recorded in every checkpoint it writes.
    data: DataIdentity,
}

impl Policy {
    /// The checkpoints of a run into `dir`, as `run` asks, written by rank 0 of `world` only, recording
    /// the run's `data` set. `resumed_from`: the checkpoint a resumed run started from, and its step.
    pub fn new(
        dir: PathBuf,
        run: &RunConfig,
        world: &World,
        resumed_from: Option<(usize, PathBuf)>,
        data: DataIdentity,
    ) -> Self {
        Self {
            dir,
            every: run.checkpoint_every,
            keep: run.keep_checkpoints,
            last: resumed_from,
            writes: world.rank == 0,
            data,
        }
    }

    /// The run's `checkpoints/` folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the state after step `it` (of `total`) is saved.
    pub fn due(&self, it: usize, epoch_end: bool, total: usize) -> bool {
        epoch_end || it == total || (self.every > 0 && it.is_multiple_of(self.every))
    }

    /// Saves the trainer's state after its last step, with the loader at `cursor`, under `config`; the
    /// step, the job's size and the data set are the trainer's and this policy's.
    pub fn save(&mut self, trainer: &mut Trainer, cursor: Cursor, config: &TrainConfig) -> Result<()> {
        let meta = &Meta {
            it: trainer.it,
            cursor,
            config: config.clone(),
            world_size: trainer.world.size,
            data: Some(self.data.clone()),
        };
        let path = match self.writes {
            true => save(&self.dir, trainer, meta, self.keep)?,
            false => self.dir.join(file_name(meta.it)),
        };
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
        verify(&bytes).with_context(|| path.display().to_string())?;
        return Ok((path.to_path_buf(), bytes));
    }
    let dir = if path.join("checkpoints").is_dir() { path.join("checkpoints") } else { path.to_path_buf() };
    for (_, p) in list(&dir).into_iter().rev() {
        let checked = std::fs::read(&p).map_err(anyhow::Error::from).and_then(|b| verify(&b).map(|()| b));
        match checked {
            Ok(bytes) => return Ok((p, bytes)),
            Err(e) => eprintln!("warning: {}: {e:#}; trying an older checkpoint", p.display()),
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
        world_size: info.get("world_size").map_or(Ok(1), |w| w.parse())?,
        data: info.get("data").map(|d| serde_json::from_str(d)).transpose()?,
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
    // fp16: the scale and its tracker go on where they were (the constants are the run's, which may have
    // changed on resume). A checkpoint of an f32 or bf16 run resumed in fp16 starts a fresh scaler.
    let stored = header.metadata().as_ref().and_then(|m| m.get("grad_scaler").cloned());
    if let (Some(scaler), Some(stored)) = (trainer.scaler.as_mut(), stored) {
        let stored: GradScaler =
            serde_json::from_str(&stored).context("reading the checkpoint's grad_scaler state")?;
        *scaler = GradScaler { cfg: scaler.cfg.clone(), ..stored };
    }
    trainer.it = meta.it;
    Ok(meta)
}
