//! The command line: `picket serve | migrate | config | admin … | decisions …`
//! and the other client commands.

pub mod anomaly;
pub mod client;

use std::convert::Infallible;

use anyhow::Context;
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};

use crate::access::{admin, auth};
use crate::domain::{NewApiKey, ScopeSet};
use crate::server::config::{Settings, redact_url};
use crate::server::shutdown;
use crate::server::startup::Application;
use crate::server::telemetry::{self, LogFormat};
use crate::storage::{self, DEFAULT_DATABASE_URL};
use crate::webhooks;

/// Picket: a gRPC-first security event platform.
#[derive(Debug, Parser)]
#[command(name = "picket", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "PICKET_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `info,picket=debug`.
    #[arg(
        long,
        global = true,
        env = "PICKET_LOG",
        default_value = "info,sqlx=warn"
    )]
    pub log: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (gRPC, grpc-web, /healthz, /metrics on one port).
    Serve(Settings),
    /// Run database migrations and exit.
    Migrate(StoreArgs),
    /// Print the effective configuration, secrets redacted.
    Config(Settings),
    /// Administer tenants, API keys and webhook sources directly in the store.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Send a JSON-lines file of events through IngestStream (`-` for stdin).
    Ingest(crate::cli::client::ingest::IngestArgs),
    /// Follow newly committed events live.
    Tail(crate::cli::client::tail::TailArgs),
    /// Response playbooks kept as YAML files.
    #[command(subcommand)]
    Playbook(PlaybookCommand),
    /// Enforcement decisions: list, add, revoke, check.
    #[command(subcommand)]
    Decisions(crate::cli::client::decisions::DecisionsCommand),
    /// Audit exports of stored events.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Reports: security summary, access report, dashboard metrics.
    #[command(subcommand)]
    Report(crate::cli::client::report::ReportCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Simulate a tenant's benign activity plus injected attacks against an
    /// in-process server and report detection rate, latency and false alerts.
    Simulate(crate::cli::client::simulate::SimulateArgs),
    /// Try the anomaly models on your own CSV data.
    #[command(subcommand)]
    Anomaly(AnomalyCommand),
}

/// `picket export …`
#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Every stored event matching the filters in a time range, oldest first,
    /// as JSON lines or CSV (ReportService.ExportEvents).
    Events(crate::cli::client::export::ExportEventsArgs),
}

/// `picket bench …`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput and ack latency against the raw SQL ceiling.
    Ingest(crate::cli::client::bench::BenchIngestArgs),
    /// Detection latency: failed-login burst → alert on WatchAlerts.
    Detect(crate::cli::client::bench_detect::BenchDetectArgs),
    /// Live fan-out: N WatchIncidents (or WatchDecisions) subscribers, each
    /// change to all of them.
    Fanout(crate::cli::client::bench_fanout::BenchFanoutArgs),
    /// CheckAccess latency with 10,000 decisions in force.
    Enforce(crate::cli::client::bench_enforce::BenchEnforceArgs),
    /// End to end: failed-login burst → incident → automatic run → ban on
    /// a WatchDecisions subscriber.
    Respond(crate::cli::client::bench_respond::BenchRespondArgs),
    /// Detection throughput with detection shared over replicas (Postgres).
    Shards(crate::cli::client::bench_shards::BenchShardsArgs),
    /// The audit log at scale: QueryEvents, ExportEvents and retention over
    /// 10 M + 10 M events spanning 30 days.
    Reports(crate::cli::client::bench_reports::BenchReportsArgs),
    /// A server under steady load for minutes (Postgres, detection on,
    /// subscribers and tails connected, bursts): errors, ack latency,
    /// detection lag and memory per minute, against pass criteria.
    Soak(crate::cli::client::bench_soak::BenchSoakArgs),
    /// The Rust SDK: client throughput to a local server, and the decision
    /// cache's check latency and memory at 100,000 IPs + 10,000 CIDRs.
    Sdk(crate::cli::client::bench_sdk::BenchSdkArgs),
}

/// `picket playbook …`
#[derive(Debug, Subcommand)]
pub enum PlaybookCommand {
    /// Create or update the tenant's playbooks from a YAML file or a
    /// directory of them (by name; unchanged ones are left alone).
    Apply(crate::cli::client::playbook::ApplyArgs),
}

/// `picket anomaly …`
#[derive(Debug, Subcommand)]
pub enum AnomalyCommand {
    /// Fit a model on --train and print one score per line (higher = more anomalous).
    Score(crate::cli::anomaly::ScoreArgs),
}

/// Which store to act on.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Database URL (`postgres://…` or `sqlite:PATH`).
    #[arg(long, env = "PICKET_DATABASE_URL", hide_env_values = true, value_parser = secret, default_value = DEFAULT_DATABASE_URL)]
    pub database_url: SecretString,
    /// Secret API keys are hashed under (must match the server's PICKET_KEY_PEPPER if it sets one).
    #[arg(long, env = "PICKET_KEY_PEPPER", hide_env_values = true, value_parser = secret)]
    pub key_pepper: Option<SecretString>,
}

fn secret(s: &str) -> Result<SecretString, Infallible> {
    Ok(SecretString::from(s.to_owned()))
}

/// `picket admin …`
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Webhook sources.
    #[command(subcommand)]
    Webhook(WebhookCommand),
}

/// `picket admin webhook …`
#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Create a webhook source and print its signing secret (shown once).
    Create {
        /// Tenant id or name.
        #[arg(long)]
        tenant: String,
        /// Name used in the URL (`/v1/webhooks/NAME`): a-z, 0-9 and '-', unique on the server.
        name: String,
        /// Also accept the replayable body-only `X-Signature: sha256=<hex>` form.
        #[arg(long)]
        allow_body_only_signature: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List a tenant's webhook sources (never their secrets).
    List {
        /// Tenant id or name.
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Replace a source's signing secret and print the new one (the old one stops working).
    Rotate {
        /// Source id.
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete a webhook source.
    Delete {
        /// Source id.
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// `picket admin tenant …`
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and print its id.
    Create {
        /// Unique name: a-z, 0-9 and '-', starting with a letter.
        name: String,
        /// Display name (defaults to the name).
        #[arg(long, default_value = "")]
        display_name: String,
        /// Event retention in days (0 keeps events forever).
        #[arg(long, default_value_t = 0)]
        retention_days: u32,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List tenants.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// `picket admin key …`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key and print it (shown once).
    Create {
        /// Tenant id or name.
        #[arg(long)]
        tenant: String,
        /// Comma-separated scopes: ingest, read, respond, admin.
        #[arg(long)]
        scopes: String,
        /// Label for the key.
        #[arg(long, default_value = "")]
        name: String,
        /// Expiry: RFC 3339 time or a duration such as 90d, 12h.
        #[arg(long)]
        expires: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke an API key by id.
    Revoke {
        /// Key id (the 16 hex characters after `pk_`).
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List a tenant's keys.
    List {
        /// Tenant id or name.
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    telemetry::init_tracing(cli.log_format, &cli.log);
    match cli.command {
        Command::Serve(settings) => serve(settings).await,
        Command::Migrate(store) => {
            let url = store.database_url.expose_secret();
            storage::migrate(url).await?;
            println!("migrations applied to {}", redact_url(url));
            Ok(())
        }
        Command::Config(settings) => {
            println!("{}", settings.describe());
            Ok(())
        }
        Command::Admin(cmd) => admin_command(cmd).await,
        Command::Anomaly(AnomalyCommand::Score(args)) => crate::cli::anomaly::run(&args),
        Command::Ingest(args) => crate::cli::client::ingest::run(args).await,
        Command::Tail(args) => crate::cli::client::tail::run(args).await,
        Command::Playbook(PlaybookCommand::Apply(args)) => {
            crate::cli::client::playbook::run(args).await
        }
        Command::Decisions(cmd) => crate::cli::client::decisions::run(cmd).await,
        Command::Export(ExportCommand::Events(args)) => {
            crate::cli::client::export::run(args).await.map(|_| ())
        }
        Command::Report(cmd) => crate::cli::client::report::run(cmd).await,
        Command::Bench(BenchCommand::Ingest(args)) => crate::cli::client::bench::run(args).await,
        Command::Bench(BenchCommand::Detect(args)) => {
            crate::cli::client::bench_detect::run(args).await
        }
        Command::Bench(BenchCommand::Fanout(args)) => {
            crate::cli::client::bench_fanout::run(args).await
        }
        Command::Bench(BenchCommand::Enforce(args)) => {
            crate::cli::client::bench_enforce::run(args).await
        }
        Command::Bench(BenchCommand::Respond(args)) => {
            crate::cli::client::bench_respond::run(args).await
        }
        Command::Bench(BenchCommand::Reports(args)) => {
            crate::cli::client::bench_reports::run(args).await
        }
        Command::Bench(BenchCommand::Soak(args)) => crate::cli::client::bench_soak::run(args).await,
        Command::Bench(BenchCommand::Sdk(args)) => crate::cli::client::bench_sdk::run(args).await,
        Command::Bench(BenchCommand::Shards(args)) => {
            crate::cli::client::bench_shards::run(args).await
        }
        Command::Simulate(args) => crate::cli::client::simulate::run(args).await,
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let mut app = Application::build(settings).await?;
    if let Some(token) = app.take_generated_operator_token() {
        // Shown once: only its hash is stored.
        eprintln!(
            "\n  Generated operator token (shown once; keep it safe, or set PICKET_ADMIN_TOKEN):\n\n    {}\n",
            token.expose_secret()
        );
    }
    app.run_until_stopped(shutdown::signal()).await
}

async fn open(
    store: &StoreArgs,
) -> anyhow::Result<(std::sync::Arc<dyn storage::Store>, auth::KeyHasher)> {
    let s = storage::connect(store.database_url.expose_secret(), 2).await?;
    let hasher = auth::key_hasher(s.as_ref(), store.key_pepper.as_ref()).await?;
    Ok((s, hasher))
}

async fn admin_command(cmd: AdminCommand) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::Tenant(TenantCommand::Create {
            name,
            display_name,
            retention_days,
            store,
        }) => {
            let (s, _) = open(&store).await?;
            let t = admin::create_tenant(s.as_ref(), &name, &display_name, retention_days).await?;
            println!("tenant {} created: id {}", t.name, t.id);
            s.close().await;
        }
        AdminCommand::Tenant(TenantCommand::List { store }) => {
            let (s, _) = open(&store).await?;
            let mut after: Option<String> = None;
            loop {
                let page = s
                    .list_tenants(after.as_deref(), 1000)
                    .await
                    .map_err(anyhow::Error::from)?;
                for t in &page {
                    println!("{}\t{}\tretention_days={}", t.id, t.name, t.retention_days);
                }
                match page.last() {
                    Some(t) if page.len() == 1000 => after = Some(t.name.clone()),
                    _ => break,
                }
            }
            s.close().await;
        }
        AdminCommand::Key(KeyCommand::Create {
            tenant,
            scopes,
            name,
            expires,
            store,
        }) => {
            let scopes =
                ScopeSet::parse_list(&scopes).map_err(|e| anyhow::anyhow!("--scopes: {e}"))?;
            let expires_at = expires
                .map(|e| admin::parse_expiry(&e, Utc::now()))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
            let (s, hasher) = open(&store).await?;
            let t = admin::resolve_tenant(s.as_ref(), &tenant).await?;
            let (key, secret) = admin::create_key(
                s.as_ref(),
                &hasher,
                NewApiKey {
                    tenant_id: t.id,
                    name,
                    scopes,
                    expires_at,
                },
            )
            .await
            .context("failed to create the key")?;
            eprintln!(
                "key {} for tenant {} (scopes {}); the secret is shown once:",
                key.id, t.name, key.scopes
            );
            println!("{}", secret.expose_secret());
            s.close().await;
        }
        AdminCommand::Key(KeyCommand::Revoke { id, store }) => {
            let (s, _) = open(&store).await?;
            let key = admin::revoke_key(s.as_ref(), None, &id).await?;
            println!("key {} revoked", key.id);
            s.close().await;
        }
        AdminCommand::Key(KeyCommand::List { tenant, store }) => {
            let (s, _) = open(&store).await?;
            let t = admin::resolve_tenant(s.as_ref(), &tenant).await?;
            let now = Utc::now();
            for k in s.list_api_keys(t.id).await.map_err(anyhow::Error::from)? {
                let state = if k.revoked_at.is_some() {
                    "revoked"
                } else if k.is_active(now) {
                    "active"
                } else {
                    "expired"
                };
                println!("{}\t{}\t{}\t{}", k.id, k.scopes, state, k.name);
            }
            s.close().await;
        }
        AdminCommand::Webhook(cmd) => webhook_command(cmd).await?,
    }
    Ok(())
}

async fn webhook_command(cmd: WebhookCommand) -> anyhow::Result<()> {
    match cmd {
        WebhookCommand::Create {
            tenant,
            name,
            allow_body_only_signature,
            store,
        } => {
            let (s, hasher) = open(&store).await?;
            let t = admin::resolve_tenant(s.as_ref(), &tenant).await?;
            let (source, secret) = webhooks::create_source(
                s.as_ref(),
                &webhooks::SecretBox::new(&hasher),
                t.id,
                &name,
                allow_body_only_signature,
            )
            .await
            .context("failed to create the webhook source")?;
            eprintln!(
                "webhook source {} (id {}) for tenant {}: POST /v1/webhooks/{}; the signing secret is shown once:",
                source.name, source.id, t.name, source.name
            );
            println!("{}", secret.expose_secret());
            s.close().await;
        }
        WebhookCommand::List { tenant, store } => {
            let (s, _) = open(&store).await?;
            let t = admin::resolve_tenant(s.as_ref(), &tenant).await?;
            for w in s
                .list_webhook_sources(t.id)
                .await
                .map_err(anyhow::Error::from)?
            {
                println!(
                    "{}\t{}\tbody_only_signature={}\tsecret_rotated_at={}",
                    w.id,
                    w.name,
                    w.allow_body_only_signature,
                    w.secret_rotated_at.to_rfc3339()
                );
            }
            s.close().await;
        }
        WebhookCommand::Rotate { id, store } => {
            let id = webhooks::parse_source_id(&id, "id")?;
            let (s, hasher) = open(&store).await?;
            let (source, secret) =
                webhooks::rotate_secret(s.as_ref(), &webhooks::SecretBox::new(&hasher), None, id)
                    .await?;
            eprintln!(
                "new signing secret for webhook source {} (the old one no longer works); shown once:",
                source.name
            );
            println!("{}", secret.expose_secret());
            s.close().await;
        }
        WebhookCommand::Delete { id, store } => {
            let id = webhooks::parse_source_id(&id, "id")?;
            let (s, _) = open(&store).await?;
            webhooks::delete_source(s.as_ref(), None, id).await?;
            println!("webhook source {id} deleted");
            s.close().await;
        }
    }
    Ok(())
}
