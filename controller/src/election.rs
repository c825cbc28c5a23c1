//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leader election does it.
//!
//! # Guarantees
//! - A replica leads only while it holds the Lease: it acquired or renewed it less than
//!   `renew_deadline` ago. When renewing fails for that long it steps down by itself, before the
//!   Lease (`lease_duration`) can expire for the others.
//! - Another holder's Lease counts as expired when its record has not changed for
//!   `lease_duration` *as observed locally*, so clocks of different nodes need not agree.
//! - Every write carries the `resourceVersion` it read: two replicas racing for the Lease cannot
//!   both win (the API server answers the second with `409 Conflict`).
//! - On a clean stop the holder releases the Lease, so the next replica takes over at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// Which Lease, and its timings.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's name in the Lease (its pod name).
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down.
    pub renew_deadline: Duration,
    /// How often to renew, or to try to acquire.
    pub retry_period: Duration,
}

impl ElectionConfig {
    /// Checks the timings relate as they must.
    ///
    /// # Errors
    /// When a leader could still believe it leads after its Lease expired for the others.
    pub fn check(&self) -> Result<(), String> {
        if self.renew_deadline >= self.lease_duration {
            return Err("--lease-renew-deadline must be shorter than --lease-duration".into());
        }
        if self.retry_period >= self.renew_deadline {
            return Err("--lease-retry-period must be shorter than --lease-renew-deadline".into());
        }
        Ok(())
    }
}

/// The record last read, and when it was read.
struct Observed {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    at: Instant,
}

/// Takes part in the election until `stop` completes; `leading` says whether this replica
/// leads now. Releases the Lease on stop if it holds it.
pub async fn run(client: Client, config: ElectionConfig, leading: watch::Sender<bool>, stop: impl Future<Output = ()>) {
    let leases: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed: Option<Observed> = None;
    let mut renewed: Option<Instant> = None;
    let mut stop = std::pin::pin!(stop);
    loop {
        match attempt(&leases, &config, &mut observed).await {
            Ok(true) => {
                renewed = Some(Instant::now());
                if !*leading.borrow() {
                    tracing::info!(lease = %config.name, identity = %config.identity, "leading: this replica writes status");
                    leading.send_replace(true);
                }
            }
            Ok(false) => {
                if *leading.borrow() {
                    tracing::warn!(lease = %config.name, holder = ?observed.as_ref().and_then(|o| o.holder.clone()), "lost the lease");
                }
                renewed = None;
                leading.send_replace(false);
            }
            Err(e) => {
                tracing::warn!(lease = %config.name, error = %e, "cannot read or write the lease");
                if *leading.borrow() && renewed.is_none_or(|r| r.elapsed() >= config.renew_deadline) {
                    tracing::warn!(lease = %config.name, "not renewed within the renew deadline: stepping down");
                    leading.send_replace(false);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(config.retry_period) => {}
            () = &mut stop => break,
        }
    }
    if *leading.borrow() {
        leading.send_replace(false);
        match release(&leases, &config).await {
            Ok(()) => tracing::info!(lease = %config.name, "lease released"),
            Err(e) => {
                tracing::warn!(lease = %config.name, error = %e, "cannot release the lease; it expires by itself");
            }
        }
    }
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Acquires or renews the Lease; `Ok(true)` when this replica holds it afterwards.
async fn attempt(leases: &Api<Lease>, config: &ElectionConfig, observed: &mut Option<Observed>) -> kube::Result<bool> {
    let now = Timestamp::now();
    let Some(mut lease) = leases.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(config.name.clone()), ..ObjectMeta::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(seconds(config.lease_duration)),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return conflict_is_false(leases.create(&PostParams::default(), &lease).await);
    };
    let spec = lease.spec.get_or_insert_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let renew_time = spec.renew_time.as_ref().map(|t| t.0);
    // The record changed since last read: the holder is alive; restart the expiry clock.
    let unchanged = observed.as_ref().is_some_and(|o| o.holder == holder && o.renew_time == renew_time);
    if !unchanged {
        *observed = Some(Observed { holder: holder.clone(), renew_time, at: Instant::now() });
    }
    let held_for = spec.lease_duration_seconds.map_or(config.lease_duration, |s| Duration::from_secs(s.max(0) as u64));
    let expired = observed.as_ref().is_some_and(|o| o.at.elapsed() >= held_for);
    let mine = holder.as_deref() == Some(config.identity.as_str());
    if !mine && holder.is_some() && !expired {
        return Ok(false);
    }
    if !mine {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(seconds(config.lease_duration));
    let written = conflict_is_false(leases.replace(&config.name, &PostParams::default(), &lease).await)?;
    if written {
        *observed = Some(Observed { holder: Some(config.identity.clone()), renew_time: Some(now), at: Instant::now() });
    }
    Ok(written)
}

/// A write that lost a race (`409`) means another replica holds the Lease.
fn conflict_is_false(result: kube::Result<Lease>) -> kube::Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn release(leases: &Api<Lease>, config: &ElectionConfig) -> kube::Result<()> {
    let Some(mut lease) = leases.get_opt(&config.name).await? else { return Ok(()) };
    let spec = lease.spec.get_or_insert_default();
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    conflict_is_false(leases.replace(&config.name, &PostParams::default(), &lease).await).map(|_| ())
}
