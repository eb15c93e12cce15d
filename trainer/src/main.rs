//! `trainer`: DenseDINO pretraining with burn. Not built yet: the model, loss and training loop are the
//! open `trainer` issues. Until then this binary says so and exits non-zero, rather than pretending.

fn main() -> std::process::ExitCode {
    eprintln!(
        "trainer: not implemented yet (the model/loss and the training run are open issues); \
         meanwhile `cargo run --release -p shard -- synth --out data/synth` makes the demo data set"
    );
    std::process::ExitCode::from(2)
}
