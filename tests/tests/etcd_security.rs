//! `coordinator serve` on an etcd that requires TLS with client certificates, and on one with
//! etcd's auth enabled (user and password): a job runs to its end on each, and every wrong
//! setting (a CA that did not sign etcd's certificate, no client certificate, plaintext to a
//! TLS etcd, a wrong password, no user, a password file others may read) stops `serve` with
//! one sentence naming the flag to fix. Real etcd processes, real certificates (openssl).

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use quarry_tests::cluster::{
    error_line, serve_exits, served_job_file, spawn_worker, start_serve_with, submit,
};
use quarry_tests::etcd::{Etcd, TlsFiles};
use quarry_tests::legacy_root;
use quarry_tests::pki::Pki;

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The `served` job submitted with `--watch` to a `serve` started with `args` (state and
/// etcd flags) and `env`, one worker with two agents: it must end done.
fn run_job(home: &Path, args: &[&str], env: &[(&str, String)]) {
    let root = legacy_root();
    let job = served_job_file(home, root.path(), "");
    let store = format!("file://{}", home.join("store").display());
    let mut all = args.to_vec();
    all.extend(["--store", &store, "--lease-ttl", "5"]);
    let log = home.join("coordinator.log");
    let (_serve, addr) = start_serve_with(&all, env, &log);
    let _worker = spawn_worker(&addr, "0,1", &[], None);
    let out = submit(&job, &addr, true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("job served: done"),
        "{err}\ncoordinator log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// `serve ARGS --allow-unauthenticated` must stop by itself with an error naming every one of
/// `names`; returns the error line.
fn refused(args: &[&str], env: &[(&str, String)], names: &[&str]) -> String {
    let mut all = args.to_vec();
    all.push("--allow-unauthenticated");
    let o = serve_exits(&all, env);
    assert!(!o.status.success(), "{}", text(&o));
    let line = error_line(&o);
    for n in names {
        assert!(line.contains(n), "{n:?} not in the error: {line}");
    }
    line
}

fn tls_files(pki: &Pki) -> TlsFiles {
    TlsFiles {
        ca: pki.path("ca.pem").into(),
        server_cert: pki.path("server.pem").into(),
        server_key: pki.path("server.key").into(),
        client_cert: pki.path("client.pem").into(),
        client_key: pki.path("client.key").into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_a_job_on_etcd_over_mutual_tls_and_names_the_flag_when_tls_is_wrong() {
    let pki = Pki::generate();
    let etcd = Etcd::start_tls(tls_files(&pki)).await;
    let home = tempfile::tempdir().unwrap();
    let state = format!("etcd+tls://{}/quarry-tls", etcd.host_port());
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    run_job(
        home.path(),
        &[
            "--state",
            &state,
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
        ],
        &[],
    );
    // The same through the environment and etcd:// with --etcd-ca (TLS by the flag).
    let plain_scheme = format!("etcd://{}/quarry-tls-env", etcd.host_port());
    let work = tempfile::tempdir().unwrap();
    run_job(
        work.path(),
        &["--state", &plain_scheme],
        &[
            ("QUARRY_ETCD_CA", ca.clone()),
            ("QUARRY_ETCD_CERT", cert.clone()),
            ("QUARRY_ETCD_KEY", key.clone()),
        ],
    );

    let store = format!("file://{}", home.path().join("store-bad").display());
    let base = ["--state", state.as_str(), "--store", store.as_str()];
    // A CA that did not sign etcd's certificate.
    let other = pki.path("other-ca.pem");
    let mut a = base.to_vec();
    a.extend([
        "--etcd-ca",
        &other,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &key,
    ]);
    refused(&a, &[], &["--etcd-ca", "not signed"]);
    // No client certificate.
    let mut a = base.to_vec();
    a.extend(["--etcd-ca", &ca]);
    refused(&a, &[], &["--etcd-cert", "--etcd-key"]);
    // A client certificate from a CA etcd does not trust.
    let (scert, skey) = (pki.path("stranger.pem"), pki.path("stranger.key"));
    let mut a = base.to_vec();
    a.extend(["--etcd-ca", &ca, "--etcd-cert", &scert, "--etcd-key", &skey]);
    refused(&a, &[], &["--etcd-cert"]);
    // Plaintext to the TLS etcd.
    let plain = format!("etcd://{}/quarry-tls", etcd.host_port());
    refused(
        &["--state", &plain, "--store", &store],
        &[],
        &["etcd+tls://", "--etcd-ca"],
    );
    // etcd+tls:// without the CA, and a key others may read: usage errors, exit status 2.
    let o = serve_exits(&[&base[..], &["--allow-unauthenticated"]].concat(), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(error_line(&o).contains("--etcd-ca"), "{}", text(&o));
    let loose = home.path().join("loose.key");
    std::fs::copy(&key, &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loose = loose.display().to_string();
    let mut a = base.to_vec();
    a.extend([
        "--etcd-ca",
        &ca,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &loose,
        "--allow-unauthenticated",
    ]);
    let o = serve_exits(&a, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let line = error_line(&o);
    assert!(
        line.contains("--etcd-key") && line.contains("chmod 600"),
        "{line}"
    );
}

/// Turns on etcd's auth with user `root` and `password`, through etcd-client.
async fn enable_auth(etcd: &Etcd, password: &str) {
    let mut c = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    // etcd needs the root user to hold the root role before auth can be enabled.
    let _ = c.role_add("root").await;
    c.user_add("root", password, None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.auth_enable().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_a_job_on_etcd_with_auth_and_names_the_flag_when_the_password_is_wrong() {
    let etcd = Etcd::start().await;
    enable_auth(&etcd, "s3cret-etcd").await;
    let home = tempfile::tempdir().unwrap();
    let pw = home.path().join("etcd-password");
    std::fs::write(&pw, "s3cret-etcd\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let pw = pw.display().to_string();
    let state = format!("etcd://{}/quarry-auth", etcd.host_port());
    run_job(
        home.path(),
        &[
            "--state",
            &state,
            "--etcd-user",
            "root",
            "--etcd-password-file",
            &pw,
        ],
        &[],
    );
    // The password from the environment instead of a file.
    let work = tempfile::tempdir().unwrap();
    let other_prefix = format!("etcd://{}/quarry-auth-env", etcd.host_port());
    run_job(
        work.path(),
        &["--state", &other_prefix, "--etcd-user", "root"],
        &[("QUARRY_ETCD_PASSWORD", "s3cret-etcd".to_string())],
    );

    let store = format!("file://{}", home.path().join("store-bad").display());
    let base = ["--state", state.as_str(), "--store", store.as_str()];
    // A wrong password.
    let wrong = home.path().join("wrong-password");
    std::fs::write(&wrong, "guess\n").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wrong = wrong.display().to_string();
    let mut a = base.to_vec();
    a.extend(["--etcd-user", "root", "--etcd-password-file", &wrong]);
    refused(&a, &[], &["--etcd-user", "--etcd-password-file"]);
    // No user at all.
    refused(&base, &[], &["--etcd-user", "--etcd-password-file"]);
    // A password file its group or others may read: exit status 2 before connecting.
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut a = base.to_vec();
    a.extend([
        "--etcd-user",
        "root",
        "--etcd-password-file",
        &pw,
        "--allow-unauthenticated",
    ]);
    let o = serve_exits(&a, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let line = error_line(&o);
    assert!(
        line.contains("--etcd-password-file") && line.contains("chmod 600"),
        "{line}"
    );
}
