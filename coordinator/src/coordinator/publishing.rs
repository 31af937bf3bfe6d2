//! The end-of-run step of `seed_only` and `both` (see [`crate::final_layout`]): before a job
//! is recorded as ended, the finals written to `final/` move (or are copied) under the run's
//! one `final_seed_<min>-<max>/`, and every object's merge record names its new keys.
//!
//! Crash-safe in two phases: first every final that will move is marked with the directory
//! (so a restarted coordinator finishes into the same one, whatever moved already), then each
//! moves and its record is rewritten. The job ends only once both are done.

use std::time::Duration;

use tracing::{info, warn};

use super::Coordinator;
use crate::final_layout::{self, LayoutError};
use crate::spec::{FinalDirMode, JobSpec};
use crate::state::{MergeRecord, StateError};

#[derive(Debug, thiserror::Error)]
pub(super) enum PublishError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    State(#[from] StateError),
}

impl Coordinator {
    /// Publishes the run's finals, retrying with backoff while the store or the state store
    /// fails; false when the coordinator stops first.
    pub(super) async fn publish_finals_until_done(&self, job_id: &str) -> bool {
        let mut delay = Duration::from_millis(500);
        loop {
            match self.publish_finals(job_id).await {
                Ok(()) => return true,
                Err(e) => {
                    warn!(job = %job_id, error = %e, "could not publish the run's finals; will retry");
                    self.set_message(
                        job_id,
                        format!("publishing the finals: retrying after: {e}"),
                    );
                    if !self.back_off(&mut delay).await {
                        return false;
                    }
                }
            }
        }
    }

    async fn publish_finals(&self, job_id: &str) -> Result<(), PublishError> {
        let (spec, waiting): (JobSpec, Vec<(usize, String, MergeRecord)>) = {
            let inner = self.lock();
            let Some(job) = inner.jobs.get(job_id) else {
                return Ok(());
            };
            let waiting = job
                .objects
                .iter()
                .filter_map(|o| {
                    let m = o.merge.as_ref()?;
                    final_layout::awaits_publish(&job.spec, &o.name, m)
                        .then(|| (o.index, o.name.clone(), m.clone()))
                })
                .collect();
            (job.spec.clone(), waiting)
        };
        if waiting.is_empty() {
            return Ok(());
        }
        // The directory already chosen, if a coordinator began this step before; otherwise the
        // seed range of every final waiting.
        // A mark that is not such a name (a damaged record) is not followed into a path.
        let marked = waiting
            .iter()
            .filter_map(|(_, _, m)| m.publish_to.clone())
            .find(|d| final_layout::is_run_dir_name(d));
        let dir = match marked {
            Some(d) => d,
            None => match final_layout::run_dir_name(waiting.iter().map(|(_, _, m)| m)) {
                Some(d) => d,
                None => return Ok(()),
            },
        };
        for (_, name, m) in &waiting {
            if m.publish_to.as_deref() != Some(dir.as_str()) {
                let mut mark = m.clone();
                mark.publish_to = Some(dir.clone());
                self.state.record_merge(job_id, name, &mark).await?;
            }
        }
        for (index, name, m) in waiting {
            let mut record = m.clone();
            record.publish_to = None;
            match final_layout::publish_object(&self.store, &spec, &name, &dir).await {
                Ok(()) => record.finals = final_layout::published_keys(&spec, &name, &dir, &m),
                Err(e @ LayoutError::Missing { .. }) => {
                    // Removed from under the run (a move is one rename, or copies before
                    // deletes, so this step never loses it): say so rather than wait forever.
                    warn!(job = %job_id, object = %name, error = %e, "a final is gone; the manifest lists none for it");
                    record.finals.clear();
                }
                Err(e) => return Err(e.into()),
            }
            self.state.record_merge(job_id, &name, &record).await?;
            let mut inner = self.lock();
            if let Some(job) = inner.jobs.get_mut(job_id) {
                job.objects[index].merge = Some(record);
            }
        }
        if spec.final_dir_mode == FinalDirMode::SeedOnly {
            final_layout::remove_empty_plain_dir(&self.store, &spec);
        }
        info!(job = %job_id, dir = %dir, "finals published");
        Ok(())
    }
}
