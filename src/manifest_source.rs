//! Configuration from a folder of manifests, for standalone mode and for a controller without a
//! cluster.
//!
//! The folder is watched (inotify through `notify`) and also rescanned every two seconds in case
//! an event is lost (network filesystems, editors that replace files oddly). Each rescan reads
//! only changed files, translates, and applies the snapshot when it differs from the one being
//! served. Problems are logged once each, naming file, document, object and field; they never
//! stop the process.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use tidegate_controller::manifests::{ManifestSet, Origin};
use tidegate_controller::{ObjectRef, ObjectStatus, Options, Severity, Translation, translate};
use tidegate_snapshot::Snapshot;

/// How long a write in progress (a file created or modified, not yet closed) is given to finish
/// before the folder is read. A settled change (a file closed after writing, renamed into place
/// or removed) is read at once.
const DEBOUNCE: Duration = Duration::from_millis(20);
const RESCAN_EVERY: Duration = Duration::from_secs(2);

/// Where configurations go: a local proxy, or the proxies subscribed to a controller.
pub trait Sink {
    /// Serves or passes on a stamped snapshot; `Err` says why it was refused.
    ///
    /// # Errors
    /// When the snapshot does not build; what was served before keeps serving.
    fn apply(&mut self, snapshot: &Snapshot) -> Result<Vec<String>, String>;
    /// Publishes the per-object statuses (JSON) and the count of rejected objects.
    fn set_status(&self, json: bytes::Bytes, rejected: usize);
    /// Declares readiness: a configuration is served and its status published.
    fn set_ready(&self);
    /// The address Ingress statuses report.
    fn address(&self) -> String;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is not a readable folder: {1}")]
    Folder(PathBuf, std::io::Error),
    #[error(transparent)]
    Proxy(#[from] tidegate_proxy::StartError),
    #[error("cannot start: {0}")]
    Start(String),
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
    watch_signals(events.clone()).map_err(Error::Signals)?;
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

/// Blocks until SIGTERM or SIGINT.
///
/// # Errors
/// When signal handlers cannot be installed.
pub fn wait_for_signal() -> std::io::Result<()> {
    let (events, stop) = mpsc::channel();
    watch_signals(events)?;
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

/// Sends [`Event::Stop`] on SIGTERM or SIGINT.
fn watch_signals(events: mpsc::Sender<Event>) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let stop = runtime.block_on(async { stop_signals() })?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        runtime.block_on(stop);
        let _ = events.send(Event::Stop);
    })?;
    Ok(())
}

struct State<S> {
    options: Options,
    manifests: ManifestSet,
    publishing: Publishing<S>,
    /// What the last translation was offered with; a rescan that finds the same objects and
    /// the same problems skips translating (at 10,000 Ingresses that is 100 ms of CPU).
    offered: Option<Vec<String>>,
}

/// How versions are stamped.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stamp {
    /// 1, 2, 3…: one process is the only source.
    Counter,
    /// Milliseconds since the Unix epoch, strictly increasing: controller replicas publish
    /// independently, and a proxy that moves from one to another still sees later versions as
    /// larger.
    Clock,
}

/// Offers translations to a sink: stamps and applies changed snapshots, logs each problem once
/// when it appears, publishes statuses, declares readiness.
pub(crate) struct Publishing<S> {
    pub(crate) sink: S,
    stamp: Stamp,
    /// The snapshot being served (compared without its version).
    served: Option<Snapshot>,
    version: u64,
    /// The content id of `version`.
    content: u64,
    /// Problems already logged; each is logged when it appears, not on every rescan.
    reported: BTreeSet<String>,
}

fn report(line: &str, error: bool) {
    if error {
        tracing::error!("{line}");
    } else {
        tracing::warn!("{line}");
    }
}

/// `/status` on the admin port: what is wrong with what, where it was read from.
#[derive(Serialize)]
struct StatusDocument<'a> {
    version: u64,
    objects: Vec<ObjectEntry<'a>>,
    load_errors: &'a [String],
}

#[derive(Serialize)]
struct ObjectEntry<'a> {
    #[serde(flatten)]
    status: &'a ObjectStatus,
    source: Option<String>,
    /// Where the object is exposed, as Ingress `status.loadBalancer` would say.
    load_balancer: Vec<String>,
}

impl<S: Sink> State<S> {
    fn reload(&mut self, dir: &Path) {
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
        let (inputs, origins, duplicates) = self.manifests.inputs(self.options.clone());
        let load_errors: Vec<String> =
            scan_errors.iter().cloned().chain(duplicates.iter().map(ToString::to_string)).collect();
        let mut translation = translate(&inputs);
        self.publishing.offer(&mut translation, &origins, &load_errors);
        self.offered = Some(scan_errors);
        // Freeing 10,000 objects takes milliseconds: not on this thread's way to the next
        // change. What they held goes back to the system at once.
        std::thread::spawn(move || {
            drop((inputs, origins, translation));
            tidegate_proxy::release_free_memory();
        });
    }
}

impl<S: Sink> Publishing<S> {
    pub(crate) fn new(sink: S, stamp: Stamp) -> Self {
        Publishing { sink, stamp, served: None, version: 0, content: 0, reported: BTreeSet::new() }
    }

    /// The version last stamped.
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// The content id of the version last stamped.
    pub(crate) fn content(&self) -> u64 {
        self.content
    }

    /// A snapshot has been applied.
    pub(crate) fn serving(&self) -> bool {
        self.served.is_some()
    }

    fn next_version(&self) -> u64 {
        match self.stamp {
            Stamp::Counter => self.version + 1,
            Stamp::Clock => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                (self.version + 1).max(u64::try_from(now.as_millis()).unwrap_or(u64::MAX))
            }
        }
    }

    /// Serves `translation` if its snapshot differs from the one served; `load_errors` are
    /// objects that could not be read at all. The snapshot is taken out of `translation` (a copy
    /// of 10,000 virtual hosts costs 10 ms), and the one it replaces (or itself, when it is not
    /// served) is put back: whoever owns the translation frees it where it suits them.
    pub(crate) fn offer(
        &mut self,
        translation: &mut Translation,
        origins: &BTreeMap<ObjectRef, Origin>,
        load_errors: &[String],
    ) {
        let mut problems = BTreeSet::new();
        for error in load_errors.iter().chain(&translation.problems) {
            problems.insert((true, error.clone()));
        }
        for status in &translation.statuses {
            for p in &status.problems {
                let source = origins.get(&status.object).map_or_else(String::new, |o| format!("{o}: "));
                let line = format!("{source}{}: field {}: {} ({:?})", status.object, p.field, p.message, p.reason);
                problems.insert((p.severity == Severity::Error, line));
            }
        }

        let snapshot = std::mem::take(&mut translation.snapshot);
        let same = |served: &Snapshot| served.routing == snapshot.routing && served.endpoints == snapshot.endpoints;
        if self.served.as_ref().is_some_and(same) {
            translation.snapshot = snapshot;
        } else {
            self.version = self.next_version();
            let mut stamped = snapshot;
            stamped.version = self.version;
            stamped.content = stamped.content_id();
            self.content = stamped.content;
            match self.sink.apply(&stamped) {
                Ok(warnings) => {
                    for warning in warnings {
                        problems.insert((true, warning));
                    }
                    translation.snapshot = self.served.replace(stamped).unwrap_or_default();
                }
                Err(e) => {
                    problems.insert((true, format!("configuration refused, the previous one keeps serving: {e}")));
                    translation.snapshot = stamped;
                }
            }
        }

        let current: BTreeSet<String> = problems.iter().map(|(_, line)| line.clone()).collect();
        for (error, line) in &problems {
            if !self.reported.contains(line) {
                report(line, *error);
            }
        }
        self.reported = current;
        self.publish_status(&translation.statuses, origins, load_errors);
        // Ready once a configuration is served and its status published, in that order.
        if self.served.is_some() {
            self.sink.set_ready();
        }
    }

    fn publish_status(&self, statuses: &[ObjectStatus], origins: &BTreeMap<ObjectRef, Origin>, load_errors: &[String]) {
        let address = self.sink.address();
        let objects = statuses
            .iter()
            .map(|status| ObjectEntry {
                status,
                source: origins.get(&status.object).map(ToString::to_string),
                load_balancer: if status.accepted && !address.is_empty() { vec![address.clone()] } else { Vec::new() },
            })
            .collect();
        let document = StatusDocument { version: self.version, objects, load_errors };
        let rejected = statuses.iter().filter(|s| !s.accepted).count() + load_errors.len();
        if let Ok(json) = serde_json::to_vec(&document) {
            self.sink.set_status(json.into(), rejected);
        }
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
