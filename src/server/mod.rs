//! The process around the capabilities: settings ([`config`]), assembly and
//! serving ([`startup`]), TLS on the port with certificate rotation
//! ([`tls`]), the shutdown trigger ([`shutdown`]), logs and metrics
//! ([`telemetry`]). Nothing below this layer imports it.

pub mod config;
pub mod limits;
pub mod shutdown;
pub mod startup;
pub mod telemetry;
pub mod tls;
