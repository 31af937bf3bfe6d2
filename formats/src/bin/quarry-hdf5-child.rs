//! A program that only answers as a libhdf5 child (`quarry-hdf5-child __quarry-hdf5`), as the
//! `coordinator` and `worker` binaries do when re-executed: what the formats crate's own
//! tests and benches isolate HDF5 operations in.

fn main() {
    quarry_formats::hdf5::child::answer_if_asked();
    eprintln!(
        "quarry-hdf5-child answers one request as a libhdf5 child; run it as `quarry-hdf5-child {}`",
        quarry_formats::hdf5::child::CHILD_ARG
    );
    std::process::exit(2);
}
