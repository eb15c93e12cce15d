//! `common`: what the loader and the trainer share and nothing more: the config types (serde, TOML),
//! [`Batch`], the seed derivation, and the error the config checks report. No burn, no JPEG, no tar in
//! here.

pub mod batch;
pub mod config;
pub mod error;
pub mod geometry;
pub mod seed;

pub use batch::{Batch, Cursor, ViewPixels};
pub use error::{Error, Result};
