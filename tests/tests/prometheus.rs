//! Quarry's Grafana dashboard (deploy/grafana/quarry-dashboard.json) and Prometheus alert
//! rules (deploy/prometheus/quarry-alerts.yaml) against a real Prometheus that scrapes a real
//! `coordinator serve` and a real `worker` while they run a job with a quarantined round.
//!
//! Every PromQL expression is read from the files themselves (the dashboard's targets and
//! template variables; the rules as Prometheus loaded them), so the files cannot drift from
//! what is checked: each must parse, and each over metrics that exist must return data. Every
//! metric they name must be listed in docs/observability.md, and so must every metric the
//! processes export. `promtool` checks the rule file and runs its unit tests
//! (deploy/prometheus/quarry-alerts.test.yaml).
//!
//! Tools: `prometheus` and `promtool` (Debian package `prometheus`, which .ci/run installs), or
//! QUARRY_PROMETHEUS / QUARRY_PROMTOOL. A missing tool fails the test; nothing is skipped.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quarry_tests::cluster::{Killed, spawn_worker, start_serve_with};
use quarry_tests::prometheus::{Prometheus, http_get, tool, url_encode};
use quarry_tests::*;
use serde_json::Value;

/// Scrape and rule evaluation interval of the test's Prometheus.
const INTERVAL: &str = "1s";
/// What Grafana's built-in variables stand for when the test runs an expression.
const BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__interval_ms", "15000"),
    ("__range", "1h"),
    ("__range_s", "3600"),
    ("__range_ms", "3600000"),
];
/// Metrics the run must produce, so that the expressions over them are really evaluated on
/// data. GPU metrics are not here: without NVML (CI has no GPU) a worker reports none.
const COORDINATOR_METRICS: &[&str] = &[
    "quarry_rounds_leased_total",
    "quarry_rounds_committed_total",
    "quarry_rounds_failed_total",
    "quarry_rounds_quarantined_total",
    "quarry_rounds_released_total",
    "quarry_rounds_duplicate_total",
    "quarry_samples_committed_total",
    "quarry_lease_expiries_total",
    "quarry_acquire_seconds_bucket",
    "quarry_commit_seconds_bucket",
    "quarry_merge_bytes_total",
    "quarry_merge_seconds_bucket",
    "quarry_merges_failed_total",
    "quarry_store_errors_total",
    "quarry_leader",
    "quarry_workers",
    "quarry_rounds_in_flight",
    "quarry_jobs_running",
];
const WORKER_METRICS: &[&str] = &[
    "quarry_worker_rounds_total",
    "quarry_worker_idle_gap_seconds_bucket",
    "quarry_worker_generator_seconds_bucket",
    "quarry_worker_upload_bytes_total",
];

/// Runs a command to completion within `limit`; its status and combined output.
fn run_bounded(mut cmd: Command, limit: Duration) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = Killed(
        cmd.stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "{cmd:?} ran past {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status.success(),
        std::fs::read_to_string(&out_path).unwrap_or_default(),
    )
}

/// Polls `f` every 200 ms until it returns something, for at most `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The address a process printed as `metrics on http://ADDR/metrics` in `log`.
fn metrics_addr(log: &Path, who: &str, proc: &mut Killed) -> String {
    wait_for(
        &format!("{who} printing `metrics on http://ADDR/metrics`"),
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(st) = proc.0.try_wait().unwrap() {
                panic!("{who} exited ({st}):\n{text}");
            }
            text.lines().find_map(|l| {
                let rest = &l[l.find("metrics on http://")? + "metrics on http://".len()..];
                Some(rest.split('/').next()?.to_string())
            })
        },
    )
}

/// The sample `name` (no labels) in a text exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Metric families (`# TYPE` lines) of a text exposition.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The two-object job, with object obj_a's round 1 (seed 6) failing every time and no retries,
/// so that it is quarantined and the failure counters move too.
fn job_file(dir: &Path, root: &Path) -> PathBuf {
    let text = format!(
        r#"
exp_name = "watched"
objects = ["obj_a", "obj_b"]
target_count_per_object = 90
round_batch_size = 25
num_iterations = 2
seed_base = 5
retries = 0
root = "{root}"

[generator]
argv = ["python3", "main.py", "--name", "{{name}}", "--object_code", "{{object}}", "--batch_size", "{{batch_size}}",
        "--num_iterations", "{{num_iterations}}", "--seed", "{{seed}}", "--gpu", "0", "--yield_mode", "uneven",
        "--fail_seeds", "6", "--sleep_ms", "300"]
cwd = "BimanGrasp-Optimization"
output = "data/experiments/{{name}}/results/{{object}}.npy"
round_dir = "data/experiments/{{name}}"
"#,
        root = root.display()
    );
    let p = dir.join("job.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The index just past the string literal that starts at `b[i]` (a quote).
fn skip_string(b: &[u8], mut i: usize) -> usize {
    let quote = b[i];
    i += 1;
    while i < b.len() && b[i] != quote {
        i += if b[i] == b'\\' && quote != b'`' { 2 } else { 1 };
    }
    i + 1
}

/// Identifiers in a PromQL expression outside string literals, with their byte offsets.
fn identifiers(expr: &str) -> Vec<(usize, &str)> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(b, i);
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            out.push((start, &expr[start..i]));
        } else {
            i += 1;
        }
    }
    out
}

/// The `quarry_*` vector selectors of an expression (`name` or `name{...}`), in order.
fn selectors(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    for (start, name) in identifiers(expr) {
        if !name.starts_with("quarry_") {
            continue;
        }
        let mut i = start + name.len();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut sel = name.to_string();
        if b.get(i) == Some(&b'{') {
            // Up to the matching brace, skipping string literals.
            let open = i;
            while i < b.len() && b[i] != b'}' {
                i = if matches!(b[i], b'"' | b'\'' | b'`') {
                    skip_string(b, i)
                } else {
                    i + 1
                };
            }
            assert!(i < b.len(), "unbalanced braces in {expr}");
            sel.push_str(&expr[open..=i]);
        }
        out.push(sel);
    }
    out
}

/// Metric names an expression reads (`quarry_*` only; `up` always exists).
fn metric_names(expr: &str) -> BTreeSet<String> {
    identifiers(expr)
        .into_iter()
        .map(|(_, n)| n)
        .filter(|n| n.starts_with("quarry_"))
        .map(str::to_string)
        .collect()
}

/// Whether `name` is a documented metric, or a series of a documented histogram.
fn is_documented(documented: &BTreeSet<String>, name: &str) -> bool {
    documented.contains(name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|family| documented.contains(family))
        })
}

/// Replaces Grafana variables (`$name`, `${name}`) in `text`; an unknown one is an error.
fn substitute(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('{') {
            let end = inner
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {text}"))?;
            // ${var:format}: the format does not matter for the values used here.
            let name = inner[..end].split(':').next().unwrap_or("");
            (name, end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.is_empty() {
            // A regex anchor such as "foo$": not a variable.
            out.push('$');
            rest = after;
            continue;
        }
        let value = vars
            .get(name)
            .ok_or_else(|| format!("unknown variable ${name} in {text}"))?;
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Grafana's regex value of a multi-value variable: `(a|b)`, each value escaped.
fn regex_of(values: &[String]) -> String {
    let esc: Vec<String> = values
        .iter()
        .map(|v| {
            v.chars()
                .flat_map(|c| {
                    if "\\^$.|?*+()[]{}".contains(c) {
                        vec!['\\', c]
                    } else {
                        vec![c]
                    }
                })
                .collect()
        })
        .collect();
    if esc.len() == 1 {
        esc[0].clone()
    } else {
        format!("({})", esc.join("|"))
    }
}

/// Every panel, rows' nested panels included.
fn all_panels(panels: &Value, out: &mut Vec<Value>) {
    for p in panels.as_array().cloned().unwrap_or_default() {
        if let Some(nested) = p.get("panels") {
            all_panels(nested, out);
        }
        out.push(p);
    }
}

/// One query of the dashboard: where it is, its language and its text.
struct DashQuery {
    origin: String,
    ds_type: String,
    text: String,
}

/// The dashboard's layout is sane and its queries use the data-source variables; returns
/// every query.
fn dashboard_queries(dash: &Value) -> Vec<DashQuery> {
    let mut panels = Vec::new();
    all_panels(&dash["panels"], &mut panels);
    assert!(!panels.is_empty(), "the dashboard has no panels");
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut out = Vec::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("").to_string();
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "panel id {id} used twice");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: gridPos {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.clone()) {
                    panic!("panels {other:?} and {title:?} overlap at x={cx} y={cy}");
                }
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert!(
            !title.is_empty() && p["description"].is_string(),
            "panel {id}: give it a title and a description"
        );
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "{title}: no queries");
        let mut refs = BTreeSet::new();
        for t in targets {
            let r = t["refId"].as_str().unwrap_or("").to_string();
            assert!(refs.insert(r.clone()), "{title}: refId {r:?} twice");
            let ds = if t["datasource"].is_object() {
                &t["datasource"]
            } else {
                &p["datasource"]
            };
            let ds_type = ds["type"].as_str().unwrap_or("").to_string();
            let uid = ds["uid"].as_str().unwrap_or("");
            // Data sources are template variables, so the dashboard works in any Grafana.
            assert_eq!(uid, format!("${{{ds_type}}}"), "{title}: data source {ds}");
            let text = match ds_type.as_str() {
                "prometheus" => t["expr"].as_str(),
                "tempo" => {
                    assert_eq!(t["queryType"], "traceql", "{title}: {t}");
                    t["query"].as_str()
                }
                other => {
                    panic!("{title}: data source type {other:?}: teach this test its language")
                }
            }
            .unwrap_or_else(|| panic!("{title}: a query without text: {t}"));
            out.push(DashQuery {
                origin: format!("panel {title:?} {r}"),
                ds_type,
                text: text.to_string(),
            });
        }
    }
    out
}

#[test]
fn dashboard_and_alerts_query_a_real_prometheus() {
    let repo = repo_root();
    let dash_path = repo.join("deploy/grafana/quarry-dashboard.json");
    let rules_path = repo.join("deploy/prometheus/quarry-alerts.yaml");
    let rules_test_path = repo.join("deploy/prometheus/quarry-alerts.test.yaml");
    let dash: Value =
        serde_json::from_slice(&std::fs::read(&dash_path).unwrap()).expect("the dashboard is JSON");
    let docs = std::fs::read_to_string(repo.join("docs/observability.md")).unwrap();
    // The metrics docs/observability.md lists (its tables' first column).
    let documented: BTreeSet<String> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("| `quarry_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("quarry_{n}"))
        .collect();
    assert!(
        documented.len() >= COORDINATOR_METRICS.len(),
        "docs/observability.md lists no metrics table"
    );
    let mut problems: Vec<String> = Vec::new();

    // promtool: the rule file, its unit tests, and the compose stack's Prometheus config.
    let promtool = tool("QUARRY_PROMTOOL", "promtool");
    for args in [
        vec!["check", "rules", rules_path.to_str().unwrap()],
        vec!["test", "rules", rules_test_path.to_str().unwrap()],
        vec![
            "check",
            "config",
            repo.join("deploy/prometheus/prometheus.yml")
                .to_str()
                .unwrap(),
        ],
    ] {
        let mut c = Command::new(&promtool);
        c.args(&args);
        let (ok, out) = run_bounded(c, Duration::from_secs(60));
        assert!(ok, "promtool {args:?} failed:\n{out}");
    }

    // A coordinator with metrics, and a worker with metrics if it can serve them.
    let root = legacy_root();
    let home = tempfile::tempdir().unwrap();
    let job = job_file(home.path(), root.path());
    let coord_log = home.path().join("coordinator.log");
    let state = format!("file://{}", home.path().join("state.redb").display());
    let store = format!("file://{}", home.path().join("store").display());
    let (mut serve, addr) = start_serve_with(
        &[
            "--state",
            &state,
            "--store",
            &store,
            "--lease-ttl",
            "5",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
        &coord_log,
    );
    let coord_metrics = metrics_addr(&coord_log, "coordinator", &mut serve);

    let worker_log = home.path().join("worker.log");
    let (worker_help_ok, worker_help) = {
        let mut c = Command::new(bin("worker"));
        c.arg("--help");
        run_bounded(c, Duration::from_secs(30))
    };
    assert!(worker_help_ok, "worker --help failed:\n{worker_help}");
    let worker_has_metrics = worker_help.contains("--metrics-listen");
    let (mut worker, worker_metrics) = if worker_has_metrics {
        let mut w = Killed(
            Command::new(bin("worker"))
                .args(["--gpu", "0,1", "--coordinator", &addr])
                .args(["--metrics-listen", "127.0.0.1:0"])
                .stderr(std::fs::File::create(&worker_log).unwrap())
                .spawn()
                .unwrap(),
        );
        let m = metrics_addr(&worker_log, "worker", &mut w);
        (w, Some(m))
    } else {
        problems.push(
            "the worker has no --metrics-listen yet: its metrics were not scraped, and the \
             expressions over them were only parsed"
                .into(),
        );
        (spawn_worker(&addr, "0,1", &[], Some(&worker_log)), None)
    };

    // Prometheus scraping both every second, with the alert rules loaded.
    let mut config = format!(
        "global:\n  scrape_interval: {INTERVAL}\n  scrape_timeout: {INTERVAL}\n  \
         evaluation_interval: {INTERVAL}\nrule_files:\n  - {rules}\nscrape_configs:\n  \
         - job_name: quarry-coordinator\n    static_configs:\n      - targets: [\"{coord_metrics}\"]\n",
        rules = rules_path.display()
    );
    if let Some(w) = &worker_metrics {
        config.push_str(&format!(
            "  - job_name: quarry-worker\n    static_configs:\n      - targets: [\"{w}\"]\n"
        ));
    }
    let config_path = home.path().join("prometheus.yml");
    std::fs::write(&config_path, &config).unwrap();
    let prom = Prometheus::start(&config_path, home.path());
    let targets = 1 + usize::from(worker_metrics.is_some());
    wait_for(
        "prometheus scraping every target",
        Duration::from_secs(60),
        || (prom.scalar("sum(up)")? >= targets as f64).then_some(()),
    );

    // The job, with Prometheus watching, so that rates and histograms see it happen.
    let mut submit = Killed(
        Command::new(bin("coordinator"))
            .arg("submit")
            .arg(&job)
            .args(["--coordinator", &addr, "--watch"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(home.path().join("submit.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let st = wait_for("the job to finish", Duration::from_secs(180), || {
        if let Some(st) = worker.0.try_wait().unwrap() {
            panic!(
                "worker exited ({st}):\n{}",
                std::fs::read_to_string(&worker_log).unwrap_or_default()
            );
        }
        submit.0.try_wait().unwrap()
    });
    assert!(
        st.success(),
        "submit --watch failed ({st}):\n{}",
        std::fs::read_to_string(home.path().join("submit.log")).unwrap_or_default()
    );
    let job_done = now_s();

    // Prometheus has scraped everything after the job ended.
    let (code, coord_text) = http_get(&coord_metrics, "/metrics").unwrap();
    assert_eq!(code, 200);
    let committed = sample(&coord_text, "quarry_rounds_committed_total").unwrap();
    assert!(committed >= 8.0, "{coord_text}");
    assert_eq!(
        sample(&coord_text, "quarry_rounds_quarantined_total"),
        Some(1.0),
        "the job quarantines exactly one round"
    );
    wait_for(
        "a scrape of every target after the job",
        Duration::from_secs(30),
        || {
            let t = prom.scalar("min(timestamp(up))")?;
            (t > job_done && prom.scalar("sum(up)")? >= targets as f64).then_some(())
        },
    );
    assert_eq!(
        prom.scalar("sum(quarry_rounds_committed_total)"),
        Some(committed)
    );

    // What exists: every metric the processes export is documented; those the run must
    // produce are in Prometheus.
    let mut exported = families(&coord_text);
    if let Some(w) = &worker_metrics {
        let (code, text) = http_get(w, "/metrics").unwrap();
        assert_eq!(code, 200, "worker /metrics");
        exported.extend(families(&text));
    }
    for f in &exported {
        if !documented.contains(f) {
            problems.push(format!(
                "{f} is exported but not listed in docs/observability.md"
            ));
        }
    }
    let present: BTreeSet<String> = prom.api("label/__name__/values")["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let mut required: Vec<&str> = COORDINATOR_METRICS.to_vec();
    if worker_metrics.is_some() {
        required.extend(WORKER_METRICS);
    }
    for m in required {
        if !present.contains(m) {
            problems.push(format!("{m} has no samples in Prometheus after the job"));
        }
    }

    // The dashboard's variables, as Grafana would resolve them.
    let mut vars: BTreeMap<String, String> = BUILTINS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut ds_vars = BTreeSet::new();
    for v in dash["templating"]["list"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap().to_string();
        match v["type"].as_str().unwrap() {
            "datasource" => {
                let kind = v["query"].as_str().unwrap();
                assert!(
                    ["prometheus", "tempo"].contains(&kind),
                    "variable {name}: data source type {kind}"
                );
                ds_vars.insert(kind.to_string());
                vars.insert(name.clone(), name.clone());
            }
            "query" => {
                assert_eq!(v["datasource"]["uid"], "${prometheus}", "variable {name}");
                let q = v["query"]["query"]
                    .as_str()
                    .or(v["query"].as_str())
                    .unwrap();
                let q = substitute(q, &vars).unwrap();
                let inner = q
                    .strip_prefix("label_values(")
                    .and_then(|s| s.strip_suffix(')'))
                    .unwrap_or_else(|| panic!("variable {name}: teach this test {q:?}"));
                let (sel, label) = inner.rsplit_once(',').unwrap();
                let (sel, label) = (sel.trim(), label.trim());
                let r = prom.api(&format!(
                    "series?match[]={}&start={}",
                    url_encode(sel),
                    now_s() - 3600.0
                ));
                assert_eq!(r["status"], "success", "variable {name}: {q}: {r}");
                let values: BTreeSet<String> = r["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|s| s[label].as_str().map(str::to_string))
                    .collect();
                assert!(!values.is_empty(), "variable {name}: {q} has no values");
                if name == "job" {
                    let want: BTreeSet<String> = ["quarry-coordinator", "quarry-worker"]
                        .iter()
                        .take(targets)
                        .map(|s| s.to_string())
                        .collect();
                    assert_eq!(values, want, "variable job");
                }
                let values: Vec<String> = values.into_iter().collect();
                vars.insert(name.clone(), regex_of(&values));
            }
            other => panic!("variable {name}: type {other}: teach this test"),
        }
    }
    assert_eq!(
        ds_vars,
        BTreeSet::from(["prometheus".to_string(), "tempo".to_string()]),
        "the dashboard's data sources are the variables ${{prometheus}} and ${{tempo}}"
    );

    // Every expression: the dashboard's (with variables substituted) and the rules' (as
    // Prometheus loaded them; it evaluated them every second during the run).
    let mut exprs: Vec<(String, String, bool)> = Vec::new(); // origin, expr, is_alert
    let mut tempo = 0;
    for q in dashboard_queries(&dash) {
        match q.ds_type.as_str() {
            "prometheus" => match substitute(&q.text, &vars) {
                Ok(e) => exprs.push((q.origin, e, false)),
                Err(e) => problems.push(format!("{}: {e}", q.origin)),
            },
            _ => {
                assert!(
                    q.text.contains("resource.service.name=\"quarry-"),
                    "{}: a TraceQL query for Quarry's services: {}",
                    q.origin,
                    q.text
                );
                tempo += 1;
            }
        }
    }
    assert!(tempo >= 1, "the dashboard has no traces panel");
    let rules = prom.api("rules");
    assert_eq!(rules["status"], "success", "{rules}");
    let mut alert_names = BTreeSet::new();
    for g in rules["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["name"].as_str().unwrap().to_string();
            assert_eq!(r["type"], "alerting", "{name}");
            assert_eq!(r["health"], "ok", "rule {name}: {r}");
            assert!(
                r["annotations"]["summary"].is_string(),
                "rule {name}: no summary"
            );
            exprs.push((
                format!("alert {name}"),
                r["query"].as_str().unwrap().to_string(),
                true,
            ));
            alert_names.insert(name);
        }
    }
    for want in [
        "QuarryJobStalled",
        "QuarryGpuUnhealthy",
        "QuarryQuarantineRateHigh",
        "QuarryNoLeader",
        "QuarryLeaseExpiryRateHigh",
    ] {
        assert!(alert_names.contains(want), "no alert {want}");
    }

    let mut report = Vec::new();
    for (origin, expr, is_alert) in &exprs {
        let v = prom.query(expr);
        if v["status"] != "success" {
            problems.push(format!("{origin}: {expr}: {}", v["error"]));
            continue;
        }
        let names = metric_names(expr);
        for n in &names {
            if !is_documented(&documented, n) {
                problems.push(format!(
                    "{origin}: {n} is not a metric docs/observability.md lists"
                ));
            }
        }
        let missing: Vec<&String> = names.iter().filter(|n| !present.contains(*n)).collect();
        if !missing.is_empty() {
            report.push(format!("parsed only (no {missing:?} here): {origin}"));
            continue;
        }
        let empty = v["data"]["result"].as_array().is_some_and(|r| r.is_empty());
        if *is_alert {
            // An alert's condition is rightly empty in a healthy run: each selector it reads
            // must return data instead.
            for sel in selectors(expr) {
                if prom.results(&sel).is_empty() {
                    problems.push(format!("{origin}: selector {sel} returns no data"));
                }
            }
        } else if empty {
            problems.push(format!("{origin}: {expr} returns no data"));
        }
    }

    // A healthy run fires nothing.
    let alerts = prom.api("alerts");
    for a in alerts["data"]["alerts"].as_array().unwrap() {
        problems.push(format!(
            "alert {} is {} in a healthy run: {a}",
            a["labels"]["alertname"], a["state"]
        ));
    }

    eprintln!(
        "checked {} expressions ({} from the dashboard, {tempo} TraceQL queries not run)",
        exprs.len(),
        exprs.iter().filter(|e| !e.2).count()
    );
    for r in &report {
        eprintln!("{r}");
    }
    if !problems.is_empty() {
        let log = std::fs::read_to_string(&prom.log).unwrap_or_default();
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("level=warn") || l.contains("level=error"))
            .take(20)
            .collect();
        panic!(
            "{} problem(s):\n{}\n\nprometheus warnings and errors:\n{}",
            problems.len(),
            problems.join("\n"),
            warnings.join("\n")
        );
    }
}

#[test]
fn expression_helpers() {
    let e = r#"sum by (le) (rate(quarry_acquire_seconds_bucket{job=~"a|quarry_x}", le!=""}[1m])) / quarry_leader"#;
    assert_eq!(
        selectors(e),
        [
            r#"quarry_acquire_seconds_bucket{job=~"a|quarry_x}", le!=""}"#,
            "quarry_leader"
        ]
    );
    assert_eq!(
        metric_names(e),
        BTreeSet::from([
            "quarry_acquire_seconds_bucket".to_string(),
            "quarry_leader".to_string()
        ])
    );
    let documented = BTreeSet::from(["quarry_acquire_seconds".to_string()]);
    assert!(is_documented(&documented, "quarry_acquire_seconds_bucket"));
    assert!(!is_documented(&documented, "quarry_acquire_total"));
    let vars = BTreeMap::from([
        ("job".to_string(), regex_of(&["a.b".into(), "c".into()])),
        ("__rate_interval".to_string(), "1m".to_string()),
    ]);
    assert_eq!(
        substitute(
            r#"rate(x{job=~"$job", y=~"z$"}[${__rate_interval}])"#,
            &vars
        )
        .unwrap(),
        r#"rate(x{job=~"(a\.b|c)", y=~"z$"}[1m])"#
    );
    assert!(substitute("x{job=~\"$nope\"}", &vars).is_err());
}
