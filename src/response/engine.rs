//! The engine: workers that execute runnable runs, and the clock that
//! expires runs nobody approved in time.
//!
//! **Leases.** A worker claims runnable runs (APPROVED, or RUNNING with an
//! expired lease) with a lease (`--playbook-lease-seconds`), renews it at a
//! third of its length while it works, and every save it makes is
//! conditional on still holding it. On Postgres the claim is one statement
//! with `FOR UPDATE SKIP LOCKED`, so replicas never claim the same run; an
//! SQLite store has one serving process. A worker that dies (or loses its
//! store) stops renewing; once the lease expires another worker (or the
//! restarted process) takes the run over and continues from the first
//! unfinished step, so no run stays RUNNING past its lease. A worker that
//! stops cleanly gives its leases up at once.
//!
//! **Steps.** Steps run in order. Each attempt is recorded (state RUNNING,
//! attempt count, first start) before it begins, runs under the step's
//! timeout, and its outcome is recorded after: success with what it did
//! (and its inverse), or a failure message. Failed attempts are retried with
//! exponential backoff (1 s, 2 s, 4 s … at most 30 s) until `max_attempts`
//! failures; a failure retrying cannot fix (a refused address, a 4xx, an
//! impossible status change) fails the step at once. A failed step fails
//! the run; later steps are SKIPPED. An attempt cut off by a crash counts as
//! an attempt but not as a failure (at most three such per step), and is
//! repeated on takeover: every effect is idempotent per (run, step), see
//! `actions.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::TenantId;
use crate::domain::playbook::{PlaybookRun, RunStatus, StepState, params_digest};
use crate::response::{Responder, now_micros};
use crate::storage::StoreError;

/// Attempts cut off by crashes a step may have beyond its `max_attempts`.
const CRASH_ALLOWANCE: u32 = 3;
/// Longest wait between two attempts of a step.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why a worker stopped driving a run before it ended.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The run reached a terminal state (by this worker or a person).
    Ended,
    /// Another worker holds the run now.
    LeaseLost,
    /// The process is shutting down.
    Shutdown,
}

/// Runs the workers and the expiry clock until `shutdown`.
pub async fn run(responder: Arc<Responder>, shutdown: CancellationToken) {
    let owner = format!("worker-{}", Uuid::new_v4().simple());
    let slots = Arc::new(Semaphore::new(responder.config.workers.max(1)));
    let mut running = tokio::task::JoinSet::new();
    tracing::info!(owner = %owner, workers = responder.config.workers, "playbook engine started");
    loop {
        if let Err(e) = responder.expire_due().await {
            tracing::warn!(error = %e, "expiring playbook runs failed; retrying");
        }
        let free = slots.available_permits();
        if free > 0 {
            let now = now_micros();
            let until =
                now + chrono::Duration::from_std(responder.config.lease).unwrap_or_default();
            match responder
                .store
                .claim_runs(&owner, until, now, free as u32)
                .await
            {
                Ok(claimed) => {
                    for (tenant, id) in claimed {
                        metrics::counter!("picket_playbook_claims_total").increment(1);
                        let permit = slots.clone().acquire_owned().await.expect("semaphore open");
                        let (r, o, s) = (responder.clone(), owner.clone(), shutdown.clone());
                        running.spawn(async move {
                            execute(&r, &o, tenant, id, &s).await;
                            drop(permit);
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "claiming playbook runs failed; retrying"),
            }
        }
        while running.try_join_next().is_some() {}
        tokio::select! {
            () = responder.runnable.notified() => {}
            () = tokio::time::sleep(responder.config.poll) => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
            () = shutdown.cancelled() => break,
        }
    }
    // Each run gives its lease up as it sees the shutdown.
    while running.join_next().await.is_some() {}
    tracing::info!("playbook engine stopped");
}

/// Drives one claimed run, renewing the lease meanwhile.
async fn execute(
    responder: &Arc<Responder>,
    owner: &str,
    tenant: TenantId,
    id: Uuid,
    shutdown: &CancellationToken,
) {
    let lost = CancellationToken::new();
    let renewer = {
        let (r, o, lost, shutdown) = (
            responder.clone(),
            owner.to_owned(),
            lost.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let every = r.config.lease / 3;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = shutdown.cancelled() => return,
                }
                let until =
                    now_micros() + chrono::Duration::from_std(r.config.lease).unwrap_or_default();
                match r.store.renew_run_lease(tenant, id, &o, until).await {
                    Ok(true) => {}
                    Ok(false) => {
                        metrics::counter!("picket_playbook_leases_lost_total").increment(1);
                        lost.cancel();
                        return;
                    }
                    // The lease still runs; try again at the next beat.
                    Err(e) => {
                        tracing::warn!(run_id = %id, error = %e, "renewing a run lease failed")
                    }
                }
            }
        })
    };
    let mut worker = Worker {
        responder,
        owner,
        lost: &lost,
        shutdown,
    };
    let stop = worker.drive(tenant, id).await;
    renewer.abort();
    match stop {
        Ok(Stop::Shutdown) => {
            if let Err(e) = responder.store.release_run_lease(tenant, id, owner).await {
                tracing::warn!(run_id = %id, error = %e, "giving up a run lease failed");
            }
        }
        Ok(Stop::Ended | Stop::LeaseLost) => {}
        Err(e) => {
            tracing::warn!(run_id = %id, error = %e, "executing a run failed; it resumes when its lease expires");
        }
    }
}

/// One worker's hold on one run.
struct Worker<'a> {
    responder: &'a Arc<Responder>,
    owner: &'a str,
    lost: &'a CancellationToken,
    shutdown: &'a CancellationToken,
}

impl Worker<'_> {
    /// Applies `change` and saves under the lease; on a concurrent change,
    /// re-reads and applies it again. A run that ended meanwhile is saved
    /// anyway if `on_ended` (recording an attempt's outcome), else left.
    /// `None` to go on, `Some(stop)` when the worker must stop.
    async fn step(
        &mut self,
        run: &mut PlaybookRun,
        on_ended: bool,
        change: impl Fn(&mut PlaybookRun, DateTime<Utc>),
    ) -> Result<Option<Stop>, StoreError> {
        let store = &self.responder.store;
        let mut fresh = run.clone();
        for _ in 0..16 {
            let before = fresh.status;
            let ended = before.is_terminal();
            if ended && !on_ended {
                *run = fresh;
                return Ok(Some(Stop::Ended));
            }
            change(&mut fresh, now_micros());
            let owner = (!ended).then_some(self.owner);
            match store.save_run(&fresh, before, owner).await {
                Ok(saved) => {
                    self.responder.after_change(&saved, Some(before));
                    *run = saved;
                    return Ok(run.status.is_terminal().then_some(Stop::Ended));
                }
                Err(StoreError::Conflict(_)) => {
                    fresh = store.get_run(run.tenant_id, run.id).await?;
                    if !fresh.status.is_terminal() {
                        let until = now_micros()
                            + chrono::Duration::from_std(self.responder.config.lease)
                                .unwrap_or_default();
                        if !store
                            .renew_run_lease(run.tenant_id, run.id, self.owner, until)
                            .await?
                        {
                            *run = fresh;
                            return Ok(Some(Stop::LeaseLost));
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict(format!(
            "run {} (kept changing)",
            run.id
        )))
    }

    async fn drive(&mut self, tenant: TenantId, id: Uuid) -> Result<Stop, StoreError> {
        let store = self.responder.store.clone();
        let mut run = store.get_run(tenant, id).await?;
        if !matches!(run.status, RunStatus::Approved | RunStatus::Running) {
            store.release_run_lease(tenant, id, self.owner).await?;
            return Ok(Stop::Ended);
        }
        // What executes is exactly what was approved.
        let digest = params_digest(&run.steps);
        if digest != run.params_digest
            || run
                .approvals
                .iter()
                .any(|a| a.approved && a.params_digest != digest)
        {
            self.step(&mut run, false, |r, now| {
                r.finish(
                    RunStatus::Failed,
                    "the run's steps differ from the approved ones; nothing was executed".into(),
                    now,
                )
            })
            .await?;
            return Ok(Stop::Ended);
        }
        if run.status == RunStatus::Approved {
            if let Some(stop) = self
                .step(&mut run, false, |r, now| {
                    r.status = RunStatus::Running;
                    r.updated_at = now;
                })
                .await?
            {
                return Ok(stop);
            }
            tracing::info!(tenant_id = %tenant, run_id = %id, playbook = %run.playbook_name, "run started");
        } else {
            metrics::counter!("picket_playbook_takeovers_total").increment(1);
            tracing::info!(tenant_id = %tenant, run_id = %id, next_step = ?run.next_step(), "run taken over");
        }
        while let Some(i) = run.next_step() {
            let step = run.steps[i].clone();
            loop {
                let r = &run.results[i];
                if r.failures >= step.max_attempts
                    || r.attempts >= step.max_attempts + CRASH_ALLOWANCE
                {
                    let msg = format!("gave up after {} attempts", r.attempts);
                    self.step(&mut run, false, |r, now| {
                        fail_step(r, i, &msg, now);
                    })
                    .await?;
                    return Ok(Stop::Ended);
                }
                if let Some(stop) = self
                    .step(&mut run, false, |r, now| {
                        let x = &mut r.results[i];
                        x.state = StepState::Running;
                        x.attempts += 1;
                        x.started_at.get_or_insert(now);
                        r.updated_at = now;
                    })
                    .await?
                {
                    return Ok(stop);
                }
                let started = Instant::now();
                let outcome = tokio::select! {
                    o = tokio::time::timeout(
                        Duration::from_secs(u64::from(step.timeout_seconds)),
                        self.responder.execute_step(&run, i),
                    ) => o,
                    () = self.lost.cancelled() => return Ok(Stop::LeaseLost),
                    () = self.shutdown.cancelled() => return Ok(Stop::Shutdown),
                };
                let outcome = outcome.unwrap_or_else(|_| {
                    Err(crate::response::actions::ActionError {
                        retryable: true,
                        message: format!("timed out after {} s", step.timeout_seconds),
                    })
                });
                metrics::histogram!(
                    "picket_playbook_step_duration_seconds",
                    "action" => step.action.as_str(),
                    "outcome" => if outcome.is_ok() { "succeeded" } else { "failed" }
                )
                .record(started.elapsed().as_secs_f64());
                match outcome {
                    Ok(effect) => {
                        let stop = self
                            .step(&mut run, true, |r, now| {
                                let x = &mut r.results[i];
                                x.state = if effect.skipped {
                                    StepState::Skipped
                                } else {
                                    StepState::Succeeded
                                };
                                x.message = effect.message.clone();
                                x.inverse = effect.inverse.clone();
                                x.finished_at = Some(now);
                                r.updated_at = now;
                            })
                            .await?;
                        tracing::info!(tenant_id = %tenant, run_id = %id, step = %step.name, "step succeeded");
                        if let Some(stop) = stop {
                            return Ok(stop);
                        }
                        break;
                    }
                    Err(e) => {
                        let give_up = !e.retryable || r_failures(&run, i) + 1 >= step.max_attempts;
                        tracing::warn!(tenant_id = %tenant, run_id = %id, step = %step.name, give_up, error = %e.message, "step attempt failed");
                        let stop = self
                            .step(&mut run, true, |r, now| {
                                let x = &mut r.results[i];
                                x.failures += 1;
                                x.message = e.message.clone();
                                r.updated_at = now;
                                if give_up {
                                    fail_step(r, i, &e.message, now);
                                }
                            })
                            .await?;
                        if let Some(stop) = stop {
                            return Ok(stop);
                        }
                        let wait = backoff(r_failures(&run, i));
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = self.lost.cancelled() => return Ok(Stop::LeaseLost),
                            () = self.shutdown.cancelled() => return Ok(Stop::Shutdown),
                        }
                    }
                }
            }
        }
        self.step(&mut run, false, |r, now| {
            r.finish(RunStatus::Succeeded, String::new(), now)
        })
        .await?;
        tracing::info!(tenant_id = %tenant, run_id = %id, "run succeeded");
        Ok(Stop::Ended)
    }
}

fn r_failures(run: &PlaybookRun, i: usize) -> u32 {
    run.results[i].failures
}

/// Marks step `i` failed and, unless it ended already, the run FAILED.
fn fail_step(r: &mut PlaybookRun, i: usize, message: &str, now: DateTime<Utc>) {
    let x = &mut r.results[i];
    x.state = StepState::Failed;
    x.message = message.to_owned();
    x.finished_at = Some(now);
    let name = x.step.clone();
    if !r.status.is_terminal() {
        r.finish(
            RunStatus::Failed,
            format!("step `{name}` failed: {message}"),
            now,
        );
    }
}

/// The wait after the `failures`-th failed attempt: 1 s, 2 s, 4 s … 30 s.
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(5);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_thirty_seconds() {
        let waits: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
