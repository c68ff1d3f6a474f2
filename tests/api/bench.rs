//! The benchmark commands: `picket bench detect` and `picket simulate` run on
//! a store of their own; the enforcement benches check what they measure;
//! `picket bench shards` measures detection shared over replicas.

/// Item 9 of issue 11: `bench detect` (and `simulate`, which shares the
/// code) defaulted to the developer's store, `sqlite://picket-data/picket.db`
/// under the working directory. Without `--database-url` they now run on a
/// fresh temporary store, removed afterwards or kept with `--keep-store`.
#[test]
fn bench_detect_runs_on_a_temporary_store_by_default() {
    let cwd = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_picket"))
            .args(["bench", "detect", "--iterations", "1", "--json"])
            .args(extra)
            .current_dir(cwd.path())
            // The server's own setting must not steer a benchmark.
            .env("PICKET_DATABASE_URL", "sqlite://picket-data/picket.db")
            .env_remove("PICKET_BENCH_DATABASE_URL")
            .output()
            .expect("run picket");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["alerted"], 1, "{report}");
        stderr
    };

    let stderr = run(&[]);
    assert!(
        !cwd.path().join("picket-data").exists(),
        "the default store was written"
    );
    assert!(!stderr.contains("store kept"), "{stderr}");

    let stderr = run(&["--keep-store"]);
    let kept = stderr
        .lines()
        .find_map(|l| l.strip_prefix("store kept: sqlite://"))
        .unwrap_or_else(|| panic!("the kept store is printed: {stderr}"));
    let kept = std::path::Path::new(kept);
    assert!(kept.exists(), "{}", kept.display());
    assert!(!kept.starts_with(cwd.path()));
    std::fs::remove_dir_all(kept.parent().unwrap()).unwrap();
    assert!(!cwd.path().join("picket-data").exists());
}

/// `picket bench enforce` loads bans and checks every CheckAccess verdict it
/// measures; `picket bench fanout --stream decisions` delivers every ban to
/// every WatchDecisions subscriber once, in order.
#[test]
fn enforcement_benches_run_and_check_their_answers() {
    let run = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_picket"))
            .args(["--log", "warn", "bench"])
            .args(args)
            .arg("--json")
            .env_remove("PICKET_BENCH_DATABASE_URL")
            .output()
            .expect("run picket");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let report = run(&["enforce", "--decisions", "400", "--checks", "2000"]);
    assert_eq!(report["decisions"], 400, "{report}");
    assert_eq!(report["wrong_verdicts"], 0, "{report}");
    assert_eq!(report["server"]["count"], 2000, "{report}");

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("f.db").display());
    let report = run(&[
        "fanout",
        "--stream",
        "decisions",
        "--database-url",
        &url,
        "--subscribers",
        "20",
        "--connections",
        "2",
        "--updates",
        "10",
        "--rate",
        "50",
    ]);
    assert_eq!(report["deliveries"], 200, "{report}");
    assert_eq!(report["missed"], 0, "{report}");
    assert_eq!(report["duplicates_or_reordered"], 0, "{report}");
}

/// `bench shards` starts replica processes on one Postgres, waits until they
/// share the shards out, and counts every event sent as evaluated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_shards_counts_every_event_evaluated_across_replicas() {
    let db = crate::common::TestDb::new(picket::storage::Backend::Postgres).await;
    let url = db.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_picket"))
            .args(["bench", "shards", "--replicas", "2", "--tenants", "6"])
            .args(["--events-per-tenant", "100", "--batch-size", "50", "--json"])
            .args(["--database-url", &url])
            .env_remove("PICKET_DETECT_SHARDS")
            .output()
            .expect("run picket")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["events"], 600, "{report}");
    assert_eq!(
        report["events_evaluated"], 600.0,
        "each event once: {report}"
    );
    assert_eq!(
        report["shards_led"],
        serde_json::json!([32, 32]),
        "{report}"
    );
    assert!(
        report["detect_events_per_sec"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

/// Issue 12: `picket bench detect --storm` starts a real `picket serve`
/// (detection on) over a fresh Postgres database that it creates and drops,
/// sends a small storm with admin bursts during it, and reports the figures.
/// Without the storm mode the command refuses `--storm`.
#[tokio::test]
async fn bench_detect_storm_reports_a_small_run_on_a_fresh_postgres_database() {
    use sqlx::Connection;
    let admin = crate::common::postgres_admin_url();
    let scratch_dbs = || async {
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'picket_bench_storm_%'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        n
    };
    let before = scratch_dbs().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_picket"))
        .args([
            "bench",
            "detect",
            "--storm",
            "--database-url",
            &admin,
            "--events",
            "3000",
            "--users",
            "20",
            "--fail-percent",
            "50",
            "--admin-bursts",
            "2",
            "--batch-size",
            "250",
            "--json",
        ])
        .env_remove("PICKET_BENCH_DATABASE_URL")
        .env_remove("PICKET_ADMIN_TOKEN")
        .output()
        .await
        .expect("run picket");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["kind"], "credential-stuffing", "{r}");
    assert_eq!(r["backend"], "postgres", "{r}");
    assert_eq!(r["events"], 3000, "{r}");
    // 25 % logins, half of them failing, over 20 users: every user's
    // failures cross "more than 5 for one account in 5 minutes".
    assert!(r["failed_logins"].as_u64().unwrap() > 100, "{r}");
    assert!(r["alerts"].as_u64().unwrap() >= 20, "{r}");
    assert!(r["incidents"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["admin_bursts"], 2, "{r}");
    assert_eq!(r["admin_alerted"], 2, "{r}");
    assert!(r["admin_latency_ms"]["p99"].as_f64().is_some(), "{r}");
    // The raise began (the alert's created_at) before the alert arrived.
    assert!(
        r["admin_raise_ms"]["max"].as_f64().unwrap()
            <= r["admin_latency_ms"]["max"].as_f64().unwrap(),
        "{r}"
    );
    // Where the alert writer's time went, from the server's histograms.
    let stages = r["alert_write_stage_seconds"].as_object().unwrap();
    for stage in [
        "evidence", "raise", "handoff", "begin", "lock", "read", "fold", "encode", "write",
        "commit",
    ] {
        assert!(
            stages[stage].as_f64().is_some_and(|v| v >= 0.0),
            "{stage}: {r}"
        );
    }
    assert!(stages["raise"].as_f64().unwrap() > 0.0, "{r}");
    let wait = r["alert_queue_wait_le_s"].as_array().unwrap();
    assert!(
        wait[0].as_f64().unwrap() <= wait[1].as_f64().unwrap(),
        "{r}"
    );
    for field in [
        "ingest_events_per_sec",
        "evaluated_after_last_ack_s",
        "sentinel_alert_after_last_ack_s",
        "detect_events_per_sec",
        "detect_capacity_events_per_sec",
    ] {
        assert!(r[field].as_f64().is_some_and(|v| v >= 0.0), "{field}: {r}");
    }
    let servers = r["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{r}");
    // Storm, admin bursts, sentinel and warm-up: every event was evaluated.
    assert!(
        servers[0]["events_evaluated"].as_f64().unwrap() >= 3000.0 + 18.0,
        "{r}"
    );
    assert!(servers[0]["rss_end_mib"].as_f64().unwrap() > 1.0, "{r}");
    assert_eq!(r["targets"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(
        scratch_dbs().await,
        before,
        "the run's database was dropped"
    );
}

/// `picket bench reports` at a tiny size on both backends: it loads the
/// span, rolls it up, answers every query kind and report RPC, exports a
/// whole day and removes the oldest one; the report has every figure. On Postgres it runs in a fresh
/// database that is gone afterwards.
#[test]
fn bench_reports_runs_small_on_both_backends() {
    let admin = std::env::var("PICKET_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let dir = tempfile::tempdir().unwrap();
    let lite = format!("sqlite://{}", dir.path().join("r.db").display());
    for url in [lite.as_str(), admin.as_str()] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_picket"))
            .args(["--log", "warn", "bench", "reports", "--database-url", url])
            .args(["--tenant-events", "7200", "--other-events", "1200"])
            .args(["--other-tenants", "3", "--days", "3", "--requests", "4"])
            .args(["--exports", "1", "--json"])
            .output()
            .expect("run picket");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let queries = r["queries"].as_array().unwrap();
        // Seven QueryEvents kinds and the three report RPCs.
        assert_eq!(queries.len(), 10, "{r}");
        assert_eq!(
            queries[9]["name"],
            "GetAccessReport, last 24 hours, first page"
        );
        assert_eq!(
            queries[7]["mean_rows"], 72.0,
            "3 days of hourly buckets: {r}"
        );
        // The rollups folded every loaded event.
        assert_eq!(r["rolled_events"], 8400, "{r}");
        for q in queries {
            assert_eq!(q["requests"], 4, "{q}");
            assert!(q["p95_ms"].as_f64().unwrap() >= q["p50_ms"].as_f64().unwrap());
            assert!(q["target_p95_ms"].as_f64().is_some(), "{q}");
        }
        // A 1-hour page of the tenant (100 events an hour) is full; the
        // filter matching nothing returns nothing.
        assert_eq!(queries[0]["mean_rows"], 100.0, "{r}");
        assert_eq!(queries[6]["mean_rows"], 0.0, "{r}");
        // The export is the tenant's whole second day: 2,400 events.
        assert_eq!(r["export"]["events"], 2400, "{r}");
        // One (rate, disk MiB read) per batched run; the disks are readable here.
        let runs = r["export"]["run_disk_reads"].as_array().unwrap();
        assert_eq!(runs.len(), 1, "{r}");
        assert!(runs[0][0].as_f64().unwrap() > 0.0, "{r}");
        assert!(runs[0][1].as_f64().is_some_and(|m| m >= 0.0), "{r}");
        let retention = &r["retention"];
        assert!(retention["events"].as_u64().unwrap() > 0, "{r}");
        if url.starts_with("postgres") {
            assert_eq!(r["backend"], "postgres");
            assert_eq!(retention["method"], "drop partition", "{r}");
        } else {
            assert_eq!(r["backend"], "sqlite");
            assert_eq!(retention["method"], "delete rows", "{r}");
        }
    }
    // No database of the run is left behind.
    let left = std::process::Command::new("psql")
        .args([admin.as_str(), "-Atc"])
        .arg("SELECT count(*) FROM pg_database WHERE datname LIKE 'picket_bench_reports_%'")
        .output();
    if let Ok(left) = left {
        assert_eq!(String::from_utf8_lossy(&left.stdout).trim(), "0");
    }
}

/// `picket bench soak` for a few seconds: it measures the capacity, runs the
/// steady load with subscribers, tails and bursts, reports a minute with
/// the server's memory and descriptors, every burst alerted, and leaves no
/// database behind.
#[test]
fn bench_soak_runs_briefly() {
    let admin = std::env::var("PICKET_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_picket"))
        .args(["--log", "warn", "bench", "soak", "--database-url", &admin])
        .args(["--duration-seconds", "12", "--calibrate-seconds", "3"])
        .args([
            "--subscribers",
            "6",
            "--tails",
            "2",
            "--burst-every-seconds",
            "3",
        ])
        .arg("--json")
        .output()
        .expect("run picket");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["capacity_events_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    let minutes = r["minutes"].as_array().unwrap();
    assert_eq!(minutes.len(), 1, "{r}");
    assert!(minutes[0]["accepted"].as_u64().unwrap() > 0, "{r}");
    assert!(minutes[0]["rss_mib"].as_f64().unwrap() > 1.0, "{r}");
    assert!(minutes[0]["fds"].as_u64().unwrap() > 0, "{r}");
    assert!(r["bursts"].as_u64().unwrap() >= 2, "{r}");
    assert_eq!(r["bursts"], r["bursts_alerted"], "{r}");
    let left = std::process::Command::new("psql")
        .args([admin.as_str(), "-Atc"])
        .arg("SELECT count(*) FROM pg_database WHERE datname LIKE 'picket_bench_soak_%'")
        .output();
    if let Ok(left) = left {
        assert_eq!(String::from_utf8_lossy(&left.stdout).trim(), "0");
    }
}
