pub mod anomaly;
