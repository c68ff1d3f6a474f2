//! Services of the v1 contract whose issues have not landed yet. Each RPC
//! authenticates and checks its scope like the real one will, then answers
//! UNIMPLEMENTED with a one-line message. Never fake data here: when an issue
//! lands, its service moves to its own file and leaves this one.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::domain::Scope;
use crate::error::AppError;
use crate::grpc::status::to_status;
use crate::grpc::{ApiContext, pb};

macro_rules! placeholder_service {
    (
        $(#[$doc:meta])* $api:ident: $trait:path, $what:literal;
        unary { $( $name:ident($req:ident) -> $resp:ident, $scope:ident; )* }
        streaming { $( $sname:ident($sreq:ty) -> $sresp:ident as $assoc:ident, $sscope:ident; )* }
    ) => {
        $(#[$doc])*
        pub struct $api {
            /// Shared per-server context (authentication).
            ctx: Arc<ApiContext>,
        }

        impl $api {
            /// A service over `ctx`.
            pub fn new(ctx: Arc<ApiContext>) -> Self {
                Self { ctx }
            }
        }

        #[tonic::async_trait]
        impl $trait for $api {
            $( type $assoc = crate::grpc::BoxStream<pb::$sresp>; )*

            $(
                async fn $name(&self, request: Request<pb::$req>) -> Result<Response<pb::$resp>, Status> {
                    self.ctx.caller(&request, Scope::$scope).await?;
                    Err(to_status(AppError::Unimplemented($what)))
                }
            )*

            $(
                async fn $sname(&self, request: Request<$sreq>) -> Result<Response<Self::$assoc>, Status> {
                    self.ctx.caller(&request, Scope::$sscope).await?;
                    Err(to_status(AppError::Unimplemented($what)))
                }
            )*
        }
    };
}

placeholder_service! {
    /// `picket.v1.ReportService` until reports land.
    ReportApi: pb::report_service_server::ReportService, "reports are not implemented yet";
    unary {
        get_access_report(GetAccessReportRequest) -> GetAccessReportResponse, Read;
        get_security_summary(GetSecuritySummaryRequest) -> GetSecuritySummaryResponse, Read;
        get_dashboard_metrics(GetDashboardMetricsRequest) -> GetDashboardMetricsResponse, Read;
    }
    streaming {}
}
