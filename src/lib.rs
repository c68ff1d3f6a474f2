pub mod anomaly;
pub mod cli_anomaly;
