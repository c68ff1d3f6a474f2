//! The `picket` binary: parses the command line and hands it to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    picket::cli::run(picket::cli::Cli::parse()).await
}
