//! The benchmark commands: `picket bench detect` and `picket simulate` run on
//! a store of their own; the enforcement benches check what they measure.

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
