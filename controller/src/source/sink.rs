//! Where translations go: the [`Sink`] contract (a proxy in the same process, or the proxies
//! subscribed to a controller) and [`Publishing`], which stamps versions, applies changed
//! snapshots, logs each problem once and publishes statuses, for every source alike.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use tidegate_snapshot::Snapshot;

use crate::manifests::Origin;
use crate::{ObjectRef, ObjectStatus, Severity, Translation};

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
    /// Gives memory freed after a change back to the system (a proxy's allocator); called on
    /// the thread that frees the objects of the change before.
    fn release_memory() -> fn() {
        || {}
    }
}

/// How versions are stamped.
#[derive(Clone, Copy, Debug)]
pub enum Stamp {
    /// 1, 2, 3…: one process is the only source.
    Counter,
    /// Milliseconds since the Unix epoch, strictly increasing: controller replicas publish
    /// independently, and a proxy that moves from one to another still sees later versions as
    /// larger.
    Clock,
}

/// Offers translations to a sink: stamps and applies changed snapshots, logs each problem once
/// when it appears, publishes statuses, declares readiness.
pub struct Publishing<S> {
    pub sink: S,
    stamp: Stamp,
    /// The snapshot being served (compared without its version).
    served: Option<Snapshot>,
    version: u64,
    /// The content id of `version`.
    content: u64,
    /// Problems already logged; each is logged when it appears, not on every rescan.
    reported: BTreeSet<String>,
}

pub(super) fn report(line: &str, error: bool) {
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

impl<S: Sink> Publishing<S> {
    pub fn new(sink: S, stamp: Stamp) -> Self {
        Publishing { sink, stamp, served: None, version: 0, content: 0, reported: BTreeSet::new() }
    }

    /// The version last stamped.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The content id of the version last stamped.
    pub fn content(&self) -> u64 {
        self.content
    }

    /// A snapshot has been applied.
    pub fn serving(&self) -> bool {
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
    pub fn offer(
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
