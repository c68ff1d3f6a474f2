//! `picket.v1.ReportService`: audit exports (ExportEvents). The aggregate
//! reports (access report, security summary, dashboard metrics) are part of
//! the contract but not built yet: they authenticate, check the `read` scope
//! and answer UNIMPLEMENTED.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::domain::Scope;
use crate::domain::event::EventQuery;
use crate::error::AppError;
use crate::grpc::events::{
    ExportCursor, decode_export_cursor, encode_export_cursor, event_to_pb, query_from_pb,
};
use crate::grpc::status::to_status;
use crate::grpc::{ApiContext, BoxStream, pb};

/// Events read from the store per page of an export.
pub const EXPORT_PAGE: u32 = 500;
/// Messages an export may hold unsent (the reader's pace bounds the rest).
const EXPORT_BUFFER: usize = 64;

/// The ReportService implementation.
pub struct ReportApi {
    /// Shared per-server context (store, authentication, shutdown).
    ctx: Arc<ApiContext>,
}

impl ReportApi {
    /// A service over `ctx`.
    pub fn new(ctx: Arc<ApiContext>) -> Self {
        Self { ctx }
    }
}

/// The export's query: filter and half-open range, both bounds required.
fn export_query(req: &pb::ExportEventsRequest) -> Result<EventQuery, AppError> {
    let range = req.time_range.as_ref();
    if range.and_then(|r| r.start.as_ref()).is_none() {
        return Err(AppError::invalid("time_range.start", "required"));
    }
    if range.and_then(|r| r.end.as_ref()).is_none() {
        return Err(AppError::invalid("time_range.end", "required"));
    }
    let mut q = query_from_pb(req.filter.as_ref(), range, "filter")?;
    q.oldest_first = true;
    q.limit = EXPORT_PAGE;
    Ok(q)
}

#[tonic::async_trait]
impl pb::report_service_server::ReportService for ReportApi {
    #[instrument(skip_all, fields(rpc = "ReportService.GetAccessReport", tenant))]
    async fn get_access_report(
        &self,
        request: Request<pb::GetAccessReportRequest>,
    ) -> Result<Response<pb::GetAccessReportResponse>, Status> {
        self.ctx.tenant_caller(&request, Scope::Read).await?;
        Err(to_status(AppError::Unimplemented(
            "the access report is not implemented yet",
        )))
    }

    #[instrument(skip_all, fields(rpc = "ReportService.GetSecuritySummary", tenant))]
    async fn get_security_summary(
        &self,
        request: Request<pb::GetSecuritySummaryRequest>,
    ) -> Result<Response<pb::GetSecuritySummaryResponse>, Status> {
        self.ctx.tenant_caller(&request, Scope::Read).await?;
        Err(to_status(AppError::Unimplemented(
            "the security summary is not implemented yet",
        )))
    }

    #[instrument(skip_all, fields(rpc = "ReportService.GetDashboardMetrics", tenant))]
    async fn get_dashboard_metrics(
        &self,
        request: Request<pb::GetDashboardMetricsRequest>,
    ) -> Result<Response<pb::GetDashboardMetricsResponse>, Status> {
        self.ctx.tenant_caller(&request, Scope::Read).await?;
        Err(to_status(AppError::Unimplemented(
            "dashboard metrics are not implemented yet",
        )))
    }

    type ExportEventsStream = BoxStream<pb::ExportEventsResponse>;

    #[instrument(skip_all, fields(rpc = "ReportService.ExportEvents", tenant))]
    async fn export_events(
        &self,
        request: Request<pb::ExportEventsRequest>,
    ) -> Result<Response<Self::ExportEventsStream>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let mut q = export_query(&req).map_err(to_status)?;
        let received_before = if req.after_cursor.is_empty() {
            Utc::now()
        } else {
            let c = decode_export_cursor(
                tenant,
                req.filter.as_ref(),
                req.time_range.as_ref(),
                &req.after_cursor,
            )
            .map_err(to_status)?;
            q.after = Some(c.after);
            c.received_before
        };
        q.received_before = Some(received_before);
        let (tx, rx) = mpsc::channel(EXPORT_BUFFER);
        let store = self.ctx.store.clone();
        let shutdown = self.ctx.shutdown.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut sent: u64 = 0;
            let outcome = loop {
                let page = tokio::select! {
                    page = store.query_events(tenant, &q) => page,
                    () = shutdown.cancelled() => break "shutdown",
                };
                let page = match page {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(to_status(e.into()))).await;
                        break "error";
                    }
                };
                let last_page = page.len() < EXPORT_PAGE as usize;
                for row in page {
                    let e = row.event;
                    q.after = Some((e.occurred_at, e.id));
                    let cursor = encode_export_cursor(
                        tenant,
                        req.filter.as_ref(),
                        req.time_range.as_ref(),
                        ExportCursor {
                            after: (e.occurred_at, e.id),
                            received_before,
                        },
                    );
                    let msg = pb::ExportEventsResponse {
                        event: Some(event_to_pb(&e)),
                        cursor,
                    };
                    let delivered = tokio::select! {
                        r = tx.send(Ok(msg)) => r.is_ok(),
                        () = shutdown.cancelled() => break,
                    };
                    if !delivered {
                        break;
                    }
                    sent += 1;
                }
                if shutdown.is_cancelled() {
                    break "shutdown";
                }
                if tx.is_closed() {
                    break "cancelled";
                }
                if last_page {
                    break "complete";
                }
            };
            if outcome == "shutdown" {
                let _ = tx
                    .send(Err(to_status(AppError::Unavailable {
                        message: "the server is shutting down; resume the export from the last cursor received".into(),
                        retry_after: Duration::from_secs(1),
                    })))
                    .await;
            }
            metrics::histogram!("picket_report_duration_seconds", "report" => "export_events")
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("picket_export_events_total").increment(sent);
            tracing::info!(%tenant, sent, outcome, "export finished");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
