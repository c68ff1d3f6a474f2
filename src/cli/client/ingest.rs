//! `picket ingest FILE`: streams a JSON-lines file through `IngestStream` with
//! a bounded window of batches in flight, a progress bar, resending every
//! unacknowledged batch (same keys) after retryable errors, and a summary.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cli::client::{Backoff, ServerArgs, is_retryable, json, retry_info};
use crate::grpc::pb;
use crate::grpc::pb::ingest_service_client::IngestServiceClient;

/// `picket ingest` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// JSON-lines file to send, or `-` for standard input.
    pub file: String,
    #[command(flatten)]
    pub server: ServerArgs,
    /// Events per batch (1..1000).
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Batches in flight (unacknowledged) at once.
    #[arg(long, default_value_t = 16)]
    pub in_flight: usize,
    /// Give up after this many consecutive failed attempts.
    #[arg(long, default_value_t = 20)]
    pub max_retries: u32,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Lines read.
    pub lines: u64,
    /// Stored now.
    pub accepted: u64,
    /// Already stored before.
    pub duplicates: u64,
    /// Refused by the server or unparsable locally.
    pub rejected: u64,
    /// Rejection reasons and how often each occurred.
    pub reasons: BTreeMap<String, u64>,
    /// The first few rejections with their line numbers.
    pub examples: Vec<String>,
}

impl Summary {
    fn local_reject(&mut self, line: u64, reason: String) {
        self.rejected += 1;
        if self.examples.len() < 5 {
            self.examples.push(format!("line {line}: {reason}"));
        }
        *self.reasons.entry(reason).or_default() += 1;
    }
}

/// Waits between attempts: jittered exponential from 0.5 s to 1 s, never
/// sooner than the server's RetryInfo (the Rust SDK's backoff).
const BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(500),
    max: Duration::from_secs(1),
};

/// One batch: its events and the file lines they came from.
struct Batch {
    events: Vec<pb::Event>,
    lines: Vec<u64>,
}

/// Runs the command.
pub async fn run(args: IngestArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let summary = ingest(&args).await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} lines: {} accepted, {} duplicates, {} rejected in {:.1}s ({:.0} events/s)",
        summary.lines,
        summary.accepted,
        summary.duplicates,
        summary.rejected,
        secs,
        summary.lines as f64 / secs.max(1e-9)
    );
    let mut reasons: Vec<_> = summary.reasons.iter().collect();
    reasons.sort_by(|a, b| b.1.cmp(a.1));
    for (reason, n) in reasons.iter().take(10) {
        println!("  rejected {n:>8}  {reason}");
    }
    if reasons.len() > 10 {
        println!("  … and {} other reasons", reasons.len() - 10);
    }
    for example in &summary.examples {
        println!("  e.g. {example}");
    }
    // Scripts and CI must notice rejected lines: they are not stored.
    if summary.rejected > 0 {
        anyhow::bail!(
            "{} of {} lines were rejected (not stored); the first are listed above",
            summary.rejected,
            summary.lines
        );
    }
    Ok(())
}

/// Sends the file and returns the summary.
pub async fn ingest(args: &IngestArgs) -> anyhow::Result<Summary> {
    if !(1..=1000).contains(&args.batch_size) {
        bail!("--batch-size must be 1..1000");
    }
    let (reader, total): (Box<dyn Read + Send>, Option<u64>) = if args.file == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let f = std::fs::File::open(&args.file)
            .with_context(|| format!("failed to open {}", args.file))?;
        let len = f.metadata().map(|m| m.len()).ok();
        (Box::new(f), len)
    };
    let progress = if args.quiet {
        ProgressBar::hidden()
    } else if let Some(total) = total {
        ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {msg} [{elapsed_precise}, eta {eta}]",
            )
            .expect("static template"),
        )
    } else {
        ProgressBar::new_spinner()
    };
    // Parse on a blocking thread, hand batches over a bounded channel.
    let (batch_tx, mut batches) = mpsc::channel::<(Batch, u64)>(args.in_flight.max(1) * 2);
    let (local_tx, mut local_rejects) = mpsc::unbounded_channel::<(u64, String)>();
    let batch_size = args.batch_size;
    let reader_task = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut r = BufReader::with_capacity(1 << 20, reader);
        let mut line = String::new();
        let mut number = 0u64;
        let mut batch = Batch {
            events: Vec::with_capacity(batch_size),
            lines: Vec::new(),
        };
        let mut bytes = 0u64;
        loop {
            line.clear();
            let n = r.read_line(&mut line).context("failed to read input")?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            number += 1;
            let text = line.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                continue;
            }
            match json::parse_line(number, text) {
                Ok(e) => {
                    batch.events.push(e);
                    batch.lines.push(number);
                }
                Err(reason) => {
                    let _ = local_tx.send((number, reason));
                }
            }
            if batch.events.len() == batch_size {
                let full = std::mem::replace(
                    &mut batch,
                    Batch {
                        events: Vec::with_capacity(batch_size),
                        lines: Vec::new(),
                    },
                );
                if batch_tx.blocking_send((full, bytes)).is_err() {
                    break;
                }
            }
        }
        if !batch.events.is_empty() {
            let _ = batch_tx.blocking_send((batch, bytes));
        }
        Ok(number)
    });

    let mut client = IngestServiceClient::new(args.server.channel().await?)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut summary = Summary::default();
    let mut pending: BTreeMap<u64, (Batch, u64)> = BTreeMap::new();
    let mut next_seq = 1u64;
    let mut reading_done = false;
    let mut failures = 0u32;
    'connect: loop {
        let (req_tx, req_rx) =
            mpsc::channel::<pb::IngestStreamRequest>(args.in_flight.max(1) + pending.len());
        // Resend everything unacknowledged first, with the same keys.
        for (seq, (b, _)) in &pending {
            req_tx
                .send(pb::IngestStreamRequest {
                    sequence: *seq,
                    events: b.events.clone(),
                })
                .await
                .ok();
        }
        let mut acks = match client
            .ingest_stream(args.server.request(ReceiverStream::new(req_rx))?)
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) if is_retryable(&status) && failures < args.max_retries => {
                tokio::time::sleep(BACKOFF.delay(failures, retry_info(&status))).await;
                failures += 1;
                continue 'connect;
            }
            Err(status) => bail!(
                "ingest stream refused: {} ({:?})",
                status.message(),
                status.code()
            ),
        };
        let mut req_tx = Some(req_tx);
        loop {
            while let Ok((line, reason)) = local_rejects.try_recv() {
                summary.local_reject(line, reason);
            }
            // Fill the window.
            while !reading_done && pending.len() < args.in_flight.max(1) {
                match batches.recv().await {
                    Some((b, bytes)) => {
                        let seq = next_seq;
                        next_seq += 1;
                        if let Some(tx) = &req_tx {
                            tx.send(pb::IngestStreamRequest {
                                sequence: seq,
                                events: b.events.clone(),
                            })
                            .await
                            .ok();
                        }
                        pending.insert(seq, (b, bytes));
                    }
                    None => reading_done = true,
                }
            }
            if reading_done && pending.is_empty() {
                drop(req_tx.take());
                break 'connect;
            }
            match acks.message().await {
                Ok(Some(ack)) => {
                    failures = 0;
                    if let Some((b, bytes)) = pending.remove(&ack.sequence) {
                        summary.accepted += u64::from(ack.accepted);
                        summary.duplicates += u64::from(ack.duplicates);
                        summary.rejected += u64::from(ack.rejected);
                        for r in ack
                            .receipts
                            .iter()
                            .filter(|r| r.status == pb::ReceiptStatus::Rejected as i32)
                        {
                            *summary
                                .reasons
                                .entry(format!("{}: {}", r.field_path, r.reason))
                                .or_default() += 1;
                            if summary.examples.len() < 5 {
                                let line =
                                    b.lines.get(r.index as usize).copied().unwrap_or_default();
                                summary
                                    .examples
                                    .push(format!("line {line}: {}: {}", r.field_path, r.reason));
                            }
                        }
                        progress.set_position(bytes);
                        progress.set_message(format!(
                            "{} ok, {} dup, {} rejected",
                            summary.accepted, summary.duplicates, summary.rejected
                        ));
                    }
                }
                Ok(None) => {
                    if pending.is_empty() && reading_done {
                        break 'connect;
                    }
                    failures += 1;
                    if failures > args.max_retries {
                        bail!(
                            "the server closed the stream with {} batches unacknowledged",
                            pending.len()
                        );
                    }
                    continue 'connect;
                }
                Err(status) if is_retryable(&status) && failures < args.max_retries => {
                    let delay = BACKOFF.delay(failures, retry_info(&status));
                    failures += 1;
                    progress.set_message(format!(
                        "server busy ({}); retrying in {delay:?}",
                        status.message()
                    ));
                    tokio::time::sleep(delay).await;
                    continue 'connect;
                }
                Err(status) => bail!("ingest failed: {} ({:?})", status.message(), status.code()),
            }
        }
    }
    summary.lines = reader_task.await.context("reader thread panicked")??;
    while let Ok((line, reason)) = local_rejects.try_recv() {
        summary.local_reject(line, reason);
    }
    progress.finish_and_clear();
    Ok(summary)
}
