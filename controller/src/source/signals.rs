//! SIGTERM and SIGINT, which stop every source: the folder's loop and the API server's.

use std::sync::mpsc;

/// Blocks until SIGTERM or SIGINT.
///
/// # Errors
/// When signal handlers cannot be installed.
pub fn wait_for_signal() -> std::io::Result<()> {
    let (stopped, stop) = mpsc::channel();
    on_stop(move || {
        let _ = stopped.send(());
    })?;
    let _ = stop.recv();
    Ok(())
}

/// Handles SIGTERM and SIGINT from now on; the future completes on the first of them. Call it
/// within a tokio runtime.
///
/// # Errors
/// When the handlers cannot be installed.
pub fn stop_signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Calls `then` (once, on a thread of its own) at the first SIGTERM or SIGINT.
///
/// # Errors
/// When the handlers or the thread cannot be made.
pub fn on_stop(then: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let stop = runtime.block_on(async { stop_signals() })?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        runtime.block_on(stop);
        then();
    })?;
    Ok(())
}
