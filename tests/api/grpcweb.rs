//! grpc-web through a real client library: Connect's grpc-web transport
//! (`@connectrpc/connect-web`, run by Node) watches incidents through the
//! server's CORS and grpc-web layers, the path a browser console takes.
//!
//! `server.rs` checks the wire format with hand-framed unary calls; this checks
//! that a client written by someone else interoperates on a long-lived server
//! stream: an error before the first message, the snapshot, changes delivered
//! as they happen (not held back until the stream ends), closing the stream
//! from the client, resuming after a cursor, and the end of the stream on
//! shutdown. That end is where grpc-web differs from gRPC (the status travels
//! in a trailer frame in the body): messages alone would reach this client
//! even without the grpc-web layer.
//!
//! The client is the node package in `tests/grpcweb/` (`watch.mjs`, pinned
//! by its lock file). Once per test run, npm installs it if its
//! `node_modules` is missing or older than the lock file, and buf with
//! protoc-gen-es generates its code from `proto/`, so it cannot drift from the
//! contract. Node.js 20+ and npm are required: without them the test fails and
//! says so; it is never skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use picket::grpc::pb;
use picket::storage::Backend;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::time::Instant;

use crate::common::{self, TestApp, with_key};

/// How long the whole conversation with the Node client may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// Changes the client reads live before closing its stream.
const LIVE_CHANGES: usize = 3;

/// The node package holding the client.
fn package_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpcweb")
}

/// Runs `program args` in `dir`; its output, or why it failed.
fn run(dir: &Path, program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("could not run `{program}` in {}: {e}", dir.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "`{program} {}` failed ({}):\n{text}",
            args.join(" "),
            out.status
        ))
    }
}

/// Makes the client runnable: checks Node, installs the package's
/// dependencies when missing or stale, and generates its code from the protos.
fn install_client(dir: &Path) -> Result<(), String> {
    let version = run(dir, "node", &["--version"])?;
    let major = version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    if major.is_none_or(|m| m < 20) {
        return Err(format!("Node.js 20 or later is required, found {version}"));
    }
    let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let installed = modified(dir.join("node_modules/.package-lock.json"));
    let locked = modified(dir.join("package-lock.json"));
    if installed.is_none() || installed < locked {
        // `install` from the lock file, not `ci`: buf lists a binary package
        // per platform, the registry reachable here serves only the Linux
        // ones, so the lock file written here lacks the others and `npm ci`
        // rejects it as out of sync. `--no-save` leaves the lock file as is.
        // Scripts are skipped: buf's postinstall only speeds up its launcher.
        run(
            dir,
            "npm",
            &[
                "install",
                "--no-save",
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
            ],
        )?;
    }
    run(dir, "node_modules/.bin/buf", &["generate"])?;
    Ok(())
}

/// [`install_client`] once per test process (tests run as threads); every
/// caller gets its outcome. Panics with instructions if it failed.
async fn client_package() -> PathBuf {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = package_dir();
    let outcome = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || INSTALLED.get_or_init(|| install_client(&dir)).clone()
    })
    .await
    .expect("install task panicked");
    if let Err(why) = outcome {
        panic!(
            "the grpc-web test needs Node.js 20+ and npm on PATH to install and run its \
             client in {}:\n{why}",
            dir.display()
        );
    }
    dir
}

/// The running `watch.mjs`: its report lines, its stdin (the resume signal)
/// and its stderr (shown on failure with the reports read so far).
struct WatchClient {
    /// The node process; killed when dropped, so a failed test leaves none.
    child: Child,
    /// One JSON report per line.
    stdout: Lines<BufReader<ChildStdout>>,
    /// A line here tells the client to resume.
    stdin: ChildStdin,
    /// Everything node wrote to stderr, once it has exited.
    stderr: tokio::task::JoinHandle<String>,
    /// When the conversation has taken too long.
    deadline: Instant,
    /// The reports read so far.
    transcript: Vec<String>,
}

impl WatchClient {
    fn start(package: &Path, app: &TestApp, key: &str) -> Self {
        let mut child = tokio::process::Command::new("node")
            .arg("watch.mjs")
            .arg(format!("http://{}", app.addr))
            .arg(key)
            .arg(LIVE_CHANGES.to_string())
            .current_dir(package)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start node");
        let mut stderr = child.stderr.take().expect("piped stderr");
        Self {
            stdout: BufReader::new(child.stdout.take().expect("piped stdout")).lines(),
            stdin: child.stdin.take().expect("piped stdin"),
            stderr: tokio::spawn(async move {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text).await;
                text
            }),
            child,
            deadline: Instant::now() + DEADLINE,
            transcript: Vec::new(),
        }
    }

    /// Stops node and describes the failure with its reports and stderr.
    async fn failure(&mut self, what: &str) -> String {
        let _ = self.child.kill().await;
        let stderr = (&mut self.stderr).await.unwrap_or_default();
        format!(
            "grpc-web client: {what}\nreports so far:\n{}\nnode stderr:\n{stderr}",
            self.transcript.join("\n")
        )
    }

    /// The next report, heartbeats included.
    async fn next_report(&mut self) -> Value {
        let line = match tokio::time::timeout_at(self.deadline, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => panic!("{}", self.failure("exited before reporting").await),
            Ok(Err(e)) => panic!("{}", self.failure(&format!("stdout: {e}")).await),
            Err(_) => panic!(
                "{}",
                self.failure(&format!("no report in {DEADLINE:?}")).await
            ),
        };
        let report = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("report `{line}` is not JSON: {e}"));
        self.transcript.push(line);
        report
    }

    /// The next report that is not a heartbeat.
    async fn next(&mut self) -> Value {
        loop {
            let report = self.next_report().await;
            if report["kind"] != "heartbeat" {
                return report;
            }
        }
    }

    /// Sends the resume signal.
    async fn resume(&mut self) {
        self.stdin
            .write_all(b"resume\n")
            .await
            .expect("write stdin");
        self.stdin.flush().await.expect("flush stdin");
    }

    /// Waits for node to exit and checks that it succeeded.
    async fn finish(mut self) {
        match tokio::time::timeout_at(self.deadline, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => panic!("{}", self.failure(&format!("exited with {status}")).await),
            Ok(Err(e)) => panic!("{}", self.failure(&format!("wait: {e}")).await),
            Err(_) => panic!("{}", self.failure("did not exit").await),
        }
    }
}

/// A change as compared: (change kind, incident id, status, timeline entry
/// kind, note text for notes), all proto names but the id and the text.
type Change = (String, String, String, String, String);

/// What the change reports of `phase` say.
fn changes(phase: &str, reports: &[Value]) -> Vec<Change> {
    reports
        .iter()
        .map(|report| {
            let field = |name: &str| report[name].as_str().unwrap_or_default().to_owned();
            assert_eq!(report["phase"], phase, "{report}");
            assert_eq!(report["kind"], "change", "not a change: {report}");
            let note = if field("entry") == pb::TimelineEntryKind::NoteAdded.as_str_name() {
                field("subject")
            } else {
                String::new()
            };
            (
                field("change"),
                field("incident"),
                field("status"),
                field("entry"),
                note,
            )
        })
        .collect()
}

/// The expected [`Change`].
fn expect(
    kind: pb::IncidentChangeKind,
    incident: &str,
    status: pb::IncidentStatus,
    entry: pb::TimelineEntryKind,
    note: &str,
) -> Change {
    (
        kind.as_str_name().into(),
        incident.into(),
        status.as_str_name().into(),
        entry.as_str_name().into(),
        note.into(),
    )
}

type Incidents = pb::incident_service_client::IncidentServiceClient<tonic::transport::Channel>;

fn incidents(app: &TestApp) -> Incidents {
    pb::incident_service_client::IncidentServiceClient::new(app.channel.clone())
}

async fn create(app: &TestApp, key: &str, title: &str) -> String {
    incidents(app)
        .create_incident(with_key(
            pb::CreateIncidentRequest {
                title: title.into(),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("create incident")
        .into_inner()
        .incident
        .expect("incident")
        .id
}

async fn set_status(app: &TestApp, key: &str, id: &str, status: pb::IncidentStatus) {
    incidents(app)
        .update_incident(with_key(
            pb::UpdateIncidentRequest {
                incident_id: id.into(),
                update_mask: vec!["status".into()],
                status: status as i32,
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("update incident");
}

async fn note(app: &TestApp, key: &str, id: &str, text: &str) {
    incidents(app)
        .add_note(with_key(
            pb::AddNoteRequest {
                incident_id: id.into(),
                text: text.into(),
            },
            key,
        ))
        .await
        .expect("add note");
}

async fn grpc_web_client_watches_incidents(backend: Backend) {
    use pb::IncidentChangeKind::{Created, Updated};
    use pb::IncidentStatus::{Investigating, Open};
    use pb::TimelineEntryKind::{Created as EntryCreated, NoteAdded, StatusChanged};

    let package = client_package().await;
    let mut app = common::spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key("webco", &[pb::Scope::Read, pb::Scope::Respond])
        .await;
    let before = create(&app, &key, "Reported before the watch").await;
    let mut client = WatchClient::start(&package, &app, &key);

    // Without a key the stream fails before its first message, and the
    // client library reads the status.
    let denied = client.next().await;
    assert_eq!(denied["phase"], "no_key", "{denied}");
    assert_eq!(denied["kind"], "error", "{denied}");
    assert_eq!(denied["code"], "Unauthenticated", "{denied}");

    // The snapshot holds exactly the incident created before the watch.
    let snapshot = client.next().await;
    assert_eq!(snapshot["kind"], "snapshot", "{snapshot}");
    assert_eq!(snapshot["incident"], before.as_str(), "{snapshot}");
    assert_eq!(snapshot["status"], Open.as_str_name(), "{snapshot}");
    let complete = client.next().await;
    assert_eq!(complete["kind"], "snapshot_complete", "{complete}");
    assert_eq!(complete["itemCount"], 1, "{complete}");
    let ready = client.next().await;
    assert_eq!(ready["kind"], "ready", "{ready}");
    assert_eq!(
        ready["contentType"], "application/grpc-web+proto",
        "{ready}"
    );
    assert_eq!(
        ready["allowOrigin"], "*",
        "a browser would reject the response without CORS headers: {ready}"
    );

    // Changes made through native gRPC reach the grpc-web stream in order.
    let during = create(&app, &key, "Reported during the watch").await;
    set_status(&app, &key, &during, Investigating).await;
    note(&app, &key, &before, "blocked at the edge").await;
    let mut live = Vec::new();
    for _ in 0..LIVE_CHANGES {
        live.push(client.next().await);
    }
    assert_eq!(
        changes("live", &live),
        [
            expect(Created, &during, Open, EntryCreated, ""),
            expect(Updated, &during, Investigating, StatusChanged, ""),
            expect(Updated, &before, Open, NoteAdded, "blocked at the edge"),
        ]
    );

    // The client closes its stream; changes made meanwhile are not lost.
    let disconnected = client.next().await;
    assert_eq!(disconnected["kind"], "disconnected", "{disconnected}");
    assert_eq!(disconnected["cursor"], live[LIVE_CHANGES - 1]["cursor"]);
    note(&app, &key, &during, "escalated").await;
    set_status(&app, &key, &before, Investigating).await;
    client.resume().await;
    let resumed = [client.next().await, client.next().await];
    assert_eq!(
        changes("resumed", &resumed),
        [
            expect(Updated, &during, Investigating, NoteAdded, "escalated"),
            expect(Updated, &before, Investigating, StatusChanged, ""),
        ],
        "a resumed watch sends only the changes after its cursor, with no snapshot"
    );

    let cursors: Vec<&str> = [&snapshot]
        .into_iter()
        .chain(&live)
        .chain(&resumed)
        .map(|r| r["cursor"].as_str().unwrap_or_default())
        .collect();
    assert!(cursors.iter().all(|c| !c.is_empty()), "{cursors:?}");
    let distinct: std::collections::HashSet<_> = cursors.iter().collect();
    assert_eq!(
        distinct.len(),
        cursors.len(),
        "repeated cursor: {cursors:?}"
    );

    // On shutdown the stream ends with an OK status the client can read.
    app.trigger_shutdown();
    let end = client.next().await;
    assert_eq!(end["phase"], "resumed", "{end}");
    assert_eq!(end["kind"], "end", "{end}");
    client.finish().await;
    app.join().await.expect("server stops cleanly");
}

crate::both_backends!(grpc_web_client_watches_incidents);
