//! Data parallelism: which process of a job this is, how it was launched, and the few collectives a DINO
//! step needs, on existing collective libraries (no hand-written all-reduce).
//!
//! Two planes:
//! - the control plane starts and steers the job (what rank 0 tells the others, barriers, aborting):
//!   Open MPI through the `mpi` crate (the `mpi` feature) under `mpirun` / `srun` / `trainer train
//!   --nproc-per-node N`, or, under torchrun-style variables (and under `srun` in a build without MPI),
//!   the TCP rendezvous store of [`store`] that rank 0 serves at `MASTER_ADDR:MASTER_PORT`;
//! - the data plane sums tensors over the ranks: NCCL ([`nccl`], the `tch` feature) when the run is on
//!   CUDA, its unique id sent over the control plane; Open MPI on host memory otherwise.
//!
//! One process without a launcher has neither: every collective is the identity. A launcher of one
//! process still runs every collective (a world-size-1 check of the NCCL path).
//!
//! What is shared across ranks is what `torch.distributed` shares in the official code: the gradients
//! (averaged, in a few large buckets, before clipping), the centers' batch sums (divided by the global
//! batch), the numbers a step reports (the mean over ranks), the run folder and the checkpoint that rank 0
//! chose, and, optionally, a digest of the teacher (every rank must hold the same).

#[cfg(feature = "tch")]
pub mod nccl;
pub mod store;

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use burn::tensor::{Tensor, TensorData};

/// Gradient floats per all-reduce: large enough that a ViT-S's 22M parameters go in a handful of calls
/// (PyTorch DDP's default bucket is 25 MB), small enough that a host copy stays modest.
const BUCKET: usize = 8 << 20;

/// How long a rank waits at the rendezvous (torchrun-style launches) before it gives up with an error:
/// `DENSEDINO_RENDEZVOUS_TIMEOUT` seconds, 300 by default (torch's store default).
fn rendezvous_timeout() -> Result<Duration> {
    match std::env::var("DENSEDINO_RENDEZVOUS_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(300)),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(s) if s > 0 => Ok(Duration::from_secs(s)),
            _ => bail!("DENSEDINO_RENDEZVOUS_TIMEOUT={v:?}: a number of seconds, at least 1"),
        },
    }
}

/// This process's place in the job, and the channels to the others.
pub struct World {
    /// 0 .. size: rank 0 writes the run's files.
    pub rank: usize,
    pub size: usize,
    /// The rank among the processes of this machine: the GPU it drives.
    pub local_rank: usize,
    control: Control,
    /// The thread that made the World: MPI is initialised FUNNELED and NCCL runs on one stream, so every
    /// collective must come from it (checked, which is what makes the Send/Sync below sound).
    owner: std::thread::ThreadId,
    /// Set by [`World::use_device`] for runs on CUDA: then every tensor collective goes through NCCL.
    #[cfg(feature = "tch")]
    nccl: std::sync::OnceLock<nccl::Nccl>,
}

enum Control {
    Single,
    /// The communicator is declared before the universe: it is dropped first, the universe's drop
    /// finalises MPI.
    #[cfg(feature = "mpi")]
    Mpi {
        world: mpi::topology::SimpleCommunicator,
        _universe: mpi::environment::Universe,
    },
    /// The rendezvous store, and the number of broadcasts and barriers so far (their keys).
    Store(Mutex<(store::Store, u64)>),
}

// SAFETY: MPI is initialised with MPI_THREAD_FUNNELED and NCCL is called from one thread: every collective
// asserts that it runs on the thread that made the World (`on_owner`), and `abort` ends the process.
unsafe impl Send for World {}
unsafe impl Sync for World {}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "World {{ rank: {}, size: {}, local_rank: {}, {} }}",
            self.rank,
            self.size,
            self.local_rank,
            self.backend()
        )
    }
}

impl Default for World {
    fn default() -> Self {
        Self::single()
    }
}

/// A launcher's variables: rank, size, local rank, and which launcher set them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    pub launcher: &'static str,
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
}

/// What the environment says about the launch (`var` reads one variable; the process environment in
/// [`World::from_env`], a map in tests). MPI launchers first: `srun` of an MPI job also sets the SLURM
/// variables, and `mpirun` inside a SLURM allocation sets both; torchrun first when it started the process
/// (`TORCHELASTIC_RUN_ID`), also under srun.
pub fn launch_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>> {
    let num = |k: &str| -> Result<Option<usize>> {
        match var(k) {
            None => Ok(None),
            Some(v) => match v.trim().parse() {
                Ok(n) => Ok(Some(n)),
                Err(_) => bail!("the launcher's variable {k}={v:?} is not a number"),
            },
        }
    };
    let found = |launcher, rank: &str, size: &str, local: &str| -> Result<Option<LaunchEnv>> {
        let (Some(rank), Some(size)) = (num(rank)?, num(size)?) else { return Ok(None) };
        if size == 0 || rank >= size {
            bail!("{launcher}: rank {rank} of a job of {size} processes is not a place in it");
        }
        Ok(Some(LaunchEnv { launcher, rank, size, local_rank: num(local)?.unwrap_or(0) }))
    };
    let mut launchers = vec![
        ("mpirun (Open MPI)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("mpirun (MPICH)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
        // A job step's own task count: a batch script itself (no srun) has SLURM_NTASKS but no step.
        ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
        ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ];
    // torchrun started by srun (one agent per node): the workers are torchrun's, not srun's tasks.
    if var("TORCHELASTIC_RUN_ID").is_some() {
        launchers.rotate_right(1);
    }
    for (launcher, rank, size, local) in launchers {
        if let Some(env) = found(launcher, rank, size, local)? {
            return Ok(Some(env));
        }
    }
    Ok(None)
}

/// The GPU that local rank `local_rank` drives: `local_rank` modulo the GPUs this process sees (under
/// `srun --gpus-per-task=1` or `CUDA_VISIBLE_DEVICES` binding, one: every rank's `cuda:0`).
pub fn gpu_for(local_rank: usize) -> usize {
    #[cfg(feature = "tch")]
    {
        let visible = tch::Cuda::device_count().max(1) as usize;
        local_rank % visible
    }
    #[cfg(not(feature = "tch"))]
    local_rank
}

/// The first host of a SLURM node list (`gpu[003-010,012],big1` → `gpu003`): where rank 0 runs.
pub fn first_host(list: &str) -> Result<String> {
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            depth += (c == '[') as i32 - (c == ']') as i32;
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let first = &list[..end];
    let Some(open) = first.find('[') else {
        return if first.is_empty() { bail!("an empty SLURM node list") } else { Ok(first.to_string()) };
    };
    let close = first.rfind(']').ok_or_else(|| anyhow::anyhow!("SLURM node list {list:?}: unclosed ["))?;
    let range = first[open + 1..close].split(',').next().unwrap_or("");
    let start = range.split('-').next().unwrap_or("");
    if start.is_empty() {
        bail!("SLURM node list {list:?}: an empty range");
    }
    Ok(format!("{}{start}{}", &first[..open], &first[close + 1..]))
}

impl World {
    /// One process alone.
    pub fn single() -> Self {
        Self::with(0, 1, 0, Control::Single)
    }

    fn with(rank: usize, size: usize, local_rank: usize, control: Control) -> Self {
        Self {
            rank,
            size,
            local_rank,
            control,
            owner: std::thread::current().id(),
            #[cfg(feature = "tch")]
            nccl: std::sync::OnceLock::new(),
        }
    }

    /// Panics when called from another thread than the World's (see `owner`).
    fn on_owner(&self) {
        assert_eq!(
            std::thread::current().id(),
            self.owner,
            "a collective called off the thread that made the World (MPI is FUNNELED, NCCL on one stream)"
        );
    }

    /// The job this process was launched into (see [`launch_env`]); one process when no launcher is
    /// seen. Initialises MPI when an MPI launcher started the process; meets the other ranks at the
    /// rendezvous under torchrun-style variables.
    pub fn from_env() -> Result<Self> {
        let Some(env) = launch_env(|k| std::env::var(k).ok())? else { return Ok(Self::single()) };
        if env.launcher == "srun" && env.size == 1 {
            // Any single-task srun step (an interactive shell, `srun -n1 trainer ...`): one process.
            return Ok(Self::single());
        }
        let var = |k: &str| std::env::var(k).ok();
        // srun: MPI when this trainer has it, the TCP rendezvous at the first host of the step otherwise
        // (the CUDA build), as the official code's SLURM branch.
        let rendezvous = env.launcher == "torchrun" || (env.launcher == "srun" && !cfg!(feature = "mpi"));
        if !rendezvous {
            return Self::mpi(env);
        }
        let host =
            match (var("MASTER_ADDR"), var("SLURM_STEP_NODELIST").or_else(|| var("SLURM_JOB_NODELIST"))) {
                (Some(h), _) => h,
                (None, Some(list)) if env.launcher == "srun" => first_host(&list)?,
                _ => "127.0.0.1".into(),
            };
        let port: u16 = match var("MASTER_PORT") {
            Some(p) => p.trim().parse().map_err(|_| anyhow::anyhow!("MASTER_PORT={p:?} is not a port"))?,
            None if env.launcher == "srun" => 29500,
            None => bail!(
                "torchrun-style launch (RANK={}, WORLD_SIZE={}) without MASTER_PORT",
                env.rank,
                env.size
            ),
        };
        // Under torchrun itself its agent's store holds MASTER_PORT: ours takes the next port.
        let agent_store =
            std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        let port = if agent_store {
            port.checked_add(1).ok_or_else(|| anyhow::anyhow!("MASTER_PORT 65535 has no next port"))?
        } else {
            port
        };
        let job = store::Job::from_env(var, env.size, &host);
        let store = store::Store::connect(&host, port, env.rank, rendezvous_timeout()?, &job)?;
        let world = Self::with(env.rank, env.size, env.local_rank, Control::Store(Mutex::new((store, 0))));
        // The rendezvous is complete when every rank has arrived.
        world.barrier()?;
        Ok(world)
    }

    #[cfg(feature = "mpi")]
    fn mpi(env: LaunchEnv) -> Result<Self> {
        use mpi::traits::Communicator;
        let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
            bail!("{}: MPI was initialised twice in this process", env.launcher);
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (env.rank, env.size) {
            bail!(
                "{} says rank {} of {}, MPI says rank {rank} of {size}: is this trainer linked against another \
                 MPI than the one that launched it?",
                env.launcher,
                env.rank,
                env.size
            );
        }
        Ok(Self::with(rank, size, env.local_rank, Control::Mpi { world, _universe: universe }))
    }

    #[cfg(not(feature = "mpi"))]
    fn mpi(env: LaunchEnv) -> Result<Self> {
        if env.size == 1 {
            return Ok(Self::single());
        }
        bail!(
            "launched by {} as rank {} of {}, but this trainer was built without the `mpi` feature: rebuild \
             with `cargo build --release -p trainer --features mpi` (needs libopenmpi-dev and libclang-dev)",
            env.launcher,
            env.rank,
            env.size
        )
    }

    /// Whether this process runs alone, without a launcher (then no collective runs at all).
    pub fn alone(&self) -> bool {
        matches!(self.control, Control::Single)
    }

    /// The libraries that carry the collectives, for messages.
    pub fn backend(&self) -> String {
        let control = match self.control {
            Control::Single => return "one process".into(),
            #[cfg(feature = "mpi")]
            Control::Mpi { .. } => "Open MPI",
            Control::Store(_) => "TCP rendezvous",
        };
        #[cfg(feature = "tch")]
        if self.nccl.get().is_some() {
            return format!("NCCL, {control}");
        }
        control.into()
    }

    /// `r`, its error saying which rank failed in which collective: a failed collective ends the job (the
    /// binary aborts every rank on an error), and this is the line that names where it began.
    fn named<T>(&self, r: Result<T>, op: impl FnOnce() -> String) -> Result<T> {
        r.with_context(|| {
            format!("rank {} of {}: {} over {} failed", self.rank, self.size, op(), self.backend())
        })
    }

    /// Whether the job's collectives can run on `device` (`Some(i)`: CUDA device i; `None`: the CPU),
    /// without setting anything up: a launch that cannot is refused before it writes a file.
    pub fn check_device(&self, cuda: Option<usize>) -> Result<()> {
        match cuda {
            None if matches!(self.control, Control::Store(_)) => bail!(
                "a torchrun-style launch runs its collectives on NCCL: run.device must be cuda. On the CPU, \
                 launch with mpirun, srun or --nproc-per-node (the `mpi` feature)"
            ),
            _ => Ok(()),
        }
    }

    /// Prepares the data plane for a run on `device` (`Some(i)`: CUDA device i; `None`: the CPU). On CUDA
    /// the ranks join one NCCL communicator (rank 0's unique id through the control plane); without the
    /// `tch` feature, or on the CPU under a torchrun-style launch (no CPU collectives there), the run
    /// is refused.
    pub fn use_device(&self, cuda: Option<usize>) -> Result<()> {
        self.check_device(cuda)?;
        if self.alone() {
            return Ok(());
        }
        self.on_owner();
        match cuda {
            None => Ok(()),
            #[cfg(feature = "tch")]
            Some(device) => {
                if self.nccl.get().is_none() {
                    let id = if self.rank == 0 { nccl::unique_id()? } else { Vec::new() };
                    let id = self.broadcast(id)?;
                    let comm = nccl::Nccl::init(&id, self.rank, self.size, device)?;
                    let _ = self.nccl.set(comm);
                }
                Ok(())
            }
            #[cfg(not(feature = "tch"))]
            Some(_) => bail!("CUDA needs the `tch` feature"),
        }
    }

    /// `buf` summed over the ranks, on every rank (host memory: through a device buffer under NCCL).
    pub fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let n = buf.len();
        self.named(self.all_reduce_sum_unnamed(buf), || format!("the all-reduce of {n} floats"))
    }

    #[cfg_attr(not(any(feature = "mpi", feature = "tch")), allow(unused_variables))]
    fn all_reduce_sum_unnamed(&self, buf: &mut [f32]) -> Result<()> {
        self.on_owner();
        #[cfg(feature = "tch")]
        if let Some(nccl) = self.nccl.get() {
            // The fallible forms: a CUDA error here (a peer's failure surfacing) is an error, not a panic.
            let mut t = tch::Tensor::f_from_slice(buf)?.f_to(tch::Device::Cuda(nccl.device))?;
            nccl.all_reduce_sum(&mut t)?;
            t.f_to(tch::Device::Cpu)?.f_copy_data(buf, buf.len())?;
            return Ok(());
        }
        match &self.control {
            Control::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Control::Mpi { world, .. } => {
                use mpi::collective::{CommunicatorCollectives, SystemOperation};
                let send = buf.to_vec();
                world.all_reduce_into(&send[..], buf, SystemOperation::sum());
                Ok(())
            }
            Control::Store(_) => bail!("no host collectives under a torchrun-style launch before NCCL is up"),
        }
    }

    /// Rank 0's `bytes` on every rank (the others' argument is ignored).
    pub fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        self.named(self.broadcast_unnamed(bytes), || "a broadcast from rank 0".into())
    }

    fn broadcast_unnamed(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        self.on_owner();
        match &self.control {
            Control::Single => Ok(bytes),
            #[cfg(feature = "mpi")]
            Control::Mpi { world, .. } => {
                use mpi::traits::{Communicator, Root};
                let root = world.process_at_rank(0);
                let mut len = bytes.len() as u64;
                root.broadcast_into(&mut len);
                let mut buf = if self.rank == 0 { bytes } else { vec![0u8; len as usize] };
                root.broadcast_into(&mut buf[..]);
                Ok(buf)
            }
            Control::Store(s) => {
                let mut guard = s.lock().expect("rendezvous");
                let (store, n) = &mut *guard;
                *n += 1;
                let key = format!("broadcast/{n}");
                if self.rank == 0 {
                    store.set(&key, &bytes)?;
                    Ok(bytes)
                } else {
                    store.get(&key)
                }
            }
        }
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<()> {
        self.named(self.barrier_unnamed(), || "a barrier".into())
    }

    fn barrier_unnamed(&self) -> Result<()> {
        self.on_owner();
        match &self.control {
            Control::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Control::Mpi { world, .. } => {
                mpi::collective::CommunicatorCollectives::barrier(world);
                Ok(())
            }
            Control::Store(s) => {
                let mut guard = s.lock().expect("rendezvous");
                let (store, n) = &mut *guard;
                *n += 1;
                store.set(&format!("barrier/{n}/{}", self.rank), &[])?;
                for r in 0..self.size {
                    store.get(&format!("barrier/{n}/{r}")).map_err(|e| {
                        e.context(format!("rank {} waited for rank {r} of {}", self.rank, self.size))
                    })?;
                }
                Ok(())
            }
        }
    }

    /// Ends every process of the job: MPI_Abort (the launcher kills the others and says which rank
    /// aborted), or under NCCL the communicator aborted first (peers blocked in a collective are released
    /// with an error) and this process ended (torchrun then stops the others).
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "tch")]
        if let Some(nccl) = self.nccl.get() {
            nccl.abort();
        }
        match &self.control {
            #[cfg(feature = "mpi")]
            Control::Mpi { world, .. } => mpi::traits::Communicator::abort(world, code),
            Control::Store(_) if self.rank == 0 => {
                // Rank 0 serves the rendezvous: a moment for it to answer what the others asked last (its
                // own error, broadcast to them), before the process and its server end.
                std::thread::sleep(Duration::from_secs(1));
                std::process::exit(code)
            }
            _ => std::process::exit(code),
        }
    }

    /// Each tensor replaced by its mean over the ranks (gradients: DDP's average), in buckets of about
    /// [`BUCKET`] floats, one all-reduce each: on the device under NCCL, through host memory under MPI.
    pub fn average(&self, ts: &mut [Tensor<1>]) -> Result<()> {
        if self.alone() {
            return Ok(());
        }
        let scale = 1.0 / self.size as f32;
        let mut start = 0;
        while start < ts.len() {
            let mut end = start;
            let mut len = 0;
            while end < ts.len() && (end == start || len + ts[end].dims()[0] <= BUCKET) {
                len += ts[end].dims()[0];
                end += 1;
            }
            #[cfg(feature = "tch")]
            if let Some(nccl) = self.nccl.get() {
                let n = end - start;
                self.named(nccl_average(nccl, &mut ts[start..end], scale), || {
                    format!("the gradient all-reduce of {n} tensors ({len} floats)")
                })?;
                start = end;
                continue;
            }
            let mut flat = Vec::with_capacity(len);
            for t in &ts[start..end] {
                flat.extend(crate::model::params::host(t.clone()));
            }
            self.all_reduce_sum(&mut flat)?;
            let mut off = 0;
            for t in &mut ts[start..end] {
                let n = t.dims()[0];
                let mean: Vec<f32> = flat[off..off + n].iter().map(|x| x * scale).collect();
                *t = Tensor::from_data(TensorData::new(mean, [n]), &t.device());
                off += n;
            }
            start = end;
        }
        Ok(())
    }

    /// `t` summed over the ranks (the centers' batch sums, `[1, K]`).
    pub fn sum<const D: usize>(&self, t: Tensor<D>) -> Result<Tensor<D>> {
        if self.alone() {
            return Ok(t);
        }
        let dims = t.dims();
        let mut v = crate::model::params::host(t.clone());
        self.all_reduce_sum(&mut v)?;
        Ok(Tensor::from_data(TensorData::new(v, dims), &t.device()))
    }

    /// Every rank's `value` (below 2^24: carried exactly by an f32 sum), in rank order, on every rank.
    pub fn gather(&self, value: u32) -> Result<Vec<u32>> {
        assert!(value < 1 << 24, "gather carries values below 2^24");
        let mut slots = vec![0f32; self.size];
        slots[self.rank] = value as f32;
        self.all_reduce_sum(&mut slots)?;
        Ok(slots.into_iter().map(|x| x as u32).collect())
    }

    /// Stops with an error naming the ranks whose `digest` differs from rank 0's (every rank gets the same
    /// answer, so all stop together).
    pub fn check_same(&self, what: &str, digest: &[u8]) -> Result<()> {
        if self.alone() {
            return Ok(());
        }
        let reference = self.broadcast(digest.to_vec())?;
        let mut differs = vec![0f32; self.size];
        differs[self.rank] = (reference != digest) as u8 as f32;
        self.all_reduce_sum(&mut differs)?;
        let ranks: Vec<String> =
            differs.iter().enumerate().filter(|(_, d)| **d > 0.0).map(|(r, _)| r.to_string()).collect();
        if !ranks.is_empty() {
            bail!(
                "{what} differs between ranks: rank(s) {} hold another than rank 0 (the ranks diverged: a \
                 nondeterministic kernel, or ranks fed different configs); stopping",
                ranks.join(", ")
            );
        }
        Ok(())
    }
}

/// One bucket of LibTorch CUDA tensors averaged through NCCL: concatenated into one device buffer,
/// all-reduced in place, scaled, and cut back into the tensors.
#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch, as in `fused`
fn nccl_average(nccl: &nccl::Nccl, ts: &mut [Tensor<1>], scale: f32) -> Result<()> {
    use burn::backend::LibTorch;
    use burn::backend::libtorch::TchTensor;
    let parts: Vec<tch::Tensor> = ts
        .iter()
        .map(|t| {
            t.clone()
                .try_into_primitive::<LibTorch>()
                .map(|p| p.tensor)
                .map_err(|_| anyhow::anyhow!("NCCL: a gradient that is not a LibTorch tensor"))
        })
        .collect::<Result<_>>()?;
    let mut flat = tch::Tensor::f_cat(&parts, 0)?;
    nccl.all_reduce_sum(&mut flat)?;
    let flat = flat.f_mul_scalar(f64::from(scale))?;
    let mut off = 0;
    for t in ts.iter_mut() {
        let n = t.dims()[0] as i64;
        let part = flat.f_narrow(0, off, n)?.f_contiguous()?;
        *t = Tensor::from_primitive::<LibTorch>(TchTensor::new(part));
        off += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<LaunchEnv>> {
        let map: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        launch_env(|k| map.get(k).cloned())
    }

    #[test]
    fn launchers_are_read_from_their_own_variables() {
        assert_eq!(env(&[]).unwrap(), None);
        let ompi = env(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "16"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "3"),
            // mpirun inside a SLURM allocation: MPI's own numbering wins.
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((ompi.launcher, ompi.rank, ompi.size, ompi.local_rank), ("mpirun (Open MPI)", 3, 16, 3));
        let srun = env(&[("SLURM_PROCID", "9"), ("SLURM_STEP_NUM_TASKS", "16"), ("SLURM_LOCALID", "1")])
            .unwrap()
            .unwrap();
        assert_eq!((srun.launcher, srun.rank, srun.size, srun.local_rank), ("srun", 9, 16, 1));
        // A batch script outside any step is one process.
        assert_eq!(env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "16")]).unwrap(), None);
        // torchrun started by srun: its workers' numbering, not srun's tasks'.
        let nested = env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("TORCHELASTIC_RUN_ID", "x"),
            ("RANK", "13"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "5"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((nested.launcher, nested.rank, nested.size, nested.local_rank), ("torchrun", 13, 16, 5));
        let torch = env(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap().unwrap();
        assert_eq!((torch.launcher, torch.rank, torch.size, torch.local_rank), ("torchrun", 1, 2, 0));
    }

    #[test]
    fn the_first_host_of_a_slurm_node_list() {
        assert_eq!(first_host("gpu[003-010,012],big1").unwrap(), "gpu003");
        assert_eq!(first_host("node7,node8").unwrap(), "node7");
        assert_eq!(first_host("a-[2-3]-ib").unwrap(), "a-2-ib");
        assert_eq!(first_host("solo").unwrap(), "solo");
        assert!(first_host("").is_err() && first_host("n[1-2").is_err());
    }

    #[test]
    fn malformed_launch_variables_are_refused_by_name() {
        let e = env(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
        let e = env(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("rank 2 of a job of 2"), "{e}");
    }

    #[test]
    fn one_process_collectives_are_the_identity() {
        let w = World::single();
        let mut v = vec![1.0, 2.0];
        w.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, [1.0, 2.0]);
        assert_eq!(w.broadcast(b"x".to_vec()).unwrap(), b"x");
        w.check_same("the teacher", b"abc").unwrap();
    }

    #[test]
    fn a_failed_collective_is_an_error_naming_the_rank_and_the_operation() {
        // Rank 0 of a torchrun-style job of 2 whose rank 1 never comes: the rendezvous answers rank 0's
        // own keys, and a wait for rank 1 ends with the store's timeout.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let job = store::Job { token: String::new(), local: true, max_connections: 4 };
        let s = store::Store::connect("127.0.0.1", port, 0, Duration::from_secs(1), &job).unwrap();
        let w = World::with(0, 2, 0, Control::Store(Mutex::new((s, 0))));
        let e = format!("{:#}", w.barrier().unwrap_err());
        assert!(e.starts_with("rank 0 of 2: a barrier over TCP rendezvous failed: "), "{e}");
        assert!(e.contains("waited for rank 1 of 2"), "{e}");
        // Host tensors have no collective there (NCCL carries them): an error too, not a panic.
        let e = format!("{:#}", w.all_reduce_sum(&mut [1.0, 2.0, 3.0]).unwrap_err());
        assert!(e.starts_with("rank 0 of 2: the all-reduce of 3 floats over TCP rendezvous failed: "), "{e}");
        let e =
            format!("{:#}", w.sum(Tensor::<1>::from_floats([1.0, 2.0], &Default::default())).unwrap_err());
        assert!(e.contains("rank 0 of 2: the all-reduce of 2 floats"), "{e}");
    }
}
