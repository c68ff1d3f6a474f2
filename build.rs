//! Compiles `proto/picket/v1/*.proto` with protox (pure Rust, no system protoc),
//! writes the encoded `FileDescriptorSet` to `OUT_DIR/picket_descriptor.bin` for
//! gRPC server reflection, and generates prost messages plus tonic clients and
//! servers from it. Generated code stays in `OUT_DIR`; it is never committed.
use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // The console is embedded from its committed build (src/http/console.rs):
    // a new build (new hashed file names) must rebuild the crate.
    println!("cargo:rerun-if-changed=console/dist");
    let mut files: Vec<PathBuf> = fs::read_dir("proto/picket/v1")?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "proto"));
    files.sort();
    let fds = protox::compile(&files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // `compile_fds` ignores `file_descriptor_set_path`, so write the set ourselves.
    fs::write(out.join("picket_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // tonic-prost's codec, but undecodable requests are INVALID_ARGUMENT
        // naming the field (src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
