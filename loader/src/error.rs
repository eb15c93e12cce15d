//! `loader`'s error. Each variant names what it is about (a file, a views key, an option) and the
//! problem, except [`Error::Image`]: decoding sees bytes alone, and the caller, which knows the shard and
//! the key, reports it with them.
//!
//! The errors of the crates below pass through unchanged ([`shard::Error`] names the shard file,
//! [`common::Error`] the views key). As in `shard`, a cause is part of the message, not a `source()`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a shard set's index or shards.
    #[error(transparent)]
    Shard(#[from] shard::Error),
    /// A views config value out of range.
    #[error(transparent)]
    Config(#[from] common::Error),
    /// A shard set the loader cannot use: missing, empty, or less than one batch per rank.
    #[error("{path}: {problem}")]
    ShardSet { path: PathBuf, problem: String },
    /// A [`crate::LoaderOptions`] value out of range, naming the field.
    #[error("loader option {option}: {problem}")]
    InvalidOption { option: &'static str, problem: String },
    /// The loader stopped before its data ended ([`crate::Loader::next`]).
    #[error("the loader stopped before its data ended: {problem}")]
    Stopped { problem: String },
    /// A remote shard that cannot be read whole, or whose bytes are not the ones its index lists (the
    /// message names its URL).
    #[error("{problem}")]
    RemoteShard { problem: String },
    /// Image bytes that cannot be decoded or resized. Bytes carry no name: whoever read them from a
    /// shard names the sample (the pipeline skips it with a warning giving shard and key).
    #[error("{problem}")]
    Image { problem: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn image(problem: impl Into<String>) -> Self {
        Error::Image { problem: problem.into() }
    }
}
