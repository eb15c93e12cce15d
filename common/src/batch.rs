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
    /// `[B, V]`: whether each view was flipped horizontally (its points already are; for pictures and
    /// checks).
    pub flips: Vec<bool>,
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

    /// The samples `range` of this batch, every per-sample field cut alike: a data-parallel rank's slice
    /// of a global batch (rank r of n holds `r * B / n .. (r + 1) * B / n`).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Batch {
        assert!(range.end <= self.batch_size, "samples {range:?} of a batch of {}", self.batch_size);
        let cut = |v: &[u8], per: usize| v[range.start * per..range.end * per].to_vec();
        let cut_f = |v: &[f32], per: usize| v[range.start * per..range.end * per].to_vec();
        let (v_n, start, end) = (self.num_views(), range.start, range.end);
        let (v, m) = (self.num_views(), self.num_points);
        Batch {
            batch_size: range.len(),
            num_points: m,
            views: self
                .views
                .iter()
                .map(|view| ViewPixels { size: view.size, data: cut(&view.data, 3 * view.size * view.size) })
                .collect(),
            teacher_points: self.teacher_points.iter().map(|p| cut_f(p, v * m * 2)).collect(),
            student_points: self.student_points.iter().map(|p| cut_f(p, 2 * m * 2)).collect(),
            flips: self.flips[start * v_n..end * v_n].to_vec(),
            labels: self.labels[range.clone()].to_vec(),
            keys: self.keys[range.clone()].to_vec(),
            seq: self.seq[range].to_vec(),
            epoch: self.epoch,
            cursor: self.cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_holds_the_same_samples_in_every_field() {
        // 3 samples, 3 views (the third 1x1 px), 2 points; every value names its sample.
        let (b, v, m) = (3usize, 3usize, 2usize);
        let px = |size: usize| ViewPixels {
            size,
            data: (0..b).flat_map(|i| std::iter::repeat_n(i as u8, 3 * size * size)).collect(),
        };
        let pts = |per: usize| (0..b).flat_map(|i| std::iter::repeat_n(i as f32, per)).collect::<Vec<_>>();
        let batch = Batch {
            batch_size: b,
            num_points: m,
            views: vec![px(2), px(2), px(1)],
            teacher_points: vec![pts(v * m * 2), pts(v * m * 2)],
            student_points: (0..v).map(|_| pts(2 * m * 2)).collect(),
            flips: vec![false, false, false, true, false, true, false, true, true],
            labels: vec![10, 11, 12],
            keys: vec!["a".into(), "b".into(), "c".into()],
            seq: vec![5, 6, 7],
            epoch: 1,
            cursor: Cursor { epoch: 1, samples: 3 },
        };
        let s = batch.slice(1..3);
        assert_eq!(s.batch_size, 2);
        assert_eq!(s.views[0].data, [vec![1u8; 12], vec![2u8; 12]].concat());
        assert_eq!(s.views[2].data, [1u8, 1, 1, 2, 2, 2]);
        assert_eq!(s.teacher_points[1], [vec![1f32; 12], vec![2f32; 12]].concat());
        assert_eq!(s.student_points[2], [vec![1f32; 8], vec![2f32; 8]].concat());
        assert_eq!(s.flips, [true, false, true, false, true, true]);
        assert_eq!((s.labels, s.keys, s.seq), (vec![11, 12], vec!["b".to_string(), "c".into()], vec![6, 7]));
        assert_eq!(s.cursor, batch.cursor);
    }
}
