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
    use std::fmt::Write;
    let mut out = String::with_capacity(events.len() * 600);
    for e in events {
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
        copy_text(&mut out, &e.event_type);
        write!(out, "\t{}\t{}\t", e.ocsf_class_uid, e.ocsf_category_uid)?;
        for s in [&e.actor, &e.action, &e.resource] {
            copy_text(&mut out, s);
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
            copy_text(&mut out, s);
            out.push('\t');
        }
        copy_text(&mut out, &details);
        out.push('\n');
    }
    Ok(out)
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
                let mut copy = conn
                    .copy_in_raw(
                        "COPY events (tenant_id, id, idem, occurred_at, received_at, event_type, ocsf_class_uid, \
                         ocsf_category_uid, actor, action, resource, outcome, severity, source_ip, destination_ip, \
                         source_system, service, environment, details) FROM STDIN",
                    )
                    .await?;
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
                 source_system, service, environment, details) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
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
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
    }
    conn.close().await?;
    Ok(started.elapsed())
}
