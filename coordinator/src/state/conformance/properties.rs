//! The properties of the [`StateStore`] contract, one public function each, every one run
//! against a fresh store.

use super::*;

/// `create_job` creates once; a second create with another record returns the original,
/// unchanged, and does not overwrite it.
pub async fn create_job_is_create_if_absent(store: Arc<dyn StateStore>) {
    let original = create(&*store, "job-a").await;
    let mut other = job("job-a");
    other.created_unix_ms += 1;
    other.state = JobState::Cancelled;
    other.spec.target_count_per_object = 5;
    assert_eq!(
        ok("create_job again", store.create_job(&other).await),
        CreateJob::Exists(original.clone())
    );
    assert_eq!(
        ok("create_job same", store.create_job(&original).await),
        CreateJob::Exists(original.clone())
    );
    assert_eq!(
        ok("get_job", store.get_job("job-a").await),
        Some(original.clone())
    );
    assert_eq!(ok("list_jobs", store.list_jobs().await), vec![original]);
}

/// `get_job` returns what was stored (`None` when absent), `list_jobs` returns every job
/// ordered by id, `update_job` replaces a record.
pub async fn get_list_and_update_jobs(store: Arc<dyn StateStore>) {
    assert_eq!(
        ok("list_jobs on an empty store", store.list_jobs().await),
        Vec::<JobRecord>::new()
    );
    assert_eq!(
        ok("get_job of a missing job", store.get_job("nope").await),
        None
    );

    // Created out of order; includes ids that are prefixes of others and every allowed
    // punctuation character, which sort before letters.
    let ids = [
        "job-b", "job", "Job.c", "job-a", "job_a", "job-a.1", "9lives", "job-a-2",
    ];
    let mut created = Vec::new();
    for id in ids {
        created.push(create(&*store, id).await);
    }
    created.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        ok("list_jobs", store.list_jobs().await),
        created,
        "list_jobs is ordered by id"
    );
    for j in &created {
        assert_eq!(ok("get_job", store.get_job(&j.id).await).as_ref(), Some(j));
    }
    assert_eq!(
        ok("get_job of a prefix of a job", store.get_job("jo").await),
        None
    );

    let mut updated = job("job-a");
    updated.state = JobState::Done;
    updated.spec.retries = 7;
    ok("update_job", store.update_job(&updated).await);
    assert_eq!(
        ok("get_job after update", store.get_job("job-a").await),
        Some(updated.clone())
    );
    let mut again = updated.clone();
    again.state = JobState::Incomplete;
    ok("update_job again", store.update_job(&again).await);
    assert_eq!(
        ok("get_job after second update", store.get_job("job-a").await),
        Some(again.clone())
    );

    let listed = ok("list_jobs after update", store.list_jobs().await);
    assert_eq!(listed.len(), created.len());
    for (l, c) in listed.iter().zip(&created) {
        if l.id == "job-a" {
            assert_eq!(l, &again);
        } else {
            assert_eq!(l, c, "update_job touched only its own job");
        }
    }
}

/// `update_job` of a job that does not exist fails and creates nothing.
pub async fn update_of_missing_job_fails(store: Arc<dyn StateStore>) {
    let j = job("ghost");
    assert_job_not_found("update_job", "ghost", store.update_job(&j).await);
    assert_eq!(ok("get_job", store.get_job("ghost").await), None);
    assert_eq!(
        ok("list_jobs", store.list_jobs().await),
        Vec::<JobRecord>::new()
    );
}

/// The first commit of a round wins; a later one gets the first record back and writes
/// nothing.
pub async fn first_commit_wins(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let first = commit(5, "e1-a");
    let second = commit(5, "e1-b");
    assert_eq!(
        ok("first commit", store.commit_round("j", "obj", &first).await),
        CommitOutcome::Committed
    );
    assert_eq!(
        ok(
            "second commit",
            store.commit_round("j", "obj", &second).await
        ),
        CommitOutcome::AlreadyCommitted(first.clone())
    );
    // The same attempt again (a retried RPC) also learns it is the winner's record.
    assert_eq!(
        ok(
            "repeated commit",
            store.commit_round("j", "obj", &first).await
        ),
        CommitOutcome::AlreadyCommitted(first.clone())
    );
    let object = load(&*store, "j", "obj").await;
    assert_eq!(object.commits, BTreeMap::from([(5, first)]));
    assert!(object.quarantined.is_empty() && object.failures.is_empty() && object.merge.is_none());
}

/// Of [`RACERS`] concurrent commits of one round exactly one gets `Committed`; every other
/// gets `AlreadyCommitted` with the winner's record, which is what is stored.
pub async fn concurrent_commits_have_one_winner(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    for round in 0..3u32 {
        let barrier = Arc::new(Barrier::new(RACERS));
        let mut tasks = Vec::new();
        for i in 0..RACERS {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            let record = commit(round, &format!("e1-r{round}-t{i}"));
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let outcome = store.commit_round("j", "obj", &record).await;
                (record, outcome)
            }));
        }
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for t in tasks {
            let (record, outcome) = t.await.unwrap_or_else(|e| panic!("commit task: {e}"));
            match ok("concurrent commit", outcome) {
                CommitOutcome::Committed => winners.push(record),
                CommitOutcome::AlreadyCommitted(first) => losers.push(first),
                CommitOutcome::Quarantined => panic!("round {round} was never quarantined"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one commit wins, got {:?}",
            winners.iter().map(|w| &w.attempt).collect::<Vec<_>>()
        );
        let winner = &winners[0];
        for l in &losers {
            assert_eq!(
                l, winner,
                "round {round}: every loser sees the winner's record"
            );
        }
        let object = load(&*store, "j", "obj").await;
        assert_eq!(
            object.commits.get(&round),
            Some(winner),
            "round {round}: the winner is stored"
        );
        assert_eq!(object.commits.len(), round as usize + 1);
    }
}

/// Commits to different rounds, objects and jobs do not see each other, including objects
/// and jobs whose names extend one another.
pub async fn commits_are_independent(store: Arc<dyn StateStore>) {
    for j in ["j", "j2", "j-2"] {
        create(&*store, j).await;
    }
    // (job, object, round); rounds 9 and 10 sort differently as text than as numbers.
    let targets = [
        ("j", "obj", 0u32),
        ("j", "obj", 1),
        ("j", "obj", 9),
        ("j", "obj", 10),
        ("j", "obj", u32::MAX),
        ("j", "obj-2", 0),
        ("j", "obj.2", 1),
        ("j", "ob", 0),
        ("j", "obj2", 0),
        ("j2", "obj", 0),
        ("j-2", "obj", 0),
    ];
    let mut want: BTreeMap<(&str, &str), BTreeMap<u32, CommitRecord>> = BTreeMap::new();
    for (j, o, r) in targets {
        let record = commit(r, &format!("e1-{j}-{o}-{r}"));
        assert_eq!(
            ok("commit", store.commit_round(j, o, &record).await),
            CommitOutcome::Committed,
            "commit of ({j}, {o}, {r}) is independent of the others"
        );
        want.entry((j, o)).or_default().insert(r, record);
    }
    for ((j, o), commits) in &want {
        let object = load(&*store, j, o).await;
        assert_eq!(
            &object.commits, commits,
            "load_object({j}, {o}) holds exactly its own commits"
        );
        let keys: Vec<u32> = object.commits.keys().copied().collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
    }
    // A failure, quarantine or merge of one object does not leak into its neighbours.
    ok(
        "record_failure",
        store.record_failure("j", "obj2", 3, &failure("e1-x")).await,
    );
    assert_eq!(
        ok(
            "quarantine_round",
            store.quarantine_round("j", "obj2", &quarantine(4)).await
        ),
        QuarantineOutcome::Quarantined
    );
    ok(
        "record_merge",
        store.record_merge("j", "obj2", &merge(true)).await,
    );
    for (j, o) in [("j", "obj"), ("j", "ob"), ("j", "obj-2"), ("j2", "obj2")] {
        let object = load(&*store, j, o).await;
        assert!(
            object.failures.is_empty() && object.quarantined.is_empty() && object.merge.is_none(),
            "load_object({j}, {o}) sees another object's records: {object:?}"
        );
    }
}

/// A quarantined round is never committed: the commit gets `Quarantined` and writes nothing.
pub async fn quarantine_blocks_commit(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let q = quarantine(2);
    assert_eq!(
        ok("quarantine", store.quarantine_round("j", "obj", &q).await),
        QuarantineOutcome::Quarantined
    );
    assert_eq!(
        ok(
            "commit of a quarantined round",
            store.commit_round("j", "obj", &commit(2, "e1-late")).await
        ),
        CommitOutcome::Quarantined
    );
    let object = load(&*store, "j", "obj").await;
    assert!(
        object.commits.is_empty(),
        "nothing was committed: {:?}",
        object.commits
    );
    assert_eq!(object.quarantined, BTreeMap::from([(2, q)]));
    // Neighbouring rounds still commit.
    assert_eq!(
        ok(
            "commit round 3",
            store.commit_round("j", "obj", &commit(3, "e1-a")).await
        ),
        CommitOutcome::Committed
    );
}

/// A quarantine never overwrites a commit: it gets `AlreadyCommitted` with the commit.
pub async fn commit_blocks_quarantine(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let c = commit(2, "e1-a");
    assert_eq!(
        ok("commit", store.commit_round("j", "obj", &c).await),
        CommitOutcome::Committed
    );
    assert_eq!(
        ok(
            "quarantine of a committed round",
            store.quarantine_round("j", "obj", &quarantine(2)).await
        ),
        QuarantineOutcome::AlreadyCommitted(c.clone())
    );
    let object = load(&*store, "j", "obj").await;
    assert_eq!(object.commits, BTreeMap::from([(2, c)]));
    assert!(
        object.quarantined.is_empty(),
        "nothing was quarantined: {:?}",
        object.quarantined
    );
}

/// Quarantining a round twice answers `AlreadyQuarantined` and keeps the first record.
pub async fn quarantine_is_idempotent(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let first = quarantine(7);
    let mut second = quarantine(7);
    second.reason = "a different reason".into();
    second.attempts = 9;
    assert_eq!(
        ok(
            "quarantine",
            store.quarantine_round("j", "obj", &first).await
        ),
        QuarantineOutcome::Quarantined
    );
    assert_eq!(
        ok(
            "quarantine again",
            store.quarantine_round("j", "obj", &second).await
        ),
        QuarantineOutcome::AlreadyQuarantined
    );
    assert_eq!(
        load(&*store, "j", "obj").await.quarantined,
        BTreeMap::from([(7, first)])
    );
}

/// Concurrent commits and quarantines of one round: either one commit wins and every
/// quarantine sees it, or one quarantine wins and every commit is refused.
pub async fn commit_and_quarantine_race_has_one_winner(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    for round in 0..4u32 {
        let barrier = Arc::new(Barrier::new(RACERS));
        let mut commits = Vec::new();
        let mut quarantines = Vec::new();
        for i in 0..RACERS {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            // Alternate which kind starts first so both kinds get to win some rounds.
            if (i + round as usize).is_multiple_of(2) {
                let record = commit(round, &format!("e1-r{round}-t{i}"));
                commits.push(tokio::spawn(async move {
                    barrier.wait().await;
                    let outcome = store.commit_round("j", "obj", &record).await;
                    (record, outcome)
                }));
            } else {
                quarantines.push(tokio::spawn(async move {
                    barrier.wait().await;
                    store.quarantine_round("j", "obj", &quarantine(round)).await
                }));
            }
        }
        let mut committed = Vec::new();
        let mut commit_outcomes = Vec::new();
        for t in commits {
            let (record, outcome) = t.await.unwrap_or_else(|e| panic!("commit task: {e}"));
            let outcome = ok("racing commit", outcome);
            if outcome == CommitOutcome::Committed {
                committed.push(record);
            }
            commit_outcomes.push(outcome);
        }
        let mut quarantine_outcomes = Vec::new();
        for t in quarantines {
            quarantine_outcomes.push(ok(
                "racing quarantine",
                t.await.unwrap_or_else(|e| panic!("quarantine task: {e}")),
            ));
        }
        let quarantined = quarantine_outcomes
            .iter()
            .filter(|o| **o == QuarantineOutcome::Quarantined)
            .count();
        let object = load(&*store, "j", "obj").await;
        assert_eq!(
            committed.len() + quarantined,
            1,
            "round {round}: exactly one winner"
        );
        if let Some(winner) = committed.first() {
            for o in &commit_outcomes {
                assert!(
                    *o == CommitOutcome::Committed
                        || *o == CommitOutcome::AlreadyCommitted(winner.clone()),
                    "round {round}: {o:?}"
                );
            }
            for o in &quarantine_outcomes {
                assert_eq!(
                    *o,
                    QuarantineOutcome::AlreadyCommitted(winner.clone()),
                    "round {round}"
                );
            }
            assert_eq!(object.commits.get(&round), Some(winner));
            assert!(!object.quarantined.contains_key(&round));
        } else {
            for o in &commit_outcomes {
                assert_eq!(*o, CommitOutcome::Quarantined, "round {round}");
            }
            for o in &quarantine_outcomes {
                assert!(
                    matches!(
                        o,
                        QuarantineOutcome::Quarantined | QuarantineOutcome::AlreadyQuarantined
                    ),
                    "round {round}: {o:?}"
                );
            }
            assert_eq!(object.quarantined.get(&round), Some(&quarantine(round)));
            assert!(!object.commits.contains_key(&round));
        }
    }
}

/// `record_failure` counts per round (1, 2, 3, …) and `load_object` returns the failures of
/// each round in the order they were recorded.
pub async fn failures_count_per_round(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let mut want: BTreeMap<u32, Vec<FailureRecord>> = BTreeMap::new();
    for (round, n) in [(3u32, 3u32), (1, 1), (12, 12)] {
        for i in 1..=n {
            let mut f = failure(&format!("e1-r{round}-{i}"));
            f.unix_ms += u64::from(i);
            assert_eq!(
                ok(
                    "record_failure",
                    store.record_failure("j", "obj", round, &f).await
                ),
                i,
                "round {round}"
            );
            want.entry(round).or_default().push(f);
        }
    }
    // Another object's rounds count on their own.
    assert_eq!(
        ok(
            "record_failure",
            store
                .record_failure("j", "obj-2", 3, &failure("e1-o2"))
                .await
        ),
        1
    );
    let object = load(&*store, "j", "obj").await;
    assert_eq!(object.failures, want);
    assert!(object.commits.is_empty() && object.quarantined.is_empty());

    // Failures of a round that is later committed (a losing attempt) are kept.
    let c = commit(3, "e1-win");
    assert_eq!(
        ok("commit", store.commit_round("j", "obj", &c).await),
        CommitOutcome::Committed
    );
    assert_eq!(
        ok(
            "record_failure after commit",
            store
                .record_failure("j", "obj", 3, &failure("e1-late"))
                .await
        ),
        4
    );
    let object = load(&*store, "j", "obj").await;
    assert_eq!(object.failures.get(&3).map(Vec::len), Some(4));
    assert_eq!(object.commits, BTreeMap::from([(3, c)]));

    // Concurrent failures of one round get distinct counts.
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store
                .record_failure("j", "obj", 20, &failure(&format!("e1-race-{i}")))
                .await
        }));
    }
    let mut counts = BTreeSet::new();
    for t in tasks {
        counts.insert(ok(
            "racing record_failure",
            t.await.unwrap_or_else(|e| panic!("failure task: {e}")),
        ));
    }
    assert_eq!(counts, (1..=RACERS as u32).collect::<BTreeSet<_>>());
    assert_eq!(
        load(&*store, "j", "obj")
            .await
            .failures
            .get(&20)
            .map(Vec::len),
        Some(RACERS)
    );
}

/// `record_merge` stores the merge record and a second call replaces it.
pub async fn merge_is_stored_and_replaced(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let first = merge(false);
    ok("record_merge", store.record_merge("j", "obj", &first).await);
    assert_eq!(load(&*store, "j", "obj").await.merge, Some(first.clone()));
    let mut second = first.clone();
    second.cleaned = true;
    second.complete = true;
    second.finals.push("final/obj/obj.npy".into());
    ok(
        "record_merge again",
        store.record_merge("j", "obj", &second).await,
    );
    let object = load(&*store, "j", "obj").await;
    assert_eq!(object.merge, Some(second));
    assert!(
        object.commits.is_empty() && object.failures.is_empty() && object.quarantined.is_empty()
    );
    assert_eq!(load(&*store, "j", "obj-2").await.merge, None);
}

/// An object nothing was written for loads as empty.
pub async fn untouched_object_is_empty(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    assert_eq!(load(&*store, "j", "obj").await, ObjectRecord::default());
    assert_eq!(
        ok(
            "commit",
            store.commit_round("j", "obj", &commit(0, "e1-a")).await
        ),
        CommitOutcome::Committed
    );
    assert_eq!(load(&*store, "j", "obj-2").await, ObjectRecord::default());
    assert_eq!(load(&*store, "j", "ob").await, ObjectRecord::default());
}

/// `bump_epoch` returns 1 on a fresh store and one more on every call, also under races.
pub async fn epoch_counts_up(store: Arc<dyn StateStore>) {
    for want in 1..=3u64 {
        assert_eq!(ok("bump_epoch", store.bump_epoch().await), want);
    }
    let mut tasks = Vec::new();
    for _ in 0..RACERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move { store.bump_epoch().await }));
    }
    let mut seen = BTreeSet::new();
    for t in tasks {
        seen.insert(ok(
            "racing bump_epoch",
            t.await.unwrap_or_else(|e| panic!("epoch task: {e}")),
        ));
    }
    assert_eq!(
        seen,
        (4..4 + RACERS as u64).collect::<BTreeSet<_>>(),
        "every bump gets its own epoch"
    );
    assert_eq!(
        ok("bump_epoch", store.bump_epoch().await),
        4 + RACERS as u64
    );
}

/// Writes to a job that does not exist fail with `JobNotFound` and write nothing.
pub async fn writes_to_unknown_job_fail(store: Arc<dyn StateStore>) {
    create(&*store, "other").await;
    assert_job_not_found(
        "commit_round",
        "ghost",
        store.commit_round("ghost", "obj", &commit(0, "e1-a")).await,
    );
    assert_job_not_found(
        "record_failure",
        "ghost",
        store
            .record_failure("ghost", "obj", 0, &failure("e1-a"))
            .await,
    );
    assert_job_not_found(
        "quarantine_round",
        "ghost",
        store.quarantine_round("ghost", "obj", &quarantine(1)).await,
    );
    assert_job_not_found(
        "record_merge",
        "ghost",
        store.record_merge("ghost", "obj", &merge(true)).await,
    );
    assert_job_not_found("update_job", "ghost", store.update_job(&job("ghost")).await);
    // Nothing was written: once the job exists its object is empty and the round commits.
    create(&*store, "ghost").await;
    assert_eq!(load(&*store, "ghost", "obj").await, ObjectRecord::default());
    assert_eq!(
        ok(
            "commit",
            store.commit_round("ghost", "obj", &commit(0, "e1-b")).await
        ),
        CommitOutcome::Committed
    );
    assert_eq!(
        ok(
            "quarantine",
            store.quarantine_round("ghost", "obj", &quarantine(1)).await
        ),
        QuarantineOutcome::Quarantined
    );
}

/// `quarantine_committed` replaces the commit of the attempt it names with a quarantine, in
/// one step; the round is then never committed again. A commit of another attempt stays; an
/// uncommitted round is simply quarantined; a second call is `AlreadyQuarantined`.
pub async fn a_committed_round_that_cannot_merge_is_quarantined(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let c = commit(2, "e1-a");
    assert_eq!(
        ok("commit", store.commit_round("j", "obj", &c).await),
        CommitOutcome::Committed
    );
    let q = quarantine(2);
    assert_eq!(
        ok(
            "quarantine of another attempt's commit",
            store.quarantine_committed("j", "obj", "e1-b", &q).await
        ),
        QuarantineOutcome::AlreadyCommitted(c.clone())
    );
    assert_eq!(
        load(&*store, "j", "obj").await.commits,
        BTreeMap::from([(2, c)])
    );
    assert_eq!(
        ok(
            "quarantine of the committed attempt",
            store.quarantine_committed("j", "obj", "e1-a", &q).await
        ),
        QuarantineOutcome::Quarantined
    );
    let object = load(&*store, "j", "obj").await;
    assert!(
        object.commits.is_empty(),
        "the commit is gone: {:?}",
        object.commits
    );
    assert_eq!(object.quarantined, BTreeMap::from([(2, q.clone())]));
    assert_eq!(
        ok(
            "again",
            store.quarantine_committed("j", "obj", "e1-a", &q).await
        ),
        QuarantineOutcome::AlreadyQuarantined
    );
    assert_eq!(
        ok(
            "a later commit of the round",
            store.commit_round("j", "obj", &commit(2, "e2-a")).await
        ),
        CommitOutcome::Quarantined
    );
    // A round never committed is quarantined as quarantine_round would.
    assert_eq!(
        ok(
            "quarantine of an uncommitted round",
            store
                .quarantine_committed("j", "obj", "e1-a", &quarantine(5))
                .await
        ),
        QuarantineOutcome::Quarantined
    );
    assert!(matches!(
        store
            .quarantine_committed("ghost", "obj", "e1-a", &quarantine(1))
            .await,
        Err(StateError::JobNotFound(_))
    ));
}
