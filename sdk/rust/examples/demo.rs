//! The README's "Rust SDK" example: a client, the tower layer on an axum app
//! with enforcement, two requests through it, then `close()`.
//!
//! `PICKET_API_KEY=... cargo run -p picket-client --example demo`, with a
//! server on 127.0.0.1:50051 and a key with the ingest and read scopes.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path};
use axum::http::{HeaderName, Request};
use axum::routing::get;
use picket_client::{ActivityEvent, ClientConfig, FailureMode, SecurityLayer, TelemetryClient};
use tower::ServiceExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = TelemetryClient::new(ClientConfig {
        service_name: "billing-api".into(),
        environment: "production".into(),
        ..ClientConfig::new(std::env::var("PICKET_API_KEY")?, "http://127.0.0.1:50051")
    })?;
    client.enqueue_event(
        ActivityEvent::new("user.login")
            .actor("alice@example.com")
            .ip("203.0.113.9")
            .action("login")
            .resource("/login")
            .extra("mfa", "true"),
    );

    let layer = SecurityLayer::new(&client)
        .exclude_paths(["/health"])
        .actor_header(HeaderName::from_static("x-user-id"))
        .trusted_proxies(["127.0.0.1"])?
        .enforce(FailureMode::LastKnown);
    let app = Router::new()
        .route(
            "/invoices/{invoice_id}",
            get(|Path(id): Path<String>| async move { id }),
        )
        .layer(layer);
    // In a server: axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).

    // Only so that the first request already sees the bans.
    client
        .decisions(FailureMode::LastKnown)
        .wait_synced(Duration::from_secs(5))
        .await;
    // The app in process, as a server would call it, from a trusted proxy's address.
    let peer = ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000)));
    let mut statuses = Vec::new();
    for request in [
        Request::get("/invoices/42").header("x-user-id", "alice@example.com"),
        Request::get("/invoices/43").header("x-forwarded-for", "203.0.113.7"),
    ] {
        let response = app
            .clone()
            .oneshot(request.extension(peer).body(Body::empty())?)
            .await?;
        statuses.push(response.status().as_u16().to_string());
        // The event is recorded when the response body has been sent.
        axum::body::to_bytes(response.into_body(), 1 << 20).await?;
    }
    println!("{}", statuses.join(" "));
    println!("{:?}", client.close().await);
    Ok(())
}
