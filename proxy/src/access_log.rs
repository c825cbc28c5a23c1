//! Access log: one JSON line per request on stdout.
//!
//! Workers never write to stdout themselves (a slow terminal or pipe would block them): they
//! hand finished lines to a writer thread through a bounded channel, and count a line as dropped
//! when the channel is full.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use serde::Serialize;

/// Lines buffered between the workers and the writer.
const BUFFERED_LINES: usize = 16_384;

#[derive(Debug, Serialize)]
pub(crate) struct Entry {
    /// Seconds since the Unix epoch, with milliseconds.
    pub(crate) ts: f64,
    pub(crate) remote_addr: String,
    pub(crate) method: String,
    pub(crate) host: String,
    pub(crate) path: String,
    pub(crate) protocol: &'static str,
    pub(crate) status: u16,
    pub(crate) bytes_sent: u64,
    /// Whether the whole body reached the client.
    pub(crate) completed: bool,
    pub(crate) request_time_ms: f64,
    pub(crate) upstream: Option<String>,
    pub(crate) upstream_time_ms: Option<f64>,
    pub(crate) route: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct AccessLog {
    sender: Option<SyncSender<String>>,
}

impl AccessLog {
    pub(crate) fn start(enabled: bool) -> std::io::Result<Self> {
        if !enabled {
            return Ok(AccessLog { sender: None });
        }
        let (sender, receiver) = sync_channel(BUFFERED_LINES);
        std::thread::Builder::new().name("access-log".into()).spawn(move || write_lines(&receiver))?;
        Ok(AccessLog { sender: Some(sender) })
    }

    pub(crate) fn enabled(&self) -> bool {
        self.sender.is_some()
    }

    /// Queues an entry; returns false when it had to be dropped.
    pub(crate) fn record(&self, entry: &Entry) -> bool {
        let Some(sender) = &self.sender else { return true };
        let Ok(line) = serde_json::to_string(entry) else { return false };
        match sender.try_send(line) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

fn write_lines(receiver: &Receiver<String>) {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    while let Ok(line) = receiver.recv() {
        let _ = writeln!(out, "{line}");
        // Drain what is queued, then flush once, so a burst costs one write.
        while let Ok(line) = receiver.try_recv() {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}
