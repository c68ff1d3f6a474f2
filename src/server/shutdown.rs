//! The process-level shutdown trigger: resolves on SIGINT or SIGTERM.

use std::future::Future;

/// Listens for SIGINT (Ctrl-C) or SIGTERM from the moment it is called (the
/// handlers are installed before it returns, so a signal that arrives before
/// the returned future is first polled still stops the server gracefully
/// instead of killing the process); the future resolves on the first of them.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let (interrupt, term) = {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, signal = name, "failed to listen for a signal");
                None
            }
        };
        (
            listen(SignalKind::interrupt(), "SIGINT"),
            listen(SignalKind::terminate(), "SIGTERM"),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(interrupt) => tracing::info!(signal = "SIGINT", "signal received"),
                () = wait(term) => tracing::info!(signal = "SIGTERM", "signal received"),
            }
        }
        #[cfg(not(unix))]
        {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "failed to listen for SIGINT");
                std::future::pending::<()>().await;
            }
            tracing::info!(signal = "SIGINT", "signal received");
        }
    }
}
