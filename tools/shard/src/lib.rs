//! `shard`: packs image sets into WebDataset tar shards for the loader, checks them, and makes synthetic
//! sets.
//!
//! The pieces, one job each: [`input`] decides which files go in (the layouts), [`clean`] turns each file
//! into a JPEG every reader can decode, [`pack`] writes them in seeded order into shards that survive a
//! crash, [`format`] is the tar format itself (writer and streaming reader, used by the loader too),
//! [`index`] is `index.json`, [`remote`] reads sets from object stores, HTTP and commands, [`verify`] checks a set against its index, [`synth`] generates scenes.
//! [`error`] is the one error type of the library; anyhow is for the binary only.

pub mod clean;
pub mod error;
pub mod format;
pub mod index;
pub mod input;
pub mod pack;
pub mod progress;
pub mod remote;
pub mod synth;
pub mod verify;

pub use error::{Error, Result};
pub use format::{Sample, open_shard, read_samples};
pub use index::Index;
