//! The `picket` binary: parses the command line and hands it to the library.
//!
//! Errors are printed as their message and causes, one per line, never with a
//! backtrace: `RUST_BACKTRACE=1` is common on developer machines, and a
//! user who mistyped a port should read one sentence, not 60 frames.

use std::process::ExitCode;

use clap::Parser;

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
