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
    /// `picket.v1.PlaybookService` until playbooks land.
    PlaybookApi: pb::playbook_service_server::PlaybookService, "playbooks are not implemented yet";
    unary {
        create_playbook(CreatePlaybookRequest) -> CreatePlaybookResponse, Admin;
        get_playbook(GetPlaybookRequest) -> GetPlaybookResponse, Read;
        list_playbooks(ListPlaybooksRequest) -> ListPlaybooksResponse, Read;
        update_playbook(UpdatePlaybookRequest) -> UpdatePlaybookResponse, Admin;
        delete_playbook(DeletePlaybookRequest) -> DeletePlaybookResponse, Admin;
        start_playbook_run(StartPlaybookRunRequest) -> StartPlaybookRunResponse, Respond;
        get_playbook_run(GetPlaybookRunRequest) -> GetPlaybookRunResponse, Read;
        list_playbook_runs(ListPlaybookRunsRequest) -> ListPlaybookRunsResponse, Read;
        approve_playbook_run(ApprovePlaybookRunRequest) -> ApprovePlaybookRunResponse, Respond;
        reject_playbook_run(RejectPlaybookRunRequest) -> RejectPlaybookRunResponse, Respond;
        cancel_playbook_run(CancelPlaybookRunRequest) -> CancelPlaybookRunResponse, Respond;
    }
    streaming {}
}
