//! A real `picket serve` as a child process, for the benches that measure a
//! server on its own (its memory read from `/proc` alone, its own runtime and
//! threads): `picket bench fanout` and `picket bench detect --storm`. Also
//! the one plain-HTTP call the CLI makes (`/healthz`, `/metrics`).

use std::io::{BufRead, BufReader};
use std::time::Duration;

use anyhow::Context;

/// The server under test, as a child process; killed when dropped.
pub(crate) struct ServerChild {
    child: std::process::Child,
    /// `host:port` it listens on.
    pub addr: String,
}

impl ServerChild {
    /// Starts `picket serve` (this binary) on port 0 over `database_url` with
    /// `operator` as its admin token and the extra environment `env`
    /// (`PICKET_*` settings), and waits for its "serving" line.
    pub(crate) fn start(
        database_url: &str,
        operator: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the picket binary")?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .env("PICKET_DATABASE_URL", database_url)
            .env("PICKET_ADMIN_TOKEN", operator)
            .env(
                "PICKET_LOG",
                std::env::var("PICKET_BENCH_SERVER_FILTER")
                    .unwrap_or_else(|_| "warn,picket=info".into()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("failed to start picket serve")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines.next().context("the server exited before serving")??;
            if line.contains("picket serving") {
                let v: serde_json::Value = serde_json::from_str(&line)?;
                break v["addr"].as_str().context("no addr")?.to_owned();
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe;
        // with PICKET_BENCH_SERVER_LOG set, into that file (to see what the
        // server did during a run).
        let mut keep = match std::env::var_os("PICKET_BENCH_SERVER_LOG") {
            Some(path) => Some(
                std::fs::File::create(&path)
                    .with_context(|| format!("cannot create {}", path.to_string_lossy()))?,
            ),
            None => None,
        };
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Some(f) = keep.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
            }
        });
        Ok(Self { child, addr })
    }

    /// How many file descriptors it has open (Linux: `/proc/PID/fd`).
    pub(crate) fn open_descriptors(&self) -> anyhow::Result<u64> {
        let dir = std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .context("cannot list the server's /proc descriptors (Linux only)")?;
        Ok(dir.count() as u64)
    }

    /// (RSS, peak RSS) in MiB.
    pub(crate) fn memory(&self) -> anyhow::Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("cannot read the server's /proc status (Linux only)")?;
        let kib = |field: &str| -> anyhow::Result<f64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(field))
                .with_context(|| format!("no {field} in /proc status"))?;
            Ok(line
                .split_whitespace()
                .nth(1)
                .context("malformed /proc status")?
                .parse::<f64>()?)
        };
        Ok((kib("VmRSS:")? / 1024.0, kib("VmHWM:")? / 1024.0))
    }
}

impl ServerChild {
    /// Waits (at most 60 s) until the server leads every detection shard
    /// (`/healthz` `detect_shards`): until then a new tenant's events wait
    /// for the take-over, which a latency measurement must not count.
    pub(crate) async fn wait_leading_all_shards(&self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let body = http_get(&self.addr, "/healthz").await.unwrap_or_default();
            if serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| {
                v["detect_shards"].as_u64()
                    == Some(u64::from(crate::pipeline::shards::DEFAULT_SHARDS))
            }) {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the server did not take over every detection shard within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on the server at `addr` (`host:port`), returning the body. A
/// bare HTTP/1.1 request: the CLI has no HTTP client dependency, and these
/// are its only plain-HTTP calls.
pub(crate) async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let call = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: picket\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .with_context(|| format!("GET {path} on {addr} timed out"))??;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed answer to GET {path}"))?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "GET {path} on {addr}: {}",
        head.lines().next().unwrap_or_default()
    );
    // axum sends bodies of unknown length chunked.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_owned())
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The sum of every sample of metric `name` (all label sets) in Prometheus
/// text; 0 when absent.
pub(crate) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_samples_of_one_metric_only() {
        let text = "# TYPE picket_x counter\npicket_x{a=\"1\"} 2\npicket_x{a=\"2\"} 3.5\npicket_x_total 9\npicket_x 1\n";
        assert_eq!(metric_sum(text, "picket_x"), 6.5);
        assert_eq!(metric_sum(text, "picket_x_total"), 9.0);
        assert_eq!(metric_sum(text, "picket_y"), 0.0);
    }

    #[test]
    fn dechunks_bodies() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
