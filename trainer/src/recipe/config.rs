//! The one configuration object of a run, read from TOML with presets and `--set key=value` overrides.
//!
//! Resolution order: built-in defaults, then the file, then each `--set` in order. Two keys pick presets
//! that the rest of their table refines: `views.preset` (`paper-main`, `readme-ablation`, `dino`) and
//! `model.arch` (`vit_tiny`, `vit_small`, `vit_base`). Every struct rejects unknown keys, so a typo is an
//! error naming it rather than a silently ignored setting. The fully resolved config is written next to
//! the run and into every checkpoint, so a resume never depends on the file it started from.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::Device;
use common::config::ViewsConfig;
use serde::{Deserialize, Serialize};

use crate::model::head::HeadConfig;
use crate::model::vit::{Precision, VitConfig};
use crate::recipe::loss::LossConfig;
use crate::recipe::optim::OptimConfig;
use crate::recipe::scaler::GradScalerConfig;

/// The embedded default: the CPU demo (`cargo run --release -p trainer` with no arguments).
pub const DEFAULT_TOML: &str = include_str!("../../../configs/default.toml");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The run's folder is `out_dir/name`.
    pub name: String,
    pub out_dir: PathBuf,
    /// One seed for everything: data order and views, initialisation, stochastic depth.
    pub seed: u64,
    pub epochs: usize,
    /// Images per step and process (the official `batch_size_per_gpu`): the lr scaling rule's total batch
    /// is this times the job's processes.
    pub batch_size: usize,
    /// Stop after this many steps (0: run all epochs); the schedules still span `epochs`.
    pub max_steps: usize,
    /// `cpu` (burn's flex backend), `tch-cpu`, or `cuda:N` (LibTorch; the `tch` feature).
    pub device: DeviceSpec,
    /// `f32`, `bf16` or `fp16`: mixed precision as `torch.autocast` does it on CUDA (matmuls, convolutions
    /// and attention in bf16 or fp16; f32 master weights, optimiser state, LayerNorm, softmax, loss and
    /// centers). `fp16` is the official code's `--use_fp16` (its default), with a dynamic loss scale
    /// (`grad_scaler`); it is for GPUs without bf16 (V100, T4, RTX 20xx) and for comparisons with official
    /// fp16 runs. LibTorch devices only (`cuda:N` with tensor cores; on `tch-cpu` both are fast only with
    /// AVX-512 BF16/FP16 or AMX). Here under `run.*` beside the device, not in the recipe: it is how this
    /// machine computes the recipe, and like the device a resume may change it (a bf16 run continued in
    /// f32 on a CPU).
    #[serde(default)]
    pub precision: Precision,
    /// fp16's loss scale (PyTorch's `GradScaler`; its defaults are the official code's).
    #[serde(default)]
    pub grad_scaler: GradScalerConfig,
    /// Checkpoint every N steps (0: only at epoch ends), keeping the last `keep_checkpoints`.
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    /// The stats line every N steps.
    pub log_every: usize,
    /// Data-parallel runs: every N steps the ranks compare a digest of their teachers and stop with an
    /// error naming the ranks that diverged (0: never). The EMA teacher is what the run delivers, and the
    /// ranks' copies can only part through a nondeterministic kernel or a bug; hashing costs a pass over
    /// the weights.
    #[serde(default)]
    pub check_ranks_every: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A shard directory (or its index.json) made by `shard`. Absent (or `""`): a synthetic set at
    /// `synth_dir`, made on first use with the `shard synth` generator.
    #[serde(default, deserialize_with = "path_or_empty", skip_serializing_if = "Option::is_none")]
    pub shards: Option<PathBuf>,
    pub synth_dir: PathBuf,
    /// shapes (scenes of shapes, the label the largest) or palettes (the label is the colour palette,
    /// under random brightness and contrast: the set where training visibly beats a random network).
    #[serde(default)]
    pub synth_kind: shard::synth::SynthKind,
    pub synth_count: usize,
    pub synth_size: u32,
    /// Shapes per synthetic scene (either kind): 1 to this many.
    #[serde(default = "three")]
    pub synth_shapes: usize,
    /// Decode workers (0: the available cores).
    pub workers: usize,
    /// Batches the loader may hold ready (the bounded channel).
    pub capacity: usize,
    /// Samples in the seeded shuffle buffer.
    pub shuffle_buffer: usize,
    /// Shards read interleaved.
    pub interleave: usize,
    /// Where the shards of a remote set (`shards = "s3://…"`, `gs://`, `az://`, `http(s)://`, `pipe:`;
    /// see `shard::remote`) are kept once read and verified, so that later epochs read them from disk.
    /// Absent: streamed from the store every epoch. Processes of one machine may share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// The most `cache_dir` may hold, e.g. "200G" (K, M, G, T: binary multiples); the least recently used
    /// shards are removed first. A limit below one epoch works: shards are fetched again when they come
    /// round. Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_limit: Option<String>,
}

impl DataConfig {
    /// The remote-set cache `cache_dir` and `cache_limit` describe, if any.
    pub fn cache(&self) -> Result<Option<shard::remote::Cache>> {
        let limit = match &self.cache_limit {
            Some(s) => shard::remote::parse_size(s).map_err(|e| anyhow::anyhow!("data.cache_limit: {e}"))?,
            None => u64::MAX,
        };
        if self.cache_limit.is_some() && self.cache_dir.is_none() {
            bail!("data.cache_limit is set without data.cache_dir: where should the cache go?");
        }
        Ok(self.cache_dir.clone().map(|dir| shard::remote::Cache { dir, limit }))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub run: RunConfig,
    pub data: DataConfig,
    pub views: ViewsConfig,
    pub model: VitConfig,
    pub head: HeadConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
}

fn three() -> usize {
    3
}

/// `""` as no path: configs written before `data.shards` was optional say "synthetic" that way.
fn path_or_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()).map(PathBuf::from))
}

/// The device a run computes on, as `run.device` and `--device` spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// `cpu` (or `flex`): burn's pure-Rust backend, no native library.
    Cpu,
    /// `tch-cpu`: LibTorch on the CPU (the `tch` feature).
    TchCpu,
    /// `cuda:N` (or `cuda` for device 0): LibTorch on a CUDA device (the `tch` feature).
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" | "flex" => Ok(DeviceSpec::Cpu),
            "tch-cpu" => Ok(DeviceSpec::TchCpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            // `cuda:N`, and `cudaN` as older configs wrote it.
            _ => match s.strip_prefix("cuda").map(|i| i.trim_start_matches(':').parse()) {
                Some(Ok(i)) => Ok(DeviceSpec::Cuda(i)),
                _ => bail!("unknown device {s:?} (cpu, tch-cpu or cuda:N)"),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::TchCpu => f.write_str("tch-cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    /// The burn device; the LibTorch ones need the `tch` feature.
    // burn 0.22 marks burn-tch deprecated in favour of CubeCL; LibTorch is the GPU path asked for, and
    // CubeCL's CUDA backend cannot be built offline (it downloads LLVM at build time).
    #[allow(deprecated)]
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::flex()),
            #[cfg(feature = "tch")]
            DeviceSpec::TchCpu => Ok(Device::libtorch()),
            #[cfg(feature = "tch")]
            DeviceSpec::Cuda(i) => Ok(Device::libtorch_cuda(i)),
            #[cfg(not(feature = "tch"))]
            other => bail!(
                "device {other} is not available in this build: `cpu` always; `tch-cpu` and `cuda:N` need the \
                 `tch` feature (cargo build --release -p trainer --features tch, see README)"
            ),
        }
    }
}

impl TrainConfig {
    /// Loads `path` (or the embedded default) and applies `--set` overrides.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Self> {
        let (text, origin) = match path {
            Some(p) => (
                common::files::read_text(p, common::files::MAX_TEXT_BYTES)
                    .with_context(|| format!("reading {}", p.display()))?,
                p.display().to_string(),
            ),
            None => (DEFAULT_TOML.to_string(), "the embedded default config".to_string()),
        };
        let user: toml::Table = toml::from_str(&text).with_context(|| format!("parsing {origin}"))?;
        Self::resolve(user, sets, &origin)
    }

    /// Parses a fully resolved config (as stored in a checkpoint); no presets, no defaults.
    pub fn from_resolved(text: &str) -> Result<Self> {
        let table: toml::Table = toml::from_str(text).context("parsing a resolved config")?;
        let mut cfg: Self = typed(table, &[], "a resolved config")?;
        // Runs stored before these values were validated took 0 as 1 where they were used; keep reading them.
        for v in [
            &mut cfg.run.keep_checkpoints,
            &mut cfg.run.log_every,
            &mut cfg.data.capacity,
            &mut cfg.data.interleave,
            &mut cfg.data.shuffle_buffer,
        ] {
            *v = (*v).max(1);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// A stored config with `--set run.KEY=VALUE` overrides (a resumed run may run longer, checkpoint
    /// differently or move to another device; anything else would change the run it continues).
    pub fn with_run_overrides(&self, sets: &[String]) -> Result<Self> {
        if let Some(bad) = sets.iter().find(|s| !set_key(s).starts_with("run.")) {
            bail!("--set {bad}: only run.* settings may change on resume (the rest is the stored run's)");
        }
        // These run.* keys shape every step (the data order, the batch, the schedules' length): changed on
        // resume, the steps after it would belong to another run than the ones before.
        let fixed = ["run.seed", "run.batch_size", "run.epochs"];
        if let Some(bad) = sets.iter().find(|s| fixed.contains(&set_key(s))) {
            bail!(
                "--set {bad}: {} cannot change on resume (they shape every step of the run); run.max_steps \
                 sets how far it goes, or start a new run",
                fixed.join(", ")
            );
        }
        let table = toml::Table::try_from(self)?;
        let mut over = toml::Table::new();
        apply_sets(&mut over, sets)?;
        let mut merged = table;
        merge(&mut merged, over);
        let cfg = typed(merged, sets, "the stored config")?;
        cfg.validate().context("with the --set overrides")?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config serialises")
    }

    fn resolve(mut user: toml::Table, sets: &[String], origin: &str) -> Result<Self> {
        // `--set model.arch=…` names a whole shape: the file's own sizes give way to it, or `--set
        // model.arch=vit_base` on a file that narrows its ViT would silently train the narrow one. The
        // file's other model keys (patch size, image size) still refine it, as do sizes also `--set`.
        let set_keys: Vec<&str> =
            sets.iter().filter_map(|s| s.split_once('=')).map(|(k, _)| k.trim()).collect();
        if set_keys.contains(&"model.arch")
            && let Some(model) = user.get_mut("model").and_then(|v| v.as_table_mut())
        {
            for size in ["embed_dim", "depth", "num_heads"] {
                if !set_keys.contains(&format!("model.{size}").as_str()) {
                    model.remove(size);
                }
            }
        }
        apply_sets(&mut user, sets)?;
        let mut base = toml::Table::try_from(Self::default_values())?;
        // Presets replace their whole table before the user's keys refine it.
        if let Some(views) = user.get_mut("views").and_then(|v| v.as_table_mut())
            && let Some(preset) = views.remove("preset")
        {
            let name =
                preset.as_str().ok_or_else(|| anyhow!("in {origin}: views.preset must be a string"))?;
            let preset = ViewsConfig::preset(name).with_context(|| format!("in {origin}"))?;
            base.insert("views".into(), toml::Value::try_from(preset)?);
        }
        if let Some(model) = user.get_mut("model").and_then(|v| v.as_table_mut())
            && let Some(arch) = model.remove("arch")
        {
            let name = arch.as_str().ok_or_else(|| anyhow!("in {origin}: model.arch must be a string"))?;
            let vit = VitConfig::arch(name).ok_or_else(|| {
                anyhow!("in {origin}: model.arch: unknown {name:?} (vit_tiny, vit_small, vit_base)")
            })?;
            base.insert("model".into(), toml::Value::try_from(vit)?);
        }
        merge(&mut base, user);
        let cfg = typed(base, sets, origin)?;
        let origin =
            if sets.is_empty() { origin.to_string() } else { format!("{origin} with the --set overrides") };
        cfg.validate().with_context(|| format!("in {origin}"))?;
        Ok(cfg)
    }

    fn default_values() -> Self {
        Self {
            run: RunConfig {
                name: "default".into(),
                out_dir: "runs".into(),
                seed: 0,
                epochs: 100,
                batch_size: 64,
                max_steps: 0,
                device: DeviceSpec::Cpu,
                precision: Precision::F32,
                grad_scaler: GradScalerConfig::default(),
                checkpoint_every: 0,
                keep_checkpoints: 3,
                log_every: 10,
                check_ranks_every: 0,
            },
            data: DataConfig {
                shards: None,
                synth_dir: "data/demo-shapes".into(),
                synth_kind: Default::default(),
                synth_count: 512,
                synth_size: 128,
                synth_shapes: 3,
                workers: 0,
                capacity: 4,
                shuffle_buffer: 1024,
                interleave: 4,
                cache_dir: None,
                cache_limit: None,
            },
            views: ViewsConfig::paper_main(),
            model: VitConfig::vit_small(),
            head: HeadConfig::default(),
            loss: LossConfig::default(),
            optim: OptimConfig::default(),
        }
    }

    /// Every value in its range, each error naming the key.
    pub fn validate(&self) -> Result<()> {
        self.views.validate()?;
        self.model.validate()?;
        self.run.grad_scaler.validate()?;
        let (r, d, h, l, o) = (&self.run, &self.data, &self.head, &self.loss, &self.optim);
        for (key, v) in [
            ("run.epochs", r.epochs),
            ("run.batch_size", r.batch_size),
            ("run.keep_checkpoints", r.keep_checkpoints),
            ("run.log_every", r.log_every),
            ("data.synth_count", d.synth_count),
            ("data.synth_shapes", d.synth_shapes),
            ("data.capacity", d.capacity),
            ("data.interleave", d.interleave),
            ("head.out_dim", h.out_dim),
            ("head.hidden_dim", h.hidden_dim),
            ("head.bottleneck_dim", h.bottleneck_dim),
            ("head.nlayers", h.nlayers),
        ] {
            check(v >= 1, key, v, "must be at least 1")?;
        }
        check(d.synth_size >= 16, "data.synth_size", d.synth_size, "must be at least 16 pixels")?;
        // Upper bounds: each of these sizes an allocation or a thread count, and a typo must not.
        for (key, v, most) in [
            ("data.shuffle_buffer", d.shuffle_buffer, loader::pipeline::MAX_SHUFFLE_BUFFER),
            ("data.interleave", d.interleave, loader::pipeline::MAX_INTERLEAVE),
            ("data.capacity", d.capacity, 1024),
            ("data.workers", d.workers, 1024),
            ("data.synth_count", d.synth_count, 10_000_000),
            ("run.batch_size", r.batch_size, 65_536),
            ("head.out_dim", h.out_dim, 1 << 20),
            ("head.hidden_dim", h.hidden_dim, 1 << 16),
            ("head.bottleneck_dim", h.bottleneck_dim, 1 << 16),
            ("head.nlayers", h.nlayers, 64),
        ] {
            check(
                (1..=most).contains(&v) || (key == "data.workers" && v == 0),
                key,
                v,
                &format!("must be within 1..={most}"),
            )?;
        }
        check(d.synth_size <= 4096, "data.synth_size", d.synth_size, "must be at most 4096 pixels")?;
        d.cache()?;
        // The run's folder is `out_dir/name`: `..` or an absolute path would put it (and its checkpoints)
        // outside out_dir, `.` or an empty part would be out_dir itself. Nested names (`ablation/a`) stay.
        check(
            common::files::stays_inside(&r.name),
            "run.name",
            format!("{:?}", r.name),
            "must be a relative folder name inside run.out_dir (no `..`, `.`, empty or absolute parts)",
        )?;
        for (key, v) in [
            ("loss.student_temp", l.student_temp),
            ("loss.teacher_temp", l.teacher_temp),
            ("loss.warmup_teacher_temp", l.warmup_teacher_temp),
            ("optim.lr", o.lr),
            ("optim.eps", o.eps),
        ] {
            check(v.is_finite() && v > 0.0, key, v, "must be a positive number")?;
        }
        for (key, v) in [
            ("optim.min_lr", o.min_lr),
            ("optim.weight_decay", o.weight_decay),
            ("optim.weight_decay_end", o.weight_decay_end),
            ("optim.clip_grad", o.clip_grad),
        ] {
            check(v.is_finite() && v >= 0.0, key, v, "must be 0 or more")?;
        }
        for (key, v) in [
            ("loss.alpha", l.alpha),
            ("loss.center_momentum", l.center_momentum),
            ("optim.momentum_teacher", o.momentum_teacher),
        ] {
            check((0.0..=1.0).contains(&v), key, v, "must be within [0, 1]")?;
        }
        for (key, v) in [("optim.betas[0]", o.betas.0), ("optim.betas[1]", o.betas.1)] {
            check((0.0..1.0).contains(&v), key, v, "must be within [0, 1)")?;
        }
        if self.views.num_global != 2 {
            bail!("views.num_global must be 2: the teacher and the loss are defined for two global views");
        }
        if !self.views.global_size.is_multiple_of(self.model.patch_size)
            || !self.views.local_size.is_multiple_of(self.model.patch_size)
        {
            bail!(
                "views: sizes {} and {} must be multiples of model.patch_size {}",
                self.views.global_size,
                self.views.local_size,
                self.model.patch_size
            );
        }
        if !self.loss.use_global_loss && !self.loss.use_ref_loss {
            bail!("loss: enable use_global_loss, use_ref_loss or both");
        }
        Ok(())
    }

    /// The run's folder.
    pub fn run_dir(&self) -> PathBuf {
        self.run.out_dir.join(&self.run.name)
    }
}

/// The key of a `--set key.path=value`.
fn set_key(set: &str) -> &str {
    set.split_once('=').map_or(set, |(key, _)| key).trim()
}

/// A value's range check: the error names the key, the value and the rule.
fn check(ok: bool, key: &str, value: impl std::fmt::Display, rule: &str) -> Result<()> {
    if ok { Ok(()) } else { bail!("{key} = {value}: {rule}") }
}

/// A merged table as a config. A value of the wrong type is an error that names its key and where it came
/// from: a `--set`, or `origin` (the file).
fn typed(table: toml::Table, sets: &[String], origin: &str) -> Result<TrainConfig> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let problem = e.into_inner().message().to_string();
        match sets.iter().find(|s| set_key(s) == key) {
            Some(set) => anyhow!("--set {set}: {key}: {problem}"),
            None => anyhow!("in {origin}: {key}: {problem}"),
        }
    })
}

/// Applies `key.path=value` settings (values parsed as TOML, else taken as a string) to a table.
fn apply_sets(user: &mut toml::Table, sets: &[String]) -> Result<()> {
    for set in sets {
        let (key, value) = set.split_once('=').ok_or_else(|| anyhow!("--set {set}: expected key=value"))?;
        // TOML reads bare `nan` and `inf` as floats; no setting wants those, and `run.name=nan` means a name.
        let bare_float = matches!(value.trim().trim_start_matches(['+', '-']), "nan" | "inf");
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .filter(|_| !bare_float)
            .map(|mut t| t.remove("v").expect("just parsed"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let mut table = &mut *user;
        let parts: Vec<&str> = key.trim().split('.').collect();
        for part in &parts[..parts.len() - 1] {
            table = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| anyhow!("--set {key}: {part} is not a table"))?;
        }
        table.insert(parts[parts.len() - 1].to_string(), value);
    }
    Ok(())
}

/// Recursively lays `over` onto `base`: tables merge, anything else replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_config_resolves() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("configs/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                TrainConfig::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                n += 1;
            }
        }
        assert_eq!(
            n, 9,
            "default, the paper's two runs, the DINO baseline, Caltech-101 in three view settings and the \
             sine-cosine positions experiment, palettes"
        );
    }

    #[test]
    fn an_arch_set_on_the_command_line_replaces_the_files_sizes() {
        // The embedded default narrows a vit_tiny to 96 wide, 6 deep, 3 heads, with 8 px patches at 64 px.
        let sets = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cfg = TrainConfig::load(None, &sets(&["model.arch=vit_base"])).unwrap();
        let shape =
            |c: &TrainConfig| (c.model.embed_dim, c.model.depth, c.model.num_heads, c.model.patch_size);
        assert_eq!(
            (shape(&cfg), cfg.model.img_size),
            ((768, 12, 12, 8), 64),
            "sizes from the arch, grid from the file"
        );
        let cfg = TrainConfig::load(None, &sets(&["model.depth=4", "model.arch=vit_small"])).unwrap();
        assert_eq!(shape(&cfg), (384, 4, 6, 8), "a size also set refines the arch");
        let cfg = TrainConfig::load(None, &[]).unwrap();
        assert_eq!(shape(&cfg), (96, 6, 3, 8), "without --set the file's refinements stand");
    }

    #[test]
    fn presets_overrides_and_unknown_keys() {
        let cfg = TrainConfig::load(None, &[]).expect("the embedded default resolves");
        assert_eq!(cfg.run.name, "default");
        let user: toml::Table =
            toml::from_str("[model]\narch = \"vit_base\"\n[views]\npreset = \"dino\"\nnum_points = 3")
                .unwrap();
        let cfg = TrainConfig::resolve(user, &[], "a test").unwrap();
        assert_eq!((cfg.views.num_local, cfg.views.local_size, cfg.views.num_points), (8, 96, 3));
        // Global views smaller than the learned grid's size: the official model's 96-px case for every view.
        let user: toml::Table = toml::from_str("[views]\nglobal_size = 96\nlocal_size = 96").unwrap();
        let cfg = TrainConfig::resolve(user, &[], "a test").unwrap();
        assert_eq!((cfg.views.global_size, cfg.model.img_size, cfg.model.grid()), (96, 224, 14));
        let user: toml::Table =
            toml::from_str("[model]\narch = \"vit_base\"\n[views]\npreset = \"readme-ablation\"").unwrap();
        let cfg =
            TrainConfig::resolve(user, &["run.seed=7".into(), "loss.alpha=0.25".into()], "a test").unwrap();
        assert_eq!(
            (cfg.model.embed_dim, cfg.views.num_local, cfg.run.seed, cfg.loss.alpha),
            (768, 4, 7, 0.25)
        );
        let bad: toml::Table = toml::from_str("[loss]\nalpah = 0.3").unwrap();
        let err = TrainConfig::resolve(bad, &[], "a test").expect_err("a typo is an error");
        assert!(format!("{err:#}").contains("alpah"), "{err:#}");
        let round = TrainConfig::from_resolved(&cfg.to_toml()).unwrap();
        assert_eq!(round, cfg);
    }
}
