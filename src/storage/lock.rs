//! One serving process per SQLite store.
//!
//! A process that serves a SQLite store (`picket serve`, and `picket simulate`
//! / `picket bench detect`, which run a server in-process) runs detection on
//! it, and two of them would raise every alert twice: SQLite has no session
//! advisory locks to share detection out the way Postgres does. So the
//! server takes an exclusive OS lock (`flock`, through std's
//! [`File::try_lock`]) on a file beside the database, `<db>.lock`, before it
//! opens the store, writes its pid into it, and keeps it as long as the store:
//! a second serving process is refused with a message naming the store and
//! the holder's pid. The OS releases the lock when the holder exits, however
//! it exits, so a crashed server never leaves a stale lock behind (the file
//! stays; only the lock matters).
//!
//! Administrative commands (`picket migrate`, `picket admin …`) do not take
//! the lock: they run short transactions that SQLite serializes with the
//! server's, and work beside a running server as before. Postgres stores are
//! never locked here (several replicas share one; detection is elected with
//! `Store::join_detection`).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The SQLite store is locked by another process (or another store in this
/// one): Picket's own words, naming the holder, shown to the operator as they
/// are.
#[derive(Debug)]
pub struct StoreInUse(pub String);

impl std::fmt::Display for StoreInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreInUse {}

/// The held lock on a SQLite store; released when dropped (or the process ends).
#[derive(Debug)]
pub struct StoreLock {
    /// The open lock file (the lock belongs to this open file).
    _file: File,
    /// Its path, for logs.
    path: PathBuf,
}

impl StoreLock {
    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The database file a `sqlite:` URL names; `None` for in-memory databases
/// and for URLs of other schemes.
pub fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.split('&').any(|p| p == "mode=memory") {
        return None;
    }
    Some(PathBuf::from(path))
}

/// Takes the serving lock on the SQLite database at `db` (`<db>.lock`), or
/// fails naming the store and the pid of the process holding it.
pub fn acquire(db: &Path) -> anyhow::Result<StoreLock> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).context("failed to create the database directory")?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("failed to open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another process".to_owned()
            } else {
                format!("process {holder}")
            };
            return Err(StoreInUse(format!(
                "the SQLite store {} is already served by {who} (lock file {}): one process \
                 serves a SQLite store; stop it first, or use Postgres for several replicas",
                db.display(),
                path.display()
            ))
            .into());
        }
        Err(TryLockError::Error(e)) => {
            return Err(anyhow::Error::new(e).context(format!("failed to lock {}", path.display())));
        }
    }
    // Ours now: record who holds it.
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .and_then(|()| file.flush())
        .with_context(|| format!("failed to write the lock file {}", path.display()))?;
    Ok(StoreLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_store_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("picket.db");
        let first = acquire(&db).unwrap();
        let pid = std::fs::read_to_string(first.path()).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        let err = acquire(&db).unwrap_err().to_string();
        assert!(err.contains(&db.display().to_string()), "{err}");
        assert!(
            err.contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        drop(first);
        acquire(&db).unwrap();
    }

    #[test]
    fn a_store_in_use_is_named_with_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("picket.db");
        let _held = acquire(&db).unwrap();
        let err = acquire(&db).unwrap_err();
        assert!(err.downcast_ref::<StoreInUse>().is_some(), "{err:#}");
        let url = format!("sqlite://{}", db.display());
        let shown = super::super::opening_failed(&url, err).to_string();
        assert!(
            shown.contains(&format!("already served by process {}", std::process::id())),
            "{shown}"
        );
    }

    #[test]
    fn only_files_are_locked() {
        assert_eq!(
            sqlite_path("sqlite://picket-data/picket.db"),
            Some(PathBuf::from("picket-data/picket.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:/tmp/x.db?mode=rwc"),
            Some(PathBuf::from("/tmp/x.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("sqlite://file.db?mode=memory"), None);
        assert_eq!(
            sqlite_path("postgres://u@127.0.0.1:5432/db?sslmode=require"),
            None
        );
    }
}
