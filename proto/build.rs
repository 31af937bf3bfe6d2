fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Generated code goes to OUT_DIR only; src/ includes it with `include_proto!`.
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/quarry/v1/quarry.proto"], &["proto"])?;
    Ok(())
}
