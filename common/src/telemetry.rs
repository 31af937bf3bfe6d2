//! One telemetry init for both binaries: `tracing` with an env filter (`QUARRY_LOG`), human or
//! JSON logs on stderr, and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over
//! OTLP/gRPC. Plus the W3C `traceparent` helpers that carry a trace across processes.
//!
//! Exporting never holds up the work: spans go to a bounded queue drained by the SDK's batch
//! thread, and spans that do not fit are dropped. An unreachable collector is reported once.
//! [`Telemetry::shutdown`] flushes what is queued, bounded in time.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The gRPC metadata key (and HTTP header) of the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The standard variable naming the collector; no exporter without it.
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The filter variable of both binaries (`tracing` env-filter syntax).
pub const LOG_ENV: &str = "QUARRY_LOG";

/// Spans buffered for export at most; more are dropped rather than slow the work down.
const QUEUE: usize = 4096;
/// Bound on one export call and on the flush at shutdown.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Set once the OTLP layer is installed: without it there is no context to propagate.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event (fields, span context), for log collectors.
    Json,
}

/// The global logging flag of both binaries.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log line format on stderr: `text` or `json`. The level filter is `QUARRY_LOG`.
    #[arg(
        long = "log-format",
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "QUARRY_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

/// What one binary asks of [`init`].
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` when `OTEL_SERVICE_NAME` is not set.
    pub service: &'static str,
    /// Filter when `QUARRY_LOG` is not set (e.g. `warn`).
    pub default_filter: &'static str,
    pub log_format: LogFormat,
    /// Resource attributes beyond `service.name` and `host.name` (worker GPUs, ...).
    /// `OTEL_RESOURCE_ATTRIBUTES` is read too and wins over these.
    pub attributes: Vec<(&'static str, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{LOG_ENV}: {0}")]
    Filter(String),
    #[error("OTLP exporter ({ENDPOINT_ENV}): {0}")]
    Exporter(String),
    #[error("a tracing subscriber is already installed: {0}")]
    Installed(String),
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes it.
#[must_use = "dropping it without shutdown loses the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes queued spans and stops the exporter, waiting at most a few seconds: a
    /// collector that is gone must not hold up the process's exit.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The flush blocks its thread on the batch thread, which needs the runtime's other
        // threads for the gRPC call: keep it off the runtime's workers.
        let done = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(EXPORT_TIMEOUT + Duration::from_secs(1))
        });
        match tokio::time::timeout(EXPORT_TIMEOUT + Duration::from_secs(2), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::debug!(error = %e, "trace exporter shutdown"),
            Ok(Err(e)) => tracing::debug!(error = %e, "trace exporter shutdown task"),
            Err(_) => tracing::debug!("trace exporter shutdown timed out"),
        }
    }
}

/// Whether text logs are coloured: only when stderr is a terminal (a file or a pipe would
/// keep the escape codes), and not when `NO_COLOR` is set to anything but the empty string
/// (no-color.org).
fn colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber. Call once, inside the tokio runtime (the gRPC exporter
/// spawns its connection there).
pub fn init(cfg: TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let filter = match std::env::var(LOG_ENV) {
        Ok(s) if !s.trim().is_empty() => {
            EnvFilter::try_new(&s).map_err(|e| TelemetryError::Filter(format!("{s:?}: {e}")))?
        }
        _ => EnvFilter::new(cfg.default_filter),
    };
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match cfg.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let endpoint = std::env::var(ENDPOINT_ENV)
        .ok()
        .filter(|s| !s.trim().is_empty());
    let (otel, provider) = match endpoint {
        Some(endpoint) => {
            let provider = provider(&cfg, &endpoint)?;
            let tracer = provider.tracer("quarry");
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_filter(export_filter())
                .boxed();
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Installed(e.to_string()))?;
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

/// What is exported: Quarry's own spans at info and above; never the exporter's own traffic
/// nor the gRPC/HTTP stack's internals (each export would produce more spans to export).
fn export_filter() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
}

fn provider(cfg: &TelemetryConfig, endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let exporter = WarnOnce {
        inner: exporter,
        endpoint: endpoint.to_string(),
        warned: AtomicBool::new(false),
    };
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(QUEUE)
                .with_scheduled_delay(Duration::from_millis(500))
                .build(),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_resource(resource(cfg))
        .build())
}

/// `service.name` (`OTEL_SERVICE_NAME`, else `service.name` in `OTEL_RESOURCE_ATTRIBUTES`,
/// else the binary's default), `host.name`, the binary's own attributes, and the rest of
/// `OTEL_RESOURCE_ATTRIBUTES` (which the SDK's builder reads, and which wins over ours).
fn resource(cfg: &TelemetryConfig) -> Resource {
    // What the SDK's detectors found: OTEL_SERVICE_NAME (or `unknown_service`) and
    // OTEL_RESOURCE_ATTRIBUTES.
    let from_env = Resource::builder().build();
    let detected = from_env
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .map(|v| v.to_string())
        .filter(|s| !s.is_empty() && !s.starts_with("unknown_service"));
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or(detected)
        .unwrap_or_else(|| cfg.service.to_string());
    let mut attrs = vec![KeyValue::new("host.name", hostname())];
    attrs.extend(
        cfg.attributes
            .iter()
            .map(|(k, v)| KeyValue::new(*k, v.clone())),
    );
    attrs.retain(|kv| from_env.get(&kv.key).is_none());
    Resource::builder()
        .with_attributes(attrs)
        .with_service_name(service)
        .build()
}

/// This host's name (`/proc`, then `HOSTNAME`), `localhost` when neither says.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Wraps the OTLP exporter so an unreachable collector is logged once, not per batch: the
/// work goes on, the spans are dropped.
#[derive(Debug)]
struct WarnOnce<E> {
    inner: E,
    endpoint: String,
    warned: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for WarnOnce<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let r = self.inner.export(batch).await;
        if let Err(e) = &r
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                endpoint = %self.endpoint,
                error = %e,
                "cannot export traces; spans are dropped while the collector is unreachable (logged once)"
            );
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

/// The `traceparent` of `span`, when spans are exported and it is recorded.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !EXPORTING.load(Ordering::Relaxed) || span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut MapCarrier(&mut carrier));
    carrier.remove(TRACEPARENT)
}

/// The `traceparent` of the current span (what a client call made inside it carries).
pub fn current_traceparent() -> Option<String> {
    if !EXPORTING.load(Ordering::Relaxed) {
        return None;
    }
    traceparent(&tracing::Span::current())
}

/// Makes `span` a child of the remote span `traceparent` names; a missing or malformed
/// value leaves it a root (a trace context must never fail a call).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if let Some(cx) = remote(traceparent) {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the span `traceparent` names (e.g. a merge to the commits it merges).
pub fn add_link(span: &tracing::Span, traceparent: &str) {
    if let Some(cx) = remote(traceparent) {
        span.add_link(cx.span().span_context().clone());
    }
}

/// Parents `span` on the `traceparent` metadata of a gRPC request, if it has one.
pub fn set_parent_from_metadata(span: &tracing::Span, md: &tonic::metadata::MetadataMap) {
    if !EXPORTING.load(Ordering::Relaxed) {
        return;
    }
    if let Some(tp) = md.get(TRACEPARENT).and_then(|v| v.to_str().ok()) {
        set_parent(span, tp);
    }
}

fn remote(traceparent: &str) -> Option<Context> {
    if !EXPORTING.load(Ordering::Relaxed) || traceparent.is_empty() {
        return None;
    }
    let mut carrier = HashMap::new();
    carrier.insert(TRACEPARENT.to_string(), traceparent.to_string());
    let cx = TraceContextPropagator::new().extract(&MapCarrier(&mut carrier));
    cx.span().span_context().is_valid().then_some(cx)
}

struct MapCarrier<'a>(&'a mut HashMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

impl Extractor for MapCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }

    #[test]
    fn traceparent_round_trips_and_parents() {
        // A tracer without an exporter: spans get real ids, nothing leaves the process.
        let provider = SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::subscriber::with_default(subscriber, || {
            let lease = tracing::info_span!("lease");
            let tp = traceparent(&lease).expect("a recorded span has a traceparent");
            let parts: Vec<&str> = tp.split('-').collect();
            assert_eq!(parts.len(), 4, "{tp}");
            assert_eq!((parts[0], parts[1].len(), parts[2].len()), ("00", 32, 16));

            let round = tracing::info_span!(parent: None, "round");
            set_parent(&round, &tp);
            let child = traceparent(&round).expect("traceparent of the child");
            assert_eq!(child.split('-').nth(1), Some(parts[1]), "same trace");
            assert_ne!(child.split('-').nth(2), Some(parts[2]), "its own span id");

            // What a client call made inside the span carries.
            let _in = round.enter();
            assert_eq!(current_traceparent().as_deref(), Some(child.as_str()));
        });
        // Garbage never parents anything.
        assert!(remote("not a traceparent").is_none());
        assert!(remote("").is_none());
        assert!(remote("00-00000000000000000000000000000000-0000000000000000-01").is_none());
    }
}
