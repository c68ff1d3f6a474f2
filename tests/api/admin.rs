//! Credentials and AdminService: who may call what, tenants, keys, validation.

use chrono::Utc;
use picket::access::auth::{KeyHasher, generate_key};
use picket::domain::{ApiKey, ScopeSet, TenantId};
use picket::grpc::pb;
use picket::storage::Backend;
use secrecy::{ExposeSecret, SecretString};
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{KEY_PEPPER, OPERATOR_TOKEN, spawn_app, with_key};

async fn calls_without_a_valid_key_are_unauthenticated(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut admin = app.admin();
    let err = admin.who_am_i(pb::WhoAmIRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("x-api-key"), "{}", err.message());
    for bad in [
        "garbage",
        "pk_0123456789abcdef_wrongsecret",
        "pk_operator_nope",
        &"x".repeat(600),
    ] {
        let err = admin
            .who_am_i(with_key(pb::WhoAmIRequest {}, bad))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{bad}");
    }
    // The right id with the wrong secret is as unknown as a wrong id.
    let (_, key) = app.tenant_with_key("acme", &[pb::Scope::Read]).await;
    let tampered = format!("{}x", &key[..key.len() - 1]);
    let err = admin
        .who_am_i(with_key(pb::WhoAmIRequest {}, &tampered))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let who = admin
        .who_am_i(with_key(pb::WhoAmIRequest {}, &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(who.tenant_name, "acme");
}

async fn wrong_scope_is_permission_denied(backend: Backend) {
    let app = spawn_app(backend).await;
    let (tenant_id, ingest_key) = app.tenant_with_key("acme", &[pb::Scope::Ingest]).await;
    let err = app
        .admin()
        .list_api_keys(with_key(
            pb::ListApiKeysRequest {
                tenant_id,
                include_inactive: false,
            },
            &ingest_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("admin"), "{}", err.message());
    // An ingest key cannot read either.
    let err = app
        .ingest()
        .query_events(with_key(pb::QueryEventsRequest::default(), &ingest_key))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

async fn revoked_and_expired_keys_stop_working(backend: Backend) {
    let app = spawn_app(backend).await;
    let (tenant_id, admin_key) = app.tenant_with_key("acme", &[pb::Scope::Admin]).await;
    let reader = app.key_for(&tenant_id, &[pb::Scope::Read]).await;
    let reader_id = reader.split('_').nth(1).unwrap().to_owned();
    let mut admin = app.admin();
    assert!(
        admin
            .who_am_i(with_key(pb::WhoAmIRequest {}, &reader))
            .await
            .is_ok()
    );
    let revoked = admin
        .revoke_api_key(with_key(
            pb::RevokeApiKeyRequest {
                key_id: reader_id.clone(),
            },
            &admin_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert!(revoked.revoked_at.is_some());
    let err = admin
        .who_am_i(with_key(pb::WhoAmIRequest {}, &reader))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("revoked"));

    // A key whose expiry has passed (written straight to the store).
    let hasher = KeyHasher::new(SecretString::from(KEY_PEPPER.to_owned()));
    let generated = generate_key();
    let now = Utc::now();
    app.store
        .create_api_key(&ApiKey {
            id: generated.id.clone(),
            tenant_id: TenantId::parse(&tenant_id, "t").unwrap(),
            name: "old".into(),
            scopes: ScopeSet::all(),
            secret_hash: hasher.hash(generated.secret.expose_secret()),
            created_at: now - chrono::Duration::days(2),
            expires_at: Some(now - chrono::Duration::days(1)),
            revoked_at: None,
        })
        .await
        .unwrap();
    let err = admin
        .who_am_i(with_key(
            pb::WhoAmIRequest {},
            generated.secret.expose_secret(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"));

    // Listing hides inactive keys unless asked.
    let active = admin
        .list_api_keys(with_key(
            pb::ListApiKeysRequest {
                tenant_id: String::new(),
                include_inactive: false,
            },
            &admin_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(active.len(), 1);
    let all = admin
        .list_api_keys(with_key(
            pb::ListApiKeysRequest {
                tenant_id: String::new(),
                include_inactive: true,
            },
            &admin_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(all.len(), 3);
}

async fn tenant_keys_cannot_reach_other_tenants(backend: Backend) {
    let app = spawn_app(backend).await;
    let (tenant_a, admin_a) = app.tenant_with_key("alpha", &[pb::Scope::Admin]).await;
    let (tenant_b, admin_b) = app.tenant_with_key("bravo", &[pb::Scope::Admin]).await;
    let mut admin = app.admin();
    // Naming another tenant is refused; the tenant comes from the key.
    let err = admin
        .list_api_keys(with_key(
            pb::ListApiKeysRequest {
                tenant_id: tenant_b.clone(),
                include_inactive: true,
            },
            &admin_a,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = admin
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                tenant_id: tenant_b.clone(),
                name: "sneaky".into(),
                scopes: vec![pb::Scope::Admin as i32],
                expires_at: None,
            },
            &admin_a,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Revoking B's key with A's admin key: not found (A cannot even see it).
    let b_key_id = admin_b.split('_').nth(1).unwrap().to_owned();
    let err = admin
        .revoke_api_key(with_key(
            pb::RevokeApiKeyRequest { key_id: b_key_id },
            &admin_a,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        admin
            .who_am_i(with_key(pb::WhoAmIRequest {}, &admin_b))
            .await
            .is_ok()
    );
    // A's listing shows only A's keys.
    let keys = admin
        .list_api_keys(with_key(
            pb::ListApiKeysRequest {
                tenant_id: String::new(),
                include_inactive: true,
            },
            &admin_a,
        ))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(keys.iter().all(|k| k.tenant_id == tenant_a));
    // Tenant keys cannot create or list tenants.
    let err = admin
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name: "x".into(),
                ..Default::default()
            },
            &admin_a,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = admin
        .list_tenants(with_key(pb::ListTenantsRequest::default(), &admin_a))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

async fn tenants_are_managed_by_the_operator(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut admin = app.admin();
    for name in ["charlie", "alpha", "bravo"] {
        admin
            .create_tenant(with_key(
                pb::CreateTenantRequest {
                    name: name.into(),
                    display_name: String::new(),
                    retention_days: 30,
                },
                OPERATOR_TOKEN,
            ))
            .await
            .unwrap();
    }
    let err = admin
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name: "alpha".into(),
                ..Default::default()
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // Paging by name, no gaps or repeats.
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_tenants(with_key(
                pb::ListTenantsRequest {
                    page_size: 2,
                    page_token: token.clone(),
                },
                OPERATOR_TOKEN,
            ))
            .await
            .unwrap()
            .into_inner();
        names.extend(page.tenants.into_iter().map(|t| t.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, ["alpha", "bravo", "charlie"]);

    // The operator must name the tenant of tenant-scoped calls.
    let err = admin
        .get_tenant(with_key(
            pb::GetTenantRequest {
                tenant_id: String::new(),
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let who = admin
        .who_am_i(with_key(pb::WhoAmIRequest {}, OPERATOR_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert!(who.operator);
}

async fn invalid_arguments_name_the_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut admin = app.admin();
    let err = admin
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name: "Not Valid".into(),
                ..Default::default()
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let br = err.get_details_bad_request().expect("BadRequest details");
    assert_eq!(br.field_violations[0].field, "name");

    let (tenant_id, _) = app.tenant_with_key("acme", &[pb::Scope::Read]).await;
    let err = admin
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                tenant_id: tenant_id.clone(),
                name: "k".into(),
                scopes: vec![pb::Scope::Read as i32, 99],
                expires_at: None,
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "scopes[1]"
    );
    let err = admin
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                tenant_id: tenant_id.clone(),
                name: "k".into(),
                scopes: vec![pb::Scope::Read as i32],
                expires_at: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "expires_at"
    );
    let err = admin
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                tenant_id: "not-a-uuid".into(),
                name: "k".into(),
                scopes: vec![pb::Scope::Read as i32],
                expires_at: None,
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "tenant_id"
    );
    let err = admin
        .update_tenant(with_key(
            pb::UpdateTenantRequest {
                tenant_id,
                update_mask: vec!["retention_days".into(), "name".into()],
                display_name: String::new(),
                retention_days: 10,
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "update_mask[1]"
    );
}

crate::both_backends!(
    calls_without_a_valid_key_are_unauthenticated,
    wrong_scope_is_permission_denied,
    revoked_and_expired_keys_stop_working,
    tenant_keys_cannot_reach_other_tenants,
    tenants_are_managed_by_the_operator,
    invalid_arguments_name_the_field,
);
