//! Coalescing of a session's completions (leader/follower, no timer).
//!
//! A completion that is ready while no Complete of the session is in flight is sent at once,
//! alone, as a unary Complete: no added latency. Completions that become ready while one is
//! in flight wait here and go together, in one CompleteBatch, as soon as it returns. A
//! single sender task drives the calls ([`Outbox::push`] says when to start one, and
//! [`Outbox::next_batch`] when it stops), so a caller that gives up waiting (a timeout, a
//! fenced session) never strands the others.

use std::collections::VecDeque;
use std::sync::Mutex;

use quarry_common::transport::MAX_ROUNDS_PER_CALL;
use quarry_proto::v1 as pb;
use tokio::sync::oneshot;
use tonic::Status;

/// What one completion's caller gets back: the coordinator's answer, or the status the call
/// (or, in a batch, this completion) failed with.
pub(super) type Answer = Result<pb::CompleteResponse, Status>;

/// A completion waiting to be sent, with where its answer goes.
pub(super) struct Waiting {
    /// The request; its `worker_id` is filled in when it is sent.
    pub req: pb::CompleteRequest,
    /// The round's span: a lone Complete is made in it, a batched one carries its context.
    pub span: tracing::Span,
    pub answer: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct State {
    /// A sender task runs: a call is in flight or about to be made.
    sending: bool,
    waiting: VecDeque<Waiting>,
}

/// The completions of one session waiting for the call in flight to return.
#[derive(Default)]
pub(super) struct Outbox {
    state: Mutex<State>,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a completion. True when no sender runs: the caller must start one, which then
    /// owns the outbox until [`Outbox::next_batch`] returns `None`.
    pub fn push(&self, w: Waiting) -> bool {
        let mut st = self.lock();
        st.waiting.push_back(w);
        !std::mem::replace(&mut st.sending, true)
    }

    /// For the sender: the completions to send next, oldest first, at most
    /// [`MAX_ROUNDS_PER_CALL`]. `None` when nothing waits; the sender stops, and the next
    /// [`Outbox::push`] starts another.
    pub fn next_batch(&self) -> Option<Vec<Waiting>> {
        let mut st = self.lock();
        if st.waiting.is_empty() {
            st.sending = false;
            return None;
        }
        let n = st.waiting.len().min(MAX_ROUNDS_PER_CALL);
        Some(st.waiting.drain(..n).collect())
    }
}

/// Each completion's answer from a CompleteBatch answer for `n` completions: its response,
/// or the status Complete would have failed with. An answer of the wrong length fails every
/// completion (nothing can be matched to its round).
pub(super) fn batch_answers(resp: pb::CompleteBatchResponse, n: usize) -> Vec<Answer> {
    if resp.results.len() != n {
        let e = Status::internal(format!(
            "the coordinator answered {} results to a CompleteBatch of {n} completions",
            resp.results.len()
        ));
        return vec![Err(e); n];
    }
    resp.results
        .into_iter()
        .map(|r| match r.response {
            Some(ok) => Ok(ok),
            None if r.error_code == 0 => Err(Status::internal(
                "the coordinator's CompleteBatch result holds neither a response nor an error",
            )),
            None => Err(Status::new(
                tonic::Code::from_i32(r.error_code),
                r.error_message,
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(lease_id: u64) -> (Waiting, oneshot::Receiver<Answer>) {
        let (tx, rx) = oneshot::channel();
        let w = Waiting {
            req: pb::CompleteRequest {
                lease_id,
                ..Default::default()
            },
            span: tracing::Span::none(),
            answer: tx,
        };
        (w, rx)
    }

    fn ids(batch: &[Waiting]) -> Vec<u64> {
        batch.iter().map(|w| w.req.lease_id).collect()
    }

    #[test]
    fn the_first_push_starts_a_sender_and_later_ones_wait_for_it() {
        let o = Outbox::default();
        assert!(o.push(waiting(1).0), "nothing in flight: start a sender");
        assert_eq!(ids(&o.next_batch().unwrap()), [1], "alone: sent alone");
        // While that call is in flight, two more arrive: no second sender.
        assert!(!o.push(waiting(2).0));
        assert!(!o.push(waiting(3).0));
        assert_eq!(
            ids(&o.next_batch().unwrap()),
            [2, 3],
            "sent together, in order"
        );
        assert!(o.next_batch().is_none(), "nothing waits: the sender stops");
        assert!(o.push(waiting(4).0), "the next one starts a sender again");
    }

    #[test]
    fn a_batch_never_exceeds_the_coordinator_bound() {
        let o = Outbox::default();
        for i in 0..(MAX_ROUNDS_PER_CALL as u64 + 3) {
            o.push(waiting(i).0);
        }
        assert_eq!(o.next_batch().unwrap().len(), MAX_ROUNDS_PER_CALL);
        assert_eq!(ids(&o.next_batch().unwrap()), [64, 65, 66]);
        assert!(o.next_batch().is_none());
    }

    #[test]
    fn batch_results_map_to_each_rounds_answer_or_status() {
        let resp = pb::CompleteBatchResponse {
            results: vec![
                pb::CompleteResult {
                    response: Some(pb::CompleteResponse {
                        outcome: pb::CommitOutcome::Committed as i32,
                        message: String::new(),
                    }),
                    ..Default::default()
                },
                pb::CompleteResult {
                    response: None,
                    error_code: tonic::Code::Unavailable as i32,
                    error_message: "state store did not answer".into(),
                },
                pb::CompleteResult::default(),
            ],
        };
        let a = batch_answers(resp.clone(), 3);
        assert_eq!(
            a[0].as_ref().unwrap().outcome,
            pb::CommitOutcome::Committed as i32
        );
        let e = a[1].as_ref().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert_eq!(e.message(), "state store did not answer");
        assert_eq!(a[2].as_ref().unwrap_err().code(), tonic::Code::Internal);
        let short = batch_answers(resp, 4);
        assert_eq!(short.len(), 4);
        assert!(
            short
                .iter()
                .all(|a| a.as_ref().is_err_and(|e| e.code() == tonic::Code::Internal))
        );
    }
}
