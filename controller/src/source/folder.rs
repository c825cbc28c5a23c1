//! Configuration from a folder of manifests, for standalone mode and for a controller without a
//! cluster.
//!
//! The folder is watched (inotify through `notify`) and also rescanned every two seconds in case
//! an event is lost (network filesystems, editors that replace files oddly). Each rescan reads
//! only changed files, translates, and applies the snapshot when it differs from the one being
//! served. Problems are logged once each, naming file, document, object and field; they never
//! stop the process.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use super::signals;
use super::sink::{Publishing, Sink, Stamp, report};
use crate::manifests::ManifestSet;
use crate::{Options, translate};

/// How long a write in progress (a file created or modified, not yet closed) is given to finish
/// before the folder is read. A settled change (a file closed after writing, renamed into place
/// or removed) is read at once.
const DEBOUNCE: Duration = Duration::from_millis(20);
const RESCAN_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is not a readable folder: {1}")]
    Folder(PathBuf, std::io::Error),
    #[error("cannot watch {0}: {1}")]
    Watch(PathBuf, notify::Error),
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
}

/// What wakes the reload loop.
enum Event {
    /// Something in the folder changed; `settled` when no write is left in progress.
    Changed { settled: bool },
    /// SIGTERM or SIGINT: drain and return.
    Stop,
}

/// Reads the folder, feeds `sink`, and follows every change until SIGTERM or SIGINT; returns
/// the sink then (standalone drains its proxy).
///
/// # Errors
/// Only at start: the folder cannot be read or watched.
pub fn run<S: Sink>(dir: &Path, options: Options, sink: S) -> Result<S, Error> {
    std::fs::read_dir(dir).map_err(|e| Error::Folder(dir.to_owned(), e))?;
    let (events, changes) = mpsc::channel();
    let stop_events = events.clone();
    signals::on_stop(move || {
        let _ = stop_events.send(Event::Stop);
    })
    .map_err(Error::Signals)?;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && may_change_content(&event.kind)
        {
            let _ = events.send(Event::Changed { settled: settled(&event.kind) });
        }
    })
    .map_err(|e| Error::Watch(dir.to_owned(), e))?;
    watcher.watch(dir, RecursiveMode::NonRecursive).map_err(|e| Error::Watch(dir.to_owned(), e))?;

    let mut state = State {
        options,
        manifests: ManifestSet::default(),
        publishing: Publishing::new(sink, Stamp::Counter),
        offered: None,
    };
    state.reload(dir);
    loop {
        match changes.recv_timeout(RESCAN_EVERY) {
            Ok(Event::Changed { settled }) => {
                if wait_until_settled(&changes, settled) {
                    break;
                }
            }
            Ok(Event::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        state.reload(dir);
    }
    Ok(state.publishing.sink)
}

/// Whether an event can mean a changed folder. Opening and reading do not: reading the folder
/// for a change made those events, so following them rescanned the folder about fifty times a
/// second, forever.
fn may_change_content(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Whether an event leaves its file complete: closed after writing, renamed (an atomic
/// replacement: editors, `kubectl`-style tools and ConfigMap volumes work this way) or removed.
fn settled(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_)
    )
}

/// After a change: waits for writes in progress to settle (at most [`DEBOUNCE`]), then takes
/// every event already queued, since one read of the folder covers them. True on a stop.
fn wait_until_settled(changes: &mpsc::Receiver<Event>, mut settled: bool) -> bool {
    let deadline = std::time::Instant::now() + DEBOUNCE;
    while !settled {
        match changes.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(Event::Changed { settled: now }) => settled = now,
            Ok(Event::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return true,
            Err(mpsc::RecvTimeoutError::Timeout) => break,
        }
    }
    let mut stop = false;
    while let Ok(event) = changes.try_recv() {
        stop |= matches!(event, Event::Stop);
    }
    stop
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct State<S> {
    options: Options,
    manifests: ManifestSet,
    publishing: Publishing<S>,
    /// What the last translation was offered with; a rescan that finds the same objects and
    /// the same problems skips translating (at 10,000 Ingresses that is 100 ms of CPU).
    offered: Option<Vec<String>>,
}

impl<S: Sink> State<S> {
    fn reload(&mut self, dir: &Path) {
        let started = std::time::Instant::now();
        let scan = match self.manifests.rescan(dir) {
            Ok(scan) => scan,
            Err(e) => {
                report(&format!("cannot list {}: {e}; serving the last good configuration", dir.display()), true);
                return;
            }
        };
        let scan_errors: Vec<String> = scan.errors.iter().map(ToString::to_string).collect();
        if !scan.changed && self.offered.as_ref() == Some(&scan_errors) {
            return;
        }
        let scanned = started.elapsed();
        let (inputs, origins, duplicates) = self.manifests.inputs(self.options.clone());
        let load_errors: Vec<String> =
            scan_errors.iter().cloned().chain(duplicates.iter().map(ToString::to_string)).collect();
        let gathered = started.elapsed();
        let mut translation = translate(&inputs);
        let translated = started.elapsed();
        let release = S::release_memory();
        self.publishing.offer(&mut translation, &origins, &load_errors);
        self.offered = Some(scan_errors);
        tracing::debug!(
            scan_ms = ms(scanned),
            inputs_ms = ms(gathered - scanned),
            translate_ms = ms(translated - gathered),
            offer_ms = ms(started.elapsed() - translated),
            "folder reloaded"
        );
        // Freeing 10,000 objects takes milliseconds: not on this thread's way to the next
        // change. What they held goes back to the system at once.
        std::thread::spawn(move || {
            drop((inputs, origins, translation));
            release();
        });
    }
}

#[cfg(test)]
mod tests {
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind, RemoveKind};

    use super::*;

    #[test]
    fn reading_the_folder_is_no_change_and_writing_is() {
        for quiet in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
        ] {
            assert!(!may_change_content(&quiet), "{quiet:?}");
        }
        for change in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
        ] {
            assert!(may_change_content(&change), "{change:?}");
        }
    }
}
