//! The determinism audit of a warm round (`generator.audit`): once the warm process is done
//! with a round the coordinator marked, the round is re-run cold in a fresh process of the
//! same generator, handed the same round line, and each output's digest compared with the
//! warm run's: a plain file's sha256, a directory dataset's tree digest ([`super::digest`]).
//!
//! The cold run writes where the warm one did: an output that records its own path (an
//! episode's metadata naming its file, a log) must not differ for that. Meanwhile the warm
//! outputs (and the yield sidecar) wait beside, under `.quarry-audit-<name>`; afterwards the
//! cold ones are removed and the warm ones put back, whatever the verdict. The output check
//! and the upload come after, on the warm outputs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use quarry_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::digest::{self, Digest};
use super::round::Paths;
use crate::runner::warm::{WarmProcess, WarmSpec};
use crate::runner::{RunOutcome, RunReport};

/// Where a round's output waits during the cold re-run: beside it, `.quarry-audit-<name>`.
fn aside(p: &Path) -> PathBuf {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    p.with_file_name(format!(".quarry-audit-{name}"))
}

/// Re-runs a done warm round cold, in a fresh process started from `spec` and handed
/// `line` (the round's own line, with `round`'s paths), and compares each output's digest
/// with the warm run's. A mismatch turns `report` into [`RunOutcome::AuditMismatch`] naming
/// the round, the output, where it first differs and both digests; a cold run that fails,
/// an output that cannot be audited (a link, a special file, a tree past the bounds) or
/// warm outputs that cannot be set aside or put back, into [`RunOutcome::Failed`], a
/// retryable attempt.
pub(super) async fn audit_round(
    report: &mut RunReport,
    spec: WarmSpec,
    line: &str,
    round: &Paths,
    lease: &pb::Lease,
    limit: Option<Duration>,
    stop: &CancellationToken,
) {
    let verdict = match warm_digests(round).await {
        Err(why) => Verdict::Inconclusive(why),
        Ok(warm) => {
            let r = round.clone();
            match blocking(move || move_aside(&r)).await {
                Err(why) => Verdict::Inconclusive(why),
                Ok(moved) => {
                    let verdict = cold_run(spec, line, round, warm, limit, stop).await;
                    let r = round.clone();
                    match blocking(move || move_back(&r, &moved)).await {
                        Ok(()) => verdict,
                        Err(e) => {
                            Verdict::Inconclusive(format!("cannot put the warm outputs back: {e}"))
                        }
                    }
                }
            }
        }
    };
    match verdict {
        Verdict::Same => debug!(round = %lease.round_name, "audit: the cold re-run matches"),
        Verdict::Differs {
            output,
            first,
            warm,
            cold,
        } => {
            warn!(round = %lease.round_name, %output, %first, %warm, %cold, "audit: warm and cold outputs differ");
            report.outcome = RunOutcome::AuditMismatch;
            report.reason = Some(format!(
                "round {} ({output}{first}): the warm process wrote sha256 {warm}, a fresh process given the same round wrote sha256 {cold}; the generator keeps state from round to round (re-seed every RNG from the round's seed and reset what it changes; see docs/job-file.md, \"The determinism contract\")",
                lease.round_name,
                first = if first.is_empty() {
                    String::new()
                } else {
                    format!(", first difference: {first}")
                },
            ));
        }
        Verdict::Inconclusive(why) => {
            report.outcome = RunOutcome::Failed;
            report.reason = Some(format!("audit of round {}: {why}", lease.round_name));
        }
    }
}

/// The round's outputs and sidecar: what is set aside and put back.
fn written(round: &Paths) -> Vec<PathBuf> {
    round
        .outs
        .iter()
        .chain(round.stats.iter())
        .cloned()
        .collect()
}

/// Removes what is at `p` (a directory whole, its links removed and not followed), if
/// anything.
fn remove(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Moves the warm outputs aside (what a previous audit left there removed first), so that
/// the cold run finds the round as the warm one did; returns the paths moved. On failure,
/// what moved is moved back.
fn move_aside(round: &Paths) -> Result<Vec<PathBuf>, String> {
    let mut moved = Vec::new();
    for p in written(round) {
        let a = aside(&p);
        let step = remove(&a)
            .map_err(|e| format!("cannot clear {}: {e}", a.display()))
            .and_then(|()| match std::fs::rename(&p, &a) {
                Ok(()) => Ok(true),
                // Not written (an optional sidecar): nothing to set aside.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(format!("cannot move {} aside: {e}", p.display())),
            });
        match step {
            Ok(true) => moved.push(p),
            Ok(false) => {}
            Err(e) => {
                for q in &moved {
                    let _ = std::fs::rename(aside(q), q);
                }
                return Err(e);
            }
        }
    }
    Ok(moved)
}

/// Removes what the cold run wrote at the round's paths and moves the `moved` warm outputs
/// back where they were.
fn move_back(round: &Paths, moved: &[PathBuf]) -> Result<(), String> {
    let mut failed = Vec::new();
    for p in written(round) {
        if let Err(e) = remove(&p) {
            failed.push(format!("cannot remove the cold {}: {e}", p.display()));
            continue;
        }
        if moved.contains(&p)
            && let Err(e) = std::fs::rename(aside(&p), &p)
        {
            failed.push(format!("cannot move {} back: {e}", aside(&p).display()));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// Runs `f` off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

enum Verdict {
    Same,
    Differs {
        /// The output's name (a directory's with a trailing `/`).
        output: String,
        /// Where it first differs (empty for a plain file).
        first: String,
        warm: String,
        cold: String,
    },
    Inconclusive(String),
}

/// The digests of the warm run's outputs, or why they cannot be audited.
async fn warm_digests(round: &Paths) -> Result<Vec<Digest>, String> {
    let mut digests = Vec::with_capacity(round.outs.len());
    for p in &round.outs {
        digests.push(
            digest_of(p)
                .await
                .map_err(|e| format!("cannot audit {}: {e}", p.display()))?,
        );
    }
    Ok(digests)
}

/// Runs the round cold (the warm outputs set aside) and compares its outputs with `warm`.
async fn cold_run(
    spec: WarmSpec,
    line: &str,
    round: &Paths,
    warm_digests: Vec<Digest>,
    limit: Option<Duration>,
    stop: &CancellationToken,
) -> Verdict {
    let mut fresh = match WarmProcess::start(spec).await {
        Ok(p) => p,
        Err(e) => return Verdict::Inconclusive(format!("the cold re-run did not start: {e}")),
    };
    let ran = fresh.round(line, limit, stop).await;
    if ran.alive {
        fresh.shut_down().await;
    }
    if ran.report.outcome != RunOutcome::Exited(0) {
        return Verdict::Inconclusive(format!(
            "the cold re-run ended {:?}{}",
            ran.report.outcome,
            ran.report
                .reason
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ));
    }
    for (p, warm_digest) in round.outs.iter().zip(warm_digests) {
        let cold_digest = match digest_of(p).await {
            Ok(d) => d,
            Err(e) => {
                return Verdict::Inconclusive(format!(
                    "the cold re-run's output {} cannot be audited: {e}",
                    p.display()
                ));
            }
        };
        let Some(first) = digest::first_difference(&warm_digest, &cold_digest) else {
            continue;
        };
        let mut output = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if matches!(warm_digest, Digest::Tree { .. }) {
            output.push('/');
        }
        // Two plain files differ in their bytes, which the hashes say.
        let first = match (&warm_digest, &cold_digest) {
            (Digest::File(_), Digest::File(_)) => String::new(),
            _ => first,
        };
        return Verdict::Differs {
            output,
            first,
            warm: warm_digest.sha256().to_string(),
            cold: cold_digest.sha256().to_string(),
        };
    }
    Verdict::Same
}

/// [`digest::digest`] of `p`, off the async threads.
async fn digest_of(p: &Path) -> Result<Digest, String> {
    let p = p.to_path_buf();
    blocking(move || digest::digest(&p).map_err(|e| e.to_string())).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> Paths {
        Paths {
            root: dir.to_path_buf(),
            cwd: dir.to_path_buf(),
            outs: vec![dir.join("dataset"), dir.join("out.npy")],
            round_dir: None,
            stats: Some(dir.join("stats.json")),
        }
    }

    /// The warm outputs wait aside while the cold run writes the same paths, and come back
    /// in place of the cold ones, a stale copy of an earlier audit cleared; a sidecar the warm
    /// run did not write stays absent.
    #[test]
    fn warm_outputs_are_set_aside_and_put_back_over_the_cold_ones() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let round = paths(d);
        std::fs::create_dir_all(d.join("dataset/episodes")).unwrap();
        std::fs::write(d.join("dataset/episodes/e0"), b"warm").unwrap();
        std::fs::write(d.join("out.npy"), b"warm").unwrap();
        // Left by an audit the agent did not finish.
        std::fs::create_dir_all(d.join(".quarry-audit-dataset/stale")).unwrap();
        let moved = move_aside(&round).unwrap();
        assert_eq!(moved, [d.join("dataset"), d.join("out.npy")]);
        assert!(!d.join("dataset").exists() && !d.join("out.npy").exists());
        assert!(!d.join(".quarry-audit-dataset/stale").exists());
        // The cold run.
        std::fs::create_dir_all(d.join("dataset/episodes")).unwrap();
        std::fs::write(d.join("dataset/episodes/e0"), b"cold").unwrap();
        std::fs::write(d.join("dataset/extra"), b"cold").unwrap();
        std::fs::write(d.join("out.npy"), b"cold").unwrap();
        std::fs::write(d.join("stats.json"), b"{}").unwrap();
        move_back(&round, &moved).unwrap();
        assert_eq!(
            std::fs::read(d.join("dataset/episodes/e0")).unwrap(),
            b"warm"
        );
        assert!(!d.join("dataset/extra").exists());
        assert_eq!(std::fs::read(d.join("out.npy")).unwrap(), b"warm");
        assert!(!d.join("stats.json").exists());
        let mut left: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["dataset", "out.npy"]);
    }

    /// When one output cannot be set aside (here its aside name would be too long), those
    /// already moved are put back untouched.
    #[test]
    fn a_failed_set_aside_puts_back_what_moved() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let long = d.join("x".repeat(250));
        let round = Paths {
            outs: vec![d.join("dataset"), long.clone()],
            ..paths(d)
        };
        std::fs::create_dir_all(d.join("dataset")).unwrap();
        std::fs::write(d.join("dataset/e0"), b"warm").unwrap();
        std::fs::write(&long, b"warm").unwrap();
        let e = move_aside(&round).unwrap_err();
        assert!(e.contains(".quarry-audit-xxx"), "{e}");
        assert!(!d.join(".quarry-audit-dataset").exists());
        assert_eq!(std::fs::read(d.join("dataset/e0")).unwrap(), b"warm");
        assert_eq!(std::fs::read(&long).unwrap(), b"warm");
    }
}
