//! `tidegate standalone`: the controller in file mode and the proxy in one process.
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
use tidegate_controller::manifests::{LoadError, ManifestSet, Origin};
use tidegate_controller::{ObjectRef, ObjectStatus, Options, Severity, translate};
use tidegate_proxy::{Proxy, ProxyConfig};
use tidegate_snapshot::Snapshot;

/// Files written in one go (an editor's save, `cp -r`) arrive as bursts of events.
const DEBOUNCE: Duration = Duration::from_millis(20);
const RESCAN_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is not a readable folder: {1}")]
    Folder(PathBuf, std::io::Error),
    #[error(transparent)]
    Proxy(#[from] tidegate_proxy::StartError),
    #[error("cannot watch {0}: {1}")]
    Watch(PathBuf, notify::Error),
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
}

/// What wakes the reload loop.
enum Event {
    Changed,
    /// SIGTERM or SIGINT: drain and return.
    Stop,
}

/// Runs until SIGTERM or SIGINT, then drains: no new connections, open ones finish (for at most
/// `drain_timeout`).
///
/// # Errors
/// Only at start: the folder cannot be read or watched, or a listener cannot be bound.
pub fn run(dir: &Path, proxy_config: &ProxyConfig, options: Options, drain_timeout: Duration) -> Result<(), Error> {
    std::fs::read_dir(dir).map_err(|e| Error::Folder(dir.to_owned(), e))?;
    let proxy = Proxy::start(proxy_config)?;
    let a = proxy.addresses();
    tracing::info!(http = %a.http, https = %a.https, admin = %a.admin, manifests = %dir.display(), "listening");

    let (events, changes) = mpsc::channel();
    watch_signals(events.clone()).map_err(Error::Signals)?;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = events.send(Event::Changed);
        }
    })
    .map_err(|e| Error::Watch(dir.to_owned(), e))?;
    watcher.watch(dir, RecursiveMode::NonRecursive).map_err(|e| Error::Watch(dir.to_owned(), e))?;

    let mut state = State {
        proxy,
        options,
        manifests: ManifestSet::default(),
        served: None,
        version: 0,
        reported: BTreeSet::new(),
    };
    state.reload(dir);
    loop {
        match changes.recv_timeout(RESCAN_EVERY) {
            Ok(Event::Changed) => {
                std::thread::sleep(DEBOUNCE);
                let mut stop = false;
                while let Ok(event) = changes.try_recv() {
                    stop |= matches!(event, Event::Stop);
                }
                if stop {
                    break;
                }
            }
            Ok(Event::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        state.reload(dir);
    }
    tracing::info!(timeout_s = drain_timeout.as_secs_f64(), "draining: no new connections, open ones finish");
    let left = state.proxy.drain(drain_timeout);
    tracing::info!(connections_cut = left, "stopped");
    Ok(())
}

/// Sends [`Event::Stop`] on SIGTERM or SIGINT.
fn watch_signals(events: mpsc::Sender<Event>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut term, mut int) = runtime.block_on(async {
        Ok::<_, std::io::Error>((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
    })?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        runtime.block_on(async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        let _ = events.send(Event::Stop);
    })?;
    Ok(())
}

struct State {
    proxy: Proxy,
    options: Options,
    manifests: ManifestSet,
    /// The snapshot being served, version left at 0 for comparison.
    served: Option<Snapshot>,
    version: u64,
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
    load_errors: Vec<String>,
}

#[derive(Serialize)]
struct ObjectEntry<'a> {
    #[serde(flatten)]
    status: &'a ObjectStatus,
    source: Option<String>,
    /// Where the object is exposed, as Ingress `status.loadBalancer` would say.
    load_balancer: Vec<String>,
}

impl State {
    fn reload(&mut self, dir: &Path) {
        let scan = match self.manifests.rescan(dir) {
            Ok(scan) => scan,
            Err(e) => {
                report(&format!("cannot list {}: {e}; serving the last good configuration", dir.display()), true);
                return;
            }
        };
        let (inputs, origins, duplicates) = self.manifests.inputs(self.options.clone());
        let translation = translate(&inputs);
        let mut problems = BTreeSet::new();
        for error in scan.errors.iter().chain(&duplicates) {
            problems.insert((true, error.to_string()));
        }
        for status in &translation.statuses {
            for p in &status.problems {
                let source = origins.get(&status.object).map_or_else(String::new, |o| format!("{o}: "));
                let line = format!("{source}{}: field {}: {} ({:?})", status.object, p.field, p.message, p.reason);
                problems.insert((p.severity == Severity::Error, line));
            }
        }

        let snapshot = translation.snapshot;
        if self.served.as_ref() != Some(&snapshot) {
            self.version += 1;
            let mut stamped = snapshot.clone();
            stamped.version = self.version;
            match self.proxy.apply(&stamped) {
                Ok(applied) => {
                    tracing::info!(
                        version = applied.version,
                        hosts = stamped.routing.virtual_hosts.len(),
                        backends = stamped.endpoints.len(),
                        routing_rebuilt = applied.routing_rebuilt,
                        apply_ms = applied.duration.as_secs_f64() * 1000.0,
                        "configuration applied"
                    );
                    for warning in applied.warnings {
                        problems.insert((true, warning));
                    }
                    self.served = Some(snapshot);
                }
                Err(e) => {
                    problems.insert((true, format!("configuration refused, the previous one keeps serving: {e}")));
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
        self.publish_status(&translation.statuses, &origins, &scan.errors, &duplicates);
        // Ready once a configuration is served and its status published, in that order.
        if self.served.is_some() {
            self.proxy.set_ready();
        }
    }

    fn publish_status(
        &self,
        statuses: &[ObjectStatus],
        origins: &BTreeMap<ObjectRef, Origin>,
        errors: &[LoadError],
        duplicates: &[LoadError],
    ) {
        let address = self.proxy.addresses().http.ip().to_string();
        let objects = statuses
            .iter()
            .map(|status| ObjectEntry {
                status,
                source: origins.get(&status.object).map(ToString::to_string),
                load_balancer: if status.accepted { vec![address.clone()] } else { Vec::new() },
            })
            .collect();
        let load_errors = errors.iter().chain(duplicates).map(ToString::to_string).collect();
        let document = StatusDocument { version: self.version, objects, load_errors };
        let rejected = statuses.iter().filter(|s| !s.accepted).count() + errors.len() + duplicates.len();
        if let Ok(json) = serde_json::to_vec(&document) {
            self.proxy.set_status(json.into(), rejected);
        }
    }
}
