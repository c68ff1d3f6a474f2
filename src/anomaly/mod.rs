//! Anomaly scoring: Isolation Forest and ECOD (pure math, no IO).
