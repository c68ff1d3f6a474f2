//! The `picket` binary: parses the command line and hands it to the library.
//!
//! Errors are printed as their message and causes, one per line, never with a
//! backtrace: `RUST_BACKTRACE=1` is common on developer machines, and a
//! user who mistyped a port should read one sentence, not 60 frames.

use std::process::ExitCode;

use clap::Parser;

// jemalloc instead of glibc's malloc: the server allocates and frees many
// small, short-lived objects on every core (event batches, alert documents,
// per-entity detection state); glibc's per-thread arenas keep freed memory
// fragmented and resident, so RSS crept up under steady load (the soak,
// issue 16) and malloc/free were a quarter of the detection profile.
// jemalloc returns dirty pages to the system on a timer (its decay).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    match picket::cli::run(picket::cli::Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
