//! The determinism audit of a warm round (`generator.audit`): once the warm process is done
//! with a round the coordinator marked, the round is re-run cold in a fresh process of the
//! same generator, handed the same round line with its outputs (and the yield sidecar)
//! redirected to `.quarry-audit-<name>` beside the real ones, and each output's digest
//! compared with the warm run's: a plain file's sha256, a directory dataset's tree digest
//! ([`super::digest`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use quarry_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::digest::{self, Digest};
use super::round::Paths;
use crate::runner::warm::{WarmProcess, WarmSpec};
use crate::runner::{RunOutcome, RunReport};

/// Where an audited round's cold re-run writes: beside each real output (file or
/// directory), under `.quarry-audit-<name>`; the round directory and working directory stay
/// the round's.
pub(super) fn audit_paths(paths: &Paths) -> Paths {
    let aside = |p: &PathBuf| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        p.with_file_name(format!(".quarry-audit-{name}"))
    };
    Paths {
        root: paths.root.clone(),
        cwd: paths.cwd.clone(),
        outs: paths.outs.iter().map(aside).collect(),
        round_dir: paths.round_dir.clone(),
        stats: paths.stats.as_ref().map(aside),
    }
}

/// Re-runs a done warm round cold, in a fresh process started from `spec` and handed
/// `line` (the round with `cold`'s paths), and compares each output's digest with the warm
/// run's. A mismatch turns `report` into [`RunOutcome::AuditMismatch`] naming the round,
/// the output, where it first differs and both digests; a cold run that fails (or an output
/// that cannot be audited: a link, a special file, a tree past the bounds) into
/// [`RunOutcome::Failed`], a retryable attempt. The cold run's outputs are removed before
/// (a leftover of an earlier audit would mix into a directory) and after, either way.
#[allow(clippy::too_many_arguments)]
pub(super) async fn audit_round(
    report: &mut RunReport,
    spec: WarmSpec,
    line: &str,
    warm: &Paths,
    cold: &Paths,
    lease: &pb::Lease,
    limit: Option<Duration>,
    stop: &CancellationToken,
) {
    remove_cold(cold).await;
    let verdict = compare(spec, line, warm, cold, limit, stop).await;
    remove_cold(cold).await;
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

/// Removes the cold run's outputs: a directory whole (links in it removed, not followed),
/// anything else as a file. Gone already is fine.
async fn remove_cold(cold: &Paths) {
    let paths: Vec<PathBuf> = cold.outs.iter().chain(cold.stats.iter()).cloned().collect();
    let removed = tokio::task::spawn_blocking(move || {
        for p in paths {
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {
                    if let Err(e) = std::fs::remove_dir_all(&p) {
                        warn!(path = %p.display(), error = %e, "cannot remove the audit's cold output");
                    }
                }
                Ok(_) => {
                    let _ = std::fs::remove_file(&p);
                }
                Err(_) => {}
            }
        }
    })
    .await;
    if let Err(e) = removed {
        warn!(error = %e, "removing the audit's cold outputs failed");
    }
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

async fn compare(
    spec: WarmSpec,
    line: &str,
    warm: &Paths,
    cold: &Paths,
    limit: Option<Duration>,
    stop: &CancellationToken,
) -> Verdict {
    let mut warm_digests = Vec::with_capacity(warm.outs.len());
    for p in &warm.outs {
        match digest_of(p).await {
            Ok(d) => warm_digests.push(d),
            Err(e) => {
                return Verdict::Inconclusive(format!("cannot audit {}: {e}", p.display()));
            }
        }
    }
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
    for ((w, c), warm_digest) in warm.outs.iter().zip(&cold.outs).zip(warm_digests) {
        let cold_digest = match digest_of(c).await {
            Ok(d) => d,
            Err(e) => {
                return Verdict::Inconclusive(format!(
                    "the cold re-run's output {} cannot be audited: {e}",
                    c.display()
                ));
            }
        };
        let Some(first) = digest::first_difference(&warm_digest, &cold_digest) else {
            continue;
        };
        let mut output = w
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
    tokio::task::spawn_blocking(move || digest::digest(&p).map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())?
}
