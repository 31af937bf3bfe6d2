//! How a generator's process is started: without `fork` where a launcher is registered.
//!
//! A generator must die with its agent (kill -9, OOM): it gets SIGKILL from the kernel when
//! the agent dies (`PR_SET_PDEATHSIG`). That setting is made by the new process itself, before
//! `exec`; done in a `pre_exec` hook it makes std `fork` the agent, which copies the page
//! tables of its whole memory (milliseconds for an agent holding upload buffers: the GPU waits
//! that long between rounds). With a launcher registered ([`launch_through`]: the `worker`
//! and `coordinator` binaries register themselves), the generator is started as
//! `LAUNCHER --quarry-launch AGENT_PID PROGRAM ARGS...` without any hook, which std starts with
//! `posix_spawn` (no page tables copied); the launcher ([`answer_if_asked`], first thing in
//! `main`) sets the death signal, checks the agent is still its parent, and `exec`s the
//! program in place: same process, group, environment, directory and descriptors.
//!
//! A program that cannot be found or run is refused before the launch, with the error a
//! direct start would give (see [`check_program`]); a failure of the launcher's own `exec`
//! after that check (the file replaced meanwhile) ends the run with status 127 and the reason
//! on its stderr, which is the round's log.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The launcher's first argument.
pub const LAUNCH_ARG: &str = "--quarry-launch";

/// Exit status of a launch whose `exec` failed (as a shell's for a command it cannot run).
pub const EXEC_FAILED: i32 = 127;

static LAUNCHER: OnceLock<PathBuf> = OnceLock::new();

/// Starts every generator of this process through `program` from now on: a binary whose
/// `main` calls [`answer_if_asked`] first. The first call wins; `false` when a launcher was
/// registered already.
pub fn launch_through(program: PathBuf) -> bool {
    LAUNCHER.set(program).is_ok()
}

/// What `main` of the `worker` and `coordinator` binaries calls: this very binary is the
/// launcher (`/proc/self/exe`, which stays this version's file even when an upgrade replaces
/// it on disk). Where that path is unavailable, generators are started with `fork`, as
/// without a launcher.
pub fn launch_through_this_binary() {
    let exe = Path::new("/proc/self/exe");
    if cfg!(target_os = "linux") && exe.exists() {
        launch_through(exe.to_path_buf());
    }
}

/// The registered launcher, if any.
pub fn launcher() -> Option<&'static Path> {
    LAUNCHER.get().map(PathBuf::as_path)
}

/// When this process was started as a launcher (its first argument is [`LAUNCH_ARG`]): sets
/// its death signal and becomes the generator; never returns then. Otherwise returns at once.
/// `main` calls it before anything else (before a runtime starts threads).
pub fn answer_if_asked() {
    let mut args = std::env::args_os();
    if args.nth(1).is_none_or(|a| a != LAUNCH_ARG) {
        return;
    }
    let parent = args
        .next()
        .and_then(|p| p.to_str().and_then(|p| p.parse::<libc::pid_t>().ok()));
    let program = args.next();
    let rest: Vec<OsString> = args.collect();
    let (Some(parent), Some(program)) = (parent, program) else {
        eprintln!("quarry: usage: {LAUNCH_ARG} AGENT_PID PROGRAM [ARGS...]");
        std::process::exit(2);
    };
    std::process::exit(launch(parent, &program, &rest));
}

/// Sets the death signal (Linux), checks `parent` is still the parent, and execs `program`;
/// returns only on failure, with the exit status for it.
fn launch(parent: libc::pid_t, program: &OsString, args: &[OsString]) -> i32 {
    use std::os::unix::process::CommandExt;
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl(PR_SET_PDEATHSIG) with a valid signal number changes only this process.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            eprintln!(
                "quarry: cannot set the generator's death signal: {}",
                io::Error::last_os_error()
            );
            return EXEC_FAILED;
        }
    }
    // The agent may have died before the death signal was set: then nobody would signal
    // this process.
    // SAFETY: getppid(2) takes no arguments and cannot fail.
    if unsafe { libc::getppid() } != parent {
        return 1;
    }
    // Replaces this process; returns only on failure. std searches PATH as a direct start
    // does (the environment's PATH, which is the job's when it sets one).
    let e = std::process::Command::new(program).args(args).exec();
    eprintln!(
        "quarry: failed to start `{}`: {e}",
        Path::new(program).display()
    );
    EXEC_FAILED
}

/// Whether `program` can be started from `cwd` with the environment `env` adds to this
/// process's: the error a direct start would give when it cannot (not found, not executable,
/// a directory). A name without `/` is searched in PATH (the job's when `env` sets it).
pub fn check_program(program: &str, cwd: &Path, env: &[(String, String)]) -> io::Result<()> {
    if program.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if program.contains('/') {
        return executable(&cwd.join(program));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| OsString::from(v))
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    let mut denied = None;
    for dir in path.as_bytes().split(|&b| b == b':') {
        // An empty entry is the working directory, as execvp reads it.
        let dir = if dir.is_empty() {
            cwd.to_path_buf()
        } else {
            cwd.join(std::ffi::OsStr::from_bytes(dir))
        };
        match executable(&dir.join(program)) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => denied = Some(e),
            Err(_) => {}
        }
    }
    Err(denied.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENOENT)))
}

/// `path` is a file this process may execute.
fn executable(path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::ENOENT))?;
    // SAFETY: access(2) reads the NUL-terminated path it is given.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_is_found_as_a_direct_start_would_find_it() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        // On PATH.
        assert!(check_program("sh", cwd, &[]).is_ok());
        // Not anywhere.
        let e = check_program("quarry-no-such-program", cwd, &[]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // The job's PATH replaces the agent's.
        let e = check_program("sh", cwd, &[("PATH".into(), "/nonexistent".into())]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // A path, relative to the working directory.
        std::fs::write(cwd.join("gen.sh"), "#!/bin/sh\n").unwrap();
        let e = check_program("./gen.sh", cwd, &[]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "not executable");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(cwd.join("gen.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        assert!(check_program("./gen.sh", cwd, &[]).is_ok());
        assert!(check_program(cwd.join("gen.sh").to_str().unwrap(), Path::new("/"), &[]).is_ok());
        // A directory is not a program.
        let e = check_program(cwd.to_str().unwrap(), cwd, &[]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    }
}
