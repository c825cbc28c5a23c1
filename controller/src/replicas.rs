//! What every controller replica tells the leader about the proxies subscribed to it.
//!
//! Proxies subscribe to any replica, but only the leader writes `Programmed`. Each replica
//! keeps a Lease of its own (`LEASE-IDENTITY`, labelled [`REPLICA_LABEL`]) renewed every few
//! seconds, whose [`PROXIES_ANNOTATION`] lists its connected proxies with the version each
//! applied (or refused). The leader watches these Leases and counts the proxies of every replica
//! whose Lease is current.
//!
//! A replica deletes its own Lease when it stops cleanly ([`retire`]), and the leader deletes
//! replica Leases that expired long ago ([`STALE_AFTER`] lease durations): a replica that died
//! leaves no Lease behind for ever.
//!
//! Versions are publish times in milliseconds (see the publisher), so versions from different
//! replicas compare as times do; this assumes replicas' clocks are synchronised (NTP), as a
//! cluster's nodes are. Each replica stamps a change with its own clock, so the same content
//! gets different versions from different replicas: every version also carries its content id
//! ([`tidegate_snapshot::Snapshot::content`], the same in every replica), which proxies
//! acknowledge with it, and a proxy that holds the content being served counts as current
//! whatever the stamp it got it under.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;

use crate::publish::{ProxyState, Publisher};

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "tidegate-controller";

/// Label on every replica's own Lease; its value is the election Lease's name.
pub const REPLICA_LABEL: &str = "tidegate.dev/replica-of";
/// Annotation holding `{proxy: {version, error}}` as JSON.
pub const PROXIES_ANNOTATION: &str = "tidegate.dev/proxies";

/// A replica Lease whose renewal is older than this many of its durations is deleted by the
/// leader.
pub const STALE_AFTER: i64 = 20;

/// Deletes this replica's own Lease (on a clean stop).
pub async fn retire(client: Client, namespace: &str, election_lease: &str, identity: &str) {
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let name = format!("{election_lease}-{identity}");
    match leases.delete(&name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(lease = %name, "this replica's Lease deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => tracing::warn!(lease = %name, error = %e, "cannot delete this replica's Lease"),
    }
}

/// Keeps this replica's Lease current with its proxies until the task is dropped.
pub async fn report(
    client: Client,
    namespace: String,
    election_lease: String,
    identity: String,
    period: Duration,
    publisher: Arc<Publisher>,
) {
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    let name = format!("{election_lease}-{identity}");
    let mut changed = publisher.proxies_changed();
    loop {
        let proxies: BTreeMap<String, ProxyState> =
            publisher.proxies().into_iter().filter(|(_, p)| p.connected > 0).collect();
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "labels": {REPLICA_LABEL: election_lease},
                "annotations": {PROXIES_ANNOTATION: serde_json::to_string(&proxies).unwrap_or_default()},
            },
            "spec": {
                "holderIdentity": identity,
                "leaseDurationSeconds": (period.as_secs() * 3).max(1),
                "renewTime": MicroTime(Timestamp::now()),
            },
        });
        if let Err(e) = leases.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&lease)).await {
            tracing::warn!(lease = %name, error = %e, "cannot report this replica's proxies");
        }
        // Acknowledgements come in bursts (every proxy acks each version): report once per burst.
        tokio::select! {
            _ = changed.changed() => tokio::time::sleep(Duration::from_millis(200)).await,
            () = tokio::time::sleep(period) => {}
        }
        changed.borrow_and_update();
    }
}

/// The proxies other replicas report, by replica identity, from Leases that are current.
pub type Reports = BTreeMap<String, BTreeMap<String, ProxyState>>;

/// Follows the other replicas' Leases into `reports` until the task is dropped.
pub async fn follow(
    client: Client,
    namespace: String,
    election_lease: String,
    identity: String,
    reports: watch::Sender<Reports>,
    leading: watch::Receiver<bool>,
) {
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{REPLICA_LABEL}={election_lease}"));
    let mut events = std::pin::pin!(watcher(leases.clone(), config).backoff(crate::watch::RetryBackoff::default()));
    let mut seen: BTreeMap<String, Lease> = BTreeMap::new();
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease))) => {
                    seen.insert(lease.metadata.name.clone().unwrap_or_default(), lease);
                }
                Some(Ok(watcher::Event::Delete(lease))) => {
                    seen.remove(lease.metadata.name.as_deref().unwrap_or_default());
                }
                Some(Ok(watcher::Event::Init)) => seen.clear(),
                Some(Ok(watcher::Event::InitDone)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "cannot watch the replicas' Leases"),
                None => return,
            },
            _ = expiry.tick() => {}
        }
        let now = Timestamp::now();
        if *leading.borrow() {
            for (name, lease) in &seen {
                let Some(spec) = lease.spec.as_ref() else { continue };
                let lasts = i64::from(spec.lease_duration_seconds.unwrap_or(15));
                let stale = spec.renew_time.as_ref().is_none_or(|renewed| {
                    renewed.0 + k8s_openapi::jiff::SignedDuration::from_secs(lasts * STALE_AFTER) < now
                });
                if stale && spec.holder_identity.as_deref() != Some(identity.as_str()) {
                    match leases.delete(name, &DeleteParams::default()).await {
                        Ok(_) => tracing::info!(lease = %name, "deleted a replica Lease that expired long ago"),
                        Err(e) => tracing::debug!(lease = %name, error = %e, "cannot delete a stale replica Lease"),
                    }
                }
            }
        }
        let current: Reports = seen
            .values()
            .filter_map(|lease| {
                let spec = lease.spec.as_ref()?;
                let holder = spec.holder_identity.clone()?;
                let renewed = spec.renew_time.as_ref()?.0;
                let lasts =
                    k8s_openapi::jiff::SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
                if holder == identity || renewed + lasts < now {
                    return None;
                }
                let proxies = lease.metadata.annotations.as_ref()?.get(PROXIES_ANNOTATION)?;
                Some((holder, serde_json::from_str(proxies).ok()?))
            })
            .collect();
        reports.send_if_modified(|old| {
            let changed = *old != current;
            *old = current;
            changed
        });
    }
}
