//! The object store on an S3-compatible server (moto): the storage operations the coordinator
//! and workers use, and `coordinator serve --store s3://bucket/prefix` with a worker process
//! giving finals byte-identical to `coordinator run` on a local directory.

use std::path::Path;

use quarry_common::storage::{StoreError, hex};
use quarry_tests::cluster::{Killed, served_job_file, spawn_worker, submit};
use quarry_tests::s3::Moto;
use quarry_tests::*;
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_list_download_and_delete_on_s3() {
    let moto = Moto::start("quarry-store");
    let store = moto.store("team/runs");
    assert_eq!(store.url(), "s3://quarry-store/team/runs");
    assert!(store.local_path("x").is_none());
    let dir = tempfile::tempdir().unwrap();

    // More than one 8 MiB chunk: a multipart upload with three parts.
    let src = dir.path().join("big.bin");
    let data: Vec<u8> = (0..(20 << 20) + 123).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let key = "e/rounds/o/r0_s1/e1a0/o.npy";
    let up = store.put_file(key, &src).await.unwrap();
    assert_eq!(up.size, data.len() as u64);
    assert_eq!(up.sha256, hex(&Sha256::digest(&data)));
    store
        .put_bytes("e/manifest.json", &b"{}"[..])
        .await
        .unwrap();

    assert_eq!(store.list("e/rounds").await.unwrap(), vec![key.to_string()]);
    // Keys are relative to the prefix: the bucket holds them under it.
    let whole_bucket = moto.store("");
    let mut all = whole_bucket.list("team").await.unwrap();
    all.sort();
    assert_eq!(
        all,
        vec![
            "team/runs/e/manifest.json".to_string(),
            format!("team/runs/{key}")
        ]
    );

    let back = dir.path().join("down/o.npy");
    assert_eq!(
        store.download_to(key, &back).await.unwrap(),
        data.len() as u64
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "downloaded bytes differ"
    );

    // Finals: create-only, idempotent for the same bytes, refused for other bytes; both the
    // single-request path (small) and the multipart path (large).
    let small = dir.path().join("small.bin");
    std::fs::write(&small, b"final bytes").unwrap();
    let other = dir.path().join("other.bin");
    std::fs::write(&other, b"other bytes").unwrap();
    for (final_key, file) in [("e/final/s/s.npy", &small), ("e/final/b/b.npy", &src)] {
        let first = store.put_file_create(final_key, file).await.unwrap();
        assert_eq!(store.put_file_create(final_key, file).await.unwrap(), first);
        assert!(
            matches!(
                store.put_file_create(final_key, &other).await,
                Err(StoreError::Conflict { .. })
            ),
            "{final_key} was replaced by other bytes"
        );
        assert_eq!(store.hash_object(final_key).await.unwrap(), Some(first));
    }

    assert_eq!(store.delete_prefix("e/rounds/o").await.unwrap(), 1);
    assert!(store.list("e/rounds").await.unwrap().is_empty());
    assert_eq!(
        store.get_bytes("e/manifest.json").await.unwrap().unwrap(),
        &b"{}"[..]
    );
    assert!(store.get_bytes("e/nothing").await.unwrap().is_none());
    assert!(
        moto.open_multipart_uploads().is_empty(),
        "multipart uploads left open: {:?}",
        moto.open_multipart_uploads()
    );
}

fn job_file(dir: &Path, root: &Path) -> std::path::PathBuf {
    served_job_file(dir, root, "final_dir_mode = \"both\"")
}

/// `coordinator serve` on `store_url` with `env`; its address once it listens.
fn start_serve(home: &Path, store_url: &str, env: &[(&str, String)]) -> (Killed, String) {
    let state = format!("file://{}", home.join("state.redb").display());
    quarry_tests::cluster::start_serve(&state, store_url, "5", env, &home.join("coordinator.log"))
}

/// `coordinator serve` on `store_url` and a worker with two agents, both logging under
/// `home`; submits `job` and waits until it ends as `job <exp>: done`. The processes are
/// returned to live as long as the caller needs them.
fn serve_to_done(
    home: &Path,
    store_url: &str,
    env: &[(&str, String)],
    job: &Path,
    exp: &str,
) -> (Killed, Killed) {
    let (serve, addr) = start_serve(home, store_url, env);
    let worker = spawn_worker(&addr, "0,1", env, Some(&home.join("worker.log")));
    let submit = submit(job, &addr, true);
    let submit_err = String::from_utf8_lossy(&submit.stderr);
    assert!(
        submit.status.success() && submit_err.contains(&format!("job {exp}: done")),
        "{submit_err}\n{}",
        logs(home)
    );
    (serve, worker)
}

fn logs(home: &Path) -> String {
    ["coordinator.log", "worker.log"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(home.join(f)).unwrap_or_default();
            let start = text.len().saturating_sub(3000);
            format!("--- {f}:\n{}", text.get(start..).unwrap_or(&text))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_worker_on_s3_give_the_same_finals_as_a_local_run() {
    let moto = Moto::start("quarry-e2e");
    let env = moto.env();
    let root = legacy_root();
    let home = tempfile::tempdir().unwrap();
    let job = job_file(home.path(), root.path());
    let store_url = format!("s3://{}/team/runs", moto.bucket());

    let _cluster = serve_to_done(home.path(), &store_url, &env, &job, "served");

    // The same job through `coordinator run` on a local directory.
    let reference = legacy_root();
    let reference_job = job_file(reference.path(), reference.path());
    run_job_to_end(&reference_job, &[]).await;

    let store = moto.store("team/runs");
    let manifest =
        assert_store_finals_match(&store, "served", &["obj_a", "obj_b"], reference.path()).await;
    // scale_runner's layout under the bucket's prefix: one run-wide seed-tagged directory
    // (both objects' seeds) beside final/.
    let tagged: Vec<&str> = ["obj_a", "obj_b"]
        .iter()
        .map(|o| manifest["objects"][o]["final"][0].as_str().unwrap())
        .collect();
    assert!(
        tagged[0].starts_with("served/final_seed_") && tagged[1].starts_with("served/final_seed_"),
        "{tagged:?}"
    );
    assert_eq!(
        tagged[0].split('/').nth(1),
        tagged[1].split('/').nth(1),
        "{tagged:?}"
    );
    for o in ["obj_a", "obj_b"] {
        let keys = manifest["objects"][o]["final"].as_array().unwrap();
        assert_eq!(keys.len(), 2, "final_dir_mode both: {manifest}");
        assert_eq!(keys[1], format!("served/final/{o}/{o}.npy"), "{manifest}");
        assert_eq!(manifest["objects"][o]["collected"], 90, "{manifest}");
    }
    // No upload was left open.
    let open = moto.open_multipart_uploads();
    assert!(open.is_empty(), "multipart uploads left open: {open:?}");
}

/// Between Quarry and the S3 server sits a proxy that answers some requests `503 Slow Down`,
/// resets others and leaves a few unanswered (stalls, cut by a 2 s request timeout set with
/// `AWS_TIMEOUT`). Coordinator and worker retry with backoff: the job finishes with the
/// same finals as a clean run, and no staging object or open multipart upload remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_errors_and_resets_are_retried_and_lose_nothing() {
    use quarry_tests::faultproxy::{Fault, FaultProxy};

    let moto = Moto::start("quarry-faults");
    // Every 4th request throttled, every 7th reset, every 23rd stalled (after a clean start).
    let proxy = FaultProxy::start(moto.port(), |n| match n {
        n if n < 3 => Fault::Pass,
        n if n % 4 == 1 => Fault::SlowDown,
        n if n % 7 == 3 => Fault::Reset,
        n if n % 23 == 10 => Fault::Stall,
        _ => Fault::Pass,
    });
    let mut env: Vec<(&str, String)> = moto
        .env()
        .into_iter()
        .map(|(k, v)| {
            if k == "AWS_ENDPOINT_URL" {
                (k, proxy.endpoint())
            } else {
                (k, v)
            }
        })
        .collect();
    env.push(("AWS_TIMEOUT", "2s".into()));
    let root = legacy_root();
    let home = tempfile::tempdir().unwrap();
    let job = job_file(home.path(), root.path());
    let store_url = format!("s3://{}/runs", moto.bucket());
    let _cluster = serve_to_done(home.path(), &store_url, &env, &job, "served");
    assert!(proxy.stalled() >= 1, "no request was stalled");
    assert!(
        proxy.injected() >= 5,
        "too few faults injected to prove anything: {} of {}",
        proxy.injected(),
        proxy.injected() + proxy.passed()
    );

    let reference = legacy_root();
    let reference_job = job_file(reference.path(), reference.path());
    run_job_to_end(&reference_job, &[]).await;
    let store = moto.store("runs");
    assert_store_finals_match(&store, "served", &["obj_a", "obj_b"], reference.path()).await;
    assert!(
        moto.open_multipart_uploads().is_empty(),
        "multipart uploads left open: {:?}",
        moto.open_multipart_uploads()
    );
    eprintln!(
        "faults injected: {} of {} S3 requests ({} stalls)",
        proxy.injected(),
        proxy.injected() + proxy.passed(),
        proxy.stalled()
    );
}

/// A directory dataset (an episode folder) through S3: rounds staged as one archive each,
/// the final uploaded file by file under its key. Every file equals the one a local
/// `coordinator run` of the same job writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_dataset_on_s3_matches_a_local_run() {
    let moto = Moto::start("quarry-dirs");
    let env = moto.env();
    let home = tempfile::tempdir().unwrap();
    let job_text = |root: &Path| {
        format!(
            r#"
exp_name = "episodes"
objects = ["Stack", "Stack3"]
target_count_per_object = 12
round_batch_size = 5
seed_base = 9
root = "{root}"

[generator]
argv = ["{py}", "{gen}", "--seed", "{{seed}}", "--object", "{{object}}",
        "--batch_size", "{{batch_size}}", "--out", "out/{{name}}/dataset",
        "--stats", "out/{{name}}/stats.json"]
output = "out/{{name}}/dataset"
format = "episodes"
stats = "out/{{name}}/stats.json"
round_dir = "out/{{name}}"
"#,
            root = root.display(),
            py = python(),
            gen = repo_root()
                .join("deploy/examples/episode_collector.py")
                .display(),
        )
    };
    let job = home.path().join("job.toml");
    std::fs::write(&job, job_text(home.path())).unwrap();
    let store_url = format!("s3://{}/lab", moto.bucket());
    let _cluster = serve_to_done(home.path(), &store_url, &env, &job, "episodes");

    let reference = tempfile::tempdir().unwrap();
    let reference_job = reference.path().join("job.toml");
    std::fs::write(&reference_job, job_text(reference.path())).unwrap();
    run_job_to_end(&reference_job, &[]).await;

    let store = moto.store("lab");
    let m: serde_json::Value = serde_json::from_slice(
        &store
            .get_bytes("episodes/manifest.json")
            .await
            .unwrap()
            .expect("manifest in S3"),
    )
    .unwrap();
    for o in ["Stack", "Stack3"] {
        let key = m["objects"][o]["final"][0].as_str().expect("final key");
        let local = experiments(reference.path()).join(key);
        let want = files_under(&local);
        assert!(
            want.iter()
                .any(|f| f.starts_with("episodes/episode_00011.")),
            "{want:?}"
        );
        let mut got: Vec<String> = store
            .list(&format!("{key}/"))
            .await
            .unwrap()
            .into_iter()
            .map(|k| k[key.len() + 1..].to_string())
            .collect();
        got.sort();
        assert_eq!(got, want, "{o}: the same files");
        for f in &want {
            let bytes = store
                .get_bytes(&format!("{key}/{f}"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                bytes.as_ref(),
                std::fs::read(local.join(f)).unwrap().as_slice(),
                "{o}/{f}"
            );
        }
    }
    let staged = store.list("episodes/rounds/").await.unwrap();
    assert!(staged.is_empty(), "{staged:?}");
}

/// A file of three chunks and a bit: a multipart upload of four 8 MiB-or-less parts.
fn multipart_file(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("big.bin");
    let data: Vec<u8> = (0..(24 << 20) + 4096).map(|i| (i % 253) as u8).collect();
    std::fs::write(&src, &data).expect("write the test file");
    src
}

/// Waits (bounded) until the server holds an open multipart upload and the proxy has stalled
/// more than `stalled_before` requests (a part in flight); the open uploads' keys.
async fn open_upload_with_a_stalled_part(
    moto: &Moto,
    proxy: &quarry_tests::faultproxy::FaultProxy,
    stalled_before: u64,
) -> Vec<String> {
    for _ in 0..400 {
        let open = moto.open_multipart_uploads();
        if !open.is_empty() && proxy.stalled() > stalled_before {
            return open;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!(
        "no open multipart upload with a stalled part within 10 s (open: {:?}, stalled: {})",
        moto.open_multipart_uploads(),
        proxy.stalled()
    );
}

/// Waits (bounded) until the server holds no open multipart upload; those still open.
async fn open_uploads_after_cleanup(moto: &Moto) -> Vec<String> {
    for _ in 0..400 {
        if moto.open_multipart_uploads().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    moto.open_multipart_uploads()
}

/// An upload abandoned midway, its future dropped (the task cancelled, a timeout around the
/// call), leaves no multipart upload open: it is aborted in the background. The proxy stalls
/// every part but the first, so the upload is certainly open when it is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_multipart_upload_is_aborted() {
    use quarry_tests::faultproxy::{Fault, FaultProxy};

    let moto = Moto::start("quarry-abandoned");
    let proxy = FaultProxy::start_by_request(moto.port(), |line| {
        if line.contains("partNumber=") && !line.contains("partNumber=1&") {
            Fault::Stall
        } else {
            Fault::Pass
        }
    });
    let store = moto.store_via(&proxy.endpoint(), "runs");
    let dir = tempfile::tempdir().unwrap();
    let src = multipart_file(dir.path());

    // put_file's future dropped once the upload is open and a part hangs.
    let key = "e/rounds/o/r0_s1/a1/o.npy";
    let mut upload = Box::pin(store.put_file(key, &src));
    let open = tokio::select! {
        done = &mut upload => panic!("the upload ended though its parts are stalled: {done:?}"),
        open = open_upload_with_a_stalled_part(&moto, &proxy, 0) => open,
    };
    assert_eq!(open, vec![format!("runs/{key}")], "the upload was open");
    drop(upload);
    let left = open_uploads_after_cleanup(&moto).await;
    assert!(left.is_empty(), "dropped upload left open: {left:?}");

    // put_file_create (a final) in a task that is aborted.
    let final_key = "e/final/o/o.npy";
    let stalled = proxy.stalled();
    let task = tokio::spawn({
        let (store, src) = (store.clone(), src.clone());
        async move { store.put_file_create(final_key, &src).await }
    });
    let open = open_upload_with_a_stalled_part(&moto, &proxy, stalled).await;
    assert_eq!(
        open,
        vec![format!("runs/{final_key}")],
        "the upload was open"
    );
    task.abort();
    assert!(task.await.expect_err("aborted task").is_cancelled());
    let left = open_uploads_after_cleanup(&moto).await;
    assert!(left.is_empty(), "aborted task's upload left open: {left:?}");
    assert!(store.list("e").await.unwrap().is_empty(), "nothing written");
}

/// A completion the server refuses (`400 InvalidPart` from the proxy, not retried) fails the
/// upload with that error, and the upload is aborted before the error is returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_completion_aborts_the_multipart_upload() {
    use quarry_tests::faultproxy::{Fault, FaultProxy};

    let moto = Moto::start("quarry-refused");
    // CompleteMultipartUpload is the one POST naming an uploadId.
    let proxy = FaultProxy::start_by_request(moto.port(), |line| {
        if line.starts_with("POST ") && line.contains("uploadId=") {
            Fault::InvalidPart
        } else {
            Fault::Pass
        }
    });
    let store = moto.store_via(&proxy.endpoint(), "runs");
    let dir = tempfile::tempdir().unwrap();
    let src = multipart_file(dir.path());

    for key in ["e/rounds/o/r0_s1/a1/o.npy", "e/final/o/o.npy"] {
        let injected = proxy.injected();
        let err = if key.contains("final") {
            store.put_file_create(key, &src).await
        } else {
            store.put_file(key, &src).await
        }
        .expect_err("the completion was refused");
        assert!(err.to_string().contains("InvalidPart"), "{key}: {err}");
        assert_eq!(proxy.injected(), injected + 1, "{key}: one refusal");
        let open = moto.open_multipart_uploads();
        assert!(open.is_empty(), "{key}: refused upload left open: {open:?}");
    }
    assert!(store.list("e").await.unwrap().is_empty(), "nothing written");
}
