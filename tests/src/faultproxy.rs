//! A TCP proxy that injects faults into the connections it forwards: an HTTP `503 Slow Down`
//! answer without forwarding, a reset connection, or a request left unanswered (a stall). It stands between Quarry and the S3
//! server to prove that the object-store client retries (the server itself never fails).
//! The S3 test server answers one request per connection, so a fault per connection is a
//! fault per request.

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
}

/// How long a stalled connection hangs before the proxy drops it.
pub const STALL: Duration = Duration::from_secs(8);

/// A running proxy; stops accepting when dropped.
pub struct FaultProxy {
    port: u16,
    stop: Arc<AtomicBool>,
    injected: Arc<AtomicU64>,
    stalled: Arc<AtomicU64>,
    passed: Arc<AtomicU64>,
}

impl FaultProxy {
    /// Forwards 127.0.0.1:<new port> to 127.0.0.1:`upstream`, with `policy` choosing the fault
    /// of each connection.
    pub fn start(upstream: u16, policy: fn(u64) -> Fault) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("non-blocking proxy listener");
        let stop = Arc::new(AtomicBool::new(false));
        let injected = Arc::new(AtomicU64::new(0));
        let stalled = Arc::new(AtomicU64::new(0));
        let passed = Arc::new(AtomicU64::new(0));
        let (s, inj, pas) = (
            Arc::clone(&stop),
            Arc::clone(&injected),
            Arc::clone(&passed),
        );
        let sta = Arc::clone(&stalled);
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
                let fault = policy(n);
                n += 1;
                match fault {
                    Fault::Pass => pas.fetch_add(1, Ordering::Relaxed),
                    Fault::Stall => {
                        sta.fetch_add(1, Ordering::Relaxed);
                        inj.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => inj.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::spawn(move || handle(conn, upstream, fault));
            }
        });
        FaultProxy {
            port,
            stop,
            injected,
            stalled,
            passed,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections that got a fault.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Connections left unanswered.
    pub fn stalled(&self) -> u64 {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Connections forwarded untouched.
    pub fn passed(&self) -> u64 {
        self.passed.load(Ordering::Relaxed)
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

fn handle(mut conn: TcpStream, upstream: u16, fault: Fault) {
    match fault {
        Fault::SlowDown => {
            read_head(&mut conn);
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>\
                        <Message>Please reduce your request rate.</Message></Error>";
            let _ = write!(
                conn,
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.flush();
            let _ = conn.shutdown(Shutdown::Both);
        }
        Fault::Reset => {
            read_head(&mut conn);
            reset(conn);
        }
        Fault::Stall => {
            read_head(&mut conn);
            std::thread::sleep(STALL);
            drop(conn);
        }
        Fault::Pass => {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                return;
            };
            let (Ok(mut c2), Ok(mut s2)) = (conn.try_clone(), server.try_clone()) else {
                return;
            };
            let up = std::thread::spawn(move || {
                let mut server = server;
                let _ = std::io::copy(&mut conn, &mut server);
                let _ = server.shutdown(Shutdown::Write);
            });
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(Shutdown::Write);
            let _ = up.join();
        }
    }
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
