//! Plain f32 tensors whose values live in host memory (flex, or LibTorch on the CPU), seen as slices: what
//! the multi-tensor kernels of [`super::multi_tensor`] read and write.

#![cfg_attr(feature = "tch", allow(deprecated))] // burn-tch, as in `fused`

use burn::backend::flex::FlexTensor;
use burn::backend::{DispatchDevice, Flex};
use burn::tensor::{DType, Tensor};

use super::flex;

/// One flattened f32 tensor in host memory.
pub enum Host {
    Flex(FlexTensor),
    #[cfg(feature = "tch")]
    Tch(burn::backend::libtorch::TchTensor),
}

impl Host {
    /// The values of a plain 1-D tensor, or `None` when they are not f32 in host memory (a CUDA tensor, an
    /// autodiff one): the caller then takes the per-tensor path.
    pub fn new(t: Tensor<1>) -> Option<Self> {
        if t.dtype() != DType::F32 {
            return None;
        }
        match t.device().as_dispatch() {
            DispatchDevice::Flex(_) => {
                Some(Host::Flex(flex::contiguous(t.try_into_primitive::<Flex>().ok()?)))
            }
            #[cfg(feature = "tch")]
            DispatchDevice::LibTorch(burn::backend::libtorch::LibTorchDevice::Cpu) => {
                let t = t.try_into_primitive::<burn::backend::LibTorch>().ok()?;
                Some(Host::Tch(if t.tensor.is_contiguous() {
                    t
                } else {
                    burn::backend::libtorch::TchTensor::new(t.tensor.contiguous())
                }))
            }
            _ => None,
        }
    }

    /// A new zeroed buffer of `n` values on the same backend, for a kernel's output (zeroed, not left
    /// uninitialised: it is handed out as a Rust slice).
    pub fn output(&self, n: usize) -> Self {
        match self {
            Host::Flex(_) => Host::Flex(flex::tensor(vec![0.0; n], &[n])),
            #[cfg(feature = "tch")]
            Host::Tch(_) => Host::Tch(burn::backend::libtorch::TchTensor::new(tch::Tensor::zeros(
                [n as i64],
                (tch::Kind::Float, tch::Device::Cpu),
            ))),
        }
    }

    pub fn slice(&self) -> &[f32] {
        match self {
            Host::Flex(t) => flex::slice(t),
            #[cfg(feature = "tch")]
            Host::Tch(t) if t.tensor.numel() == 0 => &[], // its data pointer may be null
            #[cfg(feature = "tch")]
            // SAFETY: a contiguous f32 CPU tensor (checked in `new`, or made by `output`) of `numel`
            // values, borrowed for as long as `self`.
            Host::Tch(t) => unsafe {
                std::slice::from_raw_parts(t.tensor.data_ptr() as *const f32, t.tensor.numel())
            },
        }
    }

    /// The values, writable: copied first unless this tensor is the only owner of its storage.
    pub fn slice_mut(&mut self) -> &mut [f32] {
        match self {
            Host::Flex(t) => {
                if flex::slice(t).len() != t.storage::<f32>().len() {
                    // A view into a larger buffer: its own copy, so that the write stays inside it.
                    let n = flex::slice(t).len();
                    *t = flex::tensor(flex::slice(t).to_vec(), &[n]);
                }
                t.storage_mut::<f32>() // copy-on-write when shared
            }
            #[cfg(feature = "tch")]
            Host::Tch(t) => {
                if t.tensor.numel() == 0 {
                    return &mut []; // its data pointer may be null
                }
                if !t.can_mut() {
                    *t = burn::backend::libtorch::TchTensor::new(t.tensor.copy());
                }
                // SAFETY: as in `slice`, and nothing else holds this storage (`can_mut`), so the only
                // access while the borrow lives is through it.
                unsafe { std::slice::from_raw_parts_mut(t.tensor.data_ptr() as *mut f32, t.tensor.numel()) }
            }
        }
    }

    pub fn into_tensor(self) -> Tensor<1> {
        match self {
            Host::Flex(t) => Tensor::from_primitive::<Flex>(t),
            #[cfg(feature = "tch")]
            Host::Tch(t) => Tensor::from_primitive::<burn::backend::LibTorch>(t),
        }
    }
}
