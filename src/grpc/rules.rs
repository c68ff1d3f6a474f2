//! The rule RPCs of `AdminService`: a tenant's own Sigma rules and its
//! enable/disable overrides of the server's built-in and directory rules.

use chrono::Utc;

use crate::detect::{RuleOrigin, RuleSet, RuleSource, behavior};
use crate::domain::rule::TenantRule;
use crate::domain::{FieldViolation, TenantId};
use crate::error::{AppError, AppResult};
use crate::grpc::convert::timestamp;
use crate::grpc::{ApiContext, pb};

/// Largest rule text, in bytes.
const MAX_RULE_BYTES: usize = 64 * 1024;

fn origin_to_pb(o: RuleOrigin) -> pb::RuleOrigin {
    match o {
        RuleOrigin::Builtin => pb::RuleOrigin::Builtin,
        RuleOrigin::Directory => pb::RuleOrigin::Directory,
        RuleOrigin::Tenant => pb::RuleOrigin::Tenant,
    }
}

/// Problems in `yaml` (checked against the server's rules, so correlations may
/// reference them), as protobuf.
pub fn validate(base: &RuleSet, yaml: &str) -> Vec<pb::RuleError> {
    if yaml.len() > MAX_RULE_BYTES {
        return vec![pb::RuleError {
            line: 0,
            column: 0,
            message: format!("at most {MAX_RULE_BYTES} bytes"),
        }];
    }
    base.validate(yaml)
        .into_iter()
        .map(|e| pb::RuleError {
            line: e.line,
            column: e.column,
            message: e.message,
        })
        .collect()
}

/// Compiles a tenant rule; returns its (id, title) or INVALID_ARGUMENT whose
/// violations point at the bad lines.
fn compile(base: &RuleSet, yaml: &str) -> AppResult<(String, String)> {
    let errors = validate(base, yaml);
    if !errors.is_empty() {
        return Err(AppError::InvalidArgument(
            errors
                .into_iter()
                .map(|e| {
                    FieldViolation::new(
                        "sigma_yaml",
                        format!("line {}, column {}: {}", e.line, e.column, e.message),
                    )
                })
                .collect(),
        ));
    }
    let (set, errors) = base.extend(vec![RuleSource::new("api", RuleOrigin::Tenant, yaml)]);
    if let Some(e) = errors.first() {
        let msg = e
            .errors
            .first()
            .map(|x| x.message.clone())
            .unwrap_or_else(|| "rule rejected".into());
        return Err(AppError::invalid("sigma_yaml", msg));
    }
    let info = set
        .rules()
        .find(|r| r.origin == RuleOrigin::Tenant)
        .ok_or_else(|| AppError::invalid("sigma_yaml", "no rule in the text"))?;
    Ok((info.id.clone(), info.title.clone()))
}

fn tenant_rule_to_pb(r: &TenantRule) -> pb::Rule {
    pb::Rule {
        id: r.rule_id.clone(),
        title: r.title.clone(),
        sigma_yaml: r.sigma_yaml.clone().unwrap_or_default(),
        enabled: r.enabled,
        origin: pb::RuleOrigin::Tenant as i32,
        created_at: Some(timestamp(r.created_at)),
        updated_at: Some(timestamp(r.updated_at)),
    }
}

/// Every rule the tenant sees: server rules (with the tenant's overrides),
/// behavioural detectors, and the tenant's own rules, by title.
pub async fn list(ctx: &ApiContext, tenant: TenantId) -> AppResult<Vec<pb::Rule>> {
    let own = ctx.store.list_tenant_rules(tenant).await?;
    let override_of = |id: &str| {
        own.iter()
            .find(|r| r.rule_id == id && r.sigma_yaml.is_none())
    };
    let mut out = Vec::new();
    let base = ctx.rules.current();
    for info in base.rules() {
        let o = override_of(&info.id);
        out.push(pb::Rule {
            id: info.id.clone(),
            title: info.title.clone(),
            sigma_yaml: info.yaml.clone(),
            enabled: o.is_none_or(|o| o.enabled),
            origin: origin_to_pb(info.origin) as i32,
            created_at: None,
            updated_at: o.map(|o| timestamp(o.updated_at)),
        });
    }
    for b in behavior::DETECTORS {
        let o = override_of(b.id);
        out.push(pb::Rule {
            id: b.id.to_owned(),
            title: b.title.to_owned(),
            sigma_yaml: String::new(),
            enabled: o.is_none_or(|o| o.enabled),
            origin: pb::RuleOrigin::Builtin as i32,
            created_at: None,
            updated_at: o.map(|o| timestamp(o.updated_at)),
        });
    }
    out.extend(
        own.iter()
            .filter(|r| r.sigma_yaml.is_some())
            .map(tenant_rule_to_pb),
    );
    out.sort_by(|a, b| a.title.cmp(&b.title).then_with(|| a.id.cmp(&b.id)));
    Ok(out)
}

/// One rule the tenant sees.
pub async fn get(ctx: &ApiContext, tenant: TenantId, id: &str) -> AppResult<pb::Rule> {
    list(ctx, tenant)
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(|| AppError::NotFound(format!("rule {id}")))
}

fn is_server_rule(ctx: &ApiContext, id: &str) -> Option<String> {
    ctx.rules
        .current()
        .get(id)
        .map(|r| r.title.clone())
        .or_else(|| {
            behavior::DETECTORS
                .iter()
                .find(|b| b.id == id)
                .map(|b| b.title.to_owned())
        })
}

/// Adds a tenant rule.
pub async fn create(
    ctx: &ApiContext,
    tenant: TenantId,
    yaml: &str,
    enabled: bool,
) -> AppResult<pb::Rule> {
    let (id, title) = compile(&ctx.rules.current(), yaml)?;
    if is_server_rule(ctx, &id).is_some() {
        return Err(AppError::AlreadyExists(format!(
            "a built-in or directory rule already has id {id}"
        )));
    }
    let now = Utc::now();
    let rule = TenantRule {
        tenant_id: tenant,
        rule_id: id,
        title,
        sigma_yaml: Some(yaml.to_owned()),
        enabled,
        created_at: now,
        updated_at: now,
    };
    ctx.store.insert_tenant_rule(&rule).await?;
    ctx.peers.rules_changed(tenant);
    Ok(tenant_rule_to_pb(&rule))
}

async fn own_rule(ctx: &ApiContext, tenant: TenantId, id: &str) -> AppResult<Option<TenantRule>> {
    Ok(ctx
        .store
        .list_tenant_rules(tenant)
        .await?
        .into_iter()
        .find(|r| r.rule_id == id))
}

/// Replaces a tenant rule's text (its id must not change).
pub async fn update(
    ctx: &ApiContext,
    tenant: TenantId,
    id: &str,
    yaml: &str,
) -> AppResult<pb::Rule> {
    let mut rule = match own_rule(ctx, tenant, id).await? {
        Some(r) if r.sigma_yaml.is_some() => r,
        _ if is_server_rule(ctx, id).is_some() => {
            return Err(AppError::FailedPrecondition(
                "only the tenant's own rules can be changed".into(),
            ));
        }
        _ => return Err(AppError::NotFound(format!("rule {id}"))),
    };
    let (new_id, title) = compile(&ctx.rules.current(), yaml)?;
    if new_id != id {
        return Err(AppError::invalid(
            "sigma_yaml",
            format!("the rule's id must stay {id} (got {new_id})"),
        ));
    }
    rule.title = title;
    rule.sigma_yaml = Some(yaml.to_owned());
    rule.updated_at = Utc::now();
    ctx.store.save_tenant_rule(&rule).await?;
    ctx.peers.rules_changed(tenant);
    Ok(tenant_rule_to_pb(&rule))
}

/// Enables or disables any rule for the tenant.
pub async fn set_enabled(
    ctx: &ApiContext,
    tenant: TenantId,
    id: &str,
    enabled: bool,
) -> AppResult<pb::Rule> {
    let now = Utc::now();
    let rule = match own_rule(ctx, tenant, id).await? {
        Some(mut r) => {
            r.enabled = enabled;
            r.updated_at = now;
            r
        }
        None => {
            let title =
                is_server_rule(ctx, id).ok_or_else(|| AppError::NotFound(format!("rule {id}")))?;
            TenantRule {
                tenant_id: tenant,
                rule_id: id.to_owned(),
                title,
                sigma_yaml: None,
                enabled,
                created_at: now,
                updated_at: now,
            }
        }
    };
    ctx.store.save_tenant_rule(&rule).await?;
    ctx.peers.rules_changed(tenant);
    get(ctx, tenant, id).await
}

/// Deletes a tenant rule.
pub async fn delete(ctx: &ApiContext, tenant: TenantId, id: &str) -> AppResult<()> {
    match own_rule(ctx, tenant, id).await? {
        Some(r) if r.sigma_yaml.is_some() => {}
        _ if is_server_rule(ctx, id).is_some() => {
            return Err(AppError::FailedPrecondition(
                "built-in and directory rules cannot be deleted; disable them instead".into(),
            ));
        }
        _ => return Err(AppError::NotFound(format!("rule {id}"))),
    }
    ctx.store.delete_tenant_rule(tenant, id).await?;
    ctx.peers.rules_changed(tenant);
    Ok(())
}
