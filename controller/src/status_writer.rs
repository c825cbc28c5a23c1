//! Writes what translation found into the objects' `status`, and a Warning Event for each kind of
//! problem an object has (errors and ignored settings alike).
//! Only the leader writes (see [`crate::election`]).
//!
//! - Ingress: `status.loadBalancer.ingress` lists where it is exposed (`--publish-status-address`,
//!   or the addresses of the `--publish-service` Service) while it is ours and accepted; it is
//!   emptied when an Ingress that showed our addresses stops being ours.
//! - LuaRoute: `Accepted` (`False` with the reason of its first error: `LuaSyntaxError`,
//!   `BackendNotFound`, `SecretNotFound`, `Conflict`, `Invalid`…; the message names the field
//!   and Lua line) and `Programmed` (`True` once every connected proxy acknowledged a version
//!   holding this generation; `False` with reason `Refused` and the proxy's error when one
//!   refused it, `Pending` meanwhile), each with `observedGeneration`.
//!
//! Writes are server-side apply on the `status` subresource with field manager
//! [`FIELD_MANAGER`], and happen only when the wanted status differs from the object's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressLoadBalancerIngress};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;

use crate::luaroute::{self, LuaRoute, LuaRouteStatus};
use crate::objects::{Inputs, ObjectRef, name_of, namespace_of};
use crate::publish::{ProxyState, Publisher};
pub use crate::replicas::FIELD_MANAGER;
use crate::status::{ObjectStatus, Severity};
pub use crate::watch::InvalidObject;

/// What one rebuild saw and concluded.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The version being served.
    pub version: u64,
    /// Its content id: a proxy that acknowledged the same content (through another replica,
    /// under another stamp) serves it too.
    pub content: u64,
    pub inputs: Inputs,
    pub statuses: Vec<ObjectStatus>,
    pub invalid: Vec<InvalidObject>,
}

/// Where Ingresses are exposed, as `status.loadBalancer.ingress` says.
pub fn load_balancer_entries(addresses: &[String]) -> Vec<IngressLoadBalancerIngress> {
    addresses
        .iter()
        .filter(|a| !a.is_empty())
        .map(|a| match a.parse::<IpAddr>() {
            Ok(_) => IngressLoadBalancerIngress { ip: Some(a.clone()), ..Default::default() },
            Err(_) => IngressLoadBalancerIngress { hostname: Some(a.clone()), ..Default::default() },
        })
        .collect()
}

/// Keeps what is needed across passes.
pub struct Writer {
    client: Client,
    recorder: Recorder,
    /// The version that first served each LuaRoute generation.
    served_since: BTreeMap<(String, String, i64), u64>,
    /// Rejections already announced by an Event: object, generation, reason.
    announced: BTreeSet<(ObjectRef, i64, String)>,
}

fn condition(
    kind: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map_or_else(|| Time(Timestamp::now()), |c| c.last_transition_time.clone());
    let mut message = message;
    truncate(&mut message, 32_000);
    Condition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// The `Programmed` condition of an object first served in version `since`: status, reason
/// and message.
///
/// A proxy is behind when it acknowledged an older version than `since`, unless what it
/// acknowledged has the `content` being served now: replicas stamp the same change with their
/// own clocks, and a proxy subscribed to another replica acknowledges that one's stamp.
fn programmed(
    accepted: bool,
    since: u64,
    content: u64,
    proxies: &BTreeMap<String, ProxyState>,
) -> (bool, &'static str, String) {
    let connected: Vec<(&String, &ProxyState)> = proxies.iter().filter(|(_, p)| p.connected > 0).collect();
    let current = |p: &ProxyState| p.version >= since || (content != 0 && p.content == content);
    let refused = connected.iter().find(|(_, p)| current(p) && p.error.is_some());
    let pending: Vec<&str> = connected.iter().filter(|(_, p)| !current(p)).map(|(n, _)| n.as_str()).collect();
    if !accepted {
        (false, "NotAccepted", "not served: see Accepted".into())
    } else if let Some((proxy, state)) = refused {
        let error = state.error.clone().unwrap_or_default();
        (false, "Refused", format!("proxy {proxy} refused version {}: {error}", state.version))
    } else if connected.is_empty() {
        (false, "Pending", "no proxy is connected".into())
    } else if !pending.is_empty() {
        (false, "Pending", format!("waiting for {} to apply version {since}", pending.join(", ")))
    } else {
        let proxies = if connected.len() == 1 { "proxy" } else { "proxies" };
        (true, "Programmed", format!("served by {} {proxies} from version {since}", connected.len()))
    }
}

/// Cuts `text` to at most `max` bytes (plus an ellipsis), on a character boundary: the API
/// server limits condition messages (32 KiB) and Event notes (1 KiB).
fn truncate(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push('…');
}

/// Conditions compared without their transition times.
fn same(a: &[Condition], b: &[Condition]) -> bool {
    let key =
        |c: &Condition| (c.type_.clone(), c.status.clone(), c.reason.clone(), c.message.clone(), c.observed_generation);
    a.len() == b.len() && a.iter().map(key).eq(b.iter().map(key))
}

fn problems_text(status: &ObjectStatus) -> String {
    status
        .problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Writer {
    pub fn new(client: Client, identity: &str) -> Writer {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(identity.to_owned()) };
        Writer {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            served_since: BTreeMap::new(),
            announced: BTreeSet::new(),
        }
    }

    /// Brings every status to what `view` says; returns how many objects were written. A write
    /// that fails is logged and retried on the next pass.
    pub async fn sync(
        &mut self,
        view: &View,
        addresses: &[IngressLoadBalancerIngress],
        proxies: &BTreeMap<String, ProxyState>,
    ) -> usize {
        let by_object: BTreeMap<&ObjectRef, &ObjectStatus> = view.statuses.iter().map(|s| (&s.object, s)).collect();
        let mut written = 0;
        for ingress in &view.inputs.ingresses {
            let object = ObjectRef::namespaced("Ingress", namespace_of(&ingress.metadata), name_of(&ingress.metadata));
            written += usize::from(self.ingress(ingress, by_object.get(&object).copied(), addresses).await);
        }
        for route in &view.inputs.lua_routes {
            let object = ObjectRef::namespaced(luaroute::KIND, namespace_of(&route.metadata), name_of(&route.metadata));
            if let Some(status) = by_object.get(&object) {
                written += usize::from(self.lua_route(route, status, (view.version, view.content), proxies).await);
            }
        }
        for invalid in &view.invalid {
            written += usize::from(self.invalid_lua_route(invalid).await);
        }
        // ConfigMaps have no status: their problems (the global one's keys) are Events.
        for config_map in &view.inputs.config_maps {
            let object =
                ObjectRef::namespaced("ConfigMap", namespace_of(&config_map.metadata), name_of(&config_map.metadata));
            if let Some(status) = by_object.get(&object) {
                self.announce(status, &config_map.metadata, "v1", "ConfigMap").await;
            }
        }
        // Forget generations of LuaRoutes that are gone.
        let present: BTreeSet<(String, String)> = view
            .inputs
            .lua_routes
            .iter()
            .map(|r| (namespace_of(&r.metadata).to_owned(), name_of(&r.metadata).to_owned()))
            .collect();
        self.served_since.retain(|(ns, name, _), _| present.contains(&(ns.clone(), name.clone())));
        let objects: BTreeSet<&ObjectRef> = by_object.keys().copied().collect();
        self.announced.retain(|(object, _, _)| objects.contains(object));
        written
    }

    async fn ingress(
        &mut self,
        ingress: &Ingress,
        status: Option<&ObjectStatus>,
        addresses: &[IngressLoadBalancerIngress],
    ) -> bool {
        let current = ingress
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.clone())
            .unwrap_or_default();
        if let Some(status) = status {
            self.announce(status, &ingress.metadata, "networking.k8s.io/v1", "Ingress").await;
        }
        let wanted = match status {
            Some(s) if s.accepted => addresses.to_vec(),
            // Not ours (or not served): leave others' addresses alone, take back ours.
            _ if !current.is_empty() && current == addresses => Vec::new(),
            _ => return false,
        };
        if wanted == current {
            return false;
        }
        let patch = json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "status": {"loadBalancer": {"ingress": wanted}},
        });
        let api: Api<Ingress> = Api::namespaced(self.client.clone(), namespace_of(&ingress.metadata));
        self.apply(&api, name_of(&ingress.metadata), &patch, "Ingress").await
    }

    async fn lua_route(
        &mut self,
        route: &LuaRoute,
        status: &ObjectStatus,
        (version, content): (u64, u64),
        proxies: &BTreeMap<String, ProxyState>,
    ) -> bool {
        let (namespace, name) = (namespace_of(&route.metadata), name_of(&route.metadata));
        let generation = route.metadata.generation;
        let previous: LuaRouteStatus =
            route.status.clone().and_then(|s| serde_json::from_value(s).ok()).unwrap_or_default();
        let errors = problems_text(status);
        let accepted_ok = status.accepted && errors.is_empty();
        let reason = status
            .problems
            .iter()
            .find(|p| p.severity == Severity::Error)
            .map_or_else(|| "Accepted".to_owned(), |p| format!("{:?}", p.reason));
        let accepted = condition("Accepted", accepted_ok, &reason, errors, generation, &previous.conditions);

        let since = *self
            .served_since
            .entry((namespace.to_owned(), name.to_owned(), generation.unwrap_or(0)))
            .or_insert(version);
        let (ok, reason, why) = programmed(status.accepted, since, content, proxies);
        let programmed = condition("Programmed", ok, reason, why, generation, &previous.conditions);
        self.announce(status, &route.metadata, luaroute::API_VERSION, luaroute::KIND).await;
        let wanted = vec![accepted, programmed];
        if same(&wanted, &previous.conditions) && previous.observed_generation == generation {
            return false;
        }
        self.write_lua_route_status(namespace, name, generation, &wanted).await
    }

    async fn invalid_lua_route(&mut self, invalid: &InvalidObject) -> bool {
        let object = ObjectRef::namespaced(luaroute::KIND, &invalid.namespace, &invalid.name);
        let message = invalid.error.clone();
        let status = ObjectStatus {
            object,
            accepted: false,
            problems: vec![crate::status::Problem {
                severity: Severity::Error,
                reason: crate::status::Reason::Invalid,
                field: String::new(),
                message: message.clone(),
            }],
        };
        let meta = ObjectMeta {
            name: Some(invalid.name.clone()),
            namespace: Some(invalid.namespace.clone()),
            generation: invalid.generation,
            uid: invalid.uid.clone(),
            ..ObjectMeta::default()
        };
        self.announce(&status, &meta, luaroute::API_VERSION, luaroute::KIND).await;
        let accepted = condition("Accepted", false, "Invalid", message, invalid.generation, &[]);
        let programmed =
            condition("Programmed", false, "NotAccepted", "not served: see Accepted".into(), invalid.generation, &[]);
        self.write_lua_route_status(&invalid.namespace, &invalid.name, invalid.generation, &[accepted, programmed])
            .await
    }

    async fn write_lua_route_status(
        &self,
        namespace: &str,
        name: &str,
        generation: Option<i64>,
        conditions: &[Condition],
    ) -> bool {
        let patch = json!({
            "apiVersion": luaroute::API_VERSION,
            "kind": luaroute::KIND,
            "status": {"observedGeneration": generation, "conditions": conditions},
        });
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &crate::watch::lua_route_resource());
        self.apply(&api, name, &patch, luaroute::KIND).await
    }

    async fn apply<K>(&self, api: &Api<K>, name: &str, patch: &serde_json::Value, kind: &str) -> bool
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api.patch_status(name, &params, &Patch::Apply(patch)).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(kind, name, error = %e, "cannot write status; retrying later");
                false
            }
        }
    }

    /// A Warning Event for each reason an object has problems (rejected in whole or in part,
    /// or served with something ignored), once per generation and reason. Errors come first;
    /// the note lists the problems of that reason. kube's [`Recorder`] aggregates repeats of an
    /// Event into a series, and `announced` keeps a pass from repeating one at all.
    async fn announce(&mut self, status: &ObjectStatus, meta: &ObjectMeta, api_version: &str, kind: &str) {
        let mut reasons: Vec<(Severity, crate::status::Reason)> =
            status.problems.iter().map(|p| (p.severity, p.reason)).collect();
        reasons.sort();
        reasons.dedup_by_key(|(_, reason)| *reason);
        for (_, reason) in reasons {
            let name = format!("{reason:?}");
            // Objects without a generation (ConfigMaps) are told again when their content changes.
            let generation = meta.generation.unwrap_or_else(|| {
                let version = meta.resource_version.as_deref().unwrap_or_default();
                i64::try_from(version.parse::<u64>().unwrap_or(0)).unwrap_or(i64::MAX)
            });
            let key = (status.object.clone(), generation, name.clone());
            if self.announced.contains(&key) {
                continue;
            }
            let mut note = problems_of(status, reason);
            truncate(&mut note, 990);
            let reference = ObjectReference {
                api_version: Some(api_version.to_owned()),
                kind: Some(kind.to_owned()),
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                uid: meta.uid.clone(),
                ..ObjectReference::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: name,
                note: Some(note),
                action: "Translate".into(),
                secondary: None,
            };
            match self.recorder.publish(&event, &reference).await {
                Ok(()) => {
                    self.announced.insert(key);
                }
                Err(e) => tracing::warn!(object = %status.object, error = %e, "cannot record an Event"),
            }
        }
    }
}

/// The problems of one reason, errors first: `field: message; field: message`.
fn problems_of(status: &ObjectStatus, reason: crate::status::Reason) -> String {
    let mut problems: Vec<&crate::status::Problem> = status.problems.iter().filter(|p| p.reason == reason).collect();
    problems.sort_by_key(|p| p.severity);
    problems.iter().map(|p| format!("{}: {}", p.field, p.message)).collect::<Vec<_>>().join("; ")
}

/// Writes statuses whenever this replica leads and something changed: a new view, the
/// addresses to publish, a proxy's acknowledgement; and every few seconds to retry failed
/// writes. Returns when the view sender is dropped.
pub async fn run(
    mut writer: Writer,
    mut views: watch::Receiver<Option<Arc<View>>>,
    mut leading: watch::Receiver<bool>,
    mut addresses: watch::Receiver<Vec<IngressLoadBalancerIngress>>,
    mut reports: watch::Receiver<crate::replicas::Reports>,
    publisher: Arc<Publisher>,
    metrics: Arc<crate::metrics::ControllerMetrics>,
) {
    let mut proxies = publisher.proxies_changed();
    let mut retry = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            changed = views.changed() => if changed.is_err() { return },
            _ = leading.changed() => {}
            _ = addresses.changed() => {}
            _ = proxies.changed() => {}
            _ = reports.changed() => {}
            _ = retry.tick() => {}
        }
        let leads = *leading.borrow_and_update();
        metrics.leader.set(i64::from(leads));
        if !leads {
            continue;
        }
        let Some(view) = views.borrow_and_update().clone() else { continue };
        let published = addresses.borrow_and_update().clone();
        let fleet = fleet(&publisher.proxies(), &reports.borrow_and_update());
        let written = writer.sync(&view, &published, &fleet).await;
        metrics.status_writes.inc_by(written as u64);
        if written > 0 {
            tracing::debug!(written, version = view.version, "statuses written");
        }
    }
}

/// Every connected proxy, this replica's and the other replicas': where a proxy appears more
/// than once (it just moved), its latest version counts.
fn fleet(own: &BTreeMap<String, ProxyState>, others: &crate::replicas::Reports) -> BTreeMap<String, ProxyState> {
    let mut all: BTreeMap<String, ProxyState> = BTreeMap::new();
    let reported = others.values().flat_map(|proxies| proxies.iter());
    for (name, state) in own.iter().chain(reported).filter(|(_, s)| s.connected > 0) {
        let entry = all.entry(name.clone()).or_insert_with(|| state.clone());
        if state.version > entry.version {
            *entry = state.clone();
        }
    }
    all
}

/// Follows the addresses of the `--publish-service` Service (`status.loadBalancer.ingress`).
pub async fn follow_service(
    client: Client,
    namespace: String,
    name: String,
    addresses: watch::Sender<Vec<IngressLoadBalancerIngress>>,
) {
    let api: Api<Service> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api, config).backoff(crate::watch::RetryBackoff::default()));
    while let Some(event) = events.next().await {
        let service = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => Some(s),
            Ok(watcher::Event::Delete(_)) => None,
            Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
            Err(e) => {
                tracing::warn!(service = %format!("{namespace}/{name}"), error = %e, "cannot watch the publish Service");
                continue;
            }
        };
        let entries: Vec<IngressLoadBalancerIngress> = service
            .and_then(|s| s.status)
            .and_then(|s| s.load_balancer)
            .and_then(|l| l.ingress)
            .unwrap_or_default()
            .into_iter()
            .map(|i| IngressLoadBalancerIngress { ip: i.ip, hostname: i.hostname, ..Default::default() })
            .collect();
        addresses.send_if_modified(|current| {
            let changed = *current != entries;
            *current = entries;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(version: u64, error: Option<&str>, connected: usize) -> ProxyState {
        ProxyState { version, content: version * 100, error: error.map(str::to_owned), connected }
    }

    #[test]
    fn programmed_follows_what_the_connected_proxies_acknowledged() {
        let fleet = |entries: &[(&str, ProxyState)]| -> BTreeMap<String, ProxyState> {
            entries.iter().map(|(n, p)| ((*n).to_owned(), p.clone())).collect()
        };
        assert_eq!(programmed(false, 5, 500, &BTreeMap::new()).1, "NotAccepted");
        assert_eq!(programmed(true, 5, 500, &BTreeMap::new()), (false, "Pending", "no proxy is connected".into()));
        let waiting = fleet(&[("p1", proxy(5, None, 1)), ("p2", proxy(4, None, 1))]);
        assert_eq!(programmed(true, 5, 500, &waiting), (false, "Pending", "waiting for p2 to apply version 5".into()));
        // A proxy that went away does not hold the condition back.
        let served = fleet(&[("p1", proxy(6, None, 1)), ("p2", proxy(4, None, 0))]);
        assert_eq!(programmed(true, 5, 500, &served), (true, "Programmed", "served by 1 proxy from version 5".into()));
        let refused = fleet(&[("p1", proxy(6, None, 1)), ("p2", proxy(5, Some("Lua x: bad"), 1))]);
        assert_eq!(
            programmed(true, 5, 500, &refused),
            (false, "Refused", "proxy p2 refused version 5: Lua x: bad".into())
        );
        // A refusal of an older version says nothing about this object's.
        let older = fleet(&[("p1", proxy(6, None, 1)), ("p2", proxy(4, Some("old"), 1))]);
        assert_eq!(programmed(true, 5, 500, &older).1, "Pending");
        // Another replica stamped the same content earlier: it is served.
        let other_stamp = fleet(&[("p1", proxy(6, None, 1)), ("p2", proxy(4, None, 1))]);
        assert!(programmed(true, 5, 400, &other_stamp).0, "p2 holds content 400, the current one");
    }

    #[test]
    fn the_fleet_counts_every_replica_and_a_moved_proxy_once() {
        let own = BTreeMap::from([("p1".to_owned(), proxy(7, None, 1))]);
        let others = BTreeMap::from([(
            "c2".to_owned(),
            BTreeMap::from([("p1".to_owned(), proxy(5, None, 1)), ("p2".to_owned(), proxy(6, None, 1))]),
        )]);
        let all = fleet(&own, &others);
        assert_eq!(all.len(), 2);
        assert_eq!(all["p1"].version, 7, "the latest report of a proxy that moved");
        assert_eq!(all["p2"].version, 6);
    }
}
