//! `common`: what the loader and the trainer share and nothing more: the config types (serde, TOML),
//! [`Batch`], the seed derivation, the error the config checks report, and the guarded reading and
//! replacing of user-named files ([`files`]). No burn, no JPEG, no tar in here.

pub mod batch;
pub mod config;
pub mod error;
pub mod files;
pub mod geometry;
pub mod seed;

pub use batch::{Batch, Cursor, ViewPixels};
pub use error::{Error, Result};
