//! How Quarry's binaries (`coordinator`, `worker`) start: a step that must run alone on the
//! main thread (the libhdf5 child answers its request there and exits, and isolation is
//! switched on before any thread exists), then the command on a multi-thread runtime, whose
//! result is the exit status.

use std::future::Future;

use crate::exit::ExitStatus;

/// Runs `prepare` (its error, one sentence, is a usage error: exit status 2), then `body` on
/// a multi-thread runtime, and exits with the status `body` returns.
pub fn run(prepare: impl FnOnce() -> Result<(), String>, body: impl Future<Output = i32>) -> ! {
    if let Err(e) = prepare() {
        eprintln!("error: {e}");
        std::process::exit(ExitStatus::Usage.code());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(ExitStatus::Error.code());
        }
    };
    let code = runtime.block_on(body);
    std::process::exit(code)
}
