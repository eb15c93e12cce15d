//! `loader`: the streaming multi-view loader. Not built yet (its issue is open); this binary says so
//! and exits non-zero.

fn main() -> std::process::ExitCode {
    eprintln!("loader: not implemented yet (the loader issue is open)");
    std::process::ExitCode::from(2)
}
