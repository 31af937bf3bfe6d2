//! A TCP proxy that delays every byte by a fixed latency in both directions, as a long link
//! does (a worker far from its coordinator): each chunk read from one side is written to the
//! other `delay` after it was read, in order, so that throughput is not limited and a
//! request's answer comes two delays after it was sent. Connections are forwarded until
//! either side closes; the accept loop stops when the proxy is dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(20);

pub struct LatencyProxy {
    addr: String,
    stop: Arc<AtomicBool>,
}

impl LatencyProxy {
    /// Listens on a loopback port and forwards each connection to `upstream` (`host:port`).
    pub fn start(upstream: &str, delay: Duration) -> LatencyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the latency proxy");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let upstream = upstream.to_string();
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let Ok(server) = TcpStream::connect(&upstream) {
                            forward(&client, &server, delay);
                            forward(&server, &client, delay);
                        }
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        });
        LatencyProxy { addr, stop }
    }

    /// Where clients connect (`127.0.0.1:port`).
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read: a reader thread stamps the
/// chunks, a writer thread holds each until its time. EOF or an error on either side ends
/// both and shuts the other side's writing half.
fn forward(from: &TcpStream, to: &TcpStream, delay: Duration) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((read_at, bytes)) = rx.recv() {
            let due = read_at + delay;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
