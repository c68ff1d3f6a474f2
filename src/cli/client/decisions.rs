//! `picket decisions list | add | revoke | check`: enforcement decisions from
//! the command line, through EnforcementService like any other client.

use anyhow::Context;
use tonic::transport::Channel;

use crate::cli::client::ServerArgs;
use crate::grpc::pb;
use crate::grpc::pb::enforcement_service_client::EnforcementServiceClient;

/// `picket decisions …`
#[derive(Debug, clap::Subcommand)]
pub enum DecisionsCommand {
    /// List decisions, newest first (only those in force unless --all).
    List(ListArgs),
    /// Create a decision and print its id.
    Add(AddArgs),
    /// Revoke a decision by id.
    Revoke(RevokeArgs),
    /// Ask the server whether a request from an IP and/or actor may proceed.
    Check(CheckArgs),
}

/// A decision scope on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScopeArg {
    /// One IPv4 or IPv6 address.
    Ip,
    /// A CIDR range.
    Cidr,
    /// An actor.
    Actor,
}

impl ScopeArg {
    fn to_pb(self) -> pb::DecisionScope {
        match self {
            Self::Ip => pb::DecisionScope::Ip,
            Self::Cidr => pb::DecisionScope::Cidr,
            Self::Actor => pb::DecisionScope::Actor,
        }
    }
}

/// A decision type on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TypeArg {
    /// Deny.
    Ban,
    /// Never deny or throttle.
    Allow,
    /// Limit the request rate (--throttle-per-minute).
    Throttle,
}

impl TypeArg {
    fn to_pb(self) -> pb::DecisionType {
        match self {
            Self::Ban => pb::DecisionType::Ban,
            Self::Allow => pb::DecisionType::Allow,
            Self::Throttle => pb::DecisionType::Throttle,
        }
    }
}

/// `picket decisions list` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Only this scope.
    #[arg(long, value_enum)]
    pub scope: Option<ScopeArg>,
    /// Only this value (needs --scope).
    #[arg(long)]
    pub value: Option<String>,
    /// Only these types (repeatable).
    #[arg(long = "type", value_enum)]
    pub types: Vec<TypeArg>,
    /// Only decisions of this origin (API key, playbook run or alert id).
    #[arg(long)]
    pub origin: Option<String>,
    /// Also revoked and expired decisions.
    #[arg(long)]
    pub all: bool,
    /// One JSON object per line instead of tab-separated text.
    #[arg(long)]
    pub json: bool,
}

/// `picket decisions add` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct AddArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// What it applies to.
    #[arg(long, value_enum)]
    pub scope: ScopeArg,
    /// The IP, range (CIDR) or actor.
    #[arg(long)]
    pub value: String,
    /// What it does.
    #[arg(long = "type", value_enum, default_value = "ban")]
    pub kind: TypeArg,
    /// How long it lasts: seconds, or a number with s, m, h or d (e.g. 90m).
    #[arg(long, default_value = "4h")]
    pub duration: String,
    /// Why (shown to whoever looks at it later).
    #[arg(long)]
    pub reason: String,
    /// Requests per minute, for --type throttle.
    #[arg(long, default_value_t = 0)]
    pub throttle_per_minute: u32,
    /// The alert this decision responds to.
    #[arg(long)]
    pub alert: Option<String>,
    /// Makes the command safe to repeat: the same key returns the first decision.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// `picket decisions revoke` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The decision id.
    pub id: String,
    /// Why.
    #[arg(long, default_value = "")]
    pub reason: String,
}

/// `picket decisions check` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The request's client IP.
    #[arg(long)]
    pub ip: Option<String>,
    /// The request's actor.
    #[arg(long)]
    pub actor: Option<String>,
}

/// Runs a `picket decisions` command.
pub async fn run(cmd: DecisionsCommand) -> anyhow::Result<()> {
    match cmd {
        DecisionsCommand::List(args) => list(args).await,
        DecisionsCommand::Add(args) => add(args).await,
        DecisionsCommand::Revoke(args) => revoke(args).await,
        DecisionsCommand::Check(args) => check(args).await,
    }
}

async fn client(server: &ServerArgs) -> anyhow::Result<EnforcementServiceClient<Channel>> {
    Ok(EnforcementServiceClient::new(server.channel().await?))
}

/// A failed call as one readable error: the server's message and every
/// field it names.
fn failed(status: tonic::Status) -> anyhow::Error {
    use tonic_types::StatusExt;
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(br) = status.get_details_bad_request() {
        for v in br.field_violations {
            text.push_str(&format!("\n  {}: {}", v.field, v.description));
        }
    }
    anyhow::anyhow!(text)
}

/// Parses `90`, `90s`, `15m`, `4h`, `7d` into seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<u32> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("`{s}` is not a duration such as 3600, 90m, 4h or 7d"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("unknown unit in `{s}` (use s, m, h or d)"),
    };
    u32::try_from(n.saturating_mul(factor)).with_context(|| format!("`{s}` is too long"))
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn scope_name(v: i32) -> &'static str {
    match pb::DecisionScope::try_from(v) {
        Ok(pb::DecisionScope::Ip) => "ip",
        Ok(pb::DecisionScope::Cidr) => "cidr",
        Ok(pb::DecisionScope::Actor) => "actor",
        _ => "?",
    }
}

fn type_name(v: i32) -> &'static str {
    match pb::DecisionType::try_from(v) {
        Ok(pb::DecisionType::Ban) => "ban",
        Ok(pb::DecisionType::Allow) => "allow",
        Ok(pb::DecisionType::Throttle) => "throttle",
        _ => "?",
    }
}

fn state_name(v: i32) -> &'static str {
    match pb::DecisionState::try_from(v) {
        Ok(pb::DecisionState::Active) => "active",
        Ok(pb::DecisionState::Expired) => "expired",
        Ok(pb::DecisionState::Revoked) => "revoked",
        _ => "?",
    }
}

fn origin_name(o: &Option<pb::DecisionOrigin>) -> (String, String) {
    let Some(o) = o else {
        return (String::new(), String::new());
    };
    let kind = match pb::DecisionOriginKind::try_from(o.kind) {
        Ok(pb::DecisionOriginKind::Manual) => "manual",
        Ok(pb::DecisionOriginKind::PlaybookRun) => "playbook_run",
        Ok(pb::DecisionOriginKind::Alert) => "alert",
        _ => "?",
    };
    (kind.to_owned(), o.id.clone())
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let mut c = client(&args.server).await?;
    let mut page_token = String::new();
    loop {
        let request = pb::ListDecisionsRequest {
            scope: args.scope.map_or(0, |s| s.to_pb() as i32),
            value: args.value.clone().unwrap_or_default(),
            types: args.types.iter().map(|t| t.to_pb() as i32).collect(),
            origin_id: args.origin.clone().unwrap_or_default(),
            include_inactive: args.all,
            page_size: 1000,
            page_token,
        };
        let page = c
            .list_decisions(args.server.request(request)?)
            .await
            .map_err(failed)?
            .into_inner();
        for d in &page.decisions {
            let (origin_kind, origin_id) = origin_name(&d.origin);
            if args.json {
                let line = serde_json::json!({
                    "id": d.id,
                    "scope": scope_name(d.scope),
                    "value": d.value,
                    "type": type_name(d.r#type),
                    "throttle_per_minute": d.throttle_per_minute,
                    "state": state_name(d.state),
                    "reason": d.reason,
                    "origin_kind": origin_kind,
                    "origin_id": origin_id,
                    "created_by": d.created_by,
                    "created_at": time(&d.created_at),
                    "expires_at": time(&d.expires_at),
                    "revoked_at": time(&d.revoked_at),
                    "idempotency_key": d.idempotency_key,
                });
                println!("{line}");
            } else {
                println!(
                    "{}\t{}\t{} {}\t{}\tuntil {}\t{}",
                    d.id,
                    type_name(d.r#type),
                    scope_name(d.scope),
                    d.value,
                    state_name(d.state),
                    time(&d.expires_at),
                    d.reason
                );
            }
        }
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        page_token = page.next_page_token;
    }
}

async fn add(args: AddArgs) -> anyhow::Result<()> {
    let duration_seconds = parse_duration(&args.duration).context("--duration")?;
    let mut c = client(&args.server).await?;
    let decision = pb::NewDecision {
        scope: args.scope.to_pb() as i32,
        value: args.value.clone(),
        r#type: args.kind.to_pb() as i32,
        duration_seconds,
        reason: args.reason.clone(),
        throttle_per_minute: args.throttle_per_minute,
        alert_id: args.alert.clone().unwrap_or_default(),
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
    };
    let r = c
        .create_decision(args.server.request(pb::CreateDecisionRequest {
            decision: Some(decision),
        })?)
        .await
        .map_err(failed)?
        .into_inner();
    let d = r.decision.context("the server returned no decision")?;
    eprintln!(
        "{} {} on {} {} until {} (revision {}){}",
        if r.created { "created" } else { "existing" },
        type_name(d.r#type),
        scope_name(d.scope),
        d.value,
        time(&d.expires_at),
        r.revision,
        if r.created {
            ""
        } else {
            ": this idempotency key was used before"
        }
    );
    println!("{}", d.id);
    Ok(())
}

async fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let mut c = client(&args.server).await?;
    let r = c
        .revoke_decision(args.server.request(pb::RevokeDecisionRequest {
            decision_id: args.id.clone(),
            reason: args.reason.clone(),
        })?)
        .await
        .map_err(failed)?
        .into_inner();
    let d = r.decision.context("the server returned no decision")?;
    let target = match &r.effective {
        Some(e) => format!(
            "{} {} is still under a {} until {}",
            scope_name(e.scope),
            e.value,
            type_name(e.r#type),
            time(&e.expires_at)
        ),
        None => format!("{} {} has no decision left", scope_name(d.scope), d.value),
    };
    println!(
        "decision {} {} (revision {}); {target}",
        d.id,
        state_name(d.state),
        r.revision
    );
    Ok(())
}

async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let mut c = client(&args.server).await?;
    let r = c
        .check_access(args.server.request(pb::CheckAccessRequest {
            ip: args.ip.clone().unwrap_or_default(),
            actor: args.actor.clone().unwrap_or_default(),
        })?)
        .await
        .map_err(failed)?
        .into_inner();
    let verdict = match pb::Verdict::try_from(r.verdict) {
        Ok(pb::Verdict::Allow) => "allow".to_owned(),
        Ok(pb::Verdict::Deny) => "deny".to_owned(),
        Ok(pb::Verdict::Throttle) => format!("throttle {}/min", r.throttle_per_minute),
        _ => "?".to_owned(),
    };
    match &r.decision {
        Some(e) => println!(
            "{verdict}\t{} on {} {} until {}\t{}\t{}",
            type_name(e.r#type),
            scope_name(e.scope),
            e.value,
            time(&e.expires_at),
            e.decision_id,
            e.reason
        ),
        None => println!("{verdict}\tno decision applies"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("15m").unwrap(), 900);
        assert_eq!(parse_duration("4h").unwrap(), 14_400);
        assert_eq!(parse_duration("7d").unwrap(), 604_800);
        assert!(parse_duration("4x").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("999999999999d").is_err());
    }
}
