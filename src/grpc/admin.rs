//! `picket.v1.AdminService`: tenants, API keys, webhook sources, rules and event purge.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::ExposeSecret;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::access::admin;
use crate::access::auth::Caller;
use crate::domain::{NewApiKey, Scope};
use crate::error::AppError;
use crate::grpc::convert::{
    from_timestamp, key_to_pb, page_size, scope_to_pb, scopes_from_pb, tenant_to_pb,
    webhook_source_to_pb,
};
use crate::grpc::pb::admin_service_server::AdminService;
use crate::grpc::status::to_status;
use crate::grpc::{ApiContext, pb, rules};
use crate::webhooks;

/// AdminService implementation.
pub struct AdminApi {
    /// Shared per-server context.
    ctx: Arc<ApiContext>,
}

impl AdminApi {
    /// A service over `ctx`.
    pub fn new(ctx: Arc<ApiContext>) -> Self {
        Self { ctx }
    }
}

/// The tenant a by-id request is confined to: a tenant key's own (another
/// tenant's id is then NOT_FOUND); `None` for the operator, who may act on any.
fn own_tenant(caller: &Caller) -> Option<crate::domain::TenantId> {
    match caller {
        Caller::Operator => None,
        Caller::Key { tenant_id, .. } => Some(*tenant_id),
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    #[instrument(skip_all, fields(rpc = "AdminService.WhoAmI", tenant))]
    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let credential = request
            .metadata()
            .get(crate::access::auth::API_KEY_HEADER)
            .and_then(|v| v.to_str().ok());
        let caller = self
            .ctx
            .auth
            .authenticate(credential)
            .await
            .map_err(to_status)?;
        let response = match &caller {
            Caller::Operator => pb::WhoAmIResponse {
                operator: true,
                key_id: "operator".into(),
                scopes: Scope::ALL.iter().map(|s| scope_to_pb(*s) as i32).collect(),
                ..Default::default()
            },
            Caller::Key {
                tenant_id,
                key_id,
                scopes,
            } => {
                let tenant = self
                    .ctx
                    .store
                    .get_tenant(*tenant_id)
                    .await
                    .map_err(|e| to_status(e.into()))?;
                pb::WhoAmIResponse {
                    operator: false,
                    tenant_id: tenant.id.to_string(),
                    tenant_name: tenant.name,
                    key_id: key_id.to_string(),
                    scopes: scopes.iter().map(|s| scope_to_pb(s) as i32).collect(),
                }
            }
        };
        Ok(Response::new(response))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.CreateTenant", tenant))]
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        caller.require_operator().map_err(to_status)?;
        let req = request.into_inner();
        let tenant = admin::create_tenant(
            self.ctx.store.as_ref(),
            &req.name,
            &req.display_name,
            req.retention_days,
        )
        .await
        .map_err(to_status)?;
        Ok(Response::new(pb::CreateTenantResponse {
            tenant: Some(tenant_to_pb(&tenant)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.GetTenant", tenant))]
    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::GetTenantResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let id = caller
            .tenant_for(&request.get_ref().tenant_id, "tenant_id")
            .map_err(to_status)?;
        let tenant = self
            .ctx
            .store
            .get_tenant(id)
            .await
            .map_err(|e| to_status(e.into()))?;
        Ok(Response::new(pb::GetTenantResponse {
            tenant: Some(tenant_to_pb(&tenant)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.ListTenants", tenant))]
    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        caller.require_operator().map_err(to_status)?;
        let req = request.into_inner();
        let limit = page_size(req.page_size, 100, 1000).map_err(to_status)?;
        let after = if req.page_token.is_empty() {
            None
        } else {
            let raw = URL_SAFE_NO_PAD
                .decode(&req.page_token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    to_status(AppError::invalid("page_token", "malformed page token"))
                })?;
            Some(raw)
        };
        let mut tenants = self
            .ctx
            .store
            .list_tenants(after.as_deref(), limit + 1)
            .await
            .map_err(|e| to_status(e.into()))?;
        let next_page_token = if tenants.len() > limit as usize {
            tenants.truncate(limit as usize);
            URL_SAFE_NO_PAD.encode(
                tenants
                    .last()
                    .map(|t| t.name.as_bytes())
                    .unwrap_or_default(),
            )
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: tenants.iter().map(tenant_to_pb).collect(),
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.UpdateTenant", tenant))]
    async fn update_tenant(
        &self,
        request: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::UpdateTenantResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let req = request.into_inner();
        let id = caller
            .tenant_for(&req.tenant_id, "tenant_id")
            .map_err(to_status)?;
        let mut tenant = self
            .ctx
            .store
            .get_tenant(id)
            .await
            .map_err(|e| to_status(e.into()))?;
        if req.update_mask.is_empty() {
            return Err(to_status(AppError::invalid(
                "update_mask",
                "name at least one field to change",
            )));
        }
        for (i, field) in req.update_mask.iter().enumerate() {
            match field.as_str() {
                "display_name" => {
                    admin::check_display_name(&req.display_name, "display_name")
                        .map_err(to_status)?;
                    tenant.display_name = req.display_name.clone();
                }
                "retention_days" => {
                    admin::check_retention(req.retention_days, "retention_days")
                        .map_err(to_status)?;
                    tenant.retention_days = req.retention_days;
                }
                other => {
                    return Err(to_status(AppError::invalid(
                        format!("update_mask[{i}]"),
                        format!("`{other}` cannot be updated (display_name, retention_days)"),
                    )));
                }
            }
        }
        self.ctx
            .store
            .update_tenant(&tenant)
            .await
            .map_err(|e| to_status(e.into()))?;
        Ok(Response::new(pb::UpdateTenantResponse {
            tenant: Some(tenant_to_pb(&tenant)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.CreateApiKey", tenant))]
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let req = request.into_inner();
        let tenant_id = caller
            .tenant_for(&req.tenant_id, "tenant_id")
            .map_err(to_status)?;
        let scopes = scopes_from_pb(&req.scopes).map_err(to_status)?;
        let expires_at = req
            .expires_at
            .as_ref()
            .map(|t| from_timestamp(t, "expires_at"))
            .transpose()
            .map_err(to_status)?;
        let (key, secret) = admin::create_key(
            self.ctx.store.as_ref(),
            self.ctx.auth.hasher(),
            NewApiKey {
                tenant_id,
                name: req.name,
                scopes,
                expires_at,
            },
        )
        .await
        .map_err(to_status)?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            key: Some(key_to_pb(&key)),
            secret: secret.expose_secret().to_owned(),
        }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.ListApiKeys", tenant))]
    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let req = request.into_inner();
        let tenant_id = caller
            .tenant_for(&req.tenant_id, "tenant_id")
            .map_err(to_status)?;
        let now = chrono::Utc::now();
        let keys = self
            .ctx
            .store
            .list_api_keys(tenant_id)
            .await
            .map_err(|e| to_status(e.into()))?;
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys
                .iter()
                .filter(|k| req.include_inactive || k.is_active(now))
                .map(key_to_pb)
                .collect(),
        }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.RevokeApiKey", tenant))]
    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let key = admin::revoke_key(
            self.ctx.store.as_ref(),
            own_tenant(&caller),
            &request.get_ref().key_id,
        )
        .await
        .map_err(to_status)?;
        // At once here; other replicas within the key cache's lifetime.
        self.ctx.auth.forget(&key.id);
        Ok(Response::new(pb::RevokeApiKeyResponse {
            key: Some(key_to_pb(&key)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.CreateWebhookSource", tenant))]
    async fn create_webhook_source(
        &self,
        request: Request<pb::CreateWebhookSourceRequest>,
    ) -> Result<Response<pb::CreateWebhookSourceResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let req = request.into_inner();
        let tenant = caller
            .tenant_for(&req.tenant_id, "tenant_id")
            .map_err(to_status)?;
        let (source, secret) = webhooks::create_source(
            self.ctx.store.as_ref(),
            &self.ctx.secrets,
            tenant,
            &req.name,
            req.allow_body_only_signature,
        )
        .await
        .map_err(to_status)?;
        Ok(Response::new(pb::CreateWebhookSourceResponse {
            source: Some(webhook_source_to_pb(&source)),
            secret: secret.expose_secret().to_owned(),
        }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.ListWebhookSources", tenant))]
    async fn list_webhook_sources(
        &self,
        request: Request<pb::ListWebhookSourcesRequest>,
    ) -> Result<Response<pb::ListWebhookSourcesResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let tenant = caller
            .tenant_for(&request.get_ref().tenant_id, "tenant_id")
            .map_err(to_status)?;
        let sources = self
            .ctx
            .store
            .list_webhook_sources(tenant)
            .await
            .map_err(|e| to_status(e.into()))?;
        Ok(Response::new(pb::ListWebhookSourcesResponse {
            sources: sources.iter().map(webhook_source_to_pb).collect(),
        }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.RotateWebhookSecret", tenant))]
    async fn rotate_webhook_secret(
        &self,
        request: Request<pb::RotateWebhookSecretRequest>,
    ) -> Result<Response<pb::RotateWebhookSecretResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let id = webhooks::parse_source_id(&request.get_ref().source_id, "source_id")
            .map_err(to_status)?;
        let (source, secret) = webhooks::rotate_secret(
            self.ctx.store.as_ref(),
            &self.ctx.secrets,
            own_tenant(&caller),
            id,
        )
        .await
        .map_err(to_status)?;
        Ok(Response::new(pb::RotateWebhookSecretResponse {
            source: Some(webhook_source_to_pb(&source)),
            secret: secret.expose_secret().to_owned(),
        }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.DeleteWebhookSource", tenant))]
    async fn delete_webhook_source(
        &self,
        request: Request<pb::DeleteWebhookSourceRequest>,
    ) -> Result<Response<pb::DeleteWebhookSourceResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let id = webhooks::parse_source_id(&request.get_ref().source_id, "source_id")
            .map_err(to_status)?;
        webhooks::delete_source(self.ctx.store.as_ref(), own_tenant(&caller), id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteWebhookSourceResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.CreateRule", tenant))]
    async fn create_rule(
        &self,
        request: Request<pb::CreateRuleRequest>,
    ) -> Result<Response<pb::CreateRuleResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let req = request.into_inner();
        let tenant = caller
            .tenant_for(&req.tenant_id, "tenant_id")
            .map_err(to_status)?;
        let rule = rules::create(&self.ctx, tenant, &req.sigma_yaml, req.enabled)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CreateRuleResponse { rule: Some(rule) }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.GetRule", tenant))]
    async fn get_rule(
        &self,
        request: Request<pb::GetRuleRequest>,
    ) -> Result<Response<pb::GetRuleResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let req = request.into_inner();
        let tenant = caller
            .tenant_for(&req.tenant_id, "tenant_id")
            .map_err(to_status)?;
        let rule = rules::get(&self.ctx, tenant, &req.rule_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetRuleResponse { rule: Some(rule) }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.ListRules", tenant))]
    async fn list_rules(
        &self,
        request: Request<pb::ListRulesRequest>,
    ) -> Result<Response<pb::ListRulesResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let tenant = caller
            .tenant_for(&request.get_ref().tenant_id, "tenant_id")
            .map_err(to_status)?;
        let rules = rules::list(&self.ctx, tenant).await.map_err(to_status)?;
        Ok(Response::new(pb::ListRulesResponse { rules }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.UpdateRule", tenant))]
    async fn update_rule(
        &self,
        request: Request<pb::UpdateRuleRequest>,
    ) -> Result<Response<pb::UpdateRuleResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let req = request.into_inner();
        let tenant = caller
            .tenant_for(&req.tenant_id, "tenant_id")
            .map_err(to_status)?;
        let rule = rules::update(&self.ctx, tenant, &req.rule_id, &req.sigma_yaml)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::UpdateRuleResponse { rule: Some(rule) }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.SetRuleEnabled", tenant))]
    async fn set_rule_enabled(
        &self,
        request: Request<pb::SetRuleEnabledRequest>,
    ) -> Result<Response<pb::SetRuleEnabledResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let req = request.into_inner();
        let tenant = caller
            .tenant_for(&req.tenant_id, "tenant_id")
            .map_err(to_status)?;
        let rule = rules::set_enabled(&self.ctx, tenant, &req.rule_id, req.enabled)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::SetRuleEnabledResponse {
            rule: Some(rule),
        }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.ValidateRule", tenant))]
    async fn validate_rule(
        &self,
        request: Request<pb::ValidateRuleRequest>,
    ) -> Result<Response<pb::ValidateRuleResponse>, Status> {
        self.ctx.caller(&request, Scope::Admin).await?;
        let errors = rules::validate(&self.ctx.rules.current(), &request.get_ref().sigma_yaml);
        Ok(Response::new(pb::ValidateRuleResponse {
            valid: errors.is_empty(),
            errors,
        }))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.DeleteRule", tenant))]
    async fn delete_rule(
        &self,
        request: Request<pb::DeleteRuleRequest>,
    ) -> Result<Response<pb::DeleteRuleResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let req = request.into_inner();
        let tenant = caller
            .tenant_for(&req.tenant_id, "tenant_id")
            .map_err(to_status)?;
        rules::delete(&self.ctx, tenant, &req.rule_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteRuleResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "AdminService.PurgeEvents", tenant))]
    async fn purge_events(
        &self,
        request: Request<pb::PurgeEventsRequest>,
    ) -> Result<Response<pb::PurgeEventsResponse>, Status> {
        let caller = self.ctx.caller(&request, Scope::Admin).await?;
        let req = request.into_inner();
        let tenant = caller
            .tenant_for(&req.tenant_id, "tenant_id")
            .map_err(to_status)?;
        let before = req
            .before
            .as_ref()
            .ok_or_else(|| to_status(AppError::invalid("before", "required")))
            .and_then(|t| from_timestamp(t, "before").map_err(to_status))?;
        let deleted = self
            .ctx
            .store
            .purge_events(tenant, before)
            .await
            .map_err(|e| to_status(e.into()))?;
        tracing::info!(tenant_id = %tenant, deleted, actor = %caller.actor(), "events purged");
        Ok(Response::new(pb::PurgeEventsResponse { deleted }))
    }
}
