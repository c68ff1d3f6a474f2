//! Settings for `picket serve`: clap flags, each also readable from a
//! `PICKET_*` environment variable, with defaults that work offline. Built once
//! and passed down; never a global. Credentials are wrapped so `Debug` redacts them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::storage::DEFAULT_DATABASE_URL;

fn secret(s: &str) -> Result<SecretString, Infallible> {
    Ok(SecretString::from(s.to_owned()))
}

/// Everything `picket serve` can be configured with.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Address to listen on: native gRPC, grpc-web, /healthz and /metrics share it.
    #[arg(long, env = "PICKET_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Database URL: `postgres://…` for Postgres, `sqlite:PATH` for an embedded
    /// file. Default: `sqlite://picket-data/picket.db` (created on first start).
    #[arg(long, env = "PICKET_DATABASE_URL", hide_env_values = true, value_parser = secret)]
    pub database_url: Option<SecretString>,

    /// Most database connections in the pool.
    #[arg(long, env = "PICKET_DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub db_max_connections: u32,

    /// How long `serve` keeps retrying, at start, a Postgres server it cannot
    /// reach (0.5 s between attempts, doubling to 5 s) before it exits; any
    /// other database error ends the start at once.
    #[arg(long, env = "PICKET_DATABASE_WAIT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub database_wait_seconds: u64,

    /// Operator token for AdminService. Without it, one is generated on first
    /// start, printed once, and only its hash is kept.
    #[arg(long, env = "PICKET_ADMIN_TOKEN", hide_env_values = true, value_parser = secret)]
    pub admin_token: Option<SecretString>,

    /// Secret API keys are hashed under. Without it, one is generated and kept
    /// in the database; set it in production to keep it out of database dumps.
    #[arg(long, env = "PICKET_KEY_PEPPER", hide_env_values = true, value_parser = secret)]
    pub key_pepper: Option<SecretString>,

    /// Largest accepted gRPC message, in bytes (decoded size). Larger ones are
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "PICKET_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Most concurrent HTTP/2 streams (calls) per client connection.
    #[arg(long, env = "PICKET_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// Most client connections open at once (idle or not); one more is
    /// closed as soon as it is accepted. Bounds what a flood of idle or
    /// stalled connections can take from the callers already connected.
    #[arg(long, env = "PICKET_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Seconds to wait for open calls and in-flight writes on shutdown before exiting anyway.
    #[arg(long, env = "PICKET_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,

    /// Concurrent ingest transactions (writer tasks). SQLite serializes writers anyway.
    #[arg(long, env = "PICKET_INGEST_WRITERS", default_value_t = 2)]
    pub ingest_writers: usize,

    /// Most rows one ingest transaction takes from the queue.
    #[arg(long, env = "PICKET_INGEST_MAX_BATCH_ROWS", default_value_t = 2000)]
    pub ingest_max_batch_rows: usize,

    /// Most events accepted but not yet committed, server-wide; beyond it ingest
    /// answers RESOURCE_EXHAUSTED with RetryInfo.
    #[arg(
        long,
        env = "PICKET_INGEST_MAX_IN_FLIGHT_EVENTS",
        default_value_t = 100_000
    )]
    pub ingest_max_in_flight_events: usize,

    /// Most unacknowledged batches per IngestStream; the server reads no more
    /// from a stream until one is acknowledged.
    #[arg(
        long,
        env = "PICKET_STREAM_MAX_IN_FLIGHT_BATCHES",
        default_value_t = 64
    )]
    pub stream_max_in_flight_batches: usize,

    /// Default heartbeat interval of watch and tail streams, in seconds.
    #[arg(long, env = "PICKET_HEARTBEAT_SECONDS", default_value_t = 15)]
    pub heartbeat_seconds: u64,

    /// How often watch and tail streams re-read the store without a wake-up
    /// signal, in milliseconds: the delay bound for changes committed by
    /// another replica while Redis is unavailable (or not configured).
    #[arg(long, env = "PICKET_WATCH_POLL_MS", default_value_t = 500)]
    pub watch_poll_ms: u64,

    /// Redis URL (`redis://host:6379`) for running several replicas on one
    /// Postgres: Redis pub/sub signals changes between them and remembers
    /// webhook delivery ids. Without it, fan-out stays in this process.
    #[arg(long, env = "PICKET_REDIS_URL", hide_env_values = true, value_parser = secret)]
    pub redis_url: Option<SecretString>,

    /// How often tenant retention is applied (events older than a tenant's
    /// retention are deleted), in seconds.
    #[arg(
        long,
        env = "PICKET_RETENTION_INTERVAL_SECONDS",
        default_value_t = 3600
    )]
    pub retention_interval_seconds: u64,

    /// How often the report rollups (hourly event figures, VPN activity,
    /// VPN network runs) fold in newly committed events, in milliseconds.
    /// Reports are exact either way (they add the raw events the rollups do
    /// not hold yet); a longer interval only leaves more for them to read.
    /// 0 turns the rollups off.
    #[arg(long, env = "PICKET_ROLLUP_INTERVAL_MS", default_value_t = 1000)]
    pub rollup_interval_ms: u64,

    /// Run the detection pipeline (rules and behavioural detectors on every
    /// committed event). `--detection false` turns it off.
    #[arg(long, env = "PICKET_DETECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub detection: bool,

    /// The detection pipeline's wall clock (the system clock; `picket
    /// simulate` drives its own). Not a flag.
    #[arg(skip)]
    pub detection_clock: crate::pipeline::Clock,

    /// Directory of extra Sigma rules (`*.yml`) loaded at start, beside the built-in pack.
    #[arg(long, env = "PICKET_RULES_DIR")]
    pub rules_dir: Option<std::path::PathBuf>,

    /// Directory of extra response playbooks (`*.yml`) loaded at start,
    /// beside the built-in pack; shared by every tenant.
    #[arg(long, env = "PICKET_PLAYBOOKS_DIR")]
    pub playbooks_dir: Option<std::path::PathBuf>,

    /// Address ranges (CIDR, comma-separated) notifications may be sent to
    /// although they are loopback, private or link-local, e.g.
    /// `10.20.0.0/16`. By default only public addresses are allowed, so a
    /// tenant cannot make the server probe internal networks.
    #[arg(long, env = "PICKET_NOTIFY_ALLOW_CIDR", value_delimiter = ',')]
    pub notify_allow_cidr: Vec<ipnet::IpNet>,

    /// Playbook runs this process executes at once.
    #[arg(long, env = "PICKET_PLAYBOOK_WORKERS", default_value_t = 4)]
    pub playbook_workers: usize,

    /// How long a worker's lease on a run lasts, in seconds (renewed at a
    /// third of it); a run whose worker died is taken over when it expires.
    #[arg(long, env = "PICKET_PLAYBOOK_LEASE_SECONDS", default_value_t = 30)]
    pub playbook_lease_seconds: u64,

    /// How often workers look for runnable runs and approval deadlines are
    /// checked without a wake-up, in milliseconds.
    #[arg(long, env = "PICKET_PLAYBOOK_POLL_MS", default_value_t = 500)]
    pub playbook_poll_ms: u64,

    /// Repeats of an alert fingerprint within this many seconds fold into one alert.
    #[arg(long, env = "PICKET_ALERT_SUPPRESSION_SECONDS", default_value_t = 3600)]
    pub alert_suppression_seconds: u64,

    /// After a correlation rule fires for a group, the engine stays quiet for
    /// this many seconds (so a flood is not one alert write per event); later
    /// firings fold into the open alert. 0 lets every firing through.
    #[arg(long, env = "PICKET_DETECT_REFIRE_SECONDS", default_value_t = 60)]
    pub detect_refire_seconds: u64,

    /// Most correlation groups (rule × group-by values) per tenant; beyond
    /// it the stalest are dropped (and counted). A group costs ~3 KB (the
    /// rule engine keeps room for 64 evidence references in each): 25,000
    /// with the window cap below keep a storm of fresh source IPs under the
    /// 300 MB budget (docs/PERFORMANCE.md, "Follow-up: where the writer's
    /// time goes, memory caps").
    #[arg(long, env = "PICKET_DETECT_MAX_GROUPS", default_value_t = 25_000)]
    pub detect_max_groups: usize,

    /// Most actors each behavioural detector tracks per tenant; beyond it the
    /// least recently seen tenth is dropped (and counted).
    #[arg(long, env = "PICKET_DETECT_MAX_ACTORS", default_value_t = 10_000)]
    pub detect_max_actors: usize,

    /// Model that scores entity windows live.
    #[arg(
        long,
        env = "PICKET_ANOMALY_ALGORITHM",
        value_enum,
        default_value = "ecod"
    )]
    pub anomaly_algorithm: crate::pipeline::scoring::Algorithm,

    /// Share of baseline windows the anomaly threshold leaves above it.
    #[arg(long, env = "PICKET_ANOMALY_CONTAMINATION", default_value_t = 0.0005)]
    pub anomaly_contamination: f64,

    /// Length of the per-entity behaviour windows, in seconds.
    #[arg(long, env = "PICKET_ANOMALY_WINDOW_SECONDS", default_value_t = 300)]
    pub anomaly_window_seconds: u64,

    /// Windows a tenant needs before its first anomaly model is trained.
    #[arg(long, env = "PICKET_ANOMALY_MIN_WINDOWS", default_value_t = 200)]
    pub anomaly_min_windows: usize,

    /// Least time between two trainings of a tenant's anomaly model, in seconds.
    #[arg(
        long,
        env = "PICKET_ANOMALY_TRAIN_INTERVAL_SECONDS",
        default_value_t = 300
    )]
    pub anomaly_train_interval_seconds: u64,

    /// Most open behaviour windows per tenant; beyond it the least recently
    /// seen closes early (and is counted).
    #[arg(
        long,
        env = "PICKET_ANOMALY_MAX_OPEN_WINDOWS",
        default_value_t = 25_000
    )]
    pub anomaly_max_open_windows: usize,

    /// An alert joins an open incident sharing its actor or IP updated within this many seconds.
    #[arg(long, env = "PICKET_INCIDENT_WINDOW_SECONDS", default_value_t = 3600)]
    pub incident_window_seconds: u64,

    /// An alert reopens a resolved incident sharing its actor or IP resolved
    /// within this many seconds; 0 never reopens.
    #[arg(long, env = "PICKET_INCIDENT_REOPEN_SECONDS", default_value_t = 86_400)]
    pub incident_reopen_seconds: u64,

    /// Detection shards: tenants are split into this many shards by a hash
    /// of their id, and each shard is evaluated by one replica (replicas
    /// share them out). Every replica on one database must use the same
    /// count; a replica with another is refused detection while they run.
    #[arg(long, env = "PICKET_DETECT_SHARDS", default_value_t = crate::pipeline::shards::DEFAULT_SHARDS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::pipeline::shards::MAX_SHARDS)))]
    pub detect_shards: u32,

    /// How many hours of events are replayed at start to rebuild detection windows.
    #[arg(long, env = "PICKET_DETECT_REPLAY_HOURS", default_value_t = 24)]
    pub detect_replay_hours: u64,

    /// Most enforcement decisions in force per tenant; beyond it creating one
    /// answers RESOURCE_EXHAUSTED.
    #[arg(long, env = "PICKET_DECISIONS_MAX_ACTIVE", default_value_t = crate::response::decisions::DEFAULT_MAX_ACTIVE)]
    pub decisions_max_active: u64,

    /// How many hours of decision deltas are kept; a WatchDecisions client
    /// resuming from an older revision gets a fresh snapshot.
    #[arg(
        long,
        env = "PICKET_DECISION_LOG_RETENTION_HOURS",
        default_value_t = 24
    )]
    pub decision_log_retention_hours: u64,

    /// Origins allowed to call from a browser (grpc-web), comma-separated; `*` allows any.
    #[arg(
        long,
        env = "PICKET_CORS_ORIGINS",
        default_value = "*",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,

    /// PEM certificate chain (leaf first) to serve TLS with; needs
    /// `--tls-key`. Every protocol on the port (gRPC, grpc-web, /healthz,
    /// /metrics, webhooks) is then TLS only. Re-read when the file changes.
    #[arg(long, env = "PICKET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of `--tls-cert`. Re-read when the file changes.
    #[arg(long, env = "PICKET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// PEM bundle of CAs that client certificates must chain to: clients
    /// without one are refused at the handshake (mTLS, on top of API keys).
    /// Needs `--tls-cert`. Re-read when the file changes.
    #[arg(long, env = "PICKET_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// How often the TLS files are checked for changes, in seconds.
    #[arg(long, env = "PICKET_TLS_RELOAD_SECONDS", default_value_t = 10)]
    pub tls_reload_seconds: u64,
}

impl Settings {
    /// Settings with every default and the given database URL (tests, tools).
    pub fn with_database(url: Option<&str>) -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            settings: Settings,
        }
        let mut s = Wrapper::parse_from(["picket"]).settings;
        s.database_url = url.map(|u| SecretString::from(u.to_owned()));
        s
    }

    /// The database URL in force (the embedded default if none was given).
    pub fn database_url(&self) -> String {
        self.database_url
            .as_ref()
            .map(|u| u.expose_secret().to_owned())
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())
    }

    /// The database URL with any password replaced by `****`, for display.
    pub fn database_url_redacted(&self) -> String {
        redact_url(&self.database_url())
    }

    /// How alerts are grouped into incidents.
    pub fn correlation(&self) -> crate::incidents::CorrelationConfig {
        crate::incidents::CorrelationConfig {
            window: chrono::Duration::seconds(self.incident_window_seconds as i64),
            reopen: chrono::Duration::seconds(self.incident_reopen_seconds as i64),
        }
    }

    /// How the playbook engine runs.
    pub fn response(&self) -> crate::response::ResponseConfig {
        crate::response::ResponseConfig {
            workers: self.playbook_workers.max(1),
            lease: Duration::from_secs(self.playbook_lease_seconds.max(3)),
            poll: Duration::from_millis(self.playbook_poll_ms.max(10)),
            ..crate::response::ResponseConfig::default()
        }
    }

    /// The TLS files, if TLS is on.
    pub fn tls_files(&self) -> Option<crate::server::tls::TlsFiles> {
        Some(crate::server::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// The shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }

    /// The effective configuration as `key = value` lines, secrets redacted.
    pub fn describe(&self) -> String {
        let set = |s: &Option<SecretString>| {
            if s.is_some() {
                "[set, redacted]"
            } else {
                "[not set]"
            }
        };
        [
            format!("listen = {}", self.listen),
            format!("database_url = {}", self.database_url_redacted()),
            format!("db_max_connections = {}", self.db_max_connections),
            format!("database_wait_seconds = {}", self.database_wait_seconds),
            format!("admin_token = {}", set(&self.admin_token)),
            format!("key_pepper = {}", set(&self.key_pepper)),
            format!("max_message_bytes = {}", self.max_message_bytes),
            format!("max_concurrent_streams = {}", self.max_concurrent_streams),
            format!("max_connections = {}", self.max_connections),
            format!("shutdown_grace_seconds = {}", self.shutdown_grace_seconds),
            format!("ingest_writers = {}", self.ingest_writers),
            format!("ingest_max_batch_rows = {}", self.ingest_max_batch_rows),
            format!(
                "ingest_max_in_flight_events = {}",
                self.ingest_max_in_flight_events
            ),
            format!(
                "stream_max_in_flight_batches = {}",
                self.stream_max_in_flight_batches
            ),
            format!("heartbeat_seconds = {}", self.heartbeat_seconds),
            format!("watch_poll_ms = {}", self.watch_poll_ms),
            format!(
                "redis_url = {}",
                self.redis_url
                    .as_ref()
                    .map_or_else(|| "[not set]".to_owned(), |u| redact_url(u.expose_secret()))
            ),
            format!(
                "retention_interval_seconds = {}",
                self.retention_interval_seconds
            ),
            format!("rollup_interval_ms = {}", self.rollup_interval_ms),
            format!(
                "rules_dir = {}",
                self.rules_dir
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "[built-in pack only]".into())
            ),
            format!(
                "playbooks_dir = {}",
                self.playbooks_dir
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "[built-in pack only]".into())
            ),
            format!(
                "notify_allow_cidr = {}",
                if self.notify_allow_cidr.is_empty() {
                    "[public addresses only]".to_owned()
                } else {
                    self.notify_allow_cidr
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                }
            ),
            format!("playbook_workers = {}", self.playbook_workers),
            format!("playbook_lease_seconds = {}", self.playbook_lease_seconds),
            format!("playbook_poll_ms = {}", self.playbook_poll_ms),
            format!(
                "alert_suppression_seconds = {}",
                self.alert_suppression_seconds
            ),
            format!("detection = {}", self.detection),
            format!("detect_refire_seconds = {}", self.detect_refire_seconds),
            format!("detect_replay_hours = {}", self.detect_replay_hours),
            format!("detect_shards = {}", self.detect_shards),
            format!("detect_max_groups = {}", self.detect_max_groups),
            format!("detect_max_actors = {}", self.detect_max_actors),
            format!("incident_window_seconds = {}", self.incident_window_seconds),
            format!("incident_reopen_seconds = {}", self.incident_reopen_seconds),
            format!("anomaly_algorithm = {:?}", self.anomaly_algorithm),
            format!("anomaly_contamination = {}", self.anomaly_contamination),
            format!("anomaly_window_seconds = {}", self.anomaly_window_seconds),
            format!("anomaly_min_windows = {}", self.anomaly_min_windows),
            format!(
                "anomaly_train_interval_seconds = {}",
                self.anomaly_train_interval_seconds
            ),
            format!(
                "anomaly_max_open_windows = {}",
                self.anomaly_max_open_windows
            ),
            format!("decisions_max_active = {}", self.decisions_max_active),
            format!(
                "decision_log_retention_hours = {}",
                self.decision_log_retention_hours
            ),
            format!("cors_origins = {}", self.cors_origins.join(",")),
            format!(
                "tls_cert = {}",
                path_or(&self.tls_cert, "[not set: plain text]")
            ),
            format!("tls_key = {}", path_or(&self.tls_key, "[not set]")),
            format!(
                "tls_client_ca = {}",
                path_or(&self.tls_client_ca, "[not set: no client certificates]")
            ),
            format!("tls_reload_seconds = {}", self.tls_reload_seconds),
        ]
        .join("\n")
    }
}

fn path_or(p: &Option<std::path::PathBuf>, none: &str) -> String {
    p.as_ref()
        .map_or_else(|| none.to_owned(), |p| p.display().to_string())
}

/// Replaces the password of a `scheme://user:password@host` URL with `****`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:****@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Where a database URL keeps its data, for the start-up log: the absolute
/// file of an SQLite store (so a newcomer sees where `./picket-data/` is),
/// or the URL with its password redacted.
pub fn store_location(url: &str) -> String {
    match crate::storage::lock::sqlite_path(url) {
        Some(path) => std::path::absolute(&path)
            .unwrap_or(path)
            .display()
            .to_string(),
        None => redact_url(url),
    }
}

impl Settings {
    /// The anomaly scoring settings.
    pub fn scoring(&self) -> crate::pipeline::scoring::ScoringConfig {
        crate::pipeline::scoring::ScoringConfig {
            algorithm: self.anomaly_algorithm,
            window: chrono::Duration::seconds(self.anomaly_window_seconds.max(1) as i64),
            contamination: self.anomaly_contamination.clamp(0.00001, 0.5),
            min_windows: self.anomaly_min_windows.max(10),
            train_interval: chrono::Duration::seconds(
                i64::try_from(self.anomaly_train_interval_seconds).unwrap_or(i64::MAX / 1000),
            ),
            max_open_windows: self.anomaly_max_open_windows.max(1),
            ..crate::pipeline::scoring::ScoringConfig::default()
        }
    }

    /// The evaluator's bounds.
    pub fn evaluator(&self) -> crate::detect::EvaluatorConfig {
        let d = crate::detect::EvaluatorConfig::default();
        crate::detect::EvaluatorConfig {
            suppress: chrono::Duration::seconds(self.detect_refire_seconds as i64),
            max_groups_per_tenant: self.detect_max_groups.max(10),
            behavior: crate::detect::behavior::BehaviorConfig {
                max_actors: self.detect_max_actors.max(1),
                ..d.behavior.clone()
            },
            ..d
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_describe_redact_credentials() {
        let mut s = Settings::with_database(Some("postgres://picket:s3cret-pw@db:5432/picket"));
        s.admin_token = Some(SecretString::from("pk_operator_tok3n".to_owned()));
        s.key_pepper = Some(SecretString::from("pepp3r".to_owned()));
        for text in [format!("{s:?}"), s.describe()] {
            for secret in ["s3cret-pw", "tok3n", "pepp3r"] {
                assert!(!text.contains(secret), "{secret} leaked in {text}");
            }
        }
        assert!(
            s.describe()
                .contains("postgres://picket:****@db:5432/picket")
        );
    }

    #[test]
    fn defaults_work_offline() {
        let s = Settings::with_database(None);
        assert_eq!(s.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(s.database_url(), DEFAULT_DATABASE_URL);
    }
}
