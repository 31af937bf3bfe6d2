//! The child's side: the running binary re-executed with [`super::CHILD_ARG`] reads one
//! request from stdin, puts its limits on itself, runs the operation with libhdf5 in this
//! process and writes the answer to stdout, then exits. Nothing here outlives the
//! operation, so whatever the C library does to this process's memory dies with it.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::fd::FromRawFd;

use super::wire::{self, ErrorWire, InspectionWire, Op, Request, SummaryWire};
use crate::{DatasetError, Observer};

/// Exit statuses of a child that could not answer at all (the parent reports them).
const EXIT_BAD_REQUEST: i32 = 3;
const EXIT_NO_STDOUT: i32 = 4;

/// Answers one request on stdin/stdout and returns the exit status.
pub fn answer() -> i32 {
    // Descriptors a careless parent let through (all of Quarry's are close-on-exec) are
    // closed before anything else; then libhdf5 (or anything it loads) may print to stdout,
    // so answers go to a private copy of it and fd 1 becomes stderr: nothing but frames
    // reaches the parent.
    // SAFETY: plain descriptor calls on this process's own descriptors, before any other
    // thread exists and before anything here opened one; `dup` returns a fresh descriptor
    // that the `File` below owns alone.
    let out_fd = unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            return EXIT_NO_STDOUT;
        }
        fd
    };
    // SAFETY: `out_fd` was just returned by `dup` and is owned by nothing else.
    let mut out = BufWriter::new(unsafe { File::from_raw_fd(out_fd) });
    let mut text = Vec::new();
    if std::io::stdin()
        .take(64 << 20)
        .read_to_end(&mut text)
        .is_err()
    {
        return EXIT_BAD_REQUEST;
    }
    let Ok(request) = serde_json::from_slice::<Request>(&text) else {
        eprintln!("quarry hdf5 child: the request is not JSON this binary understands");
        return EXIT_BAD_REQUEST;
    };
    limit(libc::RLIMIT_CORE, 0);
    if request.memory_bytes > 0 {
        limit(libc::RLIMIT_AS, request.memory_bytes);
    }
    if request.cpu_seconds > 0 {
        limit(libc::RLIMIT_CPU, request.cpu_seconds);
    }
    let result = run(request.op, &mut out);
    let written = match result {
        Ok(json) => wire::write_frame(&mut out, wire::OK, json.as_bytes()),
        Err(e) => match serde_json::to_string(&ErrorWire::from(&e)) {
            Ok(json) => wire::write_frame(&mut out, wire::ERR, json.as_bytes()),
            Err(_) => return EXIT_NO_STDOUT,
        },
    };
    match written.and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(_) => EXIT_NO_STDOUT,
    }
}

fn limit(resource: libc::__rlimit_resource_t, value: u64) {
    let l = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct it is given and nothing else.
    unsafe {
        libc::setrlimit(resource, &l);
    }
}

fn run(op: Op, out: &mut BufWriter<File>) -> Result<String, DatasetError> {
    let json = |r: Result<String, serde_json::Error>| {
        r.map_err(|e| DatasetError::Unsupported {
            reason: format!("encoding the answer: {e}"),
        })
    };
    match op {
        Op::Inspect { path, filter } => {
            let filter = wire::filter_of(filter.as_deref())?;
            let i = super::super::inspect(&wire::bytes_path(path), filter.as_ref())?;
            json(serde_json::to_string(&InspectionWire::from(&i)))
        }
        Op::Examine { path } => {
            let mut events = Events { out, failed: false };
            let n = super::super::examine(&wire::bytes_path(path), &mut events)?;
            json(serde_json::to_string(&n))
        }
        Op::Merge {
            inputs,
            counts,
            limit,
            filter,
            dedup,
            out: target,
        } => {
            let filter = wire::filter_of(filter.as_deref())?;
            let inputs: Vec<_> = inputs.into_iter().map(wire::bytes_path).collect();
            let options = wire::merge_options(limit, filter, dedup);
            let s = super::super::merge(&inputs, &counts, &options, &wire::bytes_path(target))?;
            json(serde_json::to_string(&SummaryWire::from(&s)))
        }
    }
}

/// Examine's events, written as frames as they happen.
struct Events<'a> {
    out: &'a mut BufWriter<File>,
    failed: bool,
}

impl Events<'_> {
    fn send(&mut self, tag: u8, payload: &[u8]) {
        if !self.failed && wire::write_frame(self.out, tag, payload).is_err() {
            // The parent is gone or stopped reading; the walk finishes and the exit status
            // says the rest.
            self.failed = true;
        }
    }
}

impl Observer for Events<'_> {
    fn sample(&mut self, index: u64) {
        self.send(wire::SAMPLE, &index.to_le_bytes());
    }

    fn values(&mut self, field: &str, values: &[f64]) {
        self.send(wire::VALUES, &wire::values_payload(field, values));
    }

    fn problem(&mut self, path: &str, reason: &str) {
        if let Ok(p) = serde_json::to_vec(&(path, reason)) {
            self.send(wire::PROBLEM, &p);
        }
    }
}
