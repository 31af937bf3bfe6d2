//! A TCP proxy that injects faults into the connections it forwards: an HTTP `503 Slow Down`
//! or `400 InvalidPart` answer without forwarding, a reset connection, or a request left
//! unanswered (a stall). It stands between Quarry and the S3 server to prove that the
//! object-store client retries and cleans up (the server itself never fails). The S3 test
//! server answers one request per connection, so a fault per connection is a fault per
//! request; the fault is chosen by connection number ([`FaultProxy::start`]) or by the
//! request line ([`FaultProxy::start_by_request`]).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// What the proxy does with connection number `n` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Answer `503 Slow Down` (S3's throttling error) without contacting the server.
    SlowDown,
    /// Read the request, then reset the connection without an answer.
    Reset,
    /// Read the request and answer nothing for [`STALL`]: the client's request timeout must
    /// give up on it and retry.
    Stall,
    /// Answer `400 InvalidPart` without contacting the server: S3's refusal of a
    /// CompleteMultipartUpload naming a part it does not hold. Not retried by the client.
    InvalidPart,
}

/// How the proxy picks each connection's fault.
#[derive(Clone, Copy)]
enum Policy {
    /// By connection number (0-based), before anything is read.
    ByConnection(fn(u64) -> Fault),
    /// By the request line (`PUT /bucket/key?partNumber=1&uploadId=.. HTTP/1.1`), once read.
    ByRequest(fn(&str) -> Fault),
}

/// Connections by outcome, shared with the connection threads.
#[derive(Default)]
struct Counts {
    injected: AtomicU64,
    stalled: AtomicU64,
    passed: AtomicU64,
}

impl Counts {
    fn record(&self, fault: Fault) {
        match fault {
            Fault::Pass => self.passed.fetch_add(1, Ordering::Relaxed),
            Fault::Stall => {
                self.stalled.fetch_add(1, Ordering::Relaxed);
                self.injected.fetch_add(1, Ordering::Relaxed)
            }
            _ => self.injected.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// How long a stalled connection hangs before the proxy drops it.
pub const STALL: Duration = Duration::from_secs(8);

/// A running proxy; stops accepting when dropped.
pub struct FaultProxy {
    port: u16,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
}

impl FaultProxy {
    /// Forwards 127.0.0.1:<new port> to 127.0.0.1:`upstream`, with `policy` choosing the fault
    /// of each connection from its number.
    pub fn start(upstream: u16, policy: fn(u64) -> Fault) -> FaultProxy {
        Self::start_with(upstream, Policy::ByConnection(policy))
    }

    /// Like [`FaultProxy::start`], with `policy` choosing the fault of each request from its
    /// request line (method, path with query, version): targets one kind of S3 request, such as
    /// a multipart upload's parts (`?partNumber=`) or its completion (`POST ..?uploadId=`).
    pub fn start_by_request(upstream: u16, policy: fn(&str) -> Fault) -> FaultProxy {
        Self::start_with(upstream, Policy::ByRequest(policy))
    }

    fn start_with(upstream: u16, policy: Policy) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("non-blocking proxy listener");
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let (s, c) = (Arc::clone(&stop), Arc::clone(&counts));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let conn = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let number = n;
                n += 1;
                let counts = Arc::clone(&c);
                std::thread::spawn(move || serve(conn, upstream, policy, number, &counts));
            }
        });
        FaultProxy { port, stop, counts }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections that got a fault.
    pub fn injected(&self) -> u64 {
        self.counts.injected.load(Ordering::Relaxed)
    }

    /// Connections left unanswered.
    pub fn stalled(&self) -> u64 {
        self.counts.stalled.load(Ordering::Relaxed)
    }

    /// Connections forwarded untouched.
    pub fn passed(&self) -> u64 {
        self.counts.passed.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads up to the end of the request head (bounded); the bytes read.
fn read_head(conn: &mut TcpStream) -> Vec<u8> {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while head.len() < 64 << 10 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    head
}

/// Picks connection `number`'s fault by `policy`, counts it and carries it out.
fn serve(mut conn: TcpStream, upstream: u16, policy: Policy, number: u64, counts: &Counts) {
    let (fault, head) = match policy {
        Policy::ByConnection(policy) => (policy(number), None),
        Policy::ByRequest(policy) => {
            let head = read_head(&mut conn);
            let text = String::from_utf8_lossy(&head);
            let line = text.lines().next().unwrap_or_default();
            (policy(line), Some(head))
        }
    };
    counts.record(fault);
    handle(conn, upstream, fault, head);
}

/// Carries out `fault` on `conn`; `head` holds the bytes already read from it, if any.
fn handle(mut conn: TcpStream, upstream: u16, fault: Fault, head: Option<Vec<u8>>) {
    if fault != Fault::Pass && head.is_none() {
        read_head(&mut conn);
    }
    match fault {
        Fault::SlowDown => answer(
            conn,
            "503 Slow Down",
            "SlowDown",
            "Please reduce your request rate.",
        ),
        Fault::InvalidPart => answer(
            conn,
            "400 Bad Request",
            "InvalidPart",
            "One or more of the specified parts could not be found.",
        ),
        Fault::Reset => reset(conn),
        Fault::Stall => {
            std::thread::sleep(STALL);
            drop(conn);
        }
        Fault::Pass => {
            let _ = conn.set_read_timeout(None);
            let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                return;
            };
            if server.write_all(&head.unwrap_or_default()).is_err() {
                return;
            }
            let (Ok(mut c2), Ok(mut s2)) = (conn.try_clone(), server.try_clone()) else {
                return;
            };
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut conn, &mut server);
                let _ = server.shutdown(Shutdown::Write);
            });
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(Shutdown::Write);
            let _ = up.join();
        }
    }
}

/// Answers an S3 error (`status` line, XML `code` and `message`) and closes `conn`.
fn answer(mut conn: TcpStream, status: &str, code: &str, message: &str) {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
         <Message>{message}</Message></Error>"
    );
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.flush();
    let _ = conn.shutdown(Shutdown::Both);
}

/// Closes `conn` with a TCP RST (SO_LINGER with a zero timeout), as a crashed server or a
/// middlebox dropping state would.
fn reset(conn: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open (owned by `conn`) and `linger` is a valid, correctly sized value.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(conn);
}
