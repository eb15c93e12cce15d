//! The recipe: what one DenseDINO step computes and with which settings (config, loss, schedules, AdamW
//! and the EMA teacher, fp16's loss scale, the step). Nothing here writes a file or runs a loader: the run
//! ([`crate::run`]) feeds it batches and saves what it holds.

pub mod config;
pub mod loss;
pub mod optim;
pub mod scaler;
pub mod schedule;
pub mod step;
