//! A generator launcher for in-process agents (benches, library tests): what the `worker` and
//! `coordinator` binaries do when started with `--quarry-launch` (see
//! `quarry_worker::runner::launch`), in a small binary of its own.

fn main() {
    quarry_worker::runner::launch::answer_if_asked();
    eprintln!(
        "quarry-launch: start it as `quarry-launch --quarry-launch AGENT_PID PROGRAM [ARGS...]`"
    );
    std::process::exit(2);
}
