//! Loops that must run for as long as the daemon does (a datapath's packet loops): one
//! that panics on a packet or a bug is started again, logged and counted, instead of
//! leaving that part of the node stopped without a word while the rest runs on.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The pause before a loop that stopped is started again: a loop that fails at once
/// every time costs a little CPU, not a core.
pub const PAUSE: Duration = Duration::from_millis(100);

/// Runs the loop `make` builds, again each time it panics or returns (a loop never
/// should), after [`PAUSE`], for as long as the runtime runs; each restart is logged
/// with `name` and counted in `restarts`.
pub fn keep_running<F, Fut>(name: &'static str, restarts: Arc<AtomicU64>, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match tokio::spawn(make()).await {
                Err(e) if e.is_panic() => {
                    tracing::error!("{name} panicked (started again): {e}");
                }
                Err(e) => {
                    tracing::error!("{name} was cancelled (started again): {e}");
                }
                Ok(()) => tracing::error!("{name} ended (started again)"),
            }
            restarts.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(PAUSE).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[tokio::test]
    async fn a_loop_that_panics_runs_again_and_is_counted() {
        let restarts = Arc::new(AtomicU64::new(0));
        let runs = Arc::new(AtomicU64::new(0));
        let steady = Arc::new(AtomicBool::new(false));
        let (r, s) = (runs.clone(), steady.clone());
        keep_running("test loop", restarts.clone(), move || {
            let (r, s) = (r.clone(), s.clone());
            async move {
                // The first run panics; the second one runs on.
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("a bad packet");
                }
                s.store(true, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !steady.load(Ordering::SeqCst) {
            assert!(tokio::time::Instant::now() < deadline, "never ran again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(restarts.load(Ordering::SeqCst), 1);
    }
}
