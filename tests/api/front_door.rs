//! The front door: what a newcomer meets on the command line. Errors are one
//! sentence and its causes (no backtrace, even with RUST_BACKTRACE=1), logs
//! to a pipe carry no colour codes, `picket ingest` fails when lines are
//! rejected, and a store refuses a key-hashing secret it was not set up with.

use std::process::{Command, Output};

use picket::grpc::pb;
use picket::server::startup::Application;
use picket::storage::Backend;
use secrecy::SecretString;

use crate::common::{TestDb, spawn_app, spawn_with, test_settings, with_key};

/// Runs the real binary with `args` and extra environment, to completion.
fn picket(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_picket"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run picket")
}

#[tokio::test]
async fn cli_errors_print_causes_and_never_a_backtrace() {
    let db = TestDb::new(Backend::Sqlite).await;
    // A port that is taken: serving must fail with a sentence.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = picket(
        &["serve", "--listen", &addr],
        &[
            ("RUST_BACKTRACE", "1"),
            ("PICKET_DATABASE_URL", &db.url),
            ("PICKET_ADMIN_TOKEN", crate::common::OPERATOR_TOKEN),
            ("PICKET_KEY_PEPPER", crate::common::KEY_PEPPER),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("error: "), "{stderr}");
    assert!(stderr.contains(&addr), "names the address: {stderr}");
    assert!(
        stderr.to_lowercase().contains("address already in use")
            || stderr.to_lowercase().contains("address in use"),
        "gives the cause: {stderr}"
    );
    assert!(
        !stderr.contains("backtrace") && !stderr.contains(" at /") && !stderr.contains("rustc"),
        "no backtrace: {stderr}"
    );
}

#[tokio::test]
async fn logs_to_a_pipe_have_no_colour_and_name_the_store() {
    use std::io::{BufRead, BufReader};
    let db = TestDb::new(Backend::Sqlite).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_picket"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("PICKET_DATABASE_URL", &db.url)
        .env("PICKET_ADMIN_TOKEN", crate::common::OPERATOR_TOKEN)
        .env("PICKET_KEY_PEPPER", crate::common::KEY_PEPPER)
        .env_remove("PICKET_LOG_FORMAT")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn picket");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let serving = line.contains("picket serving");
        log.push(line);
        if serving {
            break;
        }
    }
    // Stop it the way a terminal's Ctrl-C or an orchestrator would.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    log.extend(lines.map_while(Result::ok));
    let status = child.wait().unwrap();
    let log = log.join("\n");
    assert!(status.success(), "a graceful stop exits 0: {log}");
    assert!(log.contains("picket stopped"), "{log}");
    // The SQLite file's absolute path is on the serving line.
    let path = db.url.trim_start_matches("sqlite://");
    assert!(log.contains(path), "names the store {path}: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI colour codes in a pipe: {log:?}"
    );
}

async fn ingest_exits_non_zero_when_lines_are_rejected(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_tenant, key) = app
        .tenant_with_key("cli-ingest", &[pb::Scope::Ingest])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let now = chrono::Utc::now().to_rfc3339();
    std::fs::write(
        &file,
        format!(
            "{{\"occurred_at\":\"{now}\",\"event_type\":\"user.login\",\"actor\":\"a\"}}\n\
             {{\"occurred_at\":\"{now}\",\"event_type\":\"user.login\",\"source_ip\":\"not-an-ip\"}}\n\
             {{\"occurred_at\":\"{now}\",\"event_type\":\"user.login\",\"actor\":\"b\"}}\n"
        ),
    )
    .unwrap();
    let server = format!("http://{}", app.addr);
    let file = file.to_str().unwrap();
    let out = picket(
        &["ingest", file, "--quiet", "--server", &server],
        &[("PICKET_API_KEY", &key)],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("3 lines: 2 accepted, 0 duplicates, 1 rejected"),
        "summary first: {stdout}"
    );
    assert!(
        stdout.contains("line 2: source_ip"),
        "the rejection with its line and field path: {stdout}"
    );
    assert!(stderr.contains("1 of 3 lines were rejected"), "{stderr}");
    // Nothing rejected: exit 0 (the two good lines are duplicates now).
    let good = dir.path().join("good.jsonl");
    std::fs::write(
        &good,
        format!("{{\"occurred_at\":\"{now}\",\"event_type\":\"user.login\",\"actor\":\"c\"}}\n"),
    )
    .unwrap();
    let out = picket(
        &[
            "ingest",
            good.to_str().unwrap(),
            "--quiet",
            "--server",
            &server,
        ],
        &[("PICKET_API_KEY", &key)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

async fn a_store_refuses_a_key_pepper_it_was_not_set_up_with(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_tenant, key) = app.tenant_with_key("pepper", &[pb::Scope::Read]).await;
    app.stop().await.unwrap();
    let db = std::mem::replace(&mut app.db, TestDb::placeholder());
    // Its store (and a SQLite store's serving lock) goes with it.
    drop(app);

    // Another pepper (a second `docker compose up` with a freshly drawn one):
    // refused at start, with the reason, instead of "unknown API key" later.
    let mut other = test_settings(&db);
    other.key_pepper = Some(SecretString::from("a-different-pepper".to_owned()));
    let err = Application::build(other)
        .await
        .err()
        .expect("a different pepper is refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("PICKET_KEY_PEPPER is not the key-hashing secret this store was set up with"),
        "{msg}"
    );
    assert!(
        !msg.contains("a-different-pepper"),
        "never prints the secret: {msg}"
    );
    // No pepper at all: the store's own generated one would differ too.
    let mut none = test_settings(&db);
    none.key_pepper = None;
    let err = Application::build(none).await.err().expect("refused");
    assert!(format!("{err:#}").contains("none is set"), "{err:#}");

    // The original pepper still starts, and the key made under it still works.
    let settings = test_settings(&db);
    let app = spawn_with(db, settings).await;
    let who = app
        .admin()
        .who_am_i(with_key(pb::WhoAmIRequest {}, &key))
        .await
        .expect("the old key still authenticates");
    assert!(!who.into_inner().tenant_id.is_empty());
}

crate::both_backends!(
    ingest_exits_non_zero_when_lines_are_rejected,
    a_store_refuses_a_key_pepper_it_was_not_set_up_with,
);
