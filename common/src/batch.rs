//! `Batch`: the one contract between the loader and the trainer: what one training step consumes.
//!
//! Pixels stay `u8` and planar (CHW): a quarter of the memory and bandwidth of f32; the trainer normalises on
//! the device. Reference points are f32 in grid_sample convention (−1..1 edge to edge, x then y, x negated
//! for a flipped view).

/// Where a stream stands: enough to restart exactly after the last batch handed out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    /// The epoch the next sample belongs to.
    pub epoch: u64,
    /// How many samples of that epoch (this rank's share) were already handed out in batches.
    pub samples: u64,
}

/// One view of every image in the batch: `data` is `[B, 3, size, size]`, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewPixels {
    pub size: usize,
    pub data: Vec<u8>,
}

/// B images, each with V views; views 0 and 1 are the teacher's global views.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    /// M: reference points per ordered pair (g, v).
    pub num_points: usize,
    /// `views[v]`: `[B, 3, S_v, S_v]`.
    pub views: Vec<ViewPixels>,
    /// `teacher_points[g]` for g in {0, 1}: `[B, V, M, 2]`, pair (g, v) in view g's frame.
    pub teacher_points: Vec<Vec<f32>>,
    /// `student_points[v]`: `[B, 2, M, 2]`, pair (g, v) in view v's frame.
    pub student_points: Vec<Vec<f32>>,
    /// `[B]`: class index, or -1 where the shard has none.
    pub labels: Vec<i64>,
    pub keys: Vec<String>,
    /// Global sample numbers within the epoch (this rank's order).
    pub seq: Vec<u64>,
    pub epoch: u64,
    /// What a checkpoint stores to resume after this batch.
    pub cursor: Cursor,
}

impl Batch {
    pub fn num_views(&self) -> usize {
        self.views.len()
    }
}
