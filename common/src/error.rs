//! `common`'s error: what its config checks report. Each error names the config key, its value and the
//! problem, so a bad value stops a run at start-up with one line that says what to change. The other
//! crates have their own error types (`shard::Error`, `loader::Error`); the trainer reports all of them.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config value out of its range, or a preset name that does not exist.
    #[error("invalid config: {key} = {value}: {problem}")]
    Invalid {
        /// The full key, table included (`views.num_points`).
        key: String,
        /// The value as it was given.
        value: String,
        problem: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(key: impl Into<String>, value: impl std::fmt::Debug, problem: impl Into<String>) -> Self {
        Error::Invalid { key: key.into(), value: format!("{value:?}"), problem: problem.into() }
    }
}
