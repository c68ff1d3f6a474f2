//! Several replicas on one store: the Redis bridge ([`replicas`]) that carries
//! wake-up signals ([`crate::ingest::signal`]) between `picket serve`
//! processes. Redis only signals; the store stays the source of truth.

pub mod replicas;
