//! NCCL for the CUDA build (the `tch` feature): the all-reduces of a data-parallel run on the GPUs,
//! straight on LibTorch's device buffers.
//!
//! The library is the one LibTorch already loaded (`libnccl.so.2` of PyTorch's `nvidia-nccl` wheel, a
//! dependency of `libtorch_cuda.so`): its symbols are looked up in the process first, then in
//! `libnccl.so.2` / `libnccl.so` on the library path. cudarc's NCCL bindings were the first choice; its
//! loader tries `libnccl.so` and a few versioned names but not `libnccl.so.2`, the only name the wheels
//! ship, and the six functions used here are a small surface.
//!
//! Stream order: LibTorch's kernels run on the device's default stream (burn-tch makes no other), and so
//! do these calls (stream 0): an all-reduce starts after the backward that made its gradients and ends
//! before the optimiser reads them, with no host synchronisation.

use std::ffi::{CStr, c_char, c_int, c_void};

use anyhow::{Context, Result, anyhow, bail};
use libloading::os::unix::Library;

/// `ncclUniqueId`: 128 opaque bytes that rank 0 makes and every rank needs.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type Comm = *mut c_void;
/// `ncclFloat32`, `ncclSum` (nccl.h).
const FLOAT32: c_int = 7;
const SUM: c_int = 0;

struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    all_reduce:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int,
    comm_abort: unsafe extern "C" fn(Comm) -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    /// `cudaSetDevice` of the CUDA runtime LibTorch loaded: NCCL binds a communicator to the current device.
    set_device: unsafe extern "C" fn(c_int) -> c_int,
    /// Kept loaded for as long as the pointers above are used.
    _libs: Vec<Library>,
}

/// The first library among the process itself and `names` that has `symbol`.
fn find<T: Copy>(libs: &[Library], symbol: &str) -> Result<T> {
    let name = format!("{symbol}\0");
    for lib in libs {
        // SAFETY: the symbol's type is the C declaration of nccl.h / cuda_runtime_api.h it is named after.
        if let Ok(f) = unsafe { lib.get::<T>(name.as_bytes()) } {
            return Ok(*f);
        }
    }
    bail!("{symbol} is in no loaded library (LibTorch's CUDA libraries, libnccl.so.2, libcudart)")
}

impl Api {
    fn load() -> Result<Self> {
        let mut libs = vec![Library::this()];
        for name in ["libnccl.so.2", "libnccl.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so"] {
            // SAFETY: loading NCCL or the CUDA runtime runs their initialisers, which have no preconditions.
            if let Ok(lib) = unsafe { Library::new(name) } {
                libs.push(lib);
            }
        }
        Ok(Self {
            get_unique_id: find(&libs, "ncclGetUniqueId")?,
            comm_init_rank: find(&libs, "ncclCommInitRank")?,
            all_reduce: find(&libs, "ncclAllReduce")?,
            comm_abort: find(&libs, "ncclCommAbort")?,
            comm_destroy: find(&libs, "ncclCommDestroy")?,
            error_string: find(&libs, "ncclGetErrorString")?,
            set_device: find(&libs, "cudaSetDevice")?,
            _libs: libs,
        })
    }

    fn check(&self, what: &str, code: c_int) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static C string for any code.
        let msg = unsafe { CStr::from_ptr((self.error_string)(code)) }.to_string_lossy();
        bail!("NCCL {what}: {msg} (code {code})")
    }
}

/// One rank's NCCL communicator over the job's GPUs.
pub struct Nccl {
    api: Api,
    comm: Comm,
    pub device: usize,
}

// SAFETY: the communicator is used from the training thread only; the World that holds it is shared only
// so that the trainer can hold it (see `World`).
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

/// Rank 0's unique id, which [`Nccl::init`] needs on every rank.
pub fn unique_id() -> Result<Vec<u8>> {
    let api = Api::load()?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: `id` is a valid ncclUniqueId to fill.
    api.check("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) })?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

impl Nccl {
    /// Joins the communicator of `size` ranks named by rank 0's `id`, on CUDA device `device`.
    pub fn init(id: &[u8], rank: usize, size: usize, device: usize) -> Result<Self> {
        let api = Api::load()?;
        let mut uid = UniqueId { internal: [0; 128] };
        if id.len() != uid.internal.len() {
            bail!("NCCL unique id of {} bytes, expected 128 (rank 0 and this rank disagree)", id.len());
        }
        for (d, s) in uid.internal.iter_mut().zip(id) {
            *d = *s as c_char;
        }
        // SAFETY: plain CUDA runtime call with a device ordinal.
        let code = unsafe { (api.set_device)(device as c_int) };
        if code != 0 {
            bail!(
                "cudaSetDevice({device}) failed with CUDA error {code} (which GPUs does CUDA_VISIBLE_DEVICES show?)"
            );
        }
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the communicator; `uid` is rank 0's id, the same on every rank.
        let code = unsafe { (api.comm_init_rank)(&mut comm, size as c_int, uid, rank as c_int) };
        api.check(&format!("ncclCommInitRank (rank {rank} of {size}, cuda:{device})"), code)
            .context("joining the job's NCCL communicator")?;
        Ok(Self { api, comm, device })
    }

    /// Sums a contiguous f32 CUDA tensor over the ranks, in place, on the default stream.
    pub fn all_reduce_sum(&self, t: &mut tch::Tensor) -> Result<()> {
        if t.kind() != tch::Kind::Float || !t.is_contiguous() || t.device() != tch::Device::Cuda(self.device)
        {
            return Err(anyhow!(
                "NCCL all-reduce of a {:?} tensor on {:?} (contiguous: {}): needs contiguous f32 on cuda:{}",
                t.kind(),
                t.device(),
                t.is_contiguous(),
                self.device
            ));
        }
        let n = t.numel();
        let ptr = t.data_ptr();
        // SAFETY: `ptr` is `n` f32 on this communicator's device, alive for the call (the stream orders
        // the kernel after the ones that wrote it and before the ones that read it).
        let code =
            unsafe { (self.api.all_reduce)(ptr, ptr, n, FLOAT32, SUM, self.comm, std::ptr::null_mut()) };
        self.api.check("ncclAllReduce", code)
    }

    /// Ends the communicator at once (the job is stopping: peers blocked in a collective are released).
    pub fn abort(&self) {
        // SAFETY: the communicator is valid until drop; abort leaves it unusable, and the process exits.
        unsafe { (self.api.comm_abort)(self.comm) };
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was made by init and is destroyed once.
        unsafe { (self.api.comm_destroy)(self.comm) };
    }
}
