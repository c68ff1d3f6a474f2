//! Bad input never harms anything else, and is answered in plain terms
//! (issue 11): undecodable strings, oversized messages, readable error
//! details over reflection, database errors without internal text.

use picket::grpc::pb;
use picket::storage::Backend;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{self, RawCodec, spawn_app, with_key};
use crate::ingest::login;

/// `msg` encoded, with the bytes `@@@@` replaced by four bytes that are not UTF-8.
fn with_invalid_utf8(msg: &impl Message) -> Vec<u8> {
    let mut bytes = msg.encode_to_vec();
    let at = bytes.windows(4).position(|w| w == b"@@@@").unwrap();
    bytes[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
    bytes
}

fn violation(status: &tonic::Status) -> (String, String) {
    let v = &status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest details: {status:?}"))
        .field_violations[0];
    (v.field.clone(), v.description.clone())
}

/// Item 2: a string that is not UTF-8 is INVALID_ARGUMENT naming the event
/// and the field, on Ingest and IngestStream, and the server carries on.
async fn invalid_utf8_is_an_invalid_argument_naming_the_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app.tenant_with_key("acme", &[pb::Scope::Ingest]).await;
    let mut bad = login("k2", "@@@@", "", true);
    bad.http = Some(pb::HttpDetails::default());
    let request = pb::IngestRequest {
        events: vec![login("k1", "alice", "", true), bad.clone()],
    };
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    let err = grpc
        .unary::<Vec<u8>, pb::IngestResponse, _>(
            with_key(with_invalid_utf8(&request), &key),
            http::uri::PathAndQuery::from_static("/picket.v1.IngestService/Ingest"),
            RawCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        violation(&err),
        ("events[1].actor".into(), "must be valid UTF-8".into())
    );
    assert!(!err.message().contains("Protobuf"), "{}", err.message());

    // The stream form: the good batch is acknowledged, then the stream ends
    // with the same field violation.
    let good = pb::IngestStreamRequest {
        sequence: 1,
        events: vec![login("s1", "alice", "", true)],
    }
    .encode_to_vec();
    let poisoned = with_invalid_utf8(&pb::IngestStreamRequest {
        sequence: 2,
        events: vec![bad],
    });
    grpc.ready().await.unwrap();
    let items: Vec<_> = grpc
        .streaming::<_, Vec<u8>, pb::IngestStreamResponse, _>(
            with_key(tokio_stream::iter(vec![good, poisoned]), &key),
            http::uri::PathAndQuery::from_static("/picket.v1.IngestService/IngestStream"),
            RawCodec::default(),
        )
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let acked: Vec<u64> = items
        .iter()
        .filter_map(|i| i.as_ref().ok().map(|a| a.sequence))
        .collect();
    assert_eq!(acked, [1]);
    let status = items.iter().find_map(|i| i.as_ref().err()).unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violation(status).0, "events[0].actor");

    let ok = app
        .ingest()
        .ingest(with_key(
            pb::IngestRequest {
                events: vec![login("after", "alice", "", true)],
            },
            &key,
        ))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

/// Item 3: a message over `--max-message-bytes` is RESOURCE_EXHAUSTED on a
/// stream too (the unary case is in server.rs).
async fn oversized_stream_messages_are_resource_exhausted(backend: Backend) {
    let db = common::TestDb::new(backend).await;
    let mut settings = common::test_settings(&db);
    settings.max_message_bytes = 16 * 1024;
    let app = common::spawn_with(db, settings).await;
    let (_, key) = app.tenant_with_key("acme", &[pb::Scope::Ingest]).await;
    let mut big = login("big", "alice", "", true);
    big.attributes.insert("note".into(), "x".repeat(4000));
    let batches = vec![pb::IngestStreamRequest {
        sequence: 1,
        events: vec![big; 5],
    }];
    let items: Vec<_> = app
        .ingest()
        .ingest_stream(with_key(tokio_stream::iter(batches), &key))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let status = items.iter().find_map(|i| i.as_ref().err()).unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("16384"), "{}", status.message());
}

/// Item 5: reflection serves google/rpc/error_details.proto (and status.proto),
/// so grpcurl can print BadRequest, RetryInfo and RequestInfo; v1 and v1alpha.
async fn reflection_serves_the_error_details(backend: Backend) {
    use tonic_reflection::pb::{v1, v1alpha};
    let app = spawn_app(backend).await;
    let files = |protos: Vec<Vec<u8>>| -> Vec<prost_types::FileDescriptorProto> {
        protos
            .iter()
            .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap())
            .collect()
    };
    for symbol in [
        "google.rpc.BadRequest",
        "google.rpc.RetryInfo",
        "google.rpc.Status",
    ] {
        let mut client =
            v1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
        let resp = client
            .server_reflection_info(tokio_stream::once(v1::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(
                    v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                        symbol.into(),
                    ),
                ),
            }))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(fd)) =
            resp.message_response
        else {
            panic!("v1: no file for {symbol}: {resp:?}");
        };
        let files = files(fd.file_descriptor_proto);
        let name = symbol.rsplit('.').next().unwrap();
        assert!(
            files.iter().any(|f| f.name().starts_with("google/rpc/")
                && f.message_type.iter().any(|m| m.name() == name)),
            "v1: {symbol} not in {:?}",
            files.iter().map(|f| f.name()).collect::<Vec<_>>()
        );
    }
    let mut alpha =
        v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let resp = alpha
        .server_reflection_info(tokio_stream::once(v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "google.rpc.BadRequest".into(),
                ),
            ),
        }))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(fd)) =
        resp.message_response
    else {
        panic!("v1alpha: no file for google.rpc.BadRequest: {resp:?}");
    };
    let files = files(fd.file_descriptor_proto);
    assert!(
        files
            .iter()
            .any(|f| f.name() == "google/rpc/error_details.proto"),
        "{:?}",
        files.iter().map(|f| f.name()).collect::<Vec<_>>()
    );
}

/// Item 6: `picket migrate` and `picket serve` against a database that does
/// not exist tell the user which one (host, port, name), without the password
/// and without Postgres's internal text (kept in the log).
#[test]
fn a_missing_database_is_named_without_internal_text() {
    let admin = common::postgres_admin_url();
    let (base, _) = admin.rsplit_once('/').unwrap();
    // The same server, with a password in the URL (trust ignores it).
    let base = base.replacen("postgres://postgres@", "postgres://postgres:s3cret-pw@", 1);
    let name = format!("picket_missing_{}", uuid::Uuid::new_v4().simple());
    let url = format!("{base}/{name}");
    for args in [&["migrate"][..], &["serve", "--listen", "127.0.0.1:0"][..]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_picket"))
            .args(["--log-format", "json"])
            .args(args)
            .env("PICKET_DATABASE_URL", &url)
            .env("PICKET_ADMIN_TOKEN", common::OPERATOR_TOKEN)
            .env("PICKET_KEY_PEPPER", common::KEY_PEPPER)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run picket");
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Log lines are JSON; what the user reads is the rest.
        let (log, user): (Vec<&str>, Vec<&str>) = stderr.lines().partition(|l| l.starts_with('{'));
        let user = user.join("\n");
        assert!(user.contains(&name), "{args:?}: {user}");
        assert!(user.contains("127.0.0.1:5432"), "{args:?}: {user}");
        assert!(user.contains("does not exist"), "{args:?}: {user}");
        assert!(!user.contains("at line"), "{args:?}: {user}");
        assert!(!stderr.contains("s3cret-pw"), "{args:?}: {stderr}");
        // The database's own text stays in the log.
        assert!(
            log.iter().any(|l| l.contains("does not exist at line")),
            "{args:?}: {stderr}"
        );
    }
}

crate::both_backends!(
    invalid_utf8_is_an_invalid_argument_naming_the_field,
    oversized_stream_messages_are_resource_exhausted,
    reflection_serves_the_error_details,
);
