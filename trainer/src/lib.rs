//! `trainer`: DenseDINO pretraining in burn 0.22, its evaluation and its exchange with the official code.
//! The folders follow the architecture:
//!
//! - [`model`]: what a network is. The ViT with reference tokens ([`model::vit`]), DINO's projection head
//!   ([`model::head`]), the bicubic sampling of the positional grid ([`model::bicubic`]), the named walk over
//!   parameters that everything else uses ([`model::params`]), and [`model::DenseDino`], the backbone and
//!   heads one side of the distillation owns.
//! - [`fused`]: the fused ops the model and the loss run on (LayerNorm, attention with reference rows,
//!   DINO's cross-entropy, each with its own backward pass) and the optimiser's multi-tensor kernels, on
//!   flex and on LibTorch.
//! - [`recipe`]: how a network is trained, one step of it. The config ([`recipe::config`]), the dual loss
//!   and its centers ([`recipe::loss`]), the schedules ([`recipe::schedule`]), AdamW, the EMA teacher and
//!   their config ([`recipe::optim`]), fp16's loss scale ([`recipe::scaler`]), and the step itself
//!   ([`recipe::step`]), which reads like the body of DINO's `train_one_epoch`.
//! - [`run`]: the run around the recipe, which reads like DINO's `train_dino`: its folder (fresh, resumed or
//!   branched), the data ([`run::data`]), the loop, what it reports ([`run::report`], [`run::metrics`],
//!   [`run::tensorboard`]), checkpoints ([`run::checkpoint`]), stop signals, and the step's benchmark
//!   ([`run::bench`]).
//! - [`eval`]: what a trained backbone is worth: k-NN, the linear segmentation probe ([`eval::seg`]),
//!   attention maps ([`eval::attention`]).
//! - [`export`]: the official DINO/timm weight layout, out and in.
//! - [`parallel`]: data parallelism: the job's ranks, how they were launched (mpirun, srun, torchrun, or
//!   `--nproc-per-node`), and their collectives: Open MPI or a TCP rendezvous store for the control plane,
//!   NCCL on CUDA and Open MPI on the host for the tensors.
//!
//! burn 0.22's tensors carry no backend generic: the `Device` picks the backend at run time and autodiff is
//! `device.autodiff()`. The student's parameters live on the autodiff device; the teacher, the centers and
//! the optimiser state on the plain one. Every random draw (initialisation, stochastic depth) comes from the
//! run's seed on the host, so every backend starts from the same numbers.
//!
//! Errors: this crate is the application, so it reports with `anyhow` and a context that names the file or
//! the setting; the library crates below it (`common`, `shard`, `loader`) return typed errors.

pub mod eval;
pub mod export;
pub mod fused;
pub mod model;
pub mod parallel;
pub mod recipe;
pub mod run;
