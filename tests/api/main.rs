//! API tests: the real server on port 0 (both backends), called with the
//! generated clients, grpc-web over HTTP/1.1 and plain HTTP. One test binary.

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod alerts;
mod anomaly;
mod authz_matrix;
mod bad_input;
mod bench;
mod console;
mod crash;
mod enforcement;
mod faults;
mod front_door;
mod grpcweb;
mod incidents;
mod ingest;
mod playbook_process;
mod playbooks;
mod python_sdk;
mod replicas;
mod report_aggregates;
mod reports;
mod restarts;
mod rule_pack;
mod rules;
mod rust_sdk;
mod server;
mod shards;
mod tls;
mod upgrade;
mod webhooks;
