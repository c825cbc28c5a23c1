//! Objects from the Kubernetes API server, kept in caches that translation reads as [`Inputs`].
//!
//! One kube-rs watcher (list, then watch from the listed `resourceVersion`, with bookmarks and
//! backoff) per kind, and per namespace with `--watch-namespace`.
//!
//! # Guarantees
//! - [`Watched::synced`] is false until every watcher has finished its first list: the caller
//!   never translates an empty or partial view.
//! - A relist (after `410 Gone`, or a watch that cannot resume) is buffered and swapped in whole
//!   when it ends: the cache never passes through a state with fewer objects than either side.
//! - Secrets: only `kubernetes.io/tls` and `Opaque` ones (field selectors), optionally narrowed
//!   by a label selector, and only as metadata. The data of a Secret is fetched when an Ingress or
//!   LuaRoute names it (again when its `resourceVersion` changes), so the keys of Secrets
//!   nobody references are never held.
//! - ConfigMaps the same way: metadata only, and the data of those named (the global
//!   `--configmap`, and the ConfigMaps of headers it and annotations name) fetched when named.
//!   The global ConfigMap is watched in its own namespace even when `--watch-namespace` leaves
//!   that namespace out.
//! - A LuaRoute that does not deserialize is kept as an error naming the field, for its
//!   status; it does not stop the watch of the others.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, DynamicObject, PartialObjectMeta};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher as watch_stream;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use tokio::sync::Notify;

use crate::luaroute::{self, LuaRoute};
use crate::objects::{Inputs, Options};

/// What to watch.
#[derive(Clone, Debug, Default)]
pub struct WatchConfig {
    /// Namespaces to watch; all of them when empty.
    pub namespaces: Vec<String>,
    /// Narrows the TLS Secrets watched (`--secret-label-selector`).
    pub secret_labels: Option<String>,
    pub options: Options,
}

/// `namespace/name` (namespace empty for cluster-scoped objects).
pub type Key = (String, String);

/// One watcher's objects.
#[derive(Debug)]
struct Cache<T> {
    objects: BTreeMap<Key, T>,
    /// Objects of a list in progress, swapped in when it ends.
    relisting: Option<BTreeMap<Key, T>>,
    listed: bool,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Cache { objects: BTreeMap::new(), relisting: None, listed: false }
    }
}

type Shared<T> = Arc<Mutex<Cache<T>>>;

/// A LuaRoute that does not deserialize: its key, generation and what is wrong.
#[derive(Clone, Debug)]
pub struct InvalidObject {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub uid: Option<String>,
    pub error: String,
}

/// A LuaRoute as read from the API server.
#[derive(Clone, Debug)]
pub enum WatchedLuaRoute {
    Parsed(Arc<LuaRoute>),
    /// It does not deserialize: the field and why.
    Invalid(InvalidObject),
}

/// The caches of every watcher, and what wakes the rebuild loop.
#[derive(Debug, Default)]
pub struct Watched {
    ingresses: Vec<Shared<Arc<Ingress>>>,
    classes: Vec<Shared<Arc<IngressClass>>>,
    services: Vec<Shared<Arc<Service>>>,
    slices: Vec<Shared<Arc<EndpointSlice>>>,
    lua_routes: Vec<Shared<WatchedLuaRoute>>,
    /// TLS Secrets by key: their `resourceVersion`.
    secrets: Vec<Shared<String>>,
    /// ConfigMaps by key: their `resourceVersion`.
    config_maps: Vec<Shared<String>>,
    /// ConfigMaps of Lua modules (labelled `tidegate.dev/lua-modules`), by key: read whole.
    lua_module_maps: Vec<Shared<String>>,
    changed: Arc<Notify>,
    options: Options,
}

/// The objects that are referenced (Secrets, ConfigMaps), by key, with the version each was
/// read at.
#[derive(Debug)]
pub struct Held<K> {
    read: BTreeMap<Key, (String, Arc<K>)>,
}

impl<K> Default for Held<K> {
    fn default() -> Self {
        Held { read: BTreeMap::new() }
    }
}

/// The data translation reads only when an object names it.
#[derive(Debug, Default)]
pub struct SecretData {
    secrets: Held<Secret>,
    config_maps: Held<ConfigMap>,
}

fn lock<T>(cache: &Shared<T>) -> MutexGuard<'_, Cache<T>> {
    cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

/// Follows one watcher into its cache until the task is dropped.
fn follow<K, T>(
    stream: impl futures_util::Stream<Item = watcher::Result<Event<K>>> + Send + 'static,
    kind: &'static str,
    convert: fn(K) -> T,
    changed: Arc<Notify>,
) -> Shared<T>
where
    K: Resource + Send + 'static,
    T: Send + 'static,
{
    let cache: Shared<T> = Arc::default();
    let filled = Arc::clone(&cache);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut backoff = RetryBackoff::default();
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => {
                    backoff.reset();
                    event
                }
                // The watch resumed from a version the server no longer has: the watcher
                // relists on the next poll, at once (a relist is what an outage ends in).
                Err(e) if gone(&e) => {
                    tracing::warn!(kind, error = %e, "watch expired; relisting now, the last view keeps serving");
                    backoff.reset();
                    continue;
                }
                Err(e) => {
                    let delay = backoff.next().unwrap_or(RetryBackoff::MAX);
                    tracing::warn!(kind, error = %e, retry_ms = delay.as_millis(), "watch failed; the last view keeps serving");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let mut cache = lock(&filled);
            match event {
                Event::Init => cache.relisting = Some(BTreeMap::new()),
                Event::InitApply(object) => {
                    let key = key_of(object.meta());
                    cache.relisting.get_or_insert_default().insert(key, convert(object));
                }
                Event::InitDone => {
                    cache.objects = cache.relisting.take().unwrap_or_default();
                    if !cache.listed {
                        tracing::info!(kind, objects = cache.objects.len(), "listed");
                    }
                    cache.listed = true;
                }
                Event::Apply(object) => {
                    let key = key_of(object.meta());
                    cache.objects.insert(key, convert(object));
                }
                Event::Delete(object) => {
                    cache.objects.remove(&key_of(object.meta()));
                }
            }
            // Objects listed so far are not a view yet: wake the loop once the list is whole.
            let listing = cache.relisting.is_some();
            drop(cache);
            if !listing {
                changed.notify_one();
            }
        }
    });
    cache
}

/// Whether a watch error says the resumed version is gone (`410`): a relist, not a failure.
fn gone(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status)
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// Delays between attempts after a watch fails: 100 ms doubling to 500 ms, with up to a quarter
/// of jitter; back to 100 ms once a watch works again. So the end of an outage is noticed within
/// 625 ms, and the relist its `410` asks for starts at once: a change is served within a second
/// of the API server's return. kube's default goes up to 30 s, which would keep a cluster's
/// configuration stale that long after an outage; each watcher asks about twice a second while
/// it lasts.
#[derive(Debug, Clone, Copy)]
pub struct RetryBackoff {
    next: std::time::Duration,
}

impl RetryBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX: std::time::Duration = std::time::Duration::from_millis(500);
}

impl Default for RetryBackoff {
    fn default() -> Self {
        RetryBackoff { next: Self::FIRST }
    }
}

impl Iterator for RetryBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        let delay = self.next;
        self.next = (delay * 2).min(Self::MAX);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        Some(delay + delay / 4 * (nanos % 1000) / 1000)
    }
}

impl kube::runtime::utils::Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// How the API server names the LuaRoute resource.
pub fn lua_route_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(luaroute::GROUP, luaroute::VERSION, luaroute::KIND);
    ApiResource::from_gvk_with_plural(&gvk, luaroute::PLURAL)
}

fn parse_lua_route(object: DynamicObject) -> WatchedLuaRoute {
    let meta = object.metadata.clone();
    let invalid = |error: String| {
        WatchedLuaRoute::Invalid(InvalidObject {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            generation: meta.generation,
            uid: meta.uid.clone(),
            error,
        })
    };
    let value = match serde_json::to_value(object) {
        Ok(value) => value,
        Err(e) => return invalid(e.to_string()),
    };
    match serde_path_to_error::deserialize::<_, LuaRoute>(value) {
        Ok(route) => WatchedLuaRoute::Parsed(Arc::new(route)),
        Err(e) => invalid(format!("field {}: {}", e.path(), e.inner())),
    }
}

impl Watched {
    /// Starts every watcher on the current tokio runtime.
    pub fn start(client: &Client, config: &WatchConfig) -> Arc<Watched> {
        let changed = Arc::new(Notify::new());
        let scopes: Vec<Option<&str>> = if config.namespaces.is_empty() {
            vec![None]
        } else {
            config.namespaces.iter().map(|n| Some(n.as_str())).collect()
        };
        let mut watched =
            Watched { changed: Arc::clone(&changed), options: config.options.clone(), ..Watched::default() };
        let plain = watcher::Config::default;
        watched.classes.push(follow(
            watch_stream(Api::<IngressClass>::all(client.clone()), plain()),
            "IngressClass",
            Arc::new,
            Arc::clone(&changed),
        ));
        let mut secret_config = plain().fields("type=kubernetes.io/tls");
        let mut opaque_config = plain().fields("type=Opaque");
        if let Some(labels) = &config.secret_labels {
            secret_config = secret_config.labels(labels);
            opaque_config = opaque_config.labels(labels);
        }
        for scope in scopes {
            let c = || Arc::clone(&changed);
            watched.ingresses.push(follow(watch_stream(api(client, scope), plain()), "Ingress", Arc::new, c()));
            watched.services.push(follow(watch_stream(api(client, scope), plain()), "Service", Arc::new, c()));
            watched.slices.push(follow(watch_stream(api(client, scope), plain()), "EndpointSlice", Arc::new, c()));
            let resource = lua_route_resource();
            let lua_api: Api<DynamicObject> = match scope {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            watched.lua_routes.push(follow(watch_stream(lua_api, plain()), luaroute::KIND, parse_lua_route, c()));
            let version = |s: PartialObjectMeta<Secret>| s.metadata.resource_version.unwrap_or_default();
            // TLS Secrets for certificates, Opaque ones for what policies name (auth-secret).
            for config in [secret_config.clone(), opaque_config.clone()] {
                let secrets: Api<PartialObjectMeta<Secret>> = api(client, scope);
                watched.secrets.push(follow(watch_stream(secrets, config), "Secret", version, c()));
            }
            let config_maps: Api<PartialObjectMeta<ConfigMap>> = api(client, scope);
            let version = |c: PartialObjectMeta<ConfigMap>| c.metadata.resource_version.unwrap_or_default();
            watched.config_maps.push(follow(watch_stream(config_maps, plain()), "ConfigMap", version, c()));
            let modules: Api<PartialObjectMeta<ConfigMap>> = api(client, scope);
            let labelled = plain().labels(crate::translate::lua_modules::LABEL);
            watched.lua_module_maps.push(follow(watch_stream(modules, labelled), "ConfigMap", version, c()));
        }
        // The global ConfigMap, when its namespace is not watched already.
        if let Some((namespace, name)) = &config.options.configmap
            && !config.namespaces.is_empty()
            && !config.namespaces.contains(namespace)
        {
            let config_maps: Api<PartialObjectMeta<ConfigMap>> = Api::namespaced(client.clone(), namespace);
            let version = |c: PartialObjectMeta<ConfigMap>| c.metadata.resource_version.unwrap_or_default();
            let one = plain().fields(&format!("metadata.name={name}"));
            watched.config_maps.push(follow(
                watch_stream(config_maps, one),
                "ConfigMap",
                version,
                Arc::clone(&changed),
            ));
        }
        Arc::new(watched)
    }

    /// Waits until something changed since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Every watcher has finished its first list.
    pub fn synced(&self) -> bool {
        fn all<T>(caches: &[Shared<T>]) -> bool {
            caches.iter().all(|c| lock(c).listed)
        }
        all(&self.ingresses)
            && all(&self.classes)
            && all(&self.services)
            && all(&self.slices)
            && all(&self.lua_routes)
            && all(&self.secrets)
            && all(&self.config_maps)
            && all(&self.lua_module_maps)
    }

    /// Cached objects by kind, for metrics.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        fn count<T>(caches: &[Shared<T>]) -> usize {
            caches.iter().map(|c| lock(c).objects.len()).sum()
        }
        BTreeMap::from([
            ("Ingress", count(&self.ingresses)),
            ("IngressClass", count(&self.classes)),
            ("Service", count(&self.services)),
            ("EndpointSlice", count(&self.slices)),
            (luaroute::KIND, count(&self.lua_routes)),
            ("Secret", count(&self.secrets)),
            ("ConfigMap", count(&self.config_maps)),
        ])
    }

    /// The current view as translation input, with the referenced Secrets' data (read from
    /// the API server when not already held at their current version). Also returns the
    /// LuaRoutes that do not deserialize.
    pub async fn inputs(&self, client: &Client, data: &mut SecretData) -> (Inputs, Vec<InvalidObject>) {
        fn objects<T: Clone>(caches: &[Shared<T>]) -> Vec<T> {
            caches.iter().flat_map(|c| lock(c).objects.values().cloned().collect::<Vec<_>>()).collect()
        }
        let mut inputs = Inputs {
            ingresses: objects(&self.ingresses),
            ingress_classes: objects(&self.classes),
            services: objects(&self.services),
            endpoint_slices: objects(&self.slices),
            options: self.options.clone(),
            ..Inputs::default()
        };
        let mut invalid = Vec::new();
        for cache in &self.lua_routes {
            for route in lock(cache).objects.values() {
                match route {
                    WatchedLuaRoute::Parsed(route) => inputs.lua_routes.push(Arc::clone(route)),
                    WatchedLuaRoute::Invalid(object) => invalid.push(object.clone()),
                }
            }
        }
        fn versions(caches: &[Shared<String>]) -> BTreeMap<Key, String> {
            caches.iter().flat_map(|c| lock(c).objects.clone().into_iter().collect::<Vec<_>>()).collect()
        }
        inputs.secrets = data.secrets.refresh(client, &referenced_secrets(&inputs), &versions(&self.secrets)).await;
        // The global ConfigMap first: it names others.
        let config_versions = versions(&self.config_maps);
        let global: BTreeSet<Key> = inputs.options.configmap.iter().cloned().collect();
        inputs.config_maps = data.config_maps.refresh(client, &global, &config_versions).await;
        let mut named = referenced_config_maps(&inputs);
        for cache in &self.lua_module_maps {
            named.extend(lock(cache).objects.keys().cloned());
        }
        inputs.config_maps = data.config_maps.refresh(client, &named, &config_versions).await;
        (inputs, invalid)
    }
}

/// The Secrets that Ingresses (`spec.tls[].secretName`) and LuaRoutes (`spec.tls.secretName`)
/// name, in their own namespaces, and the `--default-ssl-certificate`.
pub fn referenced_secrets(inputs: &Inputs) -> BTreeSet<Key> {
    let namespace = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        crate::objects::namespace_of(meta).to_owned()
    };
    let mut names: BTreeSet<Key> = inputs.options.default_certificate.iter().cloned().collect();
    for ingress in &inputs.ingresses {
        let tls = ingress.spec.as_ref().and_then(|s| s.tls.as_deref()).unwrap_or_default();
        for secret in tls.iter().filter_map(|t| t.secret_name.clone()) {
            names.insert((namespace(&ingress.metadata), secret));
        }
    }
    for route in &inputs.lua_routes {
        if let Some(tls) = &route.spec.tls {
            names.insert((namespace(&route.metadata), tls.secret_name.clone()));
        }
    }
    // auth-secret, auth-tls-secret and proxy-ssl-secret (either prefix), in the Ingress's own
    // namespace: translation refuses others.
    let named = |key: &str| ["/auth-secret", "/auth-tls-secret", "/proxy-ssl-secret"].iter().any(|s| key.ends_with(s));
    for ingress in &inputs.ingresses {
        let annotations = ingress.metadata.annotations.iter().flatten();
        for (key, value) in annotations.filter(|(k, _)| named(k)) {
            if key.starts_with("tidegate.dev/") || key.starts_with("nginx.ingress.kubernetes.io/") {
                let own = namespace(&ingress.metadata);
                match value.trim().split_once('/') {
                    Some((ns, name)) if ns == own => names.insert((own, name.to_owned())),
                    Some(_) => false,
                    None => names.insert((own, value.trim().to_owned())),
                };
            }
        }
    }
    names
}

/// The ConfigMaps translation reads: the global one (`--configmap`), those it names
/// (`add-headers`, `proxy-set-headers`, in its namespace unless they name one), and those
/// annotations name (`custom-headers`, `auth-proxy-set-headers`, in the Ingress's namespace).
pub fn referenced_config_maps(inputs: &Inputs) -> BTreeSet<Key> {
    let mut names: BTreeSet<Key> = BTreeSet::new();
    let named = |value: &str, namespace: &str| -> Key {
        let value = value.trim();
        match value.split_once('/') {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => (namespace.to_owned(), value.to_owned()),
        }
    };
    if let Some((namespace, name)) = &inputs.options.configmap {
        names.insert((namespace.clone(), name.clone()));
        let global = inputs
            .config_maps
            .iter()
            .find(|c| c.metadata.namespace.as_ref() == Some(namespace) && c.metadata.name.as_ref() == Some(name));
        let data = global.and_then(|c| c.data.as_ref());
        for key in ["add-headers", "proxy-set-headers"] {
            if let Some(value) = data.and_then(|d| d.get(key)) {
                names.insert(named(value, namespace));
            }
        }
    }
    let wanted = |key: &str| ["/custom-headers", "/auth-proxy-set-headers"].iter().any(|s| key.ends_with(s));
    for ingress in &inputs.ingresses {
        let own = crate::objects::namespace_of(&ingress.metadata);
        let annotations = ingress.metadata.annotations.iter().flatten();
        for (key, value) in annotations.filter(|(k, _)| wanted(k)) {
            if key.starts_with("tidegate.dev/") || key.starts_with("nginx.ingress.kubernetes.io/") {
                let key = named(value, own);
                // Others' namespaces are refused by translation, and not read.
                if key.0 == own {
                    names.insert(key);
                }
            }
        }
    }
    for route in &inputs.lua_routes {
        let own = crate::objects::namespace_of(&route.metadata);
        let rules = route.spec.routes.iter().filter_map(|r| r.policies.as_ref());
        for policies in route.spec.policies.iter().chain(rules) {
            if let Some(value) = policies.external_auth.as_ref().and_then(|a| a.proxy_set_headers.as_deref()) {
                names.insert(named(value, own));
            }
        }
    }
    names
}

impl<K> Held<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default,
{
    /// Brings the held data to `versions` for the `wanted` objects and drops the rest.
    async fn refresh(
        &mut self,
        client: &Client,
        wanted: &BTreeSet<Key>,
        versions: &BTreeMap<Key, String>,
    ) -> Vec<Arc<K>> {
        self.read.retain(|key, _| wanted.contains(key));
        for key in wanted {
            let Some(version) = versions.get(key) else {
                // Not a TLS Secret we watch (or absent): translation reports it missing.
                self.read.remove(key);
                continue;
            };
            if self.read.get(key).is_some_and(|(held, _)| held == version) {
                continue;
            }
            let objects: Api<K> = Api::namespaced(client.clone(), &key.0);
            match objects.get_opt(&key.1).await {
                Ok(Some(object)) => {
                    self.read.insert(key.clone(), (version.clone(), Arc::new(object)));
                }
                Ok(None) => {
                    self.read.remove(key);
                }
                Err(e) => {
                    // Keep what was held; the next change retries.
                    let kind = K::kind(&K::DynamicType::default()).into_owned();
                    tracing::warn!(kind, object = %format!("{}/{}", key.0, key.1), error = %e, "cannot read it");
                }
            }
        }
        self.read.values().map(|(_, object)| Arc::clone(object)).collect()
    }
}
