//! Every example generator in `deploy/examples/` runs in both modes: one process per round,
//! and warm (`generator.mode = "warm"`, through deploy/python's `quarry_generator.serve_cli`,
//! found beside the examples without any PYTHONPATH), with 1 and 4 agents; each object's
//! final is byte-identical across the three runs (for directory datasets, the sha256 of
//! their listing, which the manifest records), and to that of a fourth, warm on one agent,
//! whose generator is SIGKILLed from outside in the middle of a round (see
//! `quarry_tests::warm_kill`).
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;
use std::time::Duration;

use quarry_proto::v1 as pb;
use quarry_tests::warm_kill::MidRoundKill;
use quarry_tests::*;

const OBJECTS: [&str; 2] = ["mug", "bowl"];

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

fn job(root: &Path, e: &Example, warm: bool) -> std::path::PathBuf {
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
        "exp_name = \"ex\"\nobjects = [\"mug\", \"bowl\"]\ntarget_count_per_object = 25\n\
         round_batch_size = 10\nseed_base = 3\nretry_backoff_ms = 10\nroot = {root}\n\n[generator]\n{mode}argv = [{argv}]\n\
         output = {output}\nround_dir = \"out/{{name}}\"\n{stats}{format}",
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

/// Runs the example's job under `root` with `extra` `coordinator run` arguments (bounded in
/// time); returns the manifest of the run, which must have ended with every object at its
/// quota.
async fn run_job(root: &Path, e: &Example, warm: bool, extra: &[&str]) -> serde_json::Value {
    let job = job(root, e, warm);
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
    for o in OBJECTS {
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
    let m = run_job(root.path(), e, warm, &["--gpus", gpus]).await;
    final_shas(e, &m)
}

/// A warm run on one agent whose generator is SIGKILLed in the middle of a round (after it
/// answered one): that attempt fails, the agent starts the generator again (counted as a
/// `died` start), the round is retried and committed once; returns the finals.
async fn finals_after_a_kill_mid_round(e: &Example) -> Vec<String> {
    let root = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let kill = MidRoundKill::start(
        root.path(),
        &root.path().join("out"),
        "0",
        Some(metrics.clone()),
        Duration::from_secs(100),
    );
    let m = run_job(
        root.path(),
        e,
        true,
        &["--gpus", "0", "--metrics-listen", &metrics],
    )
    .await;
    let r = kill.finish();
    let what = format!("{}: {r:?}\n{m}", e.script);
    assert!(r.killed.is_some(), "no kill: {what}");
    assert!(r.answered_before >= 1, "{what}");
    assert!(r.restarted_as.is_some(), "no restart: {what}");
    assert_eq!(r.died_starts, Some(1.0), "{what}");
    let failed: u64 = OBJECTS
        .iter()
        .map(|o| m["objects"][o]["failed_attempts"].as_u64().unwrap())
        .sum();
    assert_eq!(failed, 1, "one failed attempt: {what}");
    for o in OBJECTS {
        let obj = &m["objects"][o];
        assert!(obj["quarantined"].as_array().unwrap().is_empty(), "{what}");
        let commits: Vec<u64> = obj["commits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["round"].as_u64().unwrap())
            .collect();
        let distinct: std::collections::BTreeSet<_> = commits.iter().collect();
        assert_eq!(
            distinct.len(),
            commits.len(),
            "a round committed twice: {what}"
        );
    }
    // The round killed (named by the directory its partial output was in) was committed from
    // its second attempt.
    if let Some(name) = &r.round {
        let (object, round) = object_and_round(name);
        let c = m["objects"][object]["commits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["round"] == round)
            .unwrap_or_else(|| panic!("round {name} not committed: {what}"));
        // Attempt ids are `e<epoch>a<n>`, n from 0: a0 was killed; its log is kept.
        assert!(
            c["attempt"].as_str().unwrap().ends_with("a1"),
            "{c}: {what}"
        );
        let tail = name.rsplit("__").next().unwrap();
        let log = experiments(root.path()).join(format!("ex/logs/{object}/{tail}/e1a0.log"));
        assert!(log.is_file(), "no {}: {what}", log.display());
    }
    // Nothing of the killed attempt's partial output is left.
    let left = files_under(&root.path().join("out"));
    assert!(left.is_empty(), "left behind: {left:?}: {what}");
    final_shas(e, &m)
}

/// The object and round number of a round's name (`<exp>__<object>__r<round>_s<seed>`).
fn object_and_round(name: &str) -> (&str, u64) {
    let mut parts = name.split("__");
    let (_, object, tail) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
    let round = tail.strip_prefix('r').unwrap().split('_').next().unwrap();
    (object, round.parse().unwrap())
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
        assert_eq!(
            finals_after_a_kill_mid_round(e).await,
            reference,
            "{}: warm mode, the generator killed mid-round",
            e.script
        );
    }
}
