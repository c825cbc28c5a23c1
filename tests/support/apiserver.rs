//! A Kubernetes API server stand-in on loopback (plain HTTP), close enough to the real protocol
//! for the real, unmodified controller binary and kube-rs.
//!
//! It does:
//! - discovery (`/api`, `/apis`, `/api/v1`, `/apis/GROUP/VERSION`) for the kinds tidegate uses;
//! - list and watch with one cluster-wide, increasing `resourceVersion`; watches resume from a
//!   given version by replaying history, send `BOOKMARK` events when asked
//!   (`allowWatchBookmarks`), end after `timeoutSeconds`, and answer an `ERROR` event with
//!   `410 Gone` (reason `Expired`) when the version is older than the last compaction;
//! - label selectors (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and field selectors
//!   (`metadata.name`, `metadata.namespace`, any other dotted path such as a Secret's `type`);
//! - metadata-only lists and watches (`Accept: ...;as=PartialObjectMetadata...`);
//! - create, replace (optimistic concurrency on `resourceVersion`, `409 Conflict`), delete,
//!   merge patch, server-side apply, and the `status` subresource (writes to the main resource
//!   leave `status` alone, writes to `/status` touch only `status`; `generation` moves with
//!   `spec`); Leases and Events are ordinary objects.
//!
//! - EndpointSlice address validation as the API server's: a loopback, link-local, link-local
//!   multicast or unspecified address is refused (`422 Invalid`, naming the field). Tests run
//!   their backends on loopback, the only addresses they may use here, so a test that needs
//!   them in EndpointSlices says so with [`ApiServer::allow_loopback_endpoints`]: the one
//!   documented exception, nothing else is let through;
//! - pruning, as the API server does for a CustomResourceDefinition's structural schema when
//!   field validation is not strict (`kubectl apply --validate=false`): fields of a LuaRoute
//!   that `crds/luaroute.yaml` does not declare are dropped before storage, unless the schema
//!   says `x-kubernetes-preserve-unknown-fields` there.
//!
//! It does not: authenticate or authorise, validate objects against schemas or admission,
//! track `managedFields` (server-side apply merges like a JSON merge patch, which is exact for
//! one field manager writing whole fields, as the controller does), paginate (`limit` is
//! ignored; everything comes in one page), send `DELETED` when an object stops matching a
//! selector, or speak protobuf, HTTP/2 or TLS.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

/// A kind the stand-in serves.
#[derive(Clone, Copy, Debug)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// Has a `status` subresource.
    pub status: bool,
}

impl Kind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_owned() } else { format!("{}/{}", self.group, self.version) }
    }
}

pub const KINDS: &[Kind] = &[
    Kind { group: "", version: "v1", kind: "Namespace", plural: "namespaces", namespaced: false, status: true },
    Kind { group: "", version: "v1", kind: "Service", plural: "services", namespaced: true, status: true },
    Kind { group: "", version: "v1", kind: "Secret", plural: "secrets", namespaced: true, status: false },
    Kind { group: "", version: "v1", kind: "ConfigMap", plural: "configmaps", namespaced: true, status: false },
    Kind { group: "", version: "v1", kind: "Event", plural: "events", namespaced: true, status: false },
    Kind {
        group: "networking.k8s.io",
        version: "v1",
        kind: "Ingress",
        plural: "ingresses",
        namespaced: true,
        status: true,
    },
    Kind {
        group: "networking.k8s.io",
        version: "v1",
        kind: "IngressClass",
        plural: "ingressclasses",
        namespaced: false,
        status: false,
    },
    Kind {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
        status: false,
    },
    Kind {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        namespaced: true,
        status: false,
    },
    Kind { group: "events.k8s.io", version: "v1", kind: "Event", plural: "events", namespaced: true, status: false },
    Kind {
        group: "tidegate.dev",
        version: "v1alpha1",
        kind: "LuaRoute",
        plural: "luaroutes",
        namespaced: true,
        status: true,
    },
];

/// Finds a kind by `apiVersion` and `kind`.
pub fn kind_of(api_version: &str, kind: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.api_version() == api_version && k.kind == kind)
}

fn kind_by_plural(group: &str, version: &str, plural: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.group == group && k.version == version && k.plural == plural)
}

type ObjectKey = (&'static str, String, String);

/// One change, as watches replay it.
#[derive(Clone, Debug)]
struct Change {
    version: u64,
    kind: &'static str,
    group: &'static str,
    event: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    version: u64,
    /// Watches from a version older than this get `410 Gone`.
    compacted: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: Vec<Change>,
    /// Method and path-and-query of every request, in order.
    requests: Vec<String>,
    /// The `User-Agent` of each request, in order (empty when none was sent).
    user_agents: Vec<String>,
    next_uid: u64,
    /// The documented exception: loopback EndpointSlice addresses are accepted.
    loopback_endpoints: bool,
}

/// Why the API server refuses an EndpointSlice's address, if it does (its `ValidateEndpointIP`).
fn endpoint_address_refused(address: &str) -> Option<&'static str> {
    let ip: std::net::IpAddr = address.parse().ok()?;
    let v6_link_local = |ip: std::net::Ipv6Addr| ip.segments()[0] & 0xffc0 == 0xfe80;
    match ip {
        _ if ip.is_unspecified() => Some("may not be unspecified"),
        _ if ip.is_loopback() => Some("may not be in the loopback range (127.0.0.0/8, ::1/128)"),
        std::net::IpAddr::V4(v4) if v4.is_link_local() => {
            Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)")
        }
        std::net::IpAddr::V6(v6) if v6_link_local(v6) => {
            Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)")
        }
        std::net::IpAddr::V4(v4) if v4.octets()[..3] == [224, 0, 0] => {
            Some("may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)")
        }
        _ => None,
    }
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch cleanly (as a server-side timeout would).
    watch_epoch: watch::Sender<u64>,
    /// Bumped to drop every connection (the server going away).
    connection_epoch: watch::Sender<u64>,
    /// Set while the server is away: a connection accepted as it went is dropped too.
    stopped: std::sync::atomic::AtomicBool,
    /// Resources (by plural) answered `503` for now.
    failing: Mutex<std::collections::BTreeSet<&'static str>>,
    bookmark_every: Duration,
}

/// The stand-in, serving on its own thread until dropped.
pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Its own runtime on its own thread, so tests of any flavour can use it.
    runtime: tokio::runtime::Handle,
    _stop_thread: tokio::sync::oneshot::Sender<()>,
    accepting: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Now, as `metadata.creationTimestamp` holds it.
fn now() -> Value {
    let now = k8s_openapi::jiff::Timestamp::now();
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)).unwrap_or(Value::Null)
}

fn status_body(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code.as_u16()})
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn respond(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed_unsync());
    *response.status_mut() = code;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    respond(code, &status_body(code, reason, message))
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn field<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(object, |v, part| v.get(part))
}

/// Splits on commas outside parentheses.
fn terms(selector: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(selector[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(selector[start..].trim());
    out.into_iter().filter(|t| !t.is_empty()).collect()
}

fn set_of(list: &str) -> Vec<&str> {
    list.trim().trim_start_matches('(').trim_end_matches(')').split(',').map(str::trim).collect()
}

fn labels_match(object: &Value, selector: &str) -> bool {
    let labels = object["metadata"]["labels"].as_object();
    let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    terms(selector).into_iter().all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            label(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(k.trim()) == Some(v.trim())
        } else if let Some((k, set)) = term.split_once(" notin ") {
            label(k.trim()).is_none_or(|v| !set_of(set).contains(&v))
        } else if let Some((k, set)) = term.split_once(" in ") {
            label(k.trim()).is_some_and(|v| set_of(set).contains(&v))
        } else if let Some(k) = term.strip_prefix('!') {
            label(k.trim()).is_none()
        } else {
            label(term).is_some()
        }
    })
}

fn fields_match(object: &Value, selector: &str) -> bool {
    terms(selector).into_iter().all(|term| {
        let value = |path: &str| field(object, path.trim()).and_then(Value::as_str).unwrap_or("").to_owned();
        if let Some((k, v)) = term.split_once("!=") {
            value(k) != v.trim()
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            value(k) == v.trim()
        } else {
            false
        }
    })
}

/// What a request names.
struct Target {
    kind: &'static Kind,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, mut rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let mut namespace = None;
    // `/api/v1/namespaces/NAME` is the Namespace itself, not a namespace prefix.
    if let ["namespaces", ns, tail @ ..] = rest
        && !tail.is_empty()
    {
        namespace = Some((*ns).to_owned());
        rest = tail;
    }
    let kind = kind_by_plural(group, version, rest.first()?)?;
    let name = rest.get(1).map(|n| (*n).to_owned());
    let status = rest.get(2) == Some(&"status");
    if rest.len() > 3 || (rest.len() == 3 && !status) {
        return None;
    }
    Some(Target { kind, namespace, name, status })
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect()
}

/// Only the metadata, as `as=PartialObjectMetadata` asks.
fn metadata_only(object: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": object["metadata"].clone()})
}

impl Store {
    fn lock(shared: &Shared) -> MutexGuard<'_, Store> {
        shared.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&mut self, changes: &broadcast::Sender<Change>, kind: &'static Kind, event: &'static str, object: Value) {
        let change = Change { version: self.version, kind: kind.kind, group: kind.group, event, object };
        self.history.push(change.clone());
        let _ = changes.send(change);
    }

    fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Creates or replaces; `expected` is the `resourceVersion` a replace must match.
    fn write(
        &mut self,
        changes: &broadcast::Sender<Change>,
        kind: &'static Kind,
        mut object: Value,
        subresource_status: bool,
        create_only: bool,
    ) -> Result<(StatusCode, Value), (StatusCode, &'static str, String)> {
        if kind.kind == "LuaRoute" {
            prune(&lua_route_schema(), &mut object, true);
        }
        if kind.kind == "EndpointSlice" && !self.loopback_endpoints {
            let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            for (e, endpoint) in object["endpoints"].as_array().into_iter().flatten().enumerate() {
                for (a, address) in endpoint["addresses"].as_array().into_iter().flatten().enumerate() {
                    let text = address.as_str().unwrap_or_default();
                    if let Some(why) = endpoint_address_refused(text) {
                        return Err((
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            format!(
                                "EndpointSlice.discovery.k8s.io \"{name}\" is invalid: endpoints[{e}].addresses[{a}]: Invalid value: \"{text}\": {why}"
                            ),
                        ));
                    }
                }
            }
        }
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
        let namespace = if kind.namespaced { Some(namespace.unwrap_or_else(|| "default".into())) } else { None };
        let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
            return Err((StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name: Required value".into()));
        };
        let key = (kind.plural, namespace.clone().unwrap_or_default(), name.clone());
        let expected = object["metadata"]["resourceVersion"].as_str().map(str::to_owned);
        let existing = self.objects.get(&key).cloned();
        let code = match &existing {
            Some(_) if create_only => {
                return Err((
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", kind.plural),
                ));
            }
            Some(current) => {
                let current_version = current["metadata"]["resourceVersion"].as_str().unwrap_or("");
                if let Some(expected) = expected.filter(|e| !e.is_empty())
                    && expected != current_version
                {
                    return Err((
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                            kind.plural
                        ),
                    ));
                }
                if subresource_status {
                    let status = object.get("status").cloned().unwrap_or(Value::Null);
                    object = current.clone();
                    object["status"] = status;
                } else {
                    if kind.status {
                        object["status"] = current.get("status").cloned().unwrap_or(Value::Null);
                    }
                    let meta = &current["metadata"];
                    for keep in ["uid", "creationTimestamp"] {
                        object["metadata"][keep] = meta[keep].clone();
                    }
                    let generation = meta["generation"].as_i64().unwrap_or(1);
                    let spec_changed = object.get("spec") != current.get("spec");
                    object["metadata"]["generation"] = json!(generation + i64::from(spec_changed));
                }
                StatusCode::OK
            }
            None if subresource_status => {
                return Err((StatusCode::NOT_FOUND, "NotFound", format!("{} \"{name}\" not found", kind.plural)));
            }
            None => {
                self.next_uid += 1;
                object["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", self.next_uid));
                object["metadata"]["creationTimestamp"] = now();
                object["metadata"]["generation"] = json!(1);
                if kind.status && object.get("status").is_some() {
                    object.as_object_mut().map(|o| o.remove("status"));
                }
                StatusCode::CREATED
            }
        };
        if kind.kind == "Secret"
            && let Some(Value::Object(strings)) = object.as_object_mut().and_then(|o| o.remove("stringData"))
        {
            // As the real server does: `stringData` is folded into `data`, base64-encoded.
            for (key, value) in strings {
                let bytes = k8s_openapi::ByteString(value.as_str().unwrap_or("").as_bytes().to_vec());
                object["data"][key] = serde_json::to_value(bytes).unwrap_or(Value::Null);
            }
        }
        if object.get("status").is_some_and(Value::is_null) {
            object.as_object_mut().map(|o| o.remove("status"));
        }
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.kind);
        if let Some(ns) = &namespace {
            object["metadata"]["namespace"] = json!(ns);
        }
        if existing.as_ref() == Some(&object) {
            // A no-op write keeps its version, as the real server does.
            return Ok((code, object));
        }
        let version = self.bump();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        self.objects.insert(key, object.clone());
        self.record(changes, kind, if existing.is_some() { "MODIFIED" } else { "ADDED" }, object.clone());
        Ok((code, object))
    }

    fn delete(
        &mut self,
        changes: &broadcast::Sender<Change>,
        kind: &'static Kind,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let mut object = self.objects.remove(&(kind.plural, namespace.to_owned(), name.to_owned()))?;
        let version = self.bump();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        self.record(changes, kind, "DELETED", object.clone());
        Some(object)
    }

    fn list(&self, kind: &Kind, namespace: Option<&str>, labels: Option<&str>, fields: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((plural, ns, _), _)| *plural == kind.plural && namespace.is_none_or(|n| n == ns))
            .map(|(_, o)| o)
            .filter(|o| labels.is_none_or(|l| labels_match(o, l)) && fields.is_none_or(|f| fields_match(o, f)))
            .cloned()
            .collect()
    }
}

/// Which changes a watch sends.
#[derive(Clone)]
struct Filter {
    kind: &'static Kind,
    namespace: Option<String>,
    labels: Option<String>,
    fields: Option<String>,
    metadata_only: bool,
}

impl Filter {
    fn matches(&self, change: &Change) -> bool {
        let object = &change.object;
        change.kind == self.kind.kind
            && change.group == self.kind.group
            && self.namespace.as_deref().is_none_or(|n| object["metadata"]["namespace"].as_str() == Some(n))
            && self.labels.as_deref().is_none_or(|l| labels_match(object, l))
            && self.fields.as_deref().is_none_or(|f| fields_match(object, f))
    }

    fn line(&self, event: &str, object: &Value) -> Bytes {
        let object = if self.metadata_only { metadata_only(object) } else { object.clone() };
        let mut line = json!({"type": event, "object": object}).to_string();
        line.push('\n');
        Bytes::from(line)
    }
}

impl ApiServer {
    /// Starts on an ephemeral loopback port.
    pub fn start() -> ApiServer {
        ApiServer::start_with(Duration::from_secs(1))
    }

    /// Starts with bookmarks sent this often to watches that allow them.
    pub fn start_with(bookmark_every: Duration) -> ApiServer {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop_thread, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("stand-in runtime");
            handle_tx.send(runtime.handle().clone()).expect("handle");
            let _ = runtime.block_on(stopped);
            runtime.shutdown_background();
        });
        let runtime = handle_rx.recv().expect("stand-in runtime");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changes: broadcast::channel(4096).0,
            watch_epoch: watch::Sender::new(0),
            connection_epoch: watch::Sender::new(0),
            stopped: std::sync::atomic::AtomicBool::new(false),
            failing: Mutex::new(std::collections::BTreeSet::new()),
            bookmark_every,
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = ApiServer { addr, shared, runtime, _stop_thread: stop_thread, accepting: Mutex::new(None) };
        server.accept_on(listener);
        server
    }

    fn accept_on(&self, listener: std::net::TcpListener) {
        let shared = Arc::clone(&self.shared);
        listener.set_nonblocking(true).expect("nonblocking");
        let task = self.runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                // Subscribed before the check: a stop either shows in the flag or reaches the
                // subscription, whichever thread it comes from.
                let mut dropped = shared.connection_epoch.subscribe();
                if shared.stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let handler = Arc::clone(&shared);
                    let service = service_fn(move |request| handle(Arc::clone(&handler), request));
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        _ = dropped.changed() => {}
                    }
                });
            }
        });
        *self.accepting.lock().expect("lock") = Some(task);
    }

    /// A kubeconfig that points kube clients here, written into `dir`.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: stand-in\n  context: {{cluster: stand-in, user: test, namespace: default}}\ncurrent-context: stand-in\n",
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Creates or replaces an object given as JSON (status included when given).
    pub fn apply(&self, object: Value) -> Value {
        let kind = kind_of(object["apiVersion"].as_str().unwrap_or(""), object["kind"].as_str().unwrap_or(""))
            .unwrap_or_else(|| panic!("the stand-in does not serve {}", object["kind"]));
        let mut store = Store::lock(&self.shared);
        let status = object.get("status").cloned();
        let mut written = store.write(&self.shared.changes, kind, object, false, false).expect("write");
        if kind.status
            && let Some(status) = status
        {
            let mut with_status = written.1.clone();
            with_status["status"] = status;
            written = store.write(&self.shared.changes, kind, with_status, true, false).expect("write status");
        }
        written.1
    }

    /// Creates or replaces every object of a YAML stream.
    pub fn apply_yaml(&self, yaml: &str) {
        for document in serde_saphyr::from_multiple::<Value>(yaml).expect("yaml") {
            if !document.is_null() {
                self.apply(document);
            }
        }
    }

    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let kind = kind_of(api_version, kind).expect("kind");
        Store::lock(&self.shared).delete(&self.shared.changes, kind, namespace, name).is_some()
    }

    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let kind = kind_of(api_version, kind).expect("kind");
        Store::lock(&self.shared).objects.get(&(kind.plural, namespace.to_owned(), name.to_owned())).cloned()
    }

    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let kind = kind_of(api_version, kind).expect("kind");
        Store::lock(&self.shared).list(kind, None, None, None)
    }

    /// Accepts loopback addresses in EndpointSlices, which a real API server refuses: the
    /// documented exception for tests, whose backends can only listen on loopback here.
    pub fn allow_loopback_endpoints(&self) {
        Store::lock(&self.shared).loopback_endpoints = true;
    }

    /// The current `resourceVersion`.
    pub fn version(&self) -> u64 {
        Store::lock(&self.shared).version
    }

    /// Forgets history up to now: watches resuming from an older version get `410 Gone`.
    pub fn compact(&self) {
        let mut store = Store::lock(&self.shared);
        store.compacted = store.version;
        store.history.clear();
    }

    /// Answers every request for `plural` with `503` (`true`) or normally again (`false`).
    pub fn fail(&self, plural: &'static str, failing: bool) {
        let mut set = self.shared.failing.lock().expect("lock");
        if failing {
            set.insert(plural);
        } else {
            set.remove(plural);
        }
    }

    /// Ends every open watch cleanly; clients resume from the version they last saw.
    pub fn end_watches(&self) {
        self.shared.watch_epoch.send_modify(|e| *e += 1);
    }

    /// Method, path and query of the requests so far.
    pub fn requests(&self) -> Vec<String> {
        Store::lock(&self.shared).requests.clone()
    }

    /// The `User-Agent` each request came with, in order (empty when none).
    pub fn user_agents(&self) -> Vec<String> {
        Store::lock(&self.shared).user_agents.clone()
    }

    /// Stops listening and drops every connection; objects are kept.
    pub fn stop(&self) {
        if let Some(task) = self.accepting.lock().expect("lock").take() {
            task.abort();
        }
        self.shared.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.connection_epoch.send_modify(|e| *e += 1);
    }

    /// Listens again on the same address.
    pub fn resume(&self) {
        let listener = std::net::TcpListener::bind(self.addr).expect("rebind");
        self.shared.stopped.store(false, std::sync::atomic::Ordering::SeqCst);
        self.accept_on(listener);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The LuaRoute CRD's structural schema, as `crds/luaroute.yaml` (what users install) holds it.
fn lua_route_schema() -> Value {
    static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/luaroute.yaml");
            let crd: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).expect("crds/luaroute.yaml"))
                .expect("the CRD reads");
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
        })
        .clone()
}

/// Drops the fields `schema` does not declare, as the API server prunes custom resources
/// (`apiVersion`, `kind` and `metadata` at the root are its own).
fn prune(schema: &Value, value: &mut Value, root: bool) {
    match value {
        Value::Object(map) => {
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true);
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            map.retain(|name, field| {
                if root && ["apiVersion", "kind", "metadata"].contains(&name.as_str()) {
                    return true;
                }
                match (properties.and_then(|p| p.get(name)), additional) {
                    (Some(sub), _) | (None, Some(sub)) => {
                        prune(sub, field, false);
                        true
                    }
                    (None, None) => preserve,
                }
            });
        }
        Value::Array(items) => {
            for item in items {
                prune(&schema["items"], item, false);
            }
        }
        _ => {}
    }
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("", |p| p.as_str()).to_owned();
    {
        let mut store = Store::lock(&shared);
        store.requests.push(format!("{} {path_and_query}", parts.method));
        let agent = parts.headers.get(http::header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("");
        store.user_agents.push(agent.to_owned());
    }
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(failure(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body")),
    };
    let path = parts.uri.path();
    if let Some(discovery) = discovery(path) {
        return Ok(respond(StatusCode::OK, &discovery));
    }
    let Some(target) = parse_path(path) else {
        return Ok(failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        ));
    };
    if shared.failing.lock().is_ok_and(|f| f.contains(target.kind.plural)) {
        return Ok(failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the stand-in was told to fail this resource",
        ));
    }
    let q = query(&parts.uri);
    let accept = parts.headers.get(http::header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    let content_type = parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let kind = target.kind;
    Ok(match (&parts.method, &target.name) {
        (&Method::GET, None) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
            let filter = Filter {
                kind,
                namespace: target.namespace.clone(),
                labels: q.get("labelSelector").cloned().filter(|s| !s.is_empty()),
                fields: q.get("fieldSelector").cloned().filter(|s| !s.is_empty()),
                metadata_only: accept.contains("as=PartialObjectMetadata"),
            };
            let from = q.get("resourceVersion").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
            let timeout = q.get("timeoutSeconds").and_then(|v| v.parse().ok()).map(Duration::from_secs);
            watch_response(shared, filter, from, bookmarks, timeout)
        }
        (&Method::GET, None) => {
            let store = Store::lock(&shared);
            let labels = q.get("labelSelector").filter(|s| !s.is_empty());
            let fields = q.get("fieldSelector").filter(|s| !s.is_empty());
            let mut items =
                store.list(kind, target.namespace.as_deref(), labels.map(String::as_str), fields.map(String::as_str));
            let (api_version, list_kind) = if accept.contains("as=PartialObjectMetadata") {
                items = items.iter().map(metadata_only).collect();
                ("meta.k8s.io/v1".to_owned(), "PartialObjectMetadataList".to_owned())
            } else {
                (kind.api_version(), format!("{}List", kind.kind))
            };
            respond(
                StatusCode::OK,
                &json!({"apiVersion": api_version, "kind": list_kind,
                        "metadata": {"resourceVersion": store.version.to_string()}, "items": items}),
            )
        }
        (&Method::GET, Some(name)) => {
            let store = Store::lock(&shared);
            let key = (kind.plural, target.namespace.clone().unwrap_or_default(), name.clone());
            match store.objects.get(&key) {
                Some(object) if accept.contains("as=PartialObjectMetadata") => {
                    respond(StatusCode::OK, &metadata_only(object))
                }
                Some(object) => respond(StatusCode::OK, object),
                None => failure(StatusCode::NOT_FOUND, "NotFound", &format!("{} \"{name}\" not found", kind.plural)),
            }
        }
        (&Method::POST, None) | (&Method::PUT, Some(_)) => {
            let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
                return Ok(failure(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON"));
            };
            if let Some(ns) = &target.namespace {
                object["metadata"]["namespace"] = json!(ns);
            }
            if let Some(name) = &target.name
                && object["metadata"]["name"].as_str() != Some(name)
            {
                return Ok(failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the name of the object does not match the URL",
                ));
            }
            let create = parts.method == Method::POST;
            let mut store = Store::lock(&shared);
            match store.write(&shared.changes, kind, object, target.status, create) {
                Ok((code, object)) => respond(code, &object),
                Err((code, reason, message)) => failure(code, reason, &message),
            }
        }
        (&Method::PATCH, Some(name)) => {
            let apply = content_type.starts_with("application/apply-patch");
            if !(apply || content_type.contains("merge-patch")) {
                return Ok(failure(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    &format!("the stand-in does not do {content_type}"),
                ));
            }
            let patch: Value = match serde_json::from_slice(&body)
                .or_else(|_| serde_saphyr::from_str(&String::from_utf8_lossy(&body)).map_err(|_| ()))
            {
                Ok(p) => p,
                Err(_) => return Ok(failure(StatusCode::BAD_REQUEST, "BadRequest", "unreadable patch")),
            };
            let mut store = Store::lock(&shared);
            let key = (kind.plural, target.namespace.clone().unwrap_or_default(), name.clone());
            let mut object = match store.objects.get(&key) {
                Some(o) => o.clone(),
                None if apply && !target.status => json!({"metadata": {"name": name}}),
                None => {
                    return Ok(failure(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{} \"{name}\" not found", kind.plural),
                    ));
                }
            };
            if target.status {
                merge(&mut object["status"], patch.get("status").unwrap_or(&Value::Null));
            } else {
                let mut patch = patch;
                patch.as_object_mut().map(|p| p.remove("status"));
                merge(&mut object, &patch);
            }
            object["metadata"]["namespace"] = target.namespace.clone().map_or(Value::Null, Value::String);
            object["metadata"].as_object_mut().map(|m| m.remove("resourceVersion"));
            match store.write(&shared.changes, kind, object, target.status, false) {
                Ok((code, object)) => respond(code, &object),
                Err((code, reason, message)) => failure(code, reason, &message),
            }
        }
        (&Method::DELETE, Some(name)) => {
            let mut store = Store::lock(&shared);
            match store.delete(&shared.changes, kind, target.namespace.as_deref().unwrap_or(""), name) {
                Some(object) => respond(StatusCode::OK, &object),
                None => failure(StatusCode::NOT_FOUND, "NotFound", &format!("{} \"{name}\" not found", kind.plural)),
            }
        }
        _ => failure(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "not supported by the stand-in"),
    })
}

fn discovery(path: &str) -> Option<Value> {
    let path = path.trim_end_matches('/');
    if path == "/api" {
        return Some(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}));
    }
    if path == "/apis" {
        let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for k in KINDS.iter().filter(|k| !k.group.is_empty()) {
            let versions = groups.entry(k.group).or_default();
            if !versions.contains(&k.version) {
                versions.push(k.version);
            }
        }
        let groups: Vec<Value> = groups
            .into_iter()
            .map(|(group, versions)| {
                let versions: Vec<Value> =
                    versions.iter().map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v})).collect();
                json!({"name": group, "versions": versions, "preferredVersion": versions[0]})
            })
            .collect();
        return Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}));
    }
    let group_version = path.strip_prefix("/api/").or_else(|| path.strip_prefix("/apis/"))?;
    if group_version.matches('/').count() > usize::from(path.starts_with("/apis/")) {
        return None;
    }
    let resources: Vec<Value> = KINDS
        .iter()
        .filter(|k| k.api_version() == group_version)
        .flat_map(|k| {
            let verbs = ["create", "delete", "get", "list", "patch", "update", "watch"];
            let main = json!({"name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced, "kind": k.kind, "verbs": verbs});
            let status = json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "patch", "update"]});
            if k.status { vec![main, status] } else { vec![main] }
        })
        .collect();
    if resources.is_empty() {
        return None;
    }
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}))
}

fn watch_response(
    shared: Arc<Shared>,
    filter: Filter,
    from: u64,
    bookmarks: bool,
    timeout: Option<Duration>,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    // Subscribe before reading history, so nothing falls between the two.
    let mut live = shared.changes.subscribe();
    let (replay, mut last, expired) = {
        let store = Store::lock(&shared);
        if from != 0 && from < store.compacted {
            (Vec::new(), store.version, true)
        } else if from == 0 {
            // No version: the current objects as ADDED, then changes.
            let objects = store.list(
                filter.kind,
                filter.namespace.as_deref(),
                filter.labels.as_deref(),
                filter.fields.as_deref(),
            );
            (objects.into_iter().map(|o| ("ADDED", o)).collect::<Vec<_>>(), store.version, false)
        } else {
            let replay = store
                .history
                .iter()
                .filter(|c| c.version > from && filter.matches(c))
                .map(|c| (c.event, c.object.clone()))
                .collect();
            (replay, store.version, false)
        }
    };
    let mut ended = shared.watch_epoch.subscribe();
    let kind = filter.kind;
    tokio::spawn(async move {
        if expired {
            let status =
                status_body(StatusCode::GONE, "Expired", &format!("too old resource version: {from} ({last})"));
            let mut line = json!({"type": "ERROR", "object": status}).to_string();
            line.push('\n');
            let _ = tx.send(Bytes::from(line)).await;
            return;
        }
        for (event, object) in replay {
            if tx.send(filter.line(event, &object)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(deadline);
        let mut bookmark = tokio::time::interval(shared.bookmark_every);
        bookmark.tick().await;
        loop {
            tokio::select! {
                change = live.recv() => match change {
                    // A stopped server delivers nothing, even on a connection that has not
                    // seen the stop yet.
                    Ok(_) if shared.stopped.load(std::sync::atomic::Ordering::SeqCst) => return,
                    Ok(change) if change.version > last => {
                        last = change.version;
                        if filter.matches(&change) && tx.send(filter.line(change.event, &change.object)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Too far behind, or the server is going away: end; the client resumes.
                    Err(_) => return,
                },
                _ = bookmark.tick(), if bookmarks => {
                    // Every change up to `last` has been sent or filtered out.
                    let object = json!({"kind": kind.kind, "apiVersion": kind.api_version(),
                                        "metadata": {"resourceVersion": last.to_string()}});
                    let mut line = json!({"type": "BOOKMARK", "object": object}).to_string();
                    line.push('\n');
                    if tx.send(Bytes::from(line)).await.is_err() {
                        return;
                    }
                }
                _ = &mut deadline => return,
                _ = ended.changed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}
