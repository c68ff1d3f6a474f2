//! Access: who may call and on whose behalf. API keys and the operator token
//! ([`auth`]: generation, keyed hashing, constant-time verification, the
//! authenticated [`auth::Caller`]) and the tenant and key administration
//! shared by `AdminService` and `picket admin` ([`admin`]).

pub mod admin;
pub mod auth;
