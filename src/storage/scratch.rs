//! Fresh Postgres databases for benchmarks: `picket bench detect --storm`
//! creates one per run on the cluster it is given and drops it afterwards,
//! so a run never meets another run's tenants, events or alerts and leaves
//! nothing behind.

use anyhow::Context;
use sqlx::Connection;

/// A database created for one run.
#[derive(Debug, Clone)]
pub struct ScratchDb {
    /// URL of the new database (the cluster URL with its name as the path).
    pub url: String,
    /// The cluster URL it was created through (and is dropped through).
    admin_url: String,
    /// Its name: `{prefix}_{random hex}`.
    pub name: String,
}

impl ScratchDb {
    /// Creates `{prefix}_{random}` on the cluster of `admin_url` (a Postgres
    /// URL whose database the caller may connect to, e.g. `postgres`).
    /// `prefix` must be lower-case letters, digits and underscores.
    pub async fn create(admin_url: &str, prefix: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !prefix.is_empty()
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "invalid database name prefix"
        );
        let name = format!("{prefix}_{}", hex::encode(rand::random::<[u8; 6]>()));
        let mut conn = sqlx::PgConnection::connect(admin_url)
            .await
            .context("failed to connect to Postgres to create the run's database")?;
        // The name is built from the checked prefix and hex digits only.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .context("failed to create the run's database")?;
        let _ = conn.close().await;
        let base = match admin_url.split_once('?') {
            Some((base, _)) => base,
            None => admin_url,
        };
        let (cluster, _) = base
            .rsplit_once('/')
            .filter(|(c, _)| c.contains("://"))
            .context("the Postgres URL needs a database path (e.g. /postgres)")?;
        let query = admin_url
            .split_once('?')
            .map(|(_, q)| format!("?{q}"))
            .unwrap_or_default();
        Ok(Self {
            url: format!("{cluster}/{name}{query}"),
            admin_url: admin_url.to_owned(),
            name,
        })
    }

    /// Drops the database (ending any session still connected to it).
    pub async fn drop_now(self) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .context("failed to connect to Postgres to drop the run's database")?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await
        .context("failed to drop the run's database")?;
        let _ = conn.close().await;
        Ok(())
    }
}
