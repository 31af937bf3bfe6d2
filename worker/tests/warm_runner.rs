//! The warm runner against real `/bin/sh` generators speaking the protocol: a round line on
//! stdin, a reply line on fd 3, the round's log split at the reply; death, timeout and cancel
//! kill the process group.

use std::path::Path;
use std::time::Duration;

use quarry_worker::runner::RunOutcome;
use quarry_worker::runner::warm::{WarmProcess, WarmRound, WarmSpec};
use tokio_util::sync::CancellationToken;

/// Upper bound on any single round in these tests.
const OUTER: Duration = Duration::from_secs(15);

fn spec(dir: &Path, script: &str) -> WarmSpec {
    WarmSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        cwd: dir.to_path_buf(),
        env: Vec::new(),
        kill_grace: Duration::from_millis(300),
        log_limit: 1 << 20,
    }
}

async fn round(p: &mut WarmProcess, line: &str, limit: Option<Duration>) -> WarmRound {
    tokio::time::timeout(OUTER, p.round(line, limit, &CancellationToken::new()))
        .await
        .expect("round did not return in time")
}

fn log(r: &WarmRound) -> String {
    String::from_utf8_lossy(&r.report.log.to_bytes()).into_owned()
}

fn alive(pid: i32) -> bool {
    // Zombies count as dead (some containers' init never reaps).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Answers every line with done, printing it before (stdout) and after a marker (stderr).
const ECHO: &str = r#"echo "started $$"; while read -r line; do echo "round $line"; echo "err $line" >&2; echo '{"status":"done"}' >&"$QUARRY_REPLY_FD"; done"#;

#[tokio::test]
async fn one_process_serves_many_rounds_with_separate_logs() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = WarmProcess::start(spec(dir.path(), ECHO)).await.unwrap();
    let first = round(&mut p, "A", None).await;
    assert_eq!(first.report.outcome, RunOutcome::Exited(0));
    assert!(first.alive);
    let text = log(&first);
    assert!(
        text.contains("started") && text.contains("round A") && text.contains("err A"),
        "{text}"
    );
    for l in ["B", "C"] {
        let r = round(&mut p, l, None).await;
        assert_eq!(r.report.outcome, RunOutcome::Exited(0));
        let text = log(&r);
        assert!(text.contains(&format!("round {l}")), "{text}");
        assert!(text.contains(&format!("err {l}")), "{text}");
        assert!(
            !text.contains("started") && !text.contains("round A"),
            "{l}: {text}"
        );
    }
    assert_eq!(p.served(), 3);
    p.shut_down().await;
}

#[tokio::test]
async fn a_failed_reply_fails_the_round_and_keeps_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"while read -r line; do if [ "$line" = bad ]; then echo '{"status":"failed","reason":"no grasp"}' >&3; else echo '{"status":"done"}' >&3; fi; done"#;
    let mut p = WarmProcess::start(spec(dir.path(), script)).await.unwrap();
    let r = round(&mut p, "bad", None).await;
    assert_eq!(r.report.outcome, RunOutcome::Failed);
    assert_eq!(r.report.reason.as_deref(), Some("no grasp"));
    assert!(r.alive);
    assert_eq!(
        round(&mut p, "ok", None).await.report.outcome,
        RunOutcome::Exited(0)
    );
    // A reply that is not the protocol's is a broken generator: stopped.
    let script = r#"read -r line; echo 'hello' >&3; sleep 30"#;
    let mut p = WarmProcess::start(spec(dir.path(), script)).await.unwrap();
    let r = round(&mut p, "x", None).await;
    assert_eq!(r.report.outcome, RunOutcome::Failed);
    assert!(r.report.reason.unwrap().contains("not JSON"));
    assert!(!r.alive);
}

#[tokio::test]
async fn dying_mid_round_is_reported_with_its_signal_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("child.pid");
    // A background child in the group, then SIGKILL of the generator itself mid-round.
    let script = format!(
        r#"sleep 60 & echo $! > {}; read -r line; echo "working $line"; kill -9 $$"#,
        pidfile.display()
    );
    let mut p = WarmProcess::start(spec(dir.path(), &script)).await.unwrap();
    let r = round(&mut p, "A", None).await;
    assert_eq!(r.report.outcome, RunOutcome::Signaled(9));
    assert!(!r.alive);
    assert!(log(&r).contains("working A"), "{}", log(&r));
    let child: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!alive(child), "the generator's background child survived");
}

#[tokio::test]
async fn a_round_past_its_timeout_or_cancelled_kills_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"echo $$ > pid; while read -r line; do sleep 30; done"#;
    let mut p = WarmProcess::start(spec(dir.path(), script)).await.unwrap();
    let started = std::time::Instant::now();
    let r = round(&mut p, "A", Some(Duration::from_millis(300))).await;
    assert_eq!(r.report.outcome, RunOutcome::TimedOut);
    assert!(!r.alive);
    assert!(started.elapsed() < Duration::from_secs(5));
    let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!alive(pid));

    let mut p = WarmProcess::start(spec(dir.path(), script)).await.unwrap();
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.cancel();
    });
    let r = tokio::time::timeout(OUTER, p.round("A", None, &cancel))
        .await
        .unwrap();
    assert_eq!(r.report.outcome, RunOutcome::Cancelled);
    assert!(!r.alive);
}

#[tokio::test]
async fn a_process_that_exited_between_rounds_is_seen_before_the_next_round() {
    let dir = tempfile::tempdir().unwrap();
    // Answers one round, then exits on its own.
    let script = r#"read -r line; echo '{"status":"done"}' >&3; exit 0"#;
    let mut p = WarmProcess::start(spec(dir.path(), script)).await.unwrap();
    assert!(!p.exited());
    assert_eq!(
        round(&mut p, "A", None).await.report.outcome,
        RunOutcome::Exited(0)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !p.exited() {
        assert!(std::time::Instant::now() < deadline, "exit never seen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.shut_down().await;
}
