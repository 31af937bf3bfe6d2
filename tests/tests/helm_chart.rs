//! The Helm chart (helm/quarry) and the compose file (deploy/compose.yaml): the chart renders
//! for its default values and for every documented variant (helm/quarry/ci/*-values.yaml),
//! passes `helm lint --strict`, validates against the Kubernetes 1.30 schemas offline, runs
//! the binaries with flags they accept (checked against the built binaries' `--help`, so the
//! chart cannot drift from the CLI), and its values.schema.json rejects bad values.
//!
//! Tools: Helm's Go SDK through PyPI `helm-python-sdk` (driven by tests/helm/helm_tool.py) and
//! PyPI `kubernetes-validate`, both in .ci/venv-helm, which .ci/run installs. Override with
//! QUARRY_HELM_PYTHON (a Python with helm-python-sdk and PyYAML) and QUARRY_KUBE_VALIDATE (the
//! kubernetes-validate executable). A missing tool fails these tests; nothing is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use quarry_tests::{bin, repo_root};
use serde_json::Value;

/// Kubernetes version the manifests must be valid for.
const KUBE_VERSION: &str = "1.30.0";
/// The release the tests render; names below are `<release>-quarry-...`.
const RELEASE: &str = "ci";
const NAMESPACE: &str = "quarry-test";
/// Custom resources kubernetes-validate has no schema for, each checked by hand in
/// `check_service_monitor` and `check_prometheus_rule` instead. Any other kind without a
/// schema fails the test.
const CRD_KINDS: &[(&str, &str)] = &[
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
];
/// The variants the docs promise; each must have its values file in helm/quarry/ci.
const VARIANTS: &[&str] = &[
    "etcd-1",
    "etcd-3",
    "etcd-external",
    "per-gpu",
    "tls",
    "monitoring",
];
/// Bound on every tool run: a hung tool fails the test instead of hanging CI.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn chart_dir() -> PathBuf {
    repo_root().join("helm/quarry")
}

fn tool_path(var: &str, default: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(default));
    assert!(
        p.is_file(),
        "{what} not found at {} (set {var}, or run .ci/run, which installs it into .ci/venv-helm)",
        p.display()
    );
    p
}

/// The Python that drives Helm's SDK (helm-python-sdk + PyYAML).
fn helm_python() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = tool_path(
            "QUARRY_HELM_PYTHON",
            ".ci/venv-helm/bin/python",
            "Python with helm-python-sdk",
        );
        let mut c = Command::new(&p);
        c.args([
            "-c",
            "import helm_python, yaml; print(helm_python.helm_sdk_version())",
        ]);
        let out = run_bounded(c, "import helm_python");
        assert!(
            out.status.success(),
            "{} cannot import helm_python and yaml (pip install helm-python-sdk pyyaml; .ci/run does):\n{}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        p
    })
    .clone()
}

fn kube_validate() -> PathBuf {
    tool_path(
        "QUARRY_KUBE_VALIDATE",
        ".ci/venv-helm/bin/kubernetes-validate",
        "kubernetes-validate",
    )
}

/// Runs `cmd` to completion within TOOL_TIMEOUT, or kills it and panics.
fn run_bounded(mut cmd: Command, what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
    // Drain both pipes on threads so a chatty tool cannot block on a full pipe.
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > TOOL_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} ran longer than {TOOL_TIMEOUT:?}: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().expect("stdout thread"),
        stderr: t_err.join().expect("stderr thread"),
    }
}

fn helm_tool(args: &[&str]) -> Output {
    let mut c = Command::new(helm_python());
    c.arg(repo_root().join("tests/helm/helm_tool.py"))
        .args(args);
    run_bounded(c, &format!("helm_tool.py {}", args.join(" ")))
}

/// A rendered chart: every manifest (with the template it came from) and NOTES.txt.
struct Rendered {
    manifests: Vec<(String, Value)>,
    notes: String,
}

impl Rendered {
    fn docs(&self) -> impl Iterator<Item = &Value> {
        self.manifests.iter().map(|(_, d)| d)
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name).unwrap_or_else(|| {
            let have: Vec<String> = self
                .docs()
                .map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]))
                .collect();
            panic!("no {kind} {name} rendered; have {have:?}")
        })
    }
}

/// Renders the chart with a values file and/or values as JSON; Err is Helm's error.
fn render(values: Option<&Path>, values_json: Option<&str>) -> Result<Rendered, String> {
    let chart = chart_dir();
    let mut args = vec![
        "render".to_string(),
        chart.display().to_string(),
        "--name".into(),
        RELEASE.into(),
        "--namespace".into(),
        NAMESPACE.into(),
    ];
    if let Some(v) = values {
        args.extend(["--values".into(), v.display().to_string()]);
    }
    if let Some(j) = values_json {
        args.extend(["--values-json".into(), j.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = helm_tool(&args);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("helm_tool render prints JSON");
    let manifests = v["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            (
                m["source"].as_str().expect("source").to_string(),
                m["doc"].clone(),
            )
        })
        .collect();
    Ok(Rendered {
        manifests,
        notes: v["notes"].as_str().unwrap_or_default().to_string(),
    })
}

/// The default values (None) and every variant file, by name.
fn variant_files() -> Vec<(String, Option<PathBuf>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("helm/quarry/ci")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    files.sort();
    let mut out = vec![("default".to_string(), None)];
    for f in files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix("-values.yaml"))
            .expect("variant name")
            .to_string();
        out.push((name, Some(f)));
    }
    let names: BTreeSet<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    for v in VARIANTS {
        assert!(
            names.contains(v),
            "helm/quarry/ci/{v}-values.yaml is missing"
        );
    }
    out
}

/// Every variant rendered once, shared by the tests of this file.
fn rendered_variants() -> &'static Vec<(String, Rendered)> {
    static R: OnceLock<Vec<(String, Rendered)>> = OnceLock::new();
    R.get_or_init(|| {
        variant_files()
            .into_iter()
            .map(|(name, file)| {
                let r = render(file.as_deref(), None)
                    .unwrap_or_else(|e| panic!("variant {name} does not render:\n{e}"));
                (name, r)
            })
            .collect()
    })
}

fn variant(name: &str) -> &'static Rendered {
    &rendered_variants()
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no variant {name}"))
        .1
}

fn name(suffix: &str) -> String {
    format!("{RELEASE}-quarry-{suffix}")
}

#[test]
fn chart_lints_strictly() {
    for (variant, file) in variant_files() {
        let chart = chart_dir().display().to_string();
        let mut args = vec!["lint", chart.as_str(), "--kube-version", "v1.30.0"];
        let f = file.map(|f| f.display().to_string());
        if let Some(f) = &f {
            args.extend(["--values", f.as_str()]);
        }
        let out = helm_tool(&args);
        assert!(
            out.status.success(),
            "lint {variant}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).expect("lint report");
        // Severity 1 is informational ("icon is recommended"); strict lint fails on warnings.
        let problems: Vec<&Value> = report["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .collect();
        assert!(
            problems.is_empty() && report["errors"].as_array().is_none_or(|e| e.is_empty()),
            "helm lint --strict, variant {variant}: {report:#}"
        );
    }
}

#[test]
fn chart_renders_valid_kubernetes_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    for (variant, r) in rendered_variants() {
        let mut text = String::new();
        for d in r.docs() {
            let api = d["apiVersion"].as_str().unwrap_or_default();
            let kind = d["kind"].as_str().unwrap_or_default();
            if CRD_KINDS.contains(&(api, kind)) {
                continue;
            }
            // JSON is YAML: one document per manifest.
            text.push_str("---\n");
            text.push_str(&serde_json::to_string(d).expect("json"));
            text.push('\n');
        }
        let p = dir.path().join(format!("{variant}.yaml"));
        std::fs::write(&p, text).expect("write manifests");
        files.push(p);
    }
    let mut c = Command::new(kube_validate());
    c.args(["--strict", "-k", KUBE_VERSION, "--quiet"])
        .args(&files);
    let out = run_bounded(c, "kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // --quiet prints only failures and warnings; a warning is a kind without a schema,
    // which must be listed in CRD_KINDS and checked by hand rather than pass unchecked.
    assert!(
        out.status.success() && report.trim().is_empty(),
        "kubernetes-validate --strict -k {KUBE_VERSION}:\n{report}"
    );
    for (variant, r) in rendered_variants() {
        check_common(variant, r);
    }
}

/// What every variant must hold: labels, security, probes, resources, checksums.
fn check_common(variant: &str, r: &Rendered) {
    let app_version = chart_app_version();
    for d in r.docs() {
        let what = format!("{variant}: {}/{}", d["kind"], d["metadata"]["name"]);
        let labels = &d["metadata"]["labels"];
        for l in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "helm.sh/chart",
        ] {
            assert!(labels[l].is_string(), "{what}: no label {l}");
        }
        let Some(pod) = d["spec"]["template"]["spec"].as_object() else {
            continue;
        };
        let sc = &pod["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{what}: runAsNonRoot");
        assert_eq!(pod["automountServiceAccountToken"], false, "{what}: token");
        for c in pod["containers"].as_array().expect("containers") {
            let cw = format!("{what} container {}", c["name"]);
            let csc = &c["securityContext"];
            assert_eq!(csc["allowPrivilegeEscalation"], false, "{cw}");
            assert_eq!(
                csc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{cw}"
            );
            assert_eq!(csc["readOnlyRootFilesystem"], true, "{cw}");
            assert!(c["resources"]["requests"].is_object(), "{cw}: requests");
            assert!(c["resources"]["limits"].is_object(), "{cw}: limits");
            if c["name"] == "etcd" {
                continue;
            }
            let image = c["image"].as_str().expect("image");
            assert!(
                image.ends_with(&format!(":{app_version}")),
                "{cw}: image {image} is not tagged with appVersion {app_version}"
            );
            let ann = &d["spec"]["template"]["metadata"]["annotations"];
            assert!(ann["checksum/config"].is_string(), "{cw}: checksum/config");
            assert!(ann["checksum/secret"].is_string(), "{cw}: checksum/secret");
        }
    }
    // The coordinator: readiness asks the health service "" (leader only), liveness
    // "liveness"; plain gRPC probes, or grpc_health_probe when TLS is on.
    let coord = r.get("Deployment", &name("coordinator"));
    let c = &coord["spec"]["template"]["spec"]["containers"][0];
    let tls = argv(c).iter().any(|a| a == "--tls-cert");
    if tls {
        let ready = c["readinessProbe"]["exec"]["command"].to_string();
        let live = c["livenessProbe"]["exec"]["command"].to_string();
        assert!(
            ready.contains("grpc_health_probe") && !ready.contains("-service="),
            "{variant}: readiness {ready}"
        );
        assert!(live.contains("-service=liveness"), "{variant}: {live}");
    } else {
        assert_eq!(c["readinessProbe"]["grpc"]["port"], 50051, "{variant}");
        assert!(
            c["readinessProbe"]["grpc"]["service"]
                .as_str()
                .unwrap_or("")
                .is_empty(),
            "{variant}: readiness must ask service \"\" (the leader)"
        );
        assert_eq!(c["livenessProbe"]["grpc"]["service"], "liveness");
    }
    // Workers: the grace period covers the drain and the kill.
    let worker = r
        .find("DaemonSet", &name("worker"))
        .or_else(|| r.find("Deployment", &name("worker")))
        .unwrap_or_else(|| panic!("{variant}: no worker DaemonSet or Deployment"));
    let pod = &worker["spec"]["template"]["spec"];
    let args = argv(&pod["containers"][0]);
    let grace = |flag: &str| -> i64 {
        let i = args.iter().position(|a| a == flag).expect("grace flag");
        args[i + 1].parse().expect("grace seconds")
    };
    let tgps = pod["terminationGracePeriodSeconds"].as_i64().expect("tgps");
    assert!(
        tgps > grace("--drain-grace") + grace("--kill-grace"),
        "{variant}: terminationGracePeriodSeconds {tgps} cannot cover the worker's drain"
    );
    assert!(
        r.notes.contains("coordinator submit") && r.notes.contains("--coordinator"),
        "{variant}: NOTES.txt must show how to submit a job"
    );
}

fn chart_app_version() -> String {
    let text = std::fs::read_to_string(chart_dir().join("Chart.yaml")).expect("Chart.yaml");
    text.lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("appVersion in Chart.yaml")
}

/// command + args of a container.
fn argv(c: &Value) -> Vec<String> {
    ["command", "args"]
        .iter()
        .flat_map(|k| c[*k].as_array().cloned().unwrap_or_default())
        .map(|a| a.as_str().expect("string argument").to_string())
        .collect()
}

fn arg_after<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    &args[i + 1]
}

fn container<'a>(d: &'a Value, name: &str) -> &'a Value {
    d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn chart_variants_do_what_they_say() {
    // Defaults: bundled etcd of one member, a worker DaemonSet driving every GPU of a node.
    let r = variant("default");
    let coord = container(r.get("Deployment", &name("coordinator")), "coordinator");
    let args = argv(coord);
    let etcd0 = format!(
        "{}-0.{}.{NAMESPACE}.svc:2379",
        name("etcd"),
        name("etcd-headless")
    );
    assert_eq!(
        arg_after(&args, "--state"),
        format!("etcd+tls://{etcd0}/quarry")
    );
    assert_eq!(arg_after(&args, "--advertise"), "$(POD_IP):50051");
    let ds = r.get("DaemonSet", &name("worker"));
    let w = argv(container(ds, "worker"));
    assert_eq!(arg_after(&w, "--gpu"), "all");
    assert_eq!(
        arg_after(&w, "--coordinator"),
        format!("{}.{NAMESPACE}.svc:50051", name("coordinator"))
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
    let sts = r.get("StatefulSet", &name("etcd"));
    assert_eq!(sts["spec"]["replicas"], 1);
    assert_eq!(sts["spec"]["serviceName"], name("etcd-headless"));
    assert!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
            .is_string()
    );
    assert_eq!(
        r.get("Service", &name("etcd-headless"))["spec"]["clusterIP"],
        "None"
    );
    let svc = r.get("Service", &name("coordinator"));
    let ports: Vec<&Value> = svc["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .collect();
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == "grpc" && p["port"] == 50051)
    );
    assert!(ports.iter().any(|p| p["name"] == "metrics"));
    let cm = r.get("ConfigMap", &name("config"));
    assert!(cm["data"]["QUARRY_LOG"].is_string());
    // The store Secret carries the AWS_* settings and reaches both kinds of pods.
    let secret = r.get("Secret", &name("store"));
    assert_eq!(secret["stringData"]["AWS_REGION"], "us-east-1");
    for c in [coord, container(ds, "worker")] {
        assert!(
            c["envFrom"].to_string().contains(&name("store")),
            "{c:#}: store Secret not in envFrom"
        );
    }

    // One etcd member, MinIO over http, OTLP, a fixed GPU count per node.
    let r = variant("etcd-1");
    let s = &r.get("Secret", &name("store"))["stringData"];
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ALLOW_HTTP",
    ] {
        assert!(s[k].is_string(), "etcd-1: store Secret lacks {k}");
    }
    assert!(r.get("ConfigMap", &name("config"))["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"].is_string());
    let ds = r.get("DaemonSet", &name("worker"));
    let w = container(ds, "worker");
    assert_eq!(w["resources"]["limits"]["nvidia.com/gpu"], 8);
    assert!(!w["env"].to_string().contains("NVIDIA_VISIBLE_DEVICES"));
    assert_eq!(ds["spec"]["template"]["spec"]["runtimeClassName"], "nvidia");

    // Three members, two coordinators: every member in --state, quorum kept by a budget.
    let r = variant("etcd-3");
    assert_eq!(r.get("StatefulSet", &name("etcd"))["spec"]["replicas"], 3);
    let c = r.get("Deployment", &name("coordinator"));
    assert_eq!(c["spec"]["replicas"], 2);
    let state = arg_after(&argv(container(c, "coordinator")), "--state").to_string();
    for i in 0..3 {
        assert!(state.contains(&format!("{}-{i}.", name("etcd"))), "{state}");
    }
    assert_eq!(
        r.get("PodDisruptionBudget", &name("etcd"))["spec"]["maxUnavailable"],
        1
    );
    let env = r
        .get("StatefulSet", &name("etcd"))
        .pointer("/spec/template/spec/containers/0/env")
        .expect("etcd env")
        .to_string();
    assert!(
        env.contains(&format!("{}-2=https://", name("etcd"))),
        "{env}"
    );

    // External etcd: no StatefulSet, the endpoints in --state, the existing store Secret.
    let r = variant("etcd-external");
    assert!(r.find("StatefulSet", &name("etcd")).is_none());
    assert!(r.find("Secret", &name("store")).is_none());
    let c = container(r.get("Deployment", &name("coordinator")), "coordinator");
    assert_eq!(
        arg_after(&argv(c), "--state"),
        "etcd://etcd-0.etcd.infra.svc:2379,etcd-1.etcd.infra.svc:2379,etcd-2.etcd.infra.svc:2379/quarry-prod"
    );
    assert!(c["envFrom"].to_string().contains("quarry-minio"));

    // One pod per GPU.
    let r = variant("per-gpu");
    assert!(r.find("DaemonSet", &name("worker")).is_none());
    let d = r.get("Deployment", &name("worker"));
    assert_eq!(d["spec"]["replicas"], 16);
    let w = container(d, "worker");
    assert_eq!(arg_after(&argv(w), "--gpu"), "0");
    assert_eq!(w["resources"]["limits"]["nvidia.com/gpu"], 1);
    assert_eq!(
        r.get("PodDisruptionBudget", &name("worker"))["spec"]["maxUnavailable"],
        2
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        900 + 10 + 30
    );

    // Mutual TLS and a token: flags point into the mounted Secrets.
    let r = variant("tls");
    let c = r.get("Deployment", &name("coordinator"));
    let ca = argv(container(c, "coordinator"));
    assert_eq!(arg_after(&ca, "--tls-cert"), "/etc/quarry/tls/tls.crt");
    assert_eq!(arg_after(&ca, "--tls-key"), "/etc/quarry/tls/tls.key");
    assert_eq!(
        arg_after(&ca, "--tls-client-ca"),
        "/etc/quarry/tls-client/ca.crt"
    );
    assert_eq!(
        arg_after(&ca, "--auth-token-file"),
        "/etc/quarry/auth/token"
    );
    let vols = c["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(vols.contains("quarry-coordinator-tls") && vols.contains("quarry-worker-tls"));
    let w = argv(container(r.get("DaemonSet", &name("worker")), "worker"));
    assert_eq!(arg_after(&w, "--tls-ca"), "/etc/quarry/tls/ca.crt");
    assert_eq!(
        arg_after(&w, "--tls-cert"),
        "/etc/quarry/tls-client/tls.crt"
    );
    assert_eq!(arg_after(&w, "--auth-token-file"), "/etc/quarry/auth/token");
    assert!(r.get("Secret", &name("auth"))["stringData"]["token"].is_string());

    // Monitoring: a ServiceMonitor over the headless Services, the alert rules, the dashboard
    // for the sidecar.
    let r = variant("monitoring");
    check_service_monitor(r);
    check_prometheus_rule(r);
    let dash = r.get("ConfigMap", &name("dashboard"));
    assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"], "1");
    let json = dash["data"]["quarry-dashboard.json"]
        .as_str()
        .expect("dashboard JSON");
    let parsed: Value = serde_json::from_str(json).expect("the dashboard is JSON");
    assert!(parsed["panels"].is_array(), "dashboard has no panels");
    for (variant, r) in rendered_variants() {
        if variant != "monitoring" {
            assert!(
                r.docs().all(|d| d["kind"] != "ServiceMonitor"),
                "{variant}: ServiceMonitor without monitoring.serviceMonitor.enabled"
            );
            assert!(
                r.docs().all(|d| d["kind"] != "PrometheusRule"),
                "{variant}: PrometheusRule without monitoring.prometheusRule.enabled"
            );
        }
    }
}

/// The ServiceMonitor (no schema offline, see CRD_KINDS): it selects Services that exist,
/// every coordinator and every worker through them, and scrapes a port they all name.
fn check_service_monitor(r: &Rendered) {
    let sm = r.get("ServiceMonitor", &format!("{RELEASE}-quarry"));
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    let sel = sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    let port = sm["spec"]["endpoints"][0]["port"].as_str().expect("port");
    let matched: Vec<&Value> = r
        .docs()
        .filter(|d| d["kind"] == "Service")
        .filter(|d| sel.iter().all(|(k, v)| &d["metadata"]["labels"][k] == v))
        .collect();
    let components: BTreeSet<String> = matched
        .iter()
        .map(|s| s["spec"]["selector"]["app.kubernetes.io/component"].to_string())
        .collect();
    assert_eq!(
        components,
        BTreeSet::from(["\"coordinator\"".to_string(), "\"worker\"".to_string()]),
        "ServiceMonitor must select the coordinator and worker headless Services"
    );
    for s in matched {
        assert_eq!(s["spec"]["clusterIP"], "None", "{s:#}");
        assert!(
            s["spec"]["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .any(|p| p["name"] == port),
            "Service {} has no port {port}",
            s["metadata"]["name"]
        );
    }
}

/// The PrometheusRule (no schema offline, see CRD_KINDS): exactly the groups of
/// deploy/prometheus/quarry-alerts.yaml, templates such as `{{ $labels.job }}` untouched.
fn check_prometheus_rule(r: &Rendered) {
    let pr = r.get("PrometheusRule", &format!("{RELEASE}-quarry"));
    assert_eq!(pr["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pr["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let path = repo_root().join("deploy/prometheus/quarry-alerts.yaml");
    let out = helm_tool(&["yaml", &path.display().to_string()]);
    assert!(out.status.success(), "quarry-alerts.yaml does not parse");
    let docs: Value = serde_json::from_slice(&out.stdout).expect("alerts as JSON");
    assert_eq!(pr["spec"]["groups"], docs[0]["groups"]);
    assert!(pr["spec"].to_string().contains("{{ $labels.job }}"));
}

/// `--flag` names in a help text.
fn help_flags(bin_name: &str, sub: &[&str]) -> BTreeSet<String> {
    let mut c = Command::new(bin(bin_name));
    c.args(sub).arg("--help");
    let out = run_bounded(c, &format!("{bin_name} --help"));
    assert!(out.status.success(), "{bin_name} {sub:?} --help failed");
    String::from_utf8_lossy(&out.stdout)
        .split(|ch: char| ch.is_whitespace() || ch == ',' || ch == '[' || ch == ']')
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.split(['=', '<']).next().unwrap_or(w).to_string())
        .filter(|w| !w.is_empty())
        .collect()
}

/// Flags in an argv: `--name` and `--name=value` alike.
fn argv_flags(args: &[String]) -> Vec<String> {
    args.iter()
        .filter_map(|a| a.strip_prefix("--"))
        .filter(|f| !f.is_empty())
        .map(|f| f.split('=').next().unwrap_or(f).to_string())
        .collect()
}

#[test]
fn chart_and_compose_pass_only_flags_the_binaries_accept() {
    let known: BTreeMap<&str, BTreeSet<String>> = [
        ("coordinator serve", help_flags("coordinator", &["serve"])),
        ("coordinator submit", help_flags("coordinator", &["submit"])),
        ("worker", help_flags("worker", &[])),
    ]
    .into_iter()
    .collect();
    // Every argv that starts a Quarry binary: where it comes from, which command, its flags.
    let mut uses: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut add = |origin: String, args: &[String]| {
        let Some(first) = args.first() else { return };
        let binary = Path::new(first)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let command = match binary {
            "worker" => "worker".to_string(),
            "coordinator" => format!("coordinator {}", args.get(1).map_or("", String::as_str)),
            _ => return,
        };
        uses.push((origin, command, argv_flags(&args[1..])));
    };
    for (variant, r) in rendered_variants() {
        for d in r.docs() {
            let containers = d["spec"]["template"]["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for c in containers {
                let origin = format!(
                    "chart {variant}: {}/{}",
                    d["kind"].as_str().unwrap_or_default(),
                    d["metadata"]["name"].as_str().unwrap_or_default()
                );
                add(origin, &argv(&c));
            }
        }
        // NOTES.txt tells users how to submit: those commands must work too.
        for line in r.notes.lines() {
            let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
            if words.first().is_some_and(|w| w == "coordinator") {
                add(format!("chart {variant}: NOTES.txt"), &words);
            }
        }
    }
    for (service, args) in compose_commands() {
        add(format!("deploy/compose.yaml: {service}"), &args);
    }
    for binary in ["coordinator serve", "worker", "coordinator submit"] {
        assert!(
            uses.iter().any(|(_, c, _)| c == binary),
            "nothing runs `{binary}`: the chart or compose file is not what this test expects"
        );
    }
    let mut missing: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (origin, command, flags) in &uses {
        let Some(ok) = known.get(command.as_str()) else {
            panic!("{origin}: runs `{command}`, which this test does not know");
        };
        for f in flags {
            if !ok.contains(f) {
                missing
                    .entry((command.clone(), format!("--{f}")))
                    .or_default()
                    .insert(origin.clone());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "flags the built binaries do not accept:\n{}",
        missing
            .iter()
            .map(|((cmd, f), origins)| {
                let shown: Vec<&str> = origins.iter().take(3).map(String::as_str).collect();
                let more = origins.len().saturating_sub(shown.len());
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                format!("  `{cmd}` {f}  (used by {}{more})", shown.join("; "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// entrypoint + command of every deploy/compose.yaml service that runs a Quarry binary.
fn compose_commands() -> Vec<(String, Vec<String>)> {
    let c = compose("compose.yaml");
    let list = |v: &Value| -> Vec<String> {
        match v {
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_str().expect("string argument").to_string())
                .collect(),
            Value::Null => Vec::new(),
            other => panic!("compose: write entrypoint and command as lists, not {other}"),
        }
    };
    c["services"]
        .as_object()
        .expect("compose services")
        .iter()
        .map(|(name, s)| {
            let mut args = list(&s["entrypoint"]);
            args.extend(list(&s["command"]));
            (name.clone(), args)
        })
        .filter(|(_, args)| !args.is_empty())
        .collect()
}

#[test]
fn the_coordinator_authenticates_its_callers_unless_told_not_to() {
    // Every variant: a token, client certificates, or the explicit flag (never silence).
    for (variant, r) in rendered_variants() {
        let ca = argv(container(
            r.get("Deployment", &name("coordinator")),
            "coordinator",
        ));
        let says = ca.iter().any(|a| {
            [
                "--auth-token-file",
                "--tls-client-ca",
                "--allow-unauthenticated",
            ]
            .contains(&a.as_str())
        });
        assert!(
            says,
            "chart {variant}: the coordinator's argv names no caller authentication: {ca:?}"
        );
        assert!(
            !ca.iter().any(|a| a == "--allow-unauthenticated"),
            "chart {variant} serves unauthenticated: {ca:?}"
        );
    }
    // The defaults: a token the chart generates, given to the coordinator and the workers.
    let r = variant("default");
    let ca = argv(container(
        r.get("Deployment", &name("coordinator")),
        "coordinator",
    ));
    assert_eq!(
        arg_after(&ca, "--auth-token-file"),
        "/etc/quarry/auth/token"
    );
    let w = argv(container(r.get("DaemonSet", &name("worker")), "worker"));
    assert_eq!(arg_after(&w, "--auth-token-file"), "/etc/quarry/auth/token");
    let token = r.get("Secret", &name("auth"))["stringData"]["token"]
        .as_str()
        .expect("a generated token")
        .to_string();
    assert!(
        token.len() >= 32 && token.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{token:?}"
    );
    assert!(r.notes.contains("--auth-token-file"), "{}", r.notes);
    // Off on purpose: the flag that says so, and a warning in the notes.
    let r = render(
        None,
        Some(r#"{"auth":{"enabled":false,"allowUnauthenticated":true}}"#),
    )
    .expect("auth off on purpose renders");
    let ca = argv(container(
        r.get("Deployment", &name("coordinator")),
        "coordinator",
    ));
    assert!(ca.iter().any(|a| a == "--allow-unauthenticated"), "{ca:?}");
    assert!(r.find("Secret", &name("auth")).is_none());
    assert!(r.notes.contains("WARNING"), "{}", r.notes);
}

/// The value of environment variable `name` in container `c`.
fn env_value<'a>(c: &'a Value, name: &str) -> &'a str {
    c["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == name))
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("no env {name} in {}", c["env"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundled_etcd_serves_tls_to_the_coordinator_with_certificates_that_work() {
    let r = variant("default");
    let etcd_set = r.get("StatefulSet", &name("etcd"));
    let etcd = container(etcd_set, "etcd");
    assert_eq!(
        env_value(etcd, "ETCD_LISTEN_CLIENT_URLS"),
        "https://0.0.0.0:2379"
    );
    assert_eq!(env_value(etcd, "ETCD_CLIENT_CERT_AUTH"), "true");
    assert_eq!(env_value(etcd, "ETCD_PEER_CLIENT_CERT_AUTH"), "true");
    assert!(env_value(etcd, "ETCD_INITIAL_CLUSTER").contains("=https://"));
    assert_eq!(
        env_value(etcd, "ETCD_TRUSTED_CA_FILE"),
        "/etc/etcd/tls/ca.crt"
    );
    let vols = etcd_set["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(vols.contains(&name("etcd-tls")), "{vols}");
    // The coordinator: etcd+tls:// and its client certificate, mounted from the same Secret.
    let c = r.get("Deployment", &name("coordinator"));
    let ca = argv(container(c, "coordinator"));
    assert!(
        arg_after(&ca, "--state").starts_with("etcd+tls://"),
        "{ca:?}"
    );
    assert_eq!(arg_after(&ca, "--etcd-ca"), "/etc/quarry/etcd-tls/ca.crt");
    assert_eq!(
        arg_after(&ca, "--etcd-cert"),
        "/etc/quarry/etcd-tls/client.crt"
    );
    assert_eq!(
        arg_after(&ca, "--etcd-key"),
        "/etc/quarry/etcd-tls/client.key"
    );
    let mounts = container(c, "coordinator")["volumeMounts"].to_string();
    assert!(mounts.contains("/etc/quarry/etcd-tls"), "{mounts}");
    let vols = c["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(
        vols.contains(&name("etcd-tls")) && vols.contains("client.key"),
        "{vols}"
    );

    // The generated certificates work: a real etcd serves with the server's, requires client
    // certificates, and admits the coordinator's; the server's names cover the members.
    let secret = &r.get("Secret", &name("etcd-tls"))["stringData"];
    let dir = tempfile::tempdir().unwrap();
    for key in [
        "ca.crt",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
    ] {
        let p = dir.path().join(key);
        std::fs::write(&p, secret[key].as_str().expect(key)).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let member = format!("{RELEASE}-quarry-etcd-0.{RELEASE}-quarry-etcd-headless.{NAMESPACE}.svc");
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-checkhost", &member, "-in"])
        .arg(dir.path().join("server.crt"))
        .output()
        .expect("the openssl command");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("does match"), "{member}: {said}");
    let etcd = quarry_tests::etcd::Etcd::start_tls(quarry_tests::etcd::TlsFiles {
        ca: dir.path().join("ca.crt"),
        server_cert: dir.path().join("server.crt"),
        server_key: dir.path().join("server.key"),
        client_cert: dir.path().join("client.crt"),
        client_key: dir.path().join("client.key"),
    })
    .await;
    quarry_coordinator::state::etcd::EtcdStore::connect_with(
        &etcd.access(),
        "/chart",
        Duration::from_secs(5),
    )
    .await
    .expect("the chart's client certificate is admitted");

    // TLS off: plaintext as before, no Secret, no etcd flags.
    let r = render(None, Some(r#"{"etcd":{"tls":{"enabled":false}}}"#)).unwrap();
    let ca = argv(container(
        r.get("Deployment", &name("coordinator")),
        "coordinator",
    ));
    assert!(arg_after(&ca, "--state").starts_with("etcd://"), "{ca:?}");
    assert!(!ca.iter().any(|a| a.starts_with("--etcd-")), "{ca:?}");
    assert!(r.find("Secret", &name("etcd-tls")).is_none());
    let etcd = container(r.get("StatefulSet", &name("etcd")), "etcd");
    assert_eq!(
        env_value(etcd, "ETCD_LISTEN_CLIENT_URLS"),
        "http://0.0.0.0:2379"
    );

    // An external etcd with TLS and a user: the operator's Secrets, mounted and named.
    let r = render(
        None,
        Some(
            r#"{"etcd":{"enabled":false,"external":{"endpoints":["etcd.db:2379"],
                "tlsSecret":"etcd-client","authSecret":"etcd-pw","user":"quarry"}}}"#,
        ),
    )
    .unwrap();
    let c = r.get("Deployment", &name("coordinator"));
    let ca = argv(container(c, "coordinator"));
    assert_eq!(arg_after(&ca, "--state"), "etcd+tls://etcd.db:2379/quarry");
    assert_eq!(arg_after(&ca, "--etcd-user"), "quarry");
    assert_eq!(
        arg_after(&ca, "--etcd-password-file"),
        "/etc/quarry/etcd-auth/password"
    );
    let vols = c["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(
        vols.contains("etcd-client") && vols.contains("etcd-pw"),
        "{vols}"
    );
    let err = render(
        None,
        Some(r#"{"etcd":{"enabled":false,"external":{"endpoints":["e:2379"],"authSecret":"pw"}}}"#),
    )
    .err()
    .expect("authSecret without user is refused");
    assert!(err.contains("etcd.external.user"), "{err}");
}

#[test]
fn values_schema_rejects_bad_values() {
    // Helm's own schema check, as `helm install` runs it.
    for (values, path) in [
        (
            r#"{"coordinator":{"replicas":"two"}}"#,
            "/coordinator/replicas",
        ),
        (r#"{"worker":{"mode":"pergpu"}}"#, "/worker/mode"),
        (r#"{"etcd":{"replicas":2}}"#, "/etcd/replicas"),
        (r#"{"store":{"url":"gs://bucket"}}"#, "/store/url"),
        (r#"{"coordinater":{"replicas":2}}"#, "coordinater"),
    ] {
        let err = match render(None, Some(values)) {
            Ok(_) => panic!("values {values} were accepted"),
            Err(e) => e,
        };
        assert!(
            err.contains("values don't meet the specifications of the schema")
                && err.contains(path),
            "values {values}: expected Helm's schema error naming {path}, got:\n{err}"
        );
    }
    // Combinations the schema cannot express fail the render with a message naming the fix.
    for (values, msg) in [
        (r#"{"tls":{"enabled":true}}"#, "tls.serverSecret"),
        (r#"{"auth":{"enabled":false}}"#, "auth.allowUnauthenticated"),
        (r#"{"etcd":{"enabled":false}}"#, "etcd.external.endpoints"),
    ] {
        let err = match render(None, Some(values)) {
            Ok(_) => panic!("values {values} were accepted"),
            Err(e) => e,
        };
        assert!(
            err.contains(msg),
            "values {values}: expected {msg} in:\n{err}"
        );
    }
    // And good values still pass: a string where the schema allows one.
    render(
        None,
        Some(r#"{"worker":{"perGpu":{"pdb":{"maxUnavailable":"50%"}}}}"#),
    )
    .expect("valid values rejected");
}

#[test]
fn chart_carries_the_deploy_dashboard_and_alerts() {
    // The chart can only read files inside itself, so it carries copies of the dashboard and
    // the alert rules; they must be the files in deploy/.
    for (deploy, chart) in [
        (
            "deploy/grafana/quarry-dashboard.json",
            "dashboards/quarry-dashboard.json",
        ),
        (
            "deploy/prometheus/quarry-alerts.yaml",
            "alerts/quarry-alerts.yaml",
        ),
    ] {
        let want = std::fs::read(repo_root().join(deploy)).expect("read");
        let got = std::fs::read(chart_dir().join(chart)).unwrap_or_default();
        assert!(
            want == got,
            "copy {deploy} to helm/quarry/{chart} (the chart ships it)"
        );
    }
}

fn compose(file: &str) -> Value {
    let path = repo_root().join("deploy").join(file);
    let out = helm_tool(&["yaml", &path.display().to_string()]);
    assert!(
        out.status.success(),
        "deploy/{file} does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Value = serde_json::from_slice(&out.stdout).expect("compose as JSON");
    docs[0].clone()
}

#[test]
fn compose_file_is_consistent() {
    // No Docker engine in CI: check what `docker compose config` would, short of its schema.
    let deploy = repo_root().join("deploy");
    let c = compose("compose.yaml");
    let services = c["services"].as_object().expect("services");
    let volumes = c["volumes"].as_object().cloned().unwrap_or_default();
    for want in [
        "etcd",
        "minio",
        "coordinator",
        "worker-0",
        "worker-1",
        "otel-collector",
        "prometheus",
        "grafana",
    ] {
        assert!(
            services.contains_key(want),
            "compose.yaml has no service {want}"
        );
    }
    for (name, s) in services {
        assert!(
            s["image"].is_string(),
            "service {name}: no image (or a build without a tag)"
        );
        if let Some(deps) = s["depends_on"].as_object() {
            for d in deps.keys() {
                assert!(
                    services.contains_key(d),
                    "service {name} depends on unknown {d}"
                );
            }
        }
        if let Some(b) = s["build"].as_object() {
            let ctx = deploy.join(b["context"].as_str().expect("build context"));
            let df = ctx.join(b["dockerfile"].as_str().expect("dockerfile"));
            assert!(df.is_file(), "service {name}: no {}", df.display());
        }
        for v in s["volumes"].as_array().cloned().unwrap_or_default() {
            let v = v.as_str().expect("short volume syntax");
            let source = v.split(':').next().unwrap_or_default();
            if source.starts_with("./") || source.starts_with("../") {
                assert!(
                    deploy.join(source).exists(),
                    "service {name}: mounts {source}, which does not exist"
                );
            } else {
                assert!(
                    volumes.contains_key(source),
                    "service {name}: volume {source} is not declared"
                );
            }
        }
    }
    // The GPU overlay only adds devices to services the base file has.
    let gpu = compose("compose.gpu.yaml");
    for (name, s) in gpu["services"].as_object().expect("services") {
        assert!(
            services.contains_key(name),
            "compose.gpu.yaml: unknown service {name}"
        );
        assert!(
            s.pointer("/deploy/resources/reservations/devices")
                .is_some(),
            "compose.gpu.yaml: {name} reserves no GPU"
        );
    }
}
