//! `picket.v1.IngestService`: batch and streaming ingest with durable acks,
//! the audit-log query, and the live tail.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::domain::event::{EventQuery, FeedPosition, InsertOutcome, MAX_BATCH_EVENTS, NewEvent};
use crate::domain::{FieldViolation, Scope, TenantId};
use crate::error::{AppError, AppResult};
use crate::grpc::convert::page_size;
use crate::grpc::events::{
    EventPageToken, decode_cursor, decode_page_token, encode_cursor, encode_page_token,
    event_from_pb, event_to_pb, query_from_pb,
};
use crate::grpc::pb::ingest_service_server::IngestService;
use crate::grpc::status::to_status;
use crate::grpc::{ApiContext, BoxStream, pb, watch};
use crate::storage::Store;

/// Cursor kind of the event feed.
const EVENTS_CURSOR: &str = "ev";

/// IngestService implementation.
pub struct IngestApi {
    /// Shared per-server context.
    ctx: Arc<ApiContext>,
}

impl IngestApi {
    /// A service over `ctx`.
    pub fn new(ctx: Arc<ApiContext>) -> Self {
        Self { ctx }
    }
}

/// The receipts for one batch plus their counts.
struct BatchResult {
    receipts: Vec<pb::EventReceipt>,
    accepted: u32,
    duplicates: u32,
    rejected: u32,
}

/// Validates a batch, writes its good events, and answers one receipt per event.
async fn ingest_batch(
    ctx: &ApiContext,
    tenant: TenantId,
    retention_days: u32,
    events: &[pb::Event],
) -> AppResult<BatchResult> {
    if events.is_empty() {
        return Err(AppError::invalid(
            "events",
            "a batch needs at least one event",
        ));
    }
    if events.len() > MAX_BATCH_EVENTS {
        return Err(AppError::invalid(
            "events",
            format!(
                "at most {MAX_BATCH_EVENTS} events per batch (got {})",
                events.len()
            ),
        ));
    }
    let now = Utc::now();
    let mut slots: Vec<Result<usize, FieldViolation>> = Vec::with_capacity(events.len());
    let mut valid: Vec<NewEvent> = Vec::with_capacity(events.len());
    for e in events {
        match event_from_pb(e, now, retention_days) {
            Ok(ev) => {
                slots.push(Ok(valid.len()));
                valid.push(ev);
            }
            Err(v) => slots.push(Err(v)),
        }
    }
    let outcomes = if valid.is_empty() {
        Vec::new()
    } else {
        let permit = ctx.ingest.try_reserve(valid.len())?;
        ctx.ingest.write(tenant, valid, permit).await?
    };
    let mut r = BatchResult {
        receipts: Vec::with_capacity(events.len()),
        accepted: 0,
        duplicates: 0,
        rejected: 0,
    };
    for (index, slot) in slots.into_iter().enumerate() {
        let index = index as u32;
        r.receipts.push(match slot {
            Ok(i) => match &outcomes[i] {
                InsertOutcome::Accepted(id) => {
                    r.accepted += 1;
                    pb::EventReceipt {
                        index,
                        status: pb::ReceiptStatus::Accepted as i32,
                        event_id: id.to_string(),
                        ..Default::default()
                    }
                }
                InsertOutcome::Duplicate(id) => {
                    r.duplicates += 1;
                    pb::EventReceipt {
                        index,
                        status: pb::ReceiptStatus::Duplicate as i32,
                        event_id: id.to_string(),
                        ..Default::default()
                    }
                }
            },
            Err(v) => {
                r.rejected += 1;
                pb::EventReceipt {
                    index,
                    status: pb::ReceiptStatus::Rejected as i32,
                    event_id: String::new(),
                    field_path: v.field,
                    reason: v.description,
                }
            }
        });
    }
    metrics::counter!("picket_ingest_events_rejected_total").increment(u64::from(r.rejected));
    Ok(r)
}

impl IngestApi {
    async fn retention_of(&self, tenant: TenantId) -> Result<u32, Status> {
        Ok(self
            .ctx
            .store
            .get_tenant(tenant)
            .await
            .map_err(|e| to_status(e.into()))?
            .retention_days)
    }
}

#[tonic::async_trait]
impl IngestService for IngestApi {
    #[instrument(skip_all, fields(rpc = "IngestService.Ingest", tenant))]
    async fn ingest(
        &self,
        request: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Ingest).await?;
        let retention = self.retention_of(tenant).await?;
        let r = ingest_batch(&self.ctx, tenant, retention, &request.get_ref().events)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::IngestResponse {
            receipts: r.receipts,
            accepted: r.accepted,
            duplicates: r.duplicates,
            rejected: r.rejected,
        }))
    }

    type IngestStreamStream = BoxStream<pb::IngestStreamResponse>;

    #[instrument(skip_all, fields(rpc = "IngestService.IngestStream", tenant))]
    async fn ingest_stream(
        &self,
        request: Request<Streaming<pb::IngestStreamRequest>>,
    ) -> Result<Response<Self::IngestStreamStream>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Ingest).await?;
        let retention = self.retention_of(tenant).await?;
        let mut inbound = request.into_inner();
        let ctx = self.ctx.clone();
        let max_in_flight = ctx.limits.stream_max_in_flight_batches.max(1);
        let (tx, rx) = mpsc::channel::<Result<pb::IngestStreamResponse, Status>>(max_in_flight);
        metrics::gauge!("picket_ingest_streams_open").increment(1.0);
        tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            let mut sequences: HashSet<u64> = HashSet::new();
            // Once set, no more batches are read; the stream ends with it after
            // the in-flight batches are acknowledged.
            let mut ending: Option<Status> = None;
            let mut inbound_done = false;
            loop {
                if (inbound_done || ending.is_some()) && in_flight.is_empty() {
                    break;
                }
                tokio::select! {
                    msg = inbound.message(), if !inbound_done && ending.is_none() && in_flight.len() < max_in_flight => {
                        match msg {
                            Ok(Some(batch)) => {
                                if !sequences.insert(batch.sequence) {
                                    ending = Some(to_status(AppError::invalid(
                                        "sequence",
                                        format!("batch {} is already in flight on this stream", batch.sequence),
                                    )));
                                    continue;
                                }
                                let ctx = ctx.clone();
                                in_flight.push(async move {
                                    let seq = batch.sequence;
                                    (seq, ingest_batch(&ctx, tenant, retention, &batch.events).await)
                                });
                            }
                            Ok(None) => inbound_done = true,
                            Err(status) => {
                                // Malformed frame or client went away: nothing more will be read.
                                tracing::debug!(error = %status, "ingest stream input ended with an error");
                                inbound_done = true;
                                ending = Some(crate::grpc::status::oversized_message(status));
                            }
                        }
                    }
                    Some((seq, result)) = in_flight.next(), if !in_flight.is_empty() => {
                        sequences.remove(&seq);
                        match result {
                            Ok(r) => {
                                let ack = pb::IngestStreamResponse {
                                    sequence: seq,
                                    receipts: r.receipts,
                                    accepted: r.accepted,
                                    duplicates: r.duplicates,
                                    rejected: r.rejected,
                                };
                                if tx.send(Ok(ack)).await.is_err() {
                                    break;
                                }
                            }
                            // Overload, shutdown or a bad batch: this batch is not
                            // acknowledged; finish the others, then end with the reason.
                            Err(e) => {
                                if ending.is_none() {
                                    ending = Some(to_status(e));
                                }
                            }
                        }
                    }
                    () = ctx.shutdown.cancelled(), if ending.is_none() => {
                        ending = Some(to_status(AppError::Unavailable {
                            message: "the server is shutting down; resend unacknowledged batches".into(),
                            retry_after: Duration::from_secs(1),
                        }));
                    }
                }
            }
            if let Some(status) = ending {
                let _ = tx.send(Err(status)).await;
            }
            metrics::gauge!("picket_ingest_streams_open").decrement(1.0);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[instrument(skip_all, fields(rpc = "IngestService.QueryEvents", tenant))]
    async fn query_events(
        &self,
        request: Request<pb::QueryEventsRequest>,
    ) -> Result<Response<pb::QueryEventsResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let limit = page_size(req.page_size, 100, 1000).map_err(to_status)?;
        let mut q = query_from_pb(req.filter.as_ref(), req.time_range.as_ref(), "filter")
            .map_err(to_status)?;
        let received_before = if req.page_token.is_empty() {
            Utc::now()
        } else {
            let t = decode_page_token(
                tenant,
                req.filter.as_ref(),
                req.time_range.as_ref(),
                &req.page_token,
            )
            .map_err(to_status)?;
            q.before = Some(t.before);
            t.received_before
        };
        q.received_before = Some(received_before);
        q.limit = limit + 1;
        let mut rows = self
            .ctx
            .store
            .query_events(tenant, &q)
            .await
            .map_err(|e| to_status(e.into()))?;
        let next_page_token = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            let last = &rows[rows.len() - 1].event;
            encode_page_token(
                tenant,
                req.filter.as_ref(),
                req.time_range.as_ref(),
                EventPageToken {
                    before: (last.occurred_at, last.id),
                    received_before,
                },
            )
        } else {
            String::new()
        };
        Ok(Response::new(pb::QueryEventsResponse {
            events: rows.iter().map(|r| event_to_pb(&r.event)).collect(),
            next_page_token,
        }))
    }

    type TailEventsStream = BoxStream<pb::TailEventsResponse>;

    #[instrument(skip_all, fields(rpc = "IngestService.TailEvents", tenant))]
    async fn tail_events(
        &self,
        request: Request<pb::TailEventsRequest>,
    ) -> Result<Response<Self::TailEventsStream>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let filter = query_from_pb(req.filter.as_ref(), None, "filter").map_err(to_status)?;
        let options = req.options.unwrap_or_default();
        let heartbeat = self
            .ctx
            .limits
            .heartbeat_interval(options.heartbeat_interval_seconds)
            .map_err(to_status)?;
        let position = if options.after_cursor.is_empty() {
            self.ctx
                .store
                .events_head(tenant)
                .await
                .map_err(|e| to_status(e.into()))?
                .unwrap_or_default()
        } else {
            decode_cursor(
                EVENTS_CURSOR,
                tenant,
                &options.after_cursor,
                "options.after_cursor",
            )
            .map_err(to_status)?
        };
        let feed = EventFeed {
            store: self.ctx.store.clone(),
            tenant,
            filter,
        };
        Ok(Response::new(self.ctx.follow(
            feed,
            position,
            heartbeat,
            self.ctx.ingest.commits(tenant),
        )))
    }
}

/// The event feed as TailEvents follows it.
struct EventFeed {
    /// Where events are read.
    store: Arc<dyn Store>,
    /// The caller's tenant.
    tenant: TenantId,
    /// Which events to deliver.
    filter: EventQuery,
}

#[tonic::async_trait]
impl watch::Feed for EventFeed {
    const STREAM: &'static str = "events";
    type Entry = crate::domain::event::NewEvent;
    type Msg = pb::TailEventsResponse;

    fn tenant(&self) -> TenantId {
        self.tenant
    }

    async fn read_after(
        &self,
        after: FeedPosition,
        limit: u32,
    ) -> AppResult<Vec<(FeedPosition, Self::Entry)>> {
        let rows = self.store.events_after(self.tenant, after, limit).await?;
        Ok(rows.into_iter().map(|r| (r.position, r.event)).collect())
    }

    fn message(&self, event: &Self::Entry) -> Option<Self::Msg> {
        self.filter.matches(event).then(|| pb::TailEventsResponse {
            cursor: String::new(),
            item: Some(pb::tail_events_response::Item::Event(event_to_pb(event))),
        })
    }

    async fn head(&self) -> AppResult<Option<FeedPosition>> {
        Ok(self.store.events_head(self.tenant).await?)
    }

    fn cursor(&self, at: FeedPosition) -> String {
        encode_cursor(EVENTS_CURSOR, self.tenant, at)
    }

    fn heartbeat(&self, hb: pb::Heartbeat) -> Self::Msg {
        pb::TailEventsResponse {
            cursor: String::new(),
            item: Some(pb::tail_events_response::Item::Heartbeat(hb)),
        }
    }

    fn with_cursor(&self, mut msg: Self::Msg, cursor: String) -> Self::Msg {
        msg.cursor = cursor;
        msg
    }
}
