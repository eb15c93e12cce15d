//! `trainer`: DenseDINO in burn 0.22: the ViT with reference tokens ([`vit`]), the DINO heads ([`head`]),
//! the network one side of the distillation owns ([`model`]), the dual loss with its centers ([`loss`]),
//! the schedules ([`schedule`]), AdamW, clipping and the EMA teacher ([`optim`]), and one training step that
//! ties them together ([`step`]); [`fused`] holds the fused ops (LayerNorm, attention, DINO's
//! cross-entropy) with their own backward passes on flex and on LibTorch.
//!
//! burn 0.22's tensors carry no backend generic: the `Device` picks the backend at run time and autodiff is
//! `device.autodiff()`. The student's parameters live on the autodiff device; the teacher, the centers and
//! the optimiser state on the plain one. Every random draw (initialisation, stochastic depth) comes from the
//! run's seed on the host, so every backend starts from the same numbers.

pub mod attention;
pub mod bicubic;
pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod export;
pub mod fused;
pub mod head;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod params;
pub mod run;
pub mod schedule;
pub mod seg;
pub mod step;
pub mod vit;
