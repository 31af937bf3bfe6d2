//! `coordinator run` end to end on one machine: real agents over gRPC on loopback, real
//! generator processes (deploy/examples/grasp_gen.py as the legacy main.py).

use quarry_proto::v1 as pb;
use quarry_tests::*;

const OBJECTS: [&str; 3] = ["obj_a", "Curver_Storage_Bin_Black_Small", "obj.c-1"];

fn args<'a>(root: &'a str, exp: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--root",
        root,
        "--exp_name",
        exp,
        "--object_code_list",
        OBJECTS[0],
        OBJECTS[1],
        OBJECTS[2],
        "--target_count_per_object",
        "150",
        "--round_batch_size",
        "40",
        "--num_iterations",
        "3",
        "--seed_base",
        "7",
        "--progress",
        "off",
    ];
    v.extend_from_slice(extra);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_quota_per_object_with_uneven_yields() {
    let root = legacy_root();
    let r = root.path().to_str().unwrap();
    let out = run(&args(
        r,
        "quota",
        &["--gpus", "0,1", "--", "--yield_mode", "uneven"],
    ))
    .await
    .unwrap();
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    assert_eq!(out.exit_code(), 0);
    let m = manifest(root.path(), "quota");
    let (mut all_seeds, mut finals_seen) = (Vec::new(), Vec::new());
    for (i, o) in OBJECTS.iter().enumerate() {
        let f = finals(root.path(), "quota", o);
        assert_eq!(f.len(), 1, "seed_only keeps one final");
        let info = quarry_formats::npy::inspect_path(&f[0]).unwrap();
        assert_eq!(info.count, 150, "{o}");
        let entry = &m["objects"][o];
        assert_eq!(entry["collected"], 150);
        assert_eq!(entry["done"], true);
        assert_eq!(entry["final_sha256"], sha256_file(&f[0]), "{o}");
        // Seeds follow seed_base + index*100000 + round, and name the final's directory.
        let seeds: Vec<i64> = entry["seeds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_i64().unwrap())
            .collect();
        let rounds: Vec<i64> = entry["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_i64().unwrap())
            .collect();
        for (s, r) in seeds.iter().zip(&rounds) {
            assert_eq!(*s, 7 + i as i64 * 100_000 + r);
        }
        all_seeds.extend(seeds);
        finals_seen.push(f[0].clone());
        // Uneven yields: more than ceil(150/40) rounds were needed for some object.
        assert!(rounds.len() >= 4, "{o}: {rounds:?}");
    }
    // scale_runner's layout: one directory for the whole run, named by the seeds of every
    // object's rounds (seed_only: `final/` renamed to it when the run ends).
    let exp_dir = experiments(root.path());
    let dir = format!(
        "final_seed_{}-{}",
        all_seeds.iter().min().unwrap(),
        all_seeds.iter().max().unwrap()
    );
    for (o, f) in OBJECTS.iter().zip(&finals_seen) {
        assert_eq!(*f, exp_dir.join(format!("quota/{dir}/{o}/{o}.npy")));
    }
    assert!(
        !exp_dir.join("quota/final").exists(),
        "seed_only leaves no final/"
    );
    let tagged: Vec<String> = std::fs::read_dir(exp_dir.join("quota"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("final"))
        .collect();
    assert_eq!(tagged, vec![dir]);
    // Intermediates are gone: no staging, no per-round generator directories.
    assert!(
        !exp_dir.join("quota/rounds").exists(),
        "{:?}",
        files_under(&exp_dir.join("quota/rounds"))
    );
    let leftovers: Vec<String> = files_under(&exp_dir)
        .into_iter()
        .filter(|f| f.contains("__"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The finals do not depend on how many agents run the job, nor on how many rounds each
/// leases per call (`--lease-batch`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finals_are_byte_identical_with_one_agent_four_and_batched_leases() {
    let one = legacy_root();
    let four = legacy_root();
    let batched = legacy_root();
    let extra = ["--", "--yield_mode", "uneven"];
    let mut a1 = args(one.path().to_str().unwrap(), "det", &["--gpu", "0"]);
    a1.extend_from_slice(&extra);
    let mut a4 = args(four.path().to_str().unwrap(), "det", &["--gpus", "0,1,2,3"]);
    a4.extend_from_slice(&extra);
    let mut ab = args(
        batched.path().to_str().unwrap(),
        "det",
        &["--gpus", "0,1", "--lease-batch", "4"],
    );
    ab.extend_from_slice(&extra);
    assert_eq!(run(&a1).await.unwrap().exit_code(), 0);
    assert_eq!(run(&a4).await.unwrap().exit_code(), 0);
    assert_eq!(run(&ab).await.unwrap().exit_code(), 0);
    let reference = final_hashes(one.path(), "det", &OBJECTS);
    assert_eq!(reference, final_hashes(four.path(), "det", &OBJECTS));
    assert_eq!(reference, final_hashes(batched.path(), "det", &OBJECTS));
    let staging = experiments(batched.path()).join("det").join("rounds");
    assert!(
        files_under(&staging).is_empty(),
        "staging left: {:?}",
        files_under(&staging)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_object_codes_are_refused_before_anything_runs() {
    for bad in ["../x", "a b", "$(id)"] {
        let root = legacy_root();
        let r = root.path().to_str().unwrap();
        let a = vec![
            "--root",
            r,
            "--exp_name",
            "bad",
            "--object_code_list",
            "ok",
            bad,
            "--target_count_per_object",
            "10",
            "--progress",
            "off",
        ];
        let err = run(&a).await.unwrap_err().to_string();
        assert!(err.contains("object_code_list[1]"), "{bad}: {err}");
        assert!(err.contains("letters, digits"), "{bad}: {err}");
        assert!(
            !experiments(root.path()).exists(),
            "nothing may be created for a refused spec"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rounds_reaching_the_stride_is_refused_with_the_fix() {
    let root = legacy_root();
    let r = root.path().to_str().unwrap();
    let err = run(&args(r, "cap", &["--max_rounds", "1000000"]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_rounds") && err.contains("at most 100000"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_spec_is_refused_showing_what_changed() {
    let root = legacy_root();
    let r = root.path().to_str().unwrap();
    assert_eq!(run(&args(r, "chg", &[])).await.unwrap().exit_code(), 0);
    let before = final_hashes(root.path(), "chg", &OBJECTS);
    let mut changed = args(r, "chg", &[]);
    let i = changed.iter().position(|a| *a == "40").unwrap();
    changed[i] = "64";
    let err = run(&changed).await.unwrap_err().to_string();
    assert!(err.contains("round_batch_size: was 40, now 64"), "{err}");
    // The same command again is a no-op resume of a finished job.
    let again = run(&args(r, "chg", &["--resume"])).await.unwrap();
    assert_eq!(again.exit_code(), 0);
    assert_eq!(final_hashes(root.path(), "chg", &OBJECTS), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_finals_load_in_numpy_and_equal_its_own_concatenation() {
    let root = legacy_root();
    let r = root.path().to_str().unwrap();
    let out = run(&args(
        r,
        "np",
        &[
            "--gpus",
            "0,1",
            "--keep_intermediate",
            "--final_dir_mode",
            "both",
            "--",
            "--yield_mode",
            "uneven",
        ],
    ))
    .await
    .unwrap();
    assert_eq!(out.exit_code(), 0);
    let m = manifest(root.path(), "np");
    let exp = experiments(root.path());
    const CHECK: &str = r#"
import sys, json, numpy as np
final, limit, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
got = np.load(final, allow_pickle=True)
want = np.concatenate([np.load(p, allow_pickle=True) for p in rounds])[:limit]
assert got.dtype == object and got.shape == want.shape, (got.shape, want.shape)
assert all(a == b for a, b in zip(got.tolist(), want.tolist()))
print(np.__version__, len(got))
"#;
    for o in OBJECTS {
        let f = finals(root.path(), "np", o);
        assert_eq!(f.len(), 2, "both: seed-tagged and plain");
        assert_eq!(sha256_file(&f[0]), sha256_file(&f[1]));
        assert!(f[1].ends_with(format!("final/{o}/{o}.npy")));
        // The rounds the final holds, in order, as kept by --keep_intermediate.
        let used: Vec<u64> = m["objects"][o]["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let rounds: Vec<String> = m["objects"][o]["commits"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| used.contains(&c["round"].as_u64().unwrap()))
            .map(|c| exp.join(c["key"].as_str().unwrap()).display().to_string())
            .collect();
        assert_eq!(rounds.len(), used.len());
        for py in pythons() {
            let mut argv = vec![f[0].to_str().unwrap(), "150"];
            argv.extend(rounds.iter().map(String::as_str));
            let printed = run_python(&py, CHECK, &argv);
            assert!(printed.trim().ends_with(" 150"), "{printed}");
        }
    }
}
