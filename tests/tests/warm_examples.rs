//! Every example generator in `deploy/examples/` runs in both modes: one process per round,
//! and warm (`generator.mode = "warm"`, through deploy/python's `quarry_generator.serve_cli`,
//! found beside the examples without any PYTHONPATH), with 1 and 4 agents; each object's
//! final is byte-identical across the three runs (for directory datasets, the sha256 of
//! their listing, which the manifest records), and to those of two more warm runs, on 1 and
//! on 4 agents, in which one warm generator is SIGKILLed from outside in the middle of a round
//! (see `quarry_tests::warm_kill`). (The examples that need torch or lerobot, which CI does
//! not have, are checked by hand: `deploy/examples/warm_check.sh`.)
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;
use std::time::Duration;

use quarry_proto::v1 as pb;
use quarry_tests::warm_kill::{MidRoundKill, Targets};
use quarry_tests::*;

const OBJECTS: [&str; 2] = ["mug", "bowl"];
/// Runs of a kill test before one without a kill fails it (see `finals_after_a_kill_mid_round`).
const KILL_TRIES: usize = 5;
/// The objects of the run killed on 4 agents: [`OBJECTS`] first (their seeds, and so their
/// finals, do not change), then more, so that the killed agent has rounds left to restart on.
const MORE_OBJECTS: [&str; 6] = ["mug", "bowl", "cup", "box", "pan", "jar"];

/// One example: its script, the output file or directory a round writes, the job's
/// `format` when the extension does not say it, flags every round takes, and whether the
/// job names the `--stats` yield sidecar.
struct Example {
    script: &'static str,
    file: &'static str,
    format: Option<&'static str>,
    flags: &'static [&'static str],
    stats: bool,
}

const EXAMPLES: [Example; 6] = [
    Example {
        script: "robomimic_gen.py",
        file: "demo.hdf5",
        format: None,
        flags: &[],
        stats: true,
    },
    Example {
        script: "zarr_replay_gen.py",
        file: "replay.zarr",
        format: None,
        flags: &[],
        stats: true,
    },
    Example {
        script: "episode_collector.py",
        file: "dataset",
        format: Some("episodes"),
        flags: &[],
        stats: true,
    },
    Example {
        script: "jsonl_gen.py",
        file: "rows.jsonl",
        format: None,
        flags: &[],
        stats: true,
    },
    Example {
        script: "npz_gen.py",
        file: "batch.npz",
        format: None,
        flags: &[],
        stats: true,
    },
    Example {
        script: "mimic_layouts_gen.py",
        file: "demo.hdf5",
        format: None,
        flags: &["--layout", "mimicgen"],
        stats: false,
    },
];

fn job(root: &Path, e: &Example, warm: bool, objects: &[&str]) -> std::path::PathBuf {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let script = repo_root().join("deploy/examples").join(e.script);
    let mut argv = vec![q(&python()), q(script.to_str().unwrap())];
    argv.extend(e.flags.iter().map(|f| q(f)));
    if !warm {
        for f in [
            "--seed",
            "{seed}",
            "--object",
            "{object}",
            "--batch_size",
            "{batch_size}",
            "--out",
            &format!("out/{{name}}/{}", e.file),
        ] {
            argv.push(q(f));
        }
        if e.stats {
            argv.extend([q("--stats"), q("out/{name}/stats.json")]);
        }
    }
    let text = format!(
        "exp_name = \"ex\"\nobjects = [{objects}]\ntarget_count_per_object = 25\n\
         round_batch_size = 10\nseed_base = 3\nretry_backoff_ms = 10\nroot = {root}\n\n[generator]\n{mode}argv = [{argv}]\n\
         output = {output}\nround_dir = \"out/{{name}}\"\n{stats}{format}",
        objects = objects.iter().map(|o| q(o)).collect::<Vec<_>>().join(", "),
        root = q(root.to_str().unwrap()),
        mode = if warm { "mode = \"warm\"\n" } else { "" },
        argv = argv.join(", "),
        output = q(&format!("out/{{name}}/{}", e.file)),
        stats = if e.stats {
            "stats = \"out/{name}/stats.json\"\n"
        } else {
            ""
        },
        format = e
            .format
            .map_or(String::new(), |f| format!("format = \"{f}\"\n")),
    );
    let p = root.join("job.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs the example's job for `objects` under `root` with `extra` `coordinator run` arguments
/// (bounded in time); returns the manifest of the run, which must have ended with every object
/// at its quota.
async fn run_job(
    root: &Path,
    e: &Example,
    warm: bool,
    objects: &[&str],
    extra: &[&str],
) -> serde_json::Value {
    let job = job(root, e, warm, objects);
    let mut args = vec!["--job", job.to_str().unwrap(), "--progress", "off"];
    args.extend_from_slice(extra);
    let out = tokio::time::timeout(Duration::from_secs(120), run(&args))
        .await
        .unwrap_or_else(|_| panic!("{} warm={warm} {extra:?}: no end in 120 s", e.script))
        .unwrap();
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{} warm={warm} {extra:?}: {:?}",
        e.script,
        out.status
    );
    let m = manifest(root, "ex");
    for o in objects {
        assert_eq!(m["objects"][o]["collected"], 25, "{}: {m}", e.script);
    }
    m
}

/// Each object's `final_sha256` in `m`.
fn final_shas(e: &Example, m: &serde_json::Value) -> Vec<String> {
    OBJECTS
        .iter()
        .map(|o| {
            m["objects"][o]["final_sha256"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no final_sha256 for {o}", e.script))
                .to_string()
        })
        .collect()
}

/// Runs the example's job and returns each object's `final_sha256`.
async fn finals_of(e: &Example, warm: bool, gpus: &str) -> Vec<String> {
    let root = tempfile::tempdir().unwrap();
    let m = run_job(root.path(), e, warm, &OBJECTS, &["--gpus", gpus]).await;
    final_shas(e, &m)
}

/// A warm run on `gpus` (one agent each) in which one warm generator (whichever first
/// answered a round and works on the next) is SIGKILLed in the middle of a round: that attempt
/// fails, its agent starts the generator again (counted as the run's one `died` start), the
/// round is retried and committed once from its second attempt, the killed attempt's log is
/// kept; returns the finals of [`OBJECTS`].
async fn finals_after_a_kill_mid_round(e: &Example, gpus: &str) -> Vec<String> {
    let objects: &[&str] = if gpus.contains(',') {
        &MORE_OBJECTS
    } else {
        &OBJECTS
    };
    // The watcher aims from outside at moments that last milliseconds: on a loaded machine a
    // run can end before it found one (nothing killed, a run like the others). Such a run is
    // repeated, up to KILL_TRIES times; a run with a kill is checked in full.
    let mut misses = Vec::new();
    let (root, m, r) = loop {
        let root = tempfile::tempdir().unwrap();
        let metrics = format!("127.0.0.1:{}", free_port());
        let kill = MidRoundKill::start(
            root.path(),
            &experiments(root.path()).join("ex/logs"),
            Targets {
                // Every object needs rounds 0, 1 and 2 (25 samples, at most 10 a round).
                rounds_below: 3,
                // Not the last two of many objects: the killed agent has rounds left to
                // start its generator again on.
                objects: objects[..objects.len().saturating_sub(2).max(OBJECTS.len())]
                    .iter()
                    .map(|o| o.to_string())
                    .collect(),
            },
            Some(metrics.clone()),
            Duration::from_secs(100),
        );
        let m = run_job(
            root.path(),
            e,
            true,
            objects,
            &["--gpus", gpus, "--metrics-listen", &metrics],
        )
        .await;
        let r = kill.finish();
        if r.killed.is_some() {
            break (root, m, r);
        }
        misses.push(r.trace);
        assert!(
            misses.len() < KILL_TRIES,
            "{} on gpus {gpus}: no kill in {KILL_TRIES} runs: {misses:?}",
            e.script
        );
    };
    // Every failed attempt's log (the last lines), to tell the kill's from any other.
    let logs = experiments(root.path()).join("ex/logs");
    let failed_logs: Vec<String> = files_under(&logs)
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(logs.join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(6).collect();
            format!("{f}: {:?}", tail)
        })
        .collect();
    let what = format!(
        "{} on gpus {gpus}: {r:?}\nfailed attempts' logs: {failed_logs:#?}\n{m}",
        e.script
    );
    assert!(r.killed.is_some(), "no kill: {what}");
    assert!(r.answered_before >= 1, "{what}");
    assert!(r.restarted_as.is_some(), "no restart: {what}");
    // The kill's restart counts as `died`; so does a round of another object's tail cancelled
    // mid-round when its object completed (the agent stops the process then), which a slow
    // run can see too.
    assert!(r.died_starts.is_some_and(|d| d >= 1.0), "{what}");
    let failed: u64 = objects
        .iter()
        .map(|o| m["objects"][o]["failed_attempts"].as_u64().unwrap())
        .sum();
    if objects.len() == OBJECTS.len() {
        assert_eq!(failed, 1, "one failed attempt: {what}");
    } else {
        // With 4 agents a round leased ahead past an object's quota may end unfinished when
        // the object completes; only the kill's is retried (below).
        assert!(failed >= 1, "the killed attempt failed: {what}");
    }
    let mut retried = Vec::new();
    for o in objects {
        let obj = &m["objects"][o];
        assert!(obj["quarantined"].as_array().unwrap().is_empty(), "{what}");
        let commits = obj["commits"].as_array().unwrap();
        let rounds: Vec<u64> = commits
            .iter()
            .map(|c| c["round"].as_u64().unwrap())
            .collect();
        let distinct: std::collections::BTreeSet<_> = rounds.iter().collect();
        assert_eq!(
            distinct.len(),
            rounds.len(),
            "a round committed twice: {what}"
        );
        // Attempt ids are `e<epoch>a<n>`, n from 0.
        retried.extend(
            commits
                .iter()
                .filter(|c| !c["attempt"].as_str().unwrap().ends_with("a0"))
                .map(|c| (o.to_string(), c["round"].as_u64().unwrap())),
        );
    }
    // The round killed (named by the killed attempt's log, which is kept) is the one round
    // committed from a later attempt, its second.
    let k = r
        .round
        .as_ref()
        .unwrap_or_else(|| panic!("no log of the killed attempt: {what}"));
    assert!(k.log.is_file(), "{what}");
    assert!(k.attempt.ends_with("a0"), "{what}");
    assert_eq!(retried, [(k.object.clone(), k.round)], "{what}");
    let c = m["objects"][&k.object]["commits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["round"] == k.round)
        .unwrap();
    assert!(
        c["attempt"].as_str().unwrap().ends_with("a1"),
        "{c}: {what}"
    );
    // Nothing of the killed attempt's partial output is left.
    let left = files_under(&root.path().join("out"));
    assert!(left.is_empty(), "left behind: {left:?}: {what}");
    final_shas(e, &m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_generator_writes_the_same_finals_warm_and_per_round() {
    for e in &EXAMPLES {
        let reference = finals_of(e, false, "0,1").await;
        for gpus in ["0", "0,1,2,3"] {
            assert_eq!(
                finals_of(e, true, gpus).await,
                reference,
                "{}: warm mode with gpus {gpus}",
                e.script
            );
        }
        for gpus in ["0", "0,1,2,3"] {
            assert_eq!(
                finals_after_a_kill_mid_round(e, gpus).await,
                reference,
                "{}: warm mode with gpus {gpus}, a generator killed mid-round",
                e.script
            );
        }
    }
}
