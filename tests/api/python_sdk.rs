//! The Python SDK (`sdk/python`, package `picket-sdk`) against the real
//! `picket serve` binary: its pytest suite, once per storage backend.
//!
//! pytest starts the binary cargo just built (`PICKET_BIN`) on the scratch
//! database this test creates (`PICKET_TEST_DATABASE_URL`), stops and
//! restarts it on the same port and data, and runs a FastAPI application under
//! uvicorn (4 workers) and gunicorn (`--preload`): every request stored exactly
//! once across a 10-second outage, queue-full and shutdown accounting, fork,
//! enforcement within a second, local expiry of decisions while disconnected.
//!
//! The Python used: `PICKET_TEST_PYTHON` if set (a Python with
//! `./sdk/python[test]` installed; CI sets it), else a virtual environment
//! this test creates under cargo's target directory with `python3 -m venv`
//! and fills with `pip install ./sdk/python[test]` (once per test run, so it
//! always tests the current SDK). Python 3.11+ with `venv` and a reachable
//! package index are required: without them the test fails and says so; it
//! is never skipped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use picket::storage::Backend;

use crate::common::TestDb;

/// How long one pytest run may take.
const PYTEST_DEADLINE: Duration = Duration::from_secs(600);

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/python")
}

/// Runs `program args`; its output, or why it failed.
fn run(program: &Path, args: &[&str], dir: &Path) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .map_err(|e| format!("could not run `{}`: {e}", program.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "`{} {}` failed ({}):\n{text}",
            program.display(),
            args.join(" "),
            out.status
        ))
    }
}

/// A Python with the SDK and its test dependencies installed.
fn prepare_python() -> Result<PathBuf, String> {
    let sdk = sdk_dir();
    if let Some(python) = std::env::var_os("PICKET_TEST_PYTHON") {
        let python = PathBuf::from(python);
        run(
            &python,
            &[
                "-c",
                "import picket.v1.ingest_pb2, picket.middleware, fastapi, uvicorn, gunicorn, pytest, httpx",
            ],
            &sdk,
        )
        .map_err(|e| format!("PICKET_TEST_PYTHON lacks the SDK or its test packages:\n{e}"))?;
        return Ok(python);
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-sdk-venv");
    let python = venv.join("bin/python");
    if !python.is_file() {
        run(
            Path::new("python3"),
            &[
                "-c",
                "import sys, venv, ensurepip; assert sys.version_info >= (3, 11), sys.version",
            ],
            &sdk,
        )
        .map_err(|e| format!("Python 3.11+ with venv is required as `python3`:\n{e}"))?;
        run(
            Path::new("python3"),
            &["-m", "venv", &venv.to_string_lossy()],
            &sdk,
        )?;
    }
    run(
        &python,
        &[
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            ".[test]",
        ],
        &sdk,
    )?;
    Ok(python)
}

/// [`prepare_python`] once per test process; panics with the reason if it failed.
fn python() -> PathBuf {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PYTHON.get_or_init(prepare_python) {
        Ok(p) => p.clone(),
        Err(why) => panic!(
            "the Python SDK test needs Python 3.11+ (`python3` with venv) and the package index \
             to install `sdk/python[test]`, or PICKET_TEST_PYTHON naming a Python that has it:\n{why}"
        ),
    }
}

async fn python_sdk_suite(backend: Backend) {
    // The suites of the two backends run one after the other: each runs a
    // 4-worker application and times enforcement to the second.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let python = tokio::task::spawn_blocking(python)
        .await
        .expect("python setup panicked");
    let db = TestDb::new(backend).await;
    let mut pytest = tokio::process::Command::new(&python);
    pytest
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(sdk_dir())
        .env("PICKET_BIN", env!("CARGO_BIN_EXE_picket"))
        .env("PICKET_TEST_DATABASE_URL", &db.url)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true);
    let out = tokio::time::timeout(PYTEST_DEADLINE, pytest.output())
        .await
        .unwrap_or_else(|_| panic!("pytest did not finish in {PYTEST_DEADLINE:?}"))
        .expect("run pytest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed ({backend:?}):\n{text}");
    let summary = text.lines().last().unwrap_or_default();
    assert!(
        summary.contains(" passed") && !summary.contains("skipped"),
        "pytest ran no test or skipped some ({backend:?}): {summary}"
    );
}

crate::both_backends!(python_sdk_suite);
