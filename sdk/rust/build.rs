//! Compiles the workspace's `proto/picket/v1/*.proto` (the public contract)
//! with protox, no system protoc, into prost messages and tonic *clients*
//! only. Generated code stays in `OUT_DIR`; it is never committed.
use std::{fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("../../proto");
    println!("cargo:rerun-if-changed=../../proto");
    let mut files: Vec<PathBuf> = fs::read_dir(root.join("picket/v1"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "proto"));
    files.sort();
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
