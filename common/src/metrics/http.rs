//! The metrics endpoint (`--metrics-listen`): `GET /metrics` and `GET /healthz` over HTTP/1.1
//! on hyper, with a cap on connections served at once, a deadline for the request head (an
//! idle or trickling client is cut), a deadline for the whole exchange, and a graceful stop.
//!
//! One request per connection (the answer says `connection: close`), as scrapers and probes
//! need no more; a keep-alive connection would hold one of the capped slots between scrapes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Registry;

/// The content type of the Prometheus text format the registry renders.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Largest request head read (hyper's smallest allowed buffer is 8 KiB); a longer one is
/// answered 431.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Limits of the endpoint. [`serve`] uses the defaults.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Connections served at once. Further ones are not accepted until one ends: they wait in
    /// the listen backlog (the client sees a slow connect or answer, never a refusal while the
    /// backlog has room). The deadlines below bound how long a slot stays taken.
    pub max_connections: usize,
    /// Time a client has, from when its connection is accepted, to send its whole request head;
    /// a connection that sends nothing, or trickles its head, is closed then (no answer).
    pub header_read_timeout: Duration,
    /// Time for one connection from accept to the last byte of the answer, reading the head
    /// included; a client that reads the answer too slowly is cut then.
    pub connection_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(10),
        }
    }
}

/// What the callers pass as the health check.
type Healthy = Arc<dyn Fn() -> bool + Send + Sync>;

/// Serves `GET /metrics` (the registry) and `GET /healthz` (200 while `healthy()` says so,
/// else 503) on `listener` until `shutdown`, with the default [`ServeConfig`]: at most 64
/// connections at once, 5 s for the request head, 10 s for the whole exchange.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    healthy: Healthy,
    shutdown: CancellationToken,
) {
    serve_with(
        listener,
        registry,
        healthy,
        shutdown,
        ServeConfig::default(),
    )
    .await;
}

/// [`serve`] with the given limits. On `shutdown` it stops accepting (and closes the listener),
/// closes connections that have sent nothing, lets requests under way finish (within the
/// deadlines), and returns once every connection has ended.
pub async fn serve_with(
    listener: TcpListener,
    registry: Arc<Registry>,
    healthy: Healthy,
    shutdown: CancellationToken,
    config: ServeConfig,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let tracker = TaskTracker::new();
    loop {
        // Take a slot before accepting: over the cap, clients wait in the backlog.
        let slot = tokio::select! {
            s = Arc::clone(&slots).acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            c = listener.accept() => match c {
                Ok((stream, _)) => stream,
                // Out of descriptors or an aborted handshake: try again shortly.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let registry = Arc::clone(&registry);
        let healthy = Arc::clone(&healthy);
        let config = config.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            connection(stream, registry, healthy, &config, &shutdown).await;
            drop(slot);
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// One connection: one request and its answer, within the config's deadlines.
async fn connection(
    stream: TcpStream,
    registry: Arc<Registry>,
    healthy: Healthy,
    config: &ServeConfig,
    shutdown: &CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req: Request<Incoming>| {
        std::future::ready(Ok::<_, Infallible>(answer(&req, &registry, &*healthy)))
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST_HEAD);
    let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
    // Errors (a client gone, a bad or late head) only end this connection.
    let _ = tokio::time::timeout(config.connection_timeout, async {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = shutdown.cancelled() => {}
        }
        // Stopping: hyper closes a connection that has sent nothing yet at once, and lets a
        // request under way (its head arriving, its answer being written) finish, within
        // the deadlines.
        conn.as_mut().graceful_shutdown();
        let _ = conn.as_mut().await;
    })
    .await;
}

fn answer(
    req: &Request<Incoming>,
    registry: &Registry,
    healthy: &(dyn Fn() -> bool + Send + Sync),
) -> Response<String> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, TEXT_FORMAT, registry.render()),
        (&Method::GET, "/healthz") if healthy() => (StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/healthz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "unhealthy\n".into(),
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /healthz\n".into(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET"));
    }
    response
}

/// `--metrics-listen`, shared by both binaries.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics (`/metrics`) and `/healthz` over HTTP on this address
    /// (e.g. 0.0.0.0:9090); off when not given.
    #[arg(
        long = "metrics-listen",
        env = "QUARRY_METRICS_LISTEN",
        value_name = "ADDR"
    )]
    pub metrics_listen: Option<String>,
}

impl MetricsArgs {
    /// Starts the endpoint when the flag was given (until `shutdown`) and says where on
    /// stderr (`metrics on http://ADDR/metrics`); returns the address.
    pub async fn start(
        &self,
        registry: Arc<Registry>,
        shutdown: CancellationToken,
    ) -> Result<Option<SocketAddr>, String> {
        let Some(addr) = &self.metrics_listen else {
            return Ok(None);
        };
        let (listener, local) = bind(addr).await?;
        eprintln!("metrics on http://{local}/metrics");
        tokio::spawn(serve(listener, registry, Arc::new(|| true), shutdown));
        Ok(Some(local))
    }
}

/// Binds `addr` for [`serve`], naming the flag in the error.
pub async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), String> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
    let local = l
        .local_addr()
        .map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
    Ok((l, local))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Instant;

    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinHandle;

    use super::*;

    struct Server {
        addr: SocketAddr,
        registry: Arc<Registry>,
        healthy: Arc<AtomicBool>,
        stop: CancellationToken,
        task: JoinHandle<()>,
    }

    async fn start(config: ServeConfig) -> Server {
        let registry = Registry::new();
        let (listener, addr) = bind("127.0.0.1:0").await.unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let h = Arc::clone(&healthy);
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_with(
            listener,
            Arc::clone(&registry),
            Arc::new(move || h.load(Ordering::Relaxed)),
            stop.clone(),
            config,
        ));
        Server {
            addr,
            registry,
            healthy,
            stop,
            task,
        }
    }

    /// Reads until the server closes the connection (EOF or reset) or `limit` passes; returns
    /// what was read and when it closed, `None` if it stayed open.
    async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Option<(Vec<u8>, Instant)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        tokio::time::timeout(limit, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return Instant::now(),
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .ok()
        .map(|at| (out, at))
    }

    /// Sends `request` on a fresh connection; the whole answer (the server must close).
    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let (out, _) = read_until_closed(&mut s, Duration::from_secs(5))
            .await
            .expect("the server answers and closes the connection");
        String::from_utf8(out).unwrap()
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        exchange(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await
    }

    fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
        let head = answer.split("\r\n\r\n").next()?;
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[tokio::test]
    async fn serves_metrics_and_health_over_http() {
        let s = start(ServeConfig::default()).await;
        s.registry.counter("quarry_x_total", "X.", &[]).inc();

        let m = get(s.addr, "/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200 OK\r\n"), "{m}");
        assert_eq!(header(&m, "content-type"), Some(TEXT_FORMAT), "{m}");
        assert_eq!(header(&m, "connection"), Some("close"), "{m}");
        assert!(m.contains("\r\n\r\n# HELP quarry_x_total X.\n"), "{m}");
        assert!(m.contains("quarry_x_total 1\n"), "{m}");
        // A query string does not change the path.
        assert!(
            get(s.addr, "/metrics?x=1")
                .await
                .starts_with("HTTP/1.1 200")
        );

        let h = get(s.addr, "/healthz").await;
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert!(h.ends_with("\r\n\r\nok\n"), "{h}");
        s.healthy.store(false, Ordering::Relaxed);
        let h = get(s.addr, "/healthz").await;
        assert!(h.starts_with("HTTP/1.1 503"), "{h}");
        assert!(h.ends_with("\r\n\r\nunhealthy\n"), "{h}");

        assert!(get(s.addr, "/nope").await.starts_with("HTTP/1.1 404"));
        let post = exchange(
            s.addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert_eq!(header(&post, "allow"), Some("GET"), "{post}");
        let huge = exchange(
            s.addr,
            &format!(
                "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
                "a".repeat(2 * MAX_REQUEST_HEAD)
            ),
        )
        .await;
        assert!(huge.starts_with("HTTP/1.1 431"), "{huge}");
        // HTTP/1.0 clients are answered too.
        assert!(
            exchange(s.addr, "GET /healthz HTTP/1.0\r\n\r\n")
                .await
                .starts_with("HTTP/1.0 503")
        );

        s.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), s.task)
            .await
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(s.addr).await.is_err(), "still listening");
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let timeout = Duration::from_millis(400);
        let s = start(ServeConfig {
            header_read_timeout: timeout,
            ..ServeConfig::default()
        })
        .await;
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        let opened = Instant::now();
        let (got, closed) = read_until_closed(&mut c, 2 * timeout)
            .await
            .expect("an idle connection is closed within twice the head timeout");
        assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
        assert!(closed - opened >= timeout / 2, "closed too early");
        s.stop.cancel();
    }

    #[tokio::test]
    async fn a_trickled_request_head_is_cut() {
        let timeout = Duration::from_millis(400);
        let s = start(ServeConfig {
            header_read_timeout: timeout,
            ..ServeConfig::default()
        })
        .await;
        let c = TcpStream::connect(s.addr).await.unwrap();
        let (mut rx, mut tx) = c.into_split();
        // One byte every 20 ms, for up to 4 s: the head is never complete in time.
        let head = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(200)
        );
        let trickle = tokio::spawn(async move {
            for b in head.as_bytes() {
                if tx.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let cut = tokio::time::timeout(2 * timeout, async {
            loop {
                match rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(
            cut.is_ok(),
            "a trickling client is cut within twice the head timeout"
        );
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        trickle.abort();
        s.stop.cancel();
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_its_answer_is_cut() {
        let timeout = Duration::from_millis(800);
        let s = start(ServeConfig {
            connection_timeout: timeout,
            ..ServeConfig::default()
        })
        .await;
        // ~16 MB of exposition: more than the socket buffers hold.
        let pad = "p".repeat(16 * 1024);
        for i in 0..1000 {
            s.registry
                .gauge(
                    "quarry_big",
                    "Big.",
                    &[("i", &i.to_string()), ("pad", &pad)],
                )
                .set(1.0);
        }
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut c = socket.connect(s.addr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Read nothing past the deadline, then everything that still comes.
        tokio::time::sleep(timeout + Duration::from_millis(700)).await;
        let (got, _) = read_until_closed(&mut c, Duration::from_secs(20))
            .await
            .expect("the connection ends");
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "{}",
            &text[..text.len().min(200)]
        );
        let length: usize = header(&text, "content-length").unwrap().parse().unwrap();
        let body = got.len() - text.find("\r\n\r\n").unwrap() - 4;
        assert!(
            body < length,
            "the whole answer ({length} bytes) came although the client stalled past the deadline"
        );
        s.stop.cancel();
    }

    #[tokio::test]
    async fn over_the_cap_a_client_waits_for_a_free_slot() {
        let s = start(ServeConfig {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(30),
            connection_timeout: Duration::from_secs(30),
        })
        .await;
        let idle1 = TcpStream::connect(s.addr).await.unwrap();
        let _idle2 = TcpStream::connect(s.addr).await.unwrap();
        let mut fresh = TcpStream::connect(s.addr).await.unwrap();
        fresh
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Both slots are held by the idle connections: no answer yet.
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(500), fresh.read(&mut buf)).await;
        assert!(early.is_err(), "answered over the cap: {early:?}");
        // One idle client leaves: the waiting one is served.
        drop(idle1);
        let (got, _) = read_until_closed(&mut fresh, Duration::from_secs(5))
            .await
            .expect("served once a slot is free");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        s.stop.cancel();
    }

    #[tokio::test]
    async fn stopping_finishes_requests_under_way_and_closes_idle_connections() {
        let s = start(ServeConfig {
            header_read_timeout: Duration::from_secs(30),
            connection_timeout: Duration::from_secs(30),
            ..ServeConfig::default()
        })
        .await;
        let mut idle = TcpStream::connect(s.addr).await.unwrap();
        let mut halfway = TcpStream::connect(s.addr).await.unwrap();
        halfway
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        // Both are accepted once a later request is answered.
        assert!(get(s.addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        s.stop.cancel();
        // The request under way is still answered.
        halfway.write_all(b"Host: x\r\n\r\n").await.unwrap();
        let (got, _) = read_until_closed(&mut halfway, Duration::from_secs(2))
            .await
            .expect("the request under way is answered");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        tokio::time::timeout(Duration::from_secs(2), s.task)
            .await
            .expect("serve returns promptly on shutdown")
            .unwrap();
        assert!(
            read_until_closed(&mut idle, Duration::from_secs(2))
                .await
                .is_some(),
            "the idle connection is closed on shutdown"
        );
        assert!(TcpStream::connect(s.addr).await.is_err(), "still listening");
    }
}
