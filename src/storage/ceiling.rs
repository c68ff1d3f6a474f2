//! The raw write ceiling for `picket bench ingest`: the same events written
//! straight into the events table by the fastest plain SQL path of each
//! backend, bypassing Picket entirely (no idempotency check, no RLS, no
//! batching layer). Postgres: `COPY … FROM STDIN` on `writers` connections in
//! parallel. SQLite: one transaction of prepared INSERTs.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::Connection;

use crate::domain::TenantId;
use crate::domain::event::NewEvent;
use crate::storage::Backend;

/// Writes `events` for `tenant` with the backend's fastest plain path and
/// returns the wall time it took.
pub async fn write_raw(
    url: &str,
    tenant: TenantId,
    events: &[NewEvent],
    writers: usize,
) -> anyhow::Result<Duration> {
    match Backend::from_url(url) {
        Some(Backend::Postgres) => postgres_copy(url, tenant, events, writers.max(1)).await,
        Some(Backend::Sqlite) => sqlite_insert(url, tenant, events).await,
        None => anyhow::bail!("unsupported database URL"),
    }
}

/// Escapes a value for COPY's text format.
fn copy_text(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

fn copy_rows(tenant: TenantId, events: &[NewEvent]) -> anyhow::Result<String> {
    let mut out = String::with_capacity(events.len() * 600);
    for e in events {
        copy_line(&mut out, tenant, e)?;
    }
    Ok(out)
}

/// The COPY statement whose columns [`copy_line`] writes.
const EVENTS_COPY: &str = "COPY events (tenant_id, id, idem, occurred_at, received_at, event_type, ocsf_class_uid, \
     ocsf_category_uid, actor, action, resource, outcome, severity, source_ip, destination_ip, \
     source_system, service, environment, details, resource_segment) FROM STDIN";

/// Appends one event's line of COPY text (the columns of [`EVENTS_COPY`]).
fn copy_line(out: &mut String, tenant: TenantId, e: &NewEvent) -> anyhow::Result<()> {
    use std::fmt::Write;
    {
        let details = serde_json::to_string(&e.details)?;
        write!(
            out,
            "{}\t{}\t\\\\x{}\t{}\t{}\t",
            tenant.0,
            e.id,
            hex::encode(e.idempotency_digest),
            e.occurred_at.to_rfc3339(),
            e.received_at.to_rfc3339()
        )?;
        copy_text(out, &e.event_type);
        write!(out, "\t{}\t{}\t", e.ocsf_class_uid, e.ocsf_category_uid)?;
        for s in [&e.actor, &e.action, &e.resource] {
            copy_text(out, s);
            out.push('\t');
        }
        write!(out, "{}\t{}\t", e.outcome.as_i16(), e.severity.as_i16())?;
        for ip in [e.source_ip, e.destination_ip] {
            match ip {
                Some(ip) => write!(out, "{ip}\t")?,
                None => out.push_str("\\N\t"),
            }
        }
        for s in [&e.source_system, &e.service, &e.environment] {
            copy_text(out, s);
            out.push('\t');
        }
        copy_text(out, &details);
        out.push('\t');
        match crate::domain::event::resource_segment(&e.resource) {
            Some(seg) => copy_text(out, seg),
            None => out.push_str("\\N"),
        }
        out.push('\n');
    }
    Ok(())
}

async fn postgres_copy(
    url: &str,
    tenant: TenantId,
    events: &[NewEvent],
    writers: usize,
) -> anyhow::Result<Duration> {
    let chunk = events.len().div_ceil(writers).max(1);
    let payloads: Vec<Vec<String>> = events
        .chunks(chunk)
        .map(|part| {
            part.chunks(1000)
                .map(|c| copy_rows(tenant, c))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .collect::<anyhow::Result<_>>()?;
    let mut conns = Vec::new();
    for _ in 0..payloads.len() {
        conns.push(
            sqlx::PgConnection::connect(url)
                .await
                .context("failed to connect for the raw ceiling")?,
        );
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (mut conn, batches) in conns.into_iter().zip(payloads) {
        tasks.push(tokio::spawn(async move {
            // One COPY (one transaction) per 1,000 rows, like one ingest batch.
            for rows in batches {
                let mut copy = conn.copy_in_raw(EVENTS_COPY).await?;
                copy.send(rows.into_bytes()).await?;
                copy.finish().await?;
            }
            conn.close().await?;
            Ok::<_, sqlx::Error>(())
        }));
    }
    for t in tasks {
        t.await
            .context("raw writer panicked")?
            .context("raw COPY failed")?;
    }
    Ok(started.elapsed())
}

async fn sqlite_insert(
    url: &str,
    tenant: TenantId,
    events: &[NewEvent],
) -> anyhow::Result<Duration> {
    let mut conn = sqlx::SqliteConnection::connect(url)
        .await
        .context("failed to open SQLite")?;
    sqlx::query("PRAGMA synchronous = FULL")
        .execute(&mut conn)
        .await?;
    let tenant = tenant.0.to_string();
    let started = Instant::now();
    for part in events.chunks(1000) {
        let mut tx = conn.begin().await?;
        for e in part {
            sqlx::query(
                "INSERT INTO events (tenant_id, id, idem, occurred_at, received_at, event_type, ocsf_class_uid, \
                 ocsf_category_uid, actor, action, resource, outcome, severity, source_ip, destination_ip, \
                 source_system, service, environment, details, resource_segment) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
            )
            .bind(&tenant)
            .bind(e.id.to_string())
            .bind(&e.idempotency_digest[..])
            .bind(e.occurred_at.timestamp_micros())
            .bind(e.received_at.timestamp_micros())
            .bind(&e.event_type)
            .bind(i64::from(e.ocsf_class_uid))
            .bind(i64::from(e.ocsf_category_uid))
            .bind(&e.actor)
            .bind(&e.action)
            .bind(&e.resource)
            .bind(e.outcome.as_i16())
            .bind(e.severity.as_i16())
            .bind(e.source_ip.map(|ip| ip.to_string()))
            .bind(e.destination_ip.map(|ip| ip.to_string()))
            .bind(&e.source_system)
            .bind(&e.service)
            .bind(&e.environment)
            .bind(serde_json::to_string(&e.details)?)
            .bind(crate::domain::event::resource_segment(&e.resource))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
    }
    conn.close().await?;
    Ok(started.elapsed())
}

/// Loads events straight into a Postgres store at COPY speed, with their
/// idempotency keys, for `picket bench reports` (which needs tens of
/// millions of stored events in minutes; the ingest path is measured by
/// `picket bench ingest`). Connects as the URL's role (the owner), so
/// row-level security does not apply.
pub struct PgBulkLoader {
    /// The loading connection.
    conn: sqlx::PgConnection,
}

impl PgBulkLoader {
    /// Connects to the store at `url`.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            conn: sqlx::PgConnection::connect(url)
                .await
                .context("failed to connect for the bulk load")?,
        })
    }

    /// Writes `rows` (events of any tenants) and their keys in one
    /// transaction.
    pub async fn load(&mut self, rows: &[(TenantId, NewEvent)]) -> anyhow::Result<()> {
        let mut events = String::with_capacity(rows.len() * 640);
        let mut keys = String::with_capacity(rows.len() * 120);
        for (tenant, e) in rows {
            copy_line(&mut events, *tenant, e)?;
            use std::fmt::Write;
            writeln!(
                keys,
                "{}\t\\\\x{}\t{}\t{}",
                tenant.0,
                hex::encode(e.idempotency_digest),
                e.id,
                e.occurred_at.to_rfc3339()
            )?;
        }
        let mut tx = self.conn.begin().await?;
        let mut copy = tx.copy_in_raw(EVENTS_COPY).await?;
        copy.send(events.into_bytes()).await?;
        copy.finish().await.context("failed to COPY events")?;
        let mut copy = tx
            .copy_in_raw("COPY event_keys (tenant_id, idem, id, occurred_at) FROM STDIN")
            .await?;
        copy.send(keys.into_bytes()).await?;
        copy.finish().await.context("failed to COPY event keys")?;
        tx.commit().await?;
        Ok(())
    }

    /// Refreshes the planner statistics of the event tables.
    pub async fn analyze(&mut self) -> anyhow::Result<()> {
        sqlx::query("ANALYZE events")
            .execute(&mut self.conn)
            .await
            .context("failed to analyze events")?;
        sqlx::query("ANALYZE event_keys")
            .execute(&mut self.conn)
            .await
            .context("failed to analyze event keys")?;
        Ok(())
    }

    /// Bytes of the events table (every partition, with indexes and
    /// TOAST) and its dead rows as counted by the statistics collector.
    pub async fn footprint(&mut self) -> anyhow::Result<(i64, i64)> {
        let bytes: Option<i64> = sqlx::query_scalar(
            "SELECT sum(pg_total_relation_size(relid))::int8 FROM pg_partition_tree('events')",
        )
        .fetch_one(&mut self.conn)
        .await
        .context("failed to read the events size")?;
        let dead: Option<i64> = sqlx::query_scalar(
            "SELECT sum(n_dead_tup)::int8 FROM pg_stat_user_tables WHERE relid IN \
             (SELECT relid FROM pg_partition_tree('events'))",
        )
        .fetch_one(&mut self.conn)
        .await
        .context("failed to read the dead rows")?;
        Ok((bytes.unwrap_or(0), dead.unwrap_or(0)))
    }
}
