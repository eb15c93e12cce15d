//! `loader`: turns shards made by `tools/shard` into DenseDINO batches ([`common::Batch`]): u8 views plus
//! the reference points of every (global, any) view pair, on a bounded async channel.
//!
//! [`plan`] decides which shards a rank reads in an epoch; [`decode`] turns bytes into RGB; [`resize`] crops
//! and resizes into planar views; [`augment`] holds the pixel operations ([`hue`] Pillow's hue shift in
//! exact integer form); [`views`] makes one sample's views and points; [`pipeline`] runs it all on
//! tokio with exact replay from a seed and a cursor; [`preview`] draws a batch for a person to check;
//! [`report`] is the stats line and progress bar. [`error`] is the one error type of the library; anyhow is
//! for the binary only.

pub mod augment;
pub mod decode;
pub mod error;
pub mod hue;
pub mod pipeline;
pub mod plan;
pub mod preview;
pub mod report;
pub mod resize;
pub mod views;

pub use common::geometry::CropBox;
pub use error::{Error, Result};
pub use pipeline::{Loader, LoaderOptions, Stats, start};
