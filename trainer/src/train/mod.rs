//! Training: the recipe (config, loss, schedules, optimiser, one step) and the run around it (data, the
//! loop, reporting and TensorBoard's files, checkpoints), plus the benchmark of one step.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod report;
pub mod run;
pub mod scaler;
pub mod schedule;
pub mod step;
pub mod tensorboard;
