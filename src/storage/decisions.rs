//! [`DecisionStore`] on [`SqlStore`], written once for both backends like
//! `sql.rs` (kept in its own file: the decision tables are used by nothing
//! else). Every write runs in one tenant transaction that first locks the
//! tenant's `decision_heads` row (`SELECT … FOR UPDATE` on Postgres; SQLite's
//! write transaction already holds the database lock), so a tenant's writes
//! are serialized and the revisions they log are assigned in commit order.
//! The resolution rules are the domain's (`domain::decision`); this file only
//! reads the touched targets, applies the change, and writes the decisions,
//! the targets' new states, the log entries and the head.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::TenantId;
use crate::domain::decision::{
    Cause, Decision, DecisionHead, DecisionLogEntry, DecisionQuery, DeltaKind, Effective,
    MAX_DECISIONS_PER_TARGET, TargetState,
};
use crate::storage::dialect::{Col, Dialect, Stmt, Tx};
use crate::storage::sql::{BATCH_ROWS, decode_all, fail, push_newest_first, uuid};
use crate::storage::{
    DecisionSchedule, DecisionStore, DecisionWrite, SqlStore, StoreError, StoreResult,
};

/// A target a write touched.
struct Touched {
    /// How many decisions its stored state held before the write.
    before: usize,
    /// Its state after the write (pruned and settled at the write's time).
    state: TargetState,
    /// How its effective state changed.
    kind: DeltaKind,
    /// The effective state the log entry carries.
    effective: Option<Effective>,
    /// Whether the change is logged (every created or revoked decision is;
    /// an expiry only when the effective state changed).
    logged: bool,
}

/// Reads a stored head row.
fn head_from_row<DB: Dialect>(row: &DB::Row) -> Result<DecisionHead, sqlx::Error> {
    Ok(DecisionHead {
        revision: row.col::<i64>("revision")?.max(0) as u64,
        floor: row.col::<i64>("log_floor")?.max(0) as u64,
        active: row.col::<i64>("active")?.max(0) as u64,
    })
}

#[allow(private_bounds)]
impl<DB: Dialect> SqlStore<DB> {
    /// Locks `tenant`'s decision log head inside `tx` (creating it at
    /// revision 0 if the tenant has none) and returns it. Every decision
    /// write starts here.
    async fn lock_decisions(
        tx: &mut Tx<DB>,
        tenant: TenantId,
    ) -> Result<DecisionHead, sqlx::Error> {
        Stmt::<DB>::new(
            "INSERT INTO decision_heads (tenant_id, revision, log_floor, active, next_change_at) \
             VALUES ($1, 0, 0, 0, NULL) ON CONFLICT (tenant_id) DO NOTHING",
        )
        .uuid(tenant.0)
        .execute(&mut **tx)
        .await?;
        let row = Stmt::<DB>::text(format!(
            "SELECT revision, log_floor, active FROM decision_heads WHERE tenant_id = $1{}",
            DB::FOR_UPDATE
        ))
        .uuid(tenant.0)
        .fetch_one(&mut **tx)
        .await?;
        head_from_row::<DB>(&row)
    }

    /// The stored states of the targets `keys` names (absent ones have no
    /// decisions), inside `tx`.
    async fn load_targets(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        keys: &BTreeSet<String>,
    ) -> Result<HashMap<String, TargetState>, sqlx::Error> {
        let keys: Vec<&String> = keys.iter().collect();
        let mut out = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH_ROWS) {
            let mut q =
                Stmt::<DB>::new("SELECT target, state FROM decision_targets WHERE tenant_id = ");
            q.push_uuid(tenant.0);
            q.push_in("target", chunk.iter().map(|k| k.as_str()));
            for row in q.fetch_all(&mut **tx).await? {
                out.insert(row.col::<String>("target")?, DB::doc(&row, "state")?);
            }
        }
        Ok(out)
    }

    /// Writes the touched targets' states, one log entry per logged change
    /// (revisions following `head`'s), and the new head, inside `tx`.
    async fn save_targets(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        head: DecisionHead,
        touched: &[Touched],
        now: DateTime<Utc>,
    ) -> Result<DecisionHead, sqlx::Error> {
        let mut revision = head.revision;
        let mut active = head.active as i64;
        let mut entries = Vec::new();
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for t in touched {
            active += t.state.decisions.len() as i64 - t.before as i64;
            if t.logged {
                revision += 1;
                entries.push(DecisionLogEntry {
                    revision,
                    kind: t.kind,
                    target: t.state.target.clone(),
                    effective: t.effective.clone(),
                    decisions: t.state.decisions.clone(),
                });
            }
            match t.state.next_change() {
                Some(next) => upserts.push((&t.state, next)),
                None => deletes.push(t.state.target.key()),
            }
        }
        for chunk in upserts.chunks(BATCH_ROWS) {
            let mut q = Stmt::<DB>::new(
                "INSERT INTO decision_targets (tenant_id, target, next_change_at, state) VALUES ",
            );
            for (n, (state, next)) in chunk.iter().enumerate() {
                q.push(if n == 0 { "(" } else { ", (" });
                q.push_uuid(tenant.0).push(", ");
                q.push_bind(state.target.key()).push(", ");
                q.push_time(*next).push(", ");
                q.push_doc(*state).push(")");
            }
            q.push(
                " ON CONFLICT (tenant_id, target) DO UPDATE SET \
                 next_change_at = excluded.next_change_at, state = excluded.state",
            );
            q.execute(&mut **tx).await?;
        }
        for chunk in deletes.chunks(BATCH_ROWS) {
            let mut q = Stmt::<DB>::new("DELETE FROM decision_targets WHERE tenant_id = ");
            q.push_uuid(tenant.0);
            q.push_in("target", chunk.iter().map(String::as_str));
            q.execute(&mut **tx).await?;
        }
        for chunk in entries.chunks(BATCH_ROWS) {
            let mut q = Stmt::<DB>::new(
                "INSERT INTO decision_log (tenant_id, revision, kind, entry, created_at) VALUES ",
            );
            for (n, e) in chunk.iter().enumerate() {
                q.push(if n == 0 { "(" } else { ", (" });
                q.push_uuid(tenant.0).push(", ");
                q.push_bind(e.revision as i64).push(", ");
                q.push_bind(kind_name(e.kind)).push(", ");
                q.push_doc(e).push(", ");
                q.push_time(now).push(")");
            }
            q.execute(&mut **tx).await?;
        }
        let active = active.max(0);
        Stmt::<DB>::new(
            "UPDATE decision_heads SET revision = $2, active = $3, next_change_at = \
             (SELECT min(next_change_at) FROM decision_targets WHERE tenant_id = $1) \
             WHERE tenant_id = $1",
        )
        .uuid(tenant.0)
        .arg(revision as i64)
        .arg(active)
        .execute(&mut **tx)
        .await?;
        Ok(DecisionHead {
            revision,
            floor: head.floor,
            active: active as u64,
        })
    }

    /// Inserts new decisions inside `tx`.
    async fn insert_decisions(tx: &mut Tx<DB>, decisions: &[Decision]) -> Result<(), sqlx::Error> {
        for chunk in decisions.chunks(BATCH_ROWS) {
            let mut q = Stmt::<DB>::new(
                "INSERT INTO decisions (tenant_id, id, target, scope, kind, origin_id, idem, \
                 created_at, expires_at, revoked_at, doc) VALUES ",
            );
            for (n, d) in chunk.iter().enumerate() {
                q.push(if n == 0 { "(" } else { ", (" });
                q.push_uuid(d.tenant_id.0).push(", ");
                q.push_uuid(d.id).push(", ");
                q.push_bind(d.target.key()).push(", ");
                q.push_bind(d.target.scope.as_str()).push(", ");
                q.push_bind(d.kind.as_str()).push(", ");
                q.push_bind(d.origin.id.as_str()).push(", ");
                q.push_bind(d.idempotency_key.clone()).push(", ");
                q.push_time(d.created_at).push(", ");
                q.push_time(d.expires_at).push(", ");
                q.push_opt_time(d.revoked_at).push(", ");
                q.push_doc(d).push(")");
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// The tenant's decisions whose idempotency keys are among `keys`, by key.
    async fn decisions_by_key(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        keys: &BTreeSet<&str>,
    ) -> Result<HashMap<String, Decision>, sqlx::Error> {
        let keys: Vec<&str> = keys.iter().copied().collect();
        let mut out = HashMap::new();
        for chunk in keys.chunks(BATCH_ROWS) {
            let mut q = Stmt::<DB>::new("SELECT doc FROM decisions WHERE tenant_id = ");
            q.push_uuid(tenant.0);
            q.push_in("idem", chunk.iter().copied());
            for row in q.fetch_all(&mut **tx).await? {
                let d: Decision = DB::doc(&row, "doc")?;
                if let Some(k) = d.idempotency_key.clone() {
                    out.insert(k, d);
                }
            }
        }
        Ok(out)
    }
}

/// The stored name of a log entry's kind.
fn kind_name(kind: DeltaKind) -> &'static str {
    match kind {
        DeltaKind::Added => "added",
        DeltaKind::Updated => "updated",
        DeltaKind::Removed => "removed",
        DeltaKind::Expired => "expired",
        DeltaKind::Unchanged => "unchanged",
    }
}

#[async_trait]
impl<DB: Dialect> DecisionStore for SqlStore<DB> {
    async fn create_decisions(
        &self,
        tenant: TenantId,
        decisions: Vec<Decision>,
        max_active: u64,
        now: DateTime<Utc>,
    ) -> StoreResult<DecisionWrite<Vec<(Decision, bool)>>> {
        let fail = fail("decisions", "failed to create decisions");
        let mut tx = self.write(tenant).await.map_err(&fail)?;
        let head = Self::lock_decisions(&mut tx, tenant).await.map_err(&fail)?;
        let keys: BTreeSet<&str> = decisions
            .iter()
            .filter_map(|d| d.idempotency_key.as_deref())
            .collect();
        let mut by_key = if keys.is_empty() {
            HashMap::new()
        } else {
            Self::decisions_by_key(&mut tx, tenant, &keys)
                .await
                .map_err(&fail)?
        };
        let target_keys: BTreeSet<String> = decisions.iter().map(|d| d.target.key()).collect();
        let mut states = Self::load_targets(&mut tx, tenant, &target_keys)
            .await
            .map_err(&fail)?;
        let before: HashMap<String, usize> = states
            .iter()
            .map(|(k, s)| (k.clone(), s.decisions.len()))
            .collect();
        let mut results = Vec::with_capacity(decisions.len());
        let mut fresh: Vec<Decision> = Vec::new();
        // Targets of new decisions, in the order the batch first names them.
        let mut order: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for d in decisions {
            if let Some(k) = d.idempotency_key.as_deref()
                && let Some(existing) = by_key.get(k)
            {
                if existing.target != d.target || existing.kind != d.kind {
                    return Err(StoreError::Conflict(format!(
                        "idempotency key `{k}` (it was used for a {} on {})",
                        existing.kind.as_str(),
                        existing.target
                    )));
                }
                results.push((existing.clone(), false));
                continue;
            }
            let key = d.target.key();
            if seen.insert(key.clone()) {
                order.push(key.clone());
            }
            states
                .entry(key)
                .or_insert_with(|| TargetState::new(d.target.clone()))
                .decisions
                .push(d.clone());
            if let Some(k) = d.idempotency_key.clone() {
                by_key.insert(k, d.clone());
            }
            fresh.push(d.clone());
            results.push((d, true));
        }
        let mut touched = Vec::with_capacity(order.len());
        for key in &order {
            let mut state = states.remove(key).expect("a touched target has a state");
            state.prune(now);
            if state.decisions.len() > MAX_DECISIONS_PER_TARGET {
                return Err(StoreError::LimitReached(format!(
                    "{} already has {MAX_DECISIONS_PER_TARGET} decisions in force; revoke some first",
                    state.target
                )));
            }
            let (kind, effective) = state.settle(now, Cause::Write);
            touched.push(Touched {
                before: before.get(key).copied().unwrap_or(0),
                state,
                kind,
                effective,
                logged: true,
            });
        }
        let grown: i64 = touched
            .iter()
            .map(|t| t.state.decisions.len() as i64 - t.before as i64)
            .sum();
        let active = (head.active as i64 + grown).max(0) as u64;
        if grown > 0 && active > max_active {
            return Err(StoreError::LimitReached(format!(
                "the tenant would have {active} decisions in force; at most {max_active} \
                 (--decisions-max-active)"
            )));
        }
        let head = if fresh.is_empty() {
            head
        } else {
            Self::insert_decisions(&mut tx, &fresh)
                .await
                .map_err(&fail)?;
            Self::save_targets(&mut tx, tenant, head, &touched, now)
                .await
                .map_err(&fail)?
        };
        // Replayed keys: their targets' current states, for the caller.
        let mut targets: Vec<TargetState> = touched.into_iter().map(|t| t.state).collect();
        targets.extend(states.into_values());
        tx.commit().await.map_err(fail)?;
        Ok(DecisionWrite {
            result: results,
            head,
            targets,
        })
    }

    async fn revoke_decision(
        &self,
        tenant: TenantId,
        id: Uuid,
        by: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<DecisionWrite<Decision>> {
        let what = format!("decision {id}");
        let fail = fail(&what, "failed to revoke a decision");
        let mut tx = self.write(tenant).await.map_err(&fail)?;
        let head = Self::lock_decisions(&mut tx, tenant).await.map_err(&fail)?;
        let row = Stmt::<DB>::new("SELECT doc FROM decisions WHERE tenant_id = $1 AND id = $2")
            .uuid(tenant.0)
            .uuid(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(&fail)?;
        let mut decision: Decision = DB::doc(&row, "doc").map_err(&fail)?;
        let key = decision.target.key();
        let mut states = Self::load_targets(&mut tx, tenant, &BTreeSet::from([key.clone()]))
            .await
            .map_err(&fail)?;
        let mut state = states
            .remove(&key)
            .unwrap_or_else(|| TargetState::new(decision.target.clone()));
        if !decision.is_active(now) {
            tx.commit().await.map_err(fail)?;
            return Ok(DecisionWrite {
                result: decision,
                head,
                targets: vec![state],
            });
        }
        decision.revoked_at = Some(now);
        decision.revoked_by = by.to_owned();
        decision.revoke_reason = reason.to_owned();
        Stmt::<DB>::new(
            "UPDATE decisions SET revoked_at = $3, doc = $4 WHERE tenant_id = $1 AND id = $2",
        )
        .uuid(tenant.0)
        .uuid(id)
        .time(now)
        .doc(&decision)
        .execute(&mut *tx)
        .await
        .map_err(&fail)?;
        let before = state.decisions.len();
        state.decisions.retain(|d| d.id != id);
        state.prune(now);
        let (kind, effective) = state.settle(now, Cause::Write);
        let touched = [Touched {
            before,
            state,
            kind,
            effective,
            logged: true,
        }];
        let head = Self::save_targets(&mut tx, tenant, head, &touched, now)
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        let [t] = touched;
        Ok(DecisionWrite {
            result: decision,
            head,
            targets: vec![t.state],
        })
    }

    async fn expire_decisions(&self, tenant: TenantId, now: DateTime<Utc>) -> StoreResult<u64> {
        let fail = fail("decisions", "failed to expire decisions");
        let mut tx = self.write(tenant).await.map_err(&fail)?;
        let head = Self::lock_decisions(&mut tx, tenant).await.map_err(&fail)?;
        let rows = Stmt::<DB>::new(
            "SELECT state FROM decision_targets WHERE tenant_id = $1 AND next_change_at <= $2",
        )
        .uuid(tenant.0)
        .time(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(&fail)?;
        let mut touched = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut state: TargetState = DB::doc(row, "state").map_err(&fail)?;
            let before = state.decisions.len();
            state.prune(now);
            let (kind, effective) = state.settle(now, Cause::Expiry);
            touched.push(Touched {
                before,
                state,
                kind,
                effective,
                logged: kind != DeltaKind::Unchanged,
            });
        }
        let logged = touched.iter().filter(|t| t.logged).count() as u64;
        if !touched.is_empty() {
            Self::save_targets(&mut tx, tenant, head, &touched, now)
                .await
                .map_err(&fail)?;
        }
        tx.commit().await.map_err(fail)?;
        Ok(logged)
    }

    async fn get_decision(&self, tenant: TenantId, id: Uuid) -> StoreResult<Decision> {
        let what = format!("decision {id}");
        let fail = fail(&what, "failed to read a decision");
        let q = Stmt::<DB>::new("SELECT doc FROM decisions WHERE tenant_id = $1 AND id = $2")
            .uuid(tenant.0)
            .uuid(id);
        let row = self.read_one(tenant, q).await.map_err(&fail)?;
        DB::doc(&row, "doc").map_err(fail)
    }

    async fn list_decisions(
        &self,
        tenant: TenantId,
        q: &DecisionQuery,
    ) -> StoreResult<Vec<Decision>> {
        let mut b = Stmt::<DB>::new("SELECT doc FROM decisions WHERE tenant_id = ");
        b.push_uuid(tenant.0);
        if let Some(scope) = q.scope {
            b.push(" AND scope = ").push_bind(scope.as_str());
            if let Some(value) = &q.value {
                b.push(" AND target = ")
                    .push_bind(format!("{}:{value}", scope.as_str()));
            }
        }
        if !q.kinds.is_empty() {
            b.push_in("kind", q.kinds.iter().map(|k| k.as_str()));
        }
        if let Some(origin) = &q.origin_id {
            b.push(" AND origin_id = ").push_bind(origin.as_str());
        }
        if !q.include_inactive {
            b.push(" AND revoked_at IS NULL AND expires_at > ")
                .push_time(q.now.unwrap_or_else(Utc::now));
        }
        push_newest_first(&mut b, "created_at", q.before, q.limit);
        let fail = fail("decisions", "failed to list decisions");
        let rows = self.read_all(tenant, b).await.map_err(&fail)?;
        decode_all::<DB, _>(&rows, |r| DB::doc(r, "doc")).map_err(fail)
    }

    async fn decision_log_after(
        &self,
        tenant: TenantId,
        after: u64,
        limit: u32,
    ) -> StoreResult<Vec<DecisionLogEntry>> {
        let q = Stmt::<DB>::new(
            "SELECT entry FROM decision_log WHERE tenant_id = $1 AND revision > $2 \
             ORDER BY revision LIMIT $3",
        )
        .uuid(tenant.0)
        .arg(after.min(i64::MAX as u64) as i64)
        .arg(i64::from(limit));
        let fail = fail("decision log", "failed to read the decision log");
        let rows = self.read_all(tenant, q).await.map_err(&fail)?;
        decode_all::<DB, _>(&rows, |r| DB::doc(r, "entry")).map_err(fail)
    }

    async fn decision_snapshot(
        &self,
        tenant: TenantId,
    ) -> StoreResult<(DecisionHead, Vec<TargetState>)> {
        // One statement: the head and the targets at one moment.
        let q = Stmt::<DB>::new(
            "SELECT h.revision, h.log_floor, h.active, t.target, t.state FROM decision_heads h \
             LEFT JOIN decision_targets t ON t.tenant_id = h.tenant_id WHERE h.tenant_id = $1",
        )
        .uuid(tenant.0);
        let fail = fail("decisions", "failed to read the decision snapshot");
        let rows = self.read_all(tenant, q).await.map_err(&fail)?;
        let mut head = DecisionHead::default();
        let mut targets = Vec::with_capacity(rows.len());
        for row in &rows {
            head = head_from_row::<DB>(row).map_err(&fail)?;
            if row
                .col::<Option<String>>("target")
                .map_err(&fail)?
                .is_some()
            {
                targets.push(DB::doc(row, "state").map_err(&fail)?);
            }
        }
        Ok((head, targets))
    }

    async fn decision_schedule(&self) -> StoreResult<Vec<DecisionSchedule>> {
        let q = Stmt::<DB>::text(format!(
            "SELECT tenant_id, next_change_at, active, revision, log_floor FROM {}",
            DB::DECISION_SCHEDULE
        ));
        let fail = fail("decisions", "failed to read the decision schedule");
        let rows = self.all(q).await.map_err(&fail)?;
        rows.iter()
            .map(|row| {
                Ok(DecisionSchedule {
                    tenant: TenantId(uuid::<DB>(row, "tenant_id")?),
                    next_change_at: DB::opt_time(row, "next_change_at")?,
                    head: head_from_row::<DB>(row)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(fail)
    }

    async fn compact_decisions(
        &self,
        tenant: TenantId,
        log_before: DateTime<Utc>,
        history_before: DateTime<Utc>,
    ) -> StoreResult<DecisionHead> {
        let fail = fail("decisions", "failed to compact decisions");
        let mut tx = self.write(tenant).await.map_err(&fail)?;
        let mut head = Self::lock_decisions(&mut tx, tenant).await.map_err(&fail)?;
        let row = Stmt::<DB>::new(
            "SELECT max(revision) AS upto FROM decision_log WHERE tenant_id = $1 AND created_at < $2",
        )
        .uuid(tenant.0)
        .time(log_before)
        .fetch_one(&mut *tx)
        .await
        .map_err(&fail)?;
        if let Some(upto) = row.col::<Option<i64>>("upto").map_err(&fail)? {
            Stmt::<DB>::new("DELETE FROM decision_log WHERE tenant_id = $1 AND revision <= $2")
                .uuid(tenant.0)
                .arg(upto)
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
            head.floor = head.floor.max(upto.max(0) as u64);
            Stmt::<DB>::new("UPDATE decision_heads SET log_floor = $2 WHERE tenant_id = $1")
                .uuid(tenant.0)
                .arg(head.floor as i64)
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
        }
        Stmt::<DB>::new(
            "DELETE FROM decisions WHERE tenant_id = $1 AND (expires_at < $2 OR revoked_at < $2)",
        )
        .uuid(tenant.0)
        .time(history_before)
        .execute(&mut *tx)
        .await
        .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(head)
    }
}
