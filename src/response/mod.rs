//! Response: what Picket does about threats. Enforcement decisions (bans,
//! allows and throttles on IPs, ranges and actors) that gateways consult
//! live ([`decisions`] to make and revoke them, [`enforcer`] for the
//! in-memory index behind CheckAccess and WatchDecisions, [`expiry`] for the
//! task that applies expiries and compacts the log).

pub mod decisions;
pub mod enforcer;
pub mod expiry;
