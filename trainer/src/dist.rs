//! Data parallelism: which process of a job this is, how it was launched, and the few collectives a DINO
//! step needs, on an existing collective library (no hand-written all-reduce):
//!
//! - one process (no launcher, or a launcher of one): every collective is the identity;
//! - Open MPI on the CPU, through the `mpi` crate (the `mpi` feature), under `mpirun` / `srun` or
//!   `trainer train --nproc-per-node N` (which runs `mpirun` itself).
//!
//! What is shared across ranks is what `torch.distributed` shares in the official code: the gradients
//! (averaged, in a few large buckets, before clipping), the centers' batch sums (divided by the global
//! batch), the numbers a step reports (the mean over ranks), the run folder and the checkpoint that rank 0
//! chose, and, optionally, a digest of the teacher (every rank must hold the same).
//!
//! Launching with torchrun-style variables (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`) is the NCCL path of the
//! CUDA build, which is not built yet: such a launch is refused with a message rather than run as
//! `WORLD_SIZE` unrelated single-process runs.

use anyhow::{Result, bail};
use burn::tensor::{Tensor, TensorData};

/// Gradient floats per all-reduce: large enough that a ViT-S's 22M parameters go in a handful of calls
/// (PyTorch DDP's default bucket is 25 MB), small enough that the host copy stays modest.
const BUCKET: usize = 8 << 20;

/// This process's place in the job, and the channel to the others.
pub struct World {
    /// 0 .. size: rank 0 writes the run's files.
    pub rank: usize,
    pub size: usize,
    /// The rank among the processes of this machine (the GPU it would drive).
    pub local_rank: usize,
    comm: Comm,
}

enum Comm {
    Single,
    /// The communicator is declared before the universe: it is dropped first, the universe's drop
    /// finalises MPI.
    #[cfg(feature = "mpi")]
    Mpi {
        world: mpi::topology::SimpleCommunicator,
        _universe: mpi::environment::Universe,
    },
}

// SAFETY: MPI is initialised with MPI_THREAD_FUNNELED and only the thread that runs the training loop
// (the one that initialised it) calls into it; the `World` is shared only so that the trainer can hold it.
#[cfg(feature = "mpi")]
unsafe impl Send for World {}
#[cfg(feature = "mpi")]
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
/// variables, and `mpirun` inside a SLURM allocation sets both.
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
    for (launcher, rank, size, local) in [
        ("mpirun (Open MPI)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("mpirun (MPICH)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
        // A job step's own task count: a batch script itself (no srun) has SLURM_NTASKS but no step.
        ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
        ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ] {
        if let Some(env) = found(launcher, rank, size, local)? {
            return Ok(Some(env));
        }
    }
    Ok(None)
}

impl World {
    /// One process alone.
    pub fn single() -> Self {
        Self { rank: 0, size: 1, local_rank: 0, comm: Comm::Single }
    }

    /// The job this process was launched into (see [`launch_env`]); one process when no launcher is
    /// seen. Initialises MPI when an MPI launcher started the process.
    pub fn from_env() -> Result<Self> {
        let Some(env) = launch_env(|k| std::env::var(k).ok())? else { return Ok(Self::single()) };
        if env.launcher == "torchrun" {
            if env.size == 1 {
                return Ok(Self::single());
            }
            bail!(
                "launched by torchrun-style variables (RANK={}, WORLD_SIZE={}): that launch needs the NCCL \
                 collectives of the CUDA build, which this trainer does not have yet. On the CPU, launch with \
                 `mpirun -n N trainer train ...`, `srun` or `trainer train --nproc-per-node N` (the `mpi` \
                 feature; see the README)",
                env.rank,
                env.size
            );
        }
        Self::mpi(env)
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
        Ok(Self { rank, size, local_rank: env.local_rank, comm: Comm::Mpi { world, _universe: universe } })
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

    /// The collective library, for messages.
    pub fn backend(&self) -> &'static str {
        match self.comm {
            Comm::Single => "one process",
            #[cfg(feature = "mpi")]
            Comm::Mpi { .. } => "Open MPI",
        }
    }

    /// `buf` summed over the ranks, on every rank.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn all_reduce_sum(&self, buf: &mut [f32]) {
        match &self.comm {
            Comm::Single => {}
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => {
                use mpi::collective::{CommunicatorCollectives, SystemOperation};
                let send = buf.to_vec();
                world.all_reduce_into(&send[..], buf, SystemOperation::sum());
            }
        }
    }

    /// Rank 0's `bytes` on every rank (the others' argument is ignored).
    pub fn broadcast(&self, bytes: Vec<u8>) -> Vec<u8> {
        match &self.comm {
            Comm::Single => bytes,
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => {
                use mpi::traits::{Communicator, Root};
                let root = world.process_at_rank(0);
                let mut len = bytes.len() as u64;
                root.broadcast_into(&mut len);
                let mut buf = if self.rank == 0 { bytes } else { vec![0u8; len as usize] };
                root.broadcast_into(&mut buf[..]);
                buf
            }
        }
    }

    /// Ends every process of the job (MPI_Abort: the launcher kills the others and says which rank
    /// aborted); one process: exits.
    pub fn abort(&self, code: i32) -> ! {
        match &self.comm {
            Comm::Single => std::process::exit(code),
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => mpi::traits::Communicator::abort(world, code),
        }
    }

    /// Waits for every rank.
    pub fn barrier(&self) {
        match &self.comm {
            Comm::Single => {}
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => mpi::collective::CommunicatorCollectives::barrier(world),
        }
    }

    /// Each tensor replaced by its mean over the ranks (gradients: DDP's average), in buckets of about
    /// [`BUCKET`] floats, one all-reduce each.
    pub fn average(&self, ts: &mut [Tensor<1>]) {
        if self.size == 1 {
            return;
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
            let mut flat = Vec::with_capacity(len);
            for t in &ts[start..end] {
                flat.extend(crate::model::params::host(t.clone()));
            }
            self.all_reduce_sum(&mut flat);
            let mut off = 0;
            for t in &mut ts[start..end] {
                let n = t.dims()[0];
                let mean: Vec<f32> = flat[off..off + n].iter().map(|x| x * scale).collect();
                *t = Tensor::from_data(TensorData::new(mean, [n]), &t.device());
                off += n;
            }
            start = end;
        }
    }

    /// `t` summed over the ranks (the centers' batch sums).
    pub fn sum<const D: usize>(&self, t: Tensor<D>) -> Tensor<D> {
        if self.size == 1 {
            return t;
        }
        let dims = t.dims();
        let mut v = crate::model::params::host(t.clone());
        self.all_reduce_sum(&mut v);
        Tensor::from_data(TensorData::new(v, dims), &t.device())
    }

    /// Stops with an error naming the ranks whose `digest` differs from rank 0's (every rank gets the same
    /// answer, so all stop together).
    pub fn check_same(&self, what: &str, digest: &[u8]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        let reference = self.broadcast(digest.to_vec());
        let mut differs = vec![0f32; self.size];
        differs[self.rank] = (reference != digest) as u8 as f32;
        self.all_reduce_sum(&mut differs);
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
        let torch = env(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap().unwrap();
        assert_eq!((torch.launcher, torch.rank, torch.size, torch.local_rank), ("torchrun", 1, 2, 0));
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
        w.all_reduce_sum(&mut v);
        assert_eq!(v, [1.0, 2.0]);
        assert_eq!(w.broadcast(b"x".to_vec()), b"x");
        w.check_same("the teacher", b"abc").unwrap();
    }
}
