//! Shared helpers of the end-to-end tests (the tests themselves are in `tests/tests/`).

use sha2::{Digest, Sha256};

/// A digest of everything a batch carries, to compare streams byte for byte.
pub fn batch_digest(b: &common::Batch) -> String {
    let mut h = Sha256::new();
    for v in &b.views {
        h.update((v.size as u64).to_le_bytes());
        h.update(&v.data);
    }
    for p in b.teacher_points.iter().chain(&b.student_points) {
        for x in p {
            h.update(x.to_le_bytes());
        }
    }
    for (l, (k, s)) in b.labels.iter().zip(b.keys.iter().zip(&b.seq)) {
        h.update(l.to_le_bytes());
        h.update(k.as_bytes());
        h.update(s.to_le_bytes());
    }
    h.update(b.epoch.to_le_bytes());
    h.update(b.cursor.epoch.to_le_bytes());
    h.update(b.cursor.samples.to_le_bytes());
    hex::encode(h.finalize())
}
