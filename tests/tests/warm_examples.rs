//! Every example generator in `deploy/examples/` runs in both modes: one process per round,
//! and warm (`generator.mode = "warm"`, through deploy/python's `quarry_generator.serve_cli`,
//! found beside the examples without any PYTHONPATH), with 1 and 4 agents; each object's
//! final is byte-identical across the three runs (for directory datasets, the sha256 of
//! their listing, which the manifest records).
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;

use quarry_proto::v1 as pb;
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
         round_batch_size = 10\nseed_base = 3\nroot = {root}\n\n[generator]\n{mode}argv = [{argv}]\n\
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

/// Runs the example's job and returns each object's `final_sha256`.
async fn finals_of(e: &Example, warm: bool, gpus: &str) -> Vec<String> {
    let root = tempfile::tempdir().unwrap();
    let job = job(root.path(), e, warm);
    let out = run(&[
        "--job",
        job.to_str().unwrap(),
        "--progress",
        "off",
        "--gpus",
        gpus,
    ])
    .await
    .unwrap();
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{} warm={warm} gpus {gpus}: {:?}",
        e.script,
        out.status
    );
    let m = manifest(root.path(), "ex");
    OBJECTS
        .iter()
        .map(|o| {
            assert_eq!(m["objects"][o]["collected"], 25, "{}: {m}", e.script);
            m["objects"][o]["final_sha256"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no final_sha256 for {o}", e.script))
                .to_string()
        })
        .collect()
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
    }
}
