//! Acquiring ahead: with prefetch, the next round is leased while the current one runs, shortly
//! before it is expected to end, so that the GPU waits neither on the Acquire call nor on the
//! coordinator between rounds: when the generator exits, the next round is already held.
//!
//! "Shortly before": the previous round's generator time less a lead of a quarter of it,
//! between [`MIN_LEAD`] and [`MAX_LEAD`]. A round of seconds or minutes therefore holds the
//! next lease for at most [`MAX_LEAD`] (plus however much it overruns the previous one), which
//! bounds what acquiring ahead can cost another, idle agent at a job's end. Nothing is acquired
//! ahead for an agent's first round (no duration known yet) or while rounds wait in the queue
//! (`--lease-batch`); a round that ends before the lead starts its Acquire at once, as
//! without acquiring ahead.

use super::*;

/// Least time before the expected end at which the next round is acquired.
const MIN_LEAD: Duration = Duration::from_millis(50);
/// Most time before the expected end at which the next round is acquired.
const MAX_LEAD: Duration = Duration::from_secs(2);

/// An Acquire started while a round runs.
pub(super) struct Ahead {
    /// Cancelled when the round ends: an Acquire still waiting for its moment starts at once.
    ended: CancellationToken,
    task: tokio::task::JoinHandle<Vec<Held>>,
}

/// How long after a round's start the next one is acquired, given the previous round's
/// generator time.
pub(super) fn delay(previous: Duration) -> Duration {
    previous.saturating_sub((previous / 4).clamp(MIN_LEAD, MAX_LEAD))
}

impl Ahead {
    /// Starts acquiring the next round `delay(previous)` from now, or when the round ends.
    pub(super) fn start(session: &Arc<Session>, previous: Duration) -> Ahead {
        let ended = CancellationToken::new();
        let s = Arc::clone(session);
        let wait = ended.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(delay(previous)) => {}
                () = wait.cancelled() => {}
            }
            s.acquire().await
        });
        Ahead { ended, task }
    }

    /// Whether its Acquire has returned (its rounds are there without waiting).
    pub(super) fn is_ready(&self) -> bool {
        self.task.is_finished()
    }

    /// The rounds it acquired, once the current round has ended (empty on drain, loss or
    /// stop, as [`Session::acquire`]).
    pub(super) async fn rounds(self) -> Vec<Held> {
        self.ended.cancel();
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lead_is_a_quarter_of_the_round_within_bounds() {
        let ms = Duration::from_millis;
        // Short rounds: at least MIN_LEAD early, never before the start.
        assert_eq!(delay(ms(100)), ms(50));
        assert_eq!(delay(ms(30)), ms(0));
        // A quarter of the round.
        assert_eq!(delay(ms(1000)), ms(750));
        // Long rounds: at most MAX_LEAD early.
        assert_eq!(delay(Duration::from_secs(600)), Duration::from_secs(598));
    }
}
