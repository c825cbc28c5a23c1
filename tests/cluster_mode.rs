//! Cluster mode with the real binaries on loopback: the API server stand-in
//! (`support/apiserver.rs`), `tidegate controller` watching it through kube-rs, two
//! `tidegate proxy` processes fed over the config stream, echo upstreams.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::apiserver::ApiServer;
use support::stream::{Controller, Pki, serves, until};
use support::{
    Tidegate, echo, get, get_request, self_signed, service_yaml, tls_connector, tls_request, tls_secret_yaml,
};

fn ingress(name: &str, host: &str, service: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  ingressClassName: tidegate\n  rules:\n  - host: {host}\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: {service}, port: {{number: 80}}}}}}}}\n"
    )
}

fn lua_route(name: &str, host: &str, content: &str) -> String {
    let body: String = content.lines().map(|l| format!("          {l}\n")).collect();
    format!(
        "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  hosts: [{host}]\n  routes:\n    - name: main\n      match: {{path: {{type: Prefix, value: /}}}}\n      lua:\n        content: |\n{body}"
    )
}

/// A stand-in API server, mutual-TLS material for the stream, and the processes started on it.
struct Cluster {
    api: ApiServer,
    dir: tempfile::TempDir,
    controller_tls: Vec<String>,
    proxy_tls: Vec<String>,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("dir");
        let pki = Pki::new("tidegate stream CA");
        let controller_tls = pki.issue(dir.path(), "controller", &["localhost"], &pki.ca_pem);
        let proxy_tls = pki.issue(dir.path(), "proxy", &["proxy"], &pki.ca_pem);
        let api = ApiServer::start();
        // The backends of these tests listen on loopback, which a real API server refuses in
        // EndpointSlices: the stand-in's one documented exception.
        api.allow_loopback_endpoints();
        Cluster { api, dir, controller_tls, proxy_tls }
    }

    fn kubeconfig(&self) -> std::path::PathBuf {
        self.api.kubeconfig(self.dir.path())
    }

    fn controller(&self, extra: &[&str]) -> Controller {
        self.controller_on("127.0.0.1:0", extra)
    }

    fn controller_on(&self, stream: &str, extra: &[&str]) -> Controller {
        Controller::on_api(&self.kubeconfig(), &self.controller_tls, stream, extra)
    }

    /// Two proxies subscribed to `controller`, once both serve a configuration.
    async fn proxies(&self, controller: &Controller) -> (Tidegate, Tidegate) {
        self.proxies_of(&[controller]).await
    }

    /// Two proxies that know every controller replica, once both serve a configuration.
    async fn proxies_of(&self, controllers: &[&Controller]) -> (Tidegate, Tidegate) {
        let urls: Vec<String> = controllers.iter().map(|c| format!("https://localhost:{}", c.stream.port())).collect();
        let (tls, dir) = (self.proxy_tls.clone(), self.dir.path().to_owned());
        tokio::task::spawn_blocking(move || {
            (Tidegate::proxy_of(&urls, "p1", &tls, &dir), Tidegate::proxy_of(&urls, "p2", &tls, &dir))
        })
        .await
        .expect("start proxies")
    }
}

async fn status_of(proxy: &Tidegate, host: &str, path: &str) -> Option<StatusCode> {
    get(proxy.http, host, path).await.ok().map(|a| a.status)
}

async fn both(p1: &Tidegate, p2: &Tidegate, host: &str, expected: StatusCode) -> bool {
    status_of(p1, host, "/").await == Some(expected) && status_of(p2, host, "/").await == Some(expected)
}

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "cluster mode: {line}");
}

/// Times an API write until both proxies show its effect.
async fn timed(what: &str, write: impl FnOnce(), check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    write();
    until(what, Duration::from_secs(10), check).await;
    let took = started.elapsed();
    report(&format!("{what}: {took:?} from API write to served by both proxies"));
    took
}

fn applied_lines(proxy: &Tidegate) -> Vec<serde_json::Value> {
    proxy
        .logs()
        .iter()
        .filter(|l| l.contains("\"configuration applied\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_serve_what_the_api_server_holds() {
    let cluster = Cluster::new();
    let api = &cluster.api;
    let (web, other) = (echo("t", "web").await, echo("t", "web").await);
    api.apply_yaml(&service_yaml("t", "web", 80, "http", &[web]));
    api.apply_yaml(&ingress("a", "a.test", "web"));
    let (cert, key) = self_signed(&["unreferenced.test"]);
    api.apply_yaml(&tls_secret_yaml("t", "unreferenced", &cert, &key));
    api.apply_yaml("apiVersion: v1\nkind: Secret\nmetadata: {name: opaque, namespace: t}\ntype: Opaque\nstringData: {password: hunter2}\n");
    let (cert, key) = self_signed(&["fallback.example"]);
    api.apply_yaml(&tls_secret_yaml("t", "fallback", &cert, &key));

    let controller = cluster.controller(&["--default-ssl-certificate", "t/fallback"]);
    let (p1, p2) = cluster.proxies(&controller).await;
    assert!(both(&p1, &p2, "a.test", StatusCode::OK).await, "the listed Ingress is served");

    let mut latencies = Vec::new();
    // Create, update, delete an Ingress.
    latencies.push(
        timed(
            "Ingress created",
            || api.apply_yaml(&ingress("b", "b.test", "web")),
            async || both(&p1, &p2, "b.test", StatusCode::OK).await,
        )
        .await,
    );
    latencies.push(
        timed(
            "Ingress host changed",
            || api.apply_yaml(&ingress("b", "b2.test", "web")),
            async || {
                both(&p1, &p2, "b2.test", StatusCode::OK).await && both(&p1, &p2, "b.test", StatusCode::NOT_FOUND).await
            },
        )
        .await,
    );
    latencies.push(
        timed(
            "Ingress deleted",
            || assert!(api.delete("networking.k8s.io/v1", "Ingress", "t", "b")),
            async || both(&p1, &p2, "b2.test", StatusCode::NOT_FOUND).await,
        )
        .await,
    );

    // Endpoints move to another upstream: served without rebuilding routes on the proxies.
    let before = applied_lines(&p1).len();
    latencies.push(
        timed(
            "EndpointSlice changed",
            || api.apply_yaml(&service_yaml("t", "web", 80, "http", &[other])),
            async || {
                let pod = format!("web-{}", other.port());
                let (a, b) = (get(p1.http, "a.test", "/").await, get(p2.http, "a.test", "/").await);
                a.is_ok_and(|a| a.json()["pod"] == pod.as_str()) && b.is_ok_and(|b| b.json()["pod"] == pod.as_str())
            },
        )
        .await,
    );
    // The proxy logs a version after it swapped it in, and its output is read by another
    // thread: the line may trail the first response served from that version.
    until("a new version was applied", Duration::from_secs(5), async || applied_lines(&p1).len() > before).await;
    let lines = applied_lines(&p1);
    for line in &lines[before..] {
        assert_eq!(line["fields"]["routing_rebuilt"], false, "endpoint-only change rebuilt routes: {line}");
    }

    // A Service deleted: its routes answer 503; created again: 200.
    latencies.push(
        timed(
            "Service deleted",
            || assert!(api.delete("v1", "Service", "t", "web")),
            async || both(&p1, &p2, "a.test", StatusCode::SERVICE_UNAVAILABLE).await,
        )
        .await,
    );
    latencies.push(
        timed(
            "Service created",
            || api.apply_yaml(&service_yaml("t", "web", 80, "http", &[other])),
            async || both(&p1, &p2, "a.test", StatusCode::OK).await,
        )
        .await,
    );

    // A TLS Secret and the Ingress that names it; then the Secret rotated.
    // A new client each time: a resumed TLS session would report the certificate of its first
    // handshake.
    let served_certificate = async |proxy: &Tidegate| {
        let connector = tls_connector(None, &[b"http/1.1"]);
        tls_request(&connector, proxy.https, "s.test", get_request("s.test", "/"))
            .await
            .ok()
            .map(|a| a.peer_certificate)
    };
    let (cert1, key1) = self_signed(&["s.test"]);
    let der = |pem: &str| {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem").to_vec()
    };
    let tls_ingress = ingress("s", "s.test", "web") + "  tls: [{hosts: [s.test], secretName: s-cert}]\n";
    latencies.push(
        timed(
            "TLS Secret and Ingress created",
            || {
                api.apply_yaml(&tls_secret_yaml("t", "s-cert", &cert1, &key1));
                api.apply_yaml(&tls_ingress);
            },
            async || {
                let want = Some(der(&cert1));
                served_certificate(&p1).await == want && served_certificate(&p2).await == want
            },
        )
        .await,
    );
    let (cert2, key2) = self_signed(&["s.test"]);
    latencies.push(
        timed(
            "TLS Secret rotated",
            || api.apply_yaml(&tls_secret_yaml("t", "s-cert", &cert2, &key2)),
            async || {
                let want = Some(der(&cert2));
                served_certificate(&p1).await == want && served_certificate(&p2).await == want
            },
        )
        .await,
    );

    // A LuaRoute; then one whose Lua does not compile, which leaves the others serving.
    latencies.push(
        timed(
            "LuaRoute created",
            || api.apply_yaml(&lua_route("hello", "lua.test", "ngx.say(\"hello from lua\")")),
            async || {
                let (a, b) = (get(p1.http, "lua.test", "/").await, get(p2.http, "lua.test", "/").await);
                a.is_ok_and(|a| a.body == "hello from lua\n") && b.is_ok_and(|b| b.body == "hello from lua\n")
            },
        )
        .await,
    );
    latencies.push(
        timed(
            "LuaRoute changed",
            || api.apply_yaml(&lua_route("hello", "lua.test", "ngx.say(\"hello again\")")),
            async || {
                let (a, b) = (get(p1.http, "lua.test", "/").await, get(p2.http, "lua.test", "/").await);
                a.is_ok_and(|a| a.body == "hello again\n") && b.is_ok_and(|b| b.body == "hello again\n")
            },
        )
        .await,
    );
    api.apply_yaml(&lua_route("broken", "broken.test", "ngx.say(\"line one\")\nlocal x = = 1"));
    until("the broken LuaRoute reported", Duration::from_secs(10), async || {
        controller.logs().iter().any(|l| l.contains("LuaRoute t/broken") && l.contains("LuaSyntaxError"))
    })
    .await;
    assert!(both(&p1, &p2, "lua.test", StatusCode::OK).await && both(&p1, &p2, "a.test", StatusCode::OK).await);

    // Deletes of the other kinds.
    latencies.push(
        timed(
            "EndpointSlice deleted",
            || assert!(api.delete("discovery.k8s.io/v1", "EndpointSlice", "t", "web-0")),
            async || both(&p1, &p2, "a.test", StatusCode::SERVICE_UNAVAILABLE).await,
        )
        .await,
    );
    api.apply_yaml(&service_yaml("t", "web", 80, "http", &[other]));
    latencies.push(
        timed(
            "LuaRoute deleted",
            || assert!(api.delete("tidegate.dev/v1alpha1", "LuaRoute", "t", "hello")),
            async || both(&p1, &p2, "lua.test", StatusCode::NOT_FOUND).await,
        )
        .await,
    );
    let fallback_served = async |proxy: &Tidegate, host: &str| {
        let connector = tls_connector(None, &[b"http/1.1"]);
        tls_request(&connector, proxy.https, host, get_request(host, "/"))
            .await
            .is_ok_and(|a| a.peer_certificate.windows(16).any(|w| w == b"fallback.example"))
    };
    latencies.push(
        timed(
            "TLS Secret deleted",
            || assert!(api.delete("v1", "Secret", "t", "s-cert")),
            async || fallback_served(&p1, "s.test").await && fallback_served(&p2, "s.test").await,
        )
        .await,
    );

    // The default certificate comes from its Secret.
    let fallback =
        tls_request(&tls_connector(None, &[b"http/1.1"]), p1.https, "unknown.test", get_request("unknown.test", "/"))
            .await
            .expect("tls");
    assert!(fallback.peer_certificate.windows(16).any(|w| w == b"fallback.example"));

    // Secrets: only TLS and Opaque ones are watched, as metadata; only the referenced ones are
    // read (an Opaque one when a policy names it).
    let requests = api.requests();
    let secret_requests: Vec<&String> = requests.iter().filter(|r| r.contains("/secrets")).collect();
    assert!(
        secret_requests.iter().filter(|r| !r.contains("/secrets/")).all(|r| r
            .contains("fieldSelector=type%3Dkubernetes.io%2Ftls")
            || r.contains("fieldSelector=type%3DOpaque")),
        "{secret_requests:?}"
    );
    assert!(secret_requests.iter().any(|r| r.starts_with("GET /api/v1/namespaces/t/secrets/s-cert")));
    assert!(!secret_requests.iter().any(|r| r.contains("/secrets/unreferenced") || r.contains("/secrets/opaque")));

    // The controller's own endpoints.
    let metrics = support::admin_get(controller.admin, "/metrics").expect("metrics");
    for expected in [
        "tidegate_controller_objects{kind=\"Ingress\"} 2",
        "tidegate_controller_objects{kind=\"LuaRoute\"} 1",
        "tidegate_controller_proxies_connected 2",
        "tidegate_controller_change_to_publish_seconds_count",
        "tidegate_controller_reconcile_duration_seconds_count",
    ] {
        assert!(metrics.contains(expected), "{expected} in\n{metrics}");
    }
    assert_eq!(support::admin_get(controller.admin, "/readyz").expect("readyz"), "ready\n");

    latencies.sort();
    report(&format!(
        "{} changes, API write to served by both proxies: median {:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    ));
}

/// Hosts `h0.test`… each with its own Ingress.
fn many_ingresses(api: &ApiServer, count: usize) {
    for i in 0..count {
        api.apply_yaml(&ingress(&format!("h{i}"), &format!("h{i}.test"), "web"));
    }
}

/// Requests to every host in turn until `stop`; returns (answered 200, failed) with the first
/// failures.
async fn steady_load(proxy: SocketAddr, hosts: usize, stop: tokio::sync::watch::Receiver<bool>) -> (u64, Vec<String>) {
    let (mut ok, mut failed) = (0, Vec::new());
    let mut i = 0;
    while !*stop.borrow() {
        let host = format!("h{}.test", i % hosts);
        match get(proxy, &host, "/").await {
            Ok(a) if a.status == StatusCode::OK => ok += 1,
            Ok(a) => failed.push(format!("{host}: {}", a.status)),
            Err(e) => failed.push(format!("{host}: {e}")),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (ok, failed)
}

/// The `web` echo Service and `hosts` Ingresses on a stand-in, with a controller and two
/// proxies that serve every host.
async fn serving(hosts: usize) -> (Cluster, Controller, Tidegate, Tidegate) {
    let cluster = Cluster::new();
    let web = echo("t", "web").await;
    cluster.api.apply_yaml(&service_yaml("t", "web", 80, "http", &[web]));
    many_ingresses(&cluster.api, hosts);
    let controller = cluster.controller(&[]);
    let (p1, p2) = cluster.proxies(&controller).await;
    let last = format!("h{}.test", hosts - 1);
    until("every host on both proxies", Duration::from_secs(10), async || {
        serves(&p1, &last).await && serves(&p2, &last).await
    })
    .await;
    (cluster, controller, p1, p2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_expiry_relists_without_dropping_routes() {
    let (cluster, controller, p1, _p2) = serving(50).await;
    let api = &cluster.api;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(steady_load(p1.http, 50, stopped));
    let lists_before = api.requests().iter().filter(|r| r.contains("/ingresses") && !r.contains("watch=")).count();
    // History is compacted past what the watchers saw: resuming gets 410 Gone, then a relist.
    api.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bump, namespace: t}\ndata: {a: b}\n");
    api.compact();
    api.end_watches();
    until("a relist of Ingresses", Duration::from_secs(15), async || {
        api.requests().iter().filter(|r| r.contains("/ingresses") && !r.contains("watch=")).count() > lists_before
    })
    .await;
    // A change after the relist is followed.
    api.apply_yaml(&ingress("late", "late.test", "web"));
    until("late.test after the relist", Duration::from_secs(10), async || serves(&p1, "late.test").await).await;
    stop.send_replace(true);
    let (ok, failed) = load.await.expect("load");
    report(&format!("410 relist under load: {ok} requests answered 200, {} failed", failed.len()));
    assert!(failed.is_empty(), "requests failed across the relist: {:?}", &failed[..failed.len().min(5)]);
    assert!(
        controller.logs().iter().any(|l| l.contains("410") || l.contains("Expired") || l.contains("too old")),
        "the controller saw the expiry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_outage_loses_nothing() {
    let (cluster, _controller, p1, p2) = serving(10).await;
    let api = &cluster.api;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let loads =
        [tokio::spawn(steady_load(p1.http, 10, stopped.clone())), tokio::spawn(steady_load(p2.http, 10, stopped))];
    let outage = Duration::from_secs(30);
    api.stop();
    // Written while the server is away (as if through another API server replica), and
    // history compacted meanwhile: every resumed watch is answered 410 Expired, as a real API
    // server answers after an outage.
    api.apply_yaml(&ingress("during", "during.test", "web"));
    api.compact();
    tokio::time::sleep(outage).await;
    assert!(!serves(&p1, "during.test").await, "nothing new without the API server");
    let resumed = Instant::now();
    api.resume();
    let recovered = until("the change written during the outage", Duration::from_secs(60), async || {
        serves(&p1, "during.test").await && serves(&p2, "during.test").await
    })
    .await;
    stop.send_replace(true);
    let mut answered = 0;
    for load in loads {
        let (ok, failed) = load.await.expect("load");
        assert!(failed.is_empty(), "requests failed during the outage: {:?}", &failed[..failed.len().min(5)]);
        answered += ok;
    }
    report(&format!(
        "API server away {outage:?}, back with 410: {answered} requests answered 200, 0 failed; caught up {recovered:?} after it returned ({:?} since resume)",
        resumed.elapsed()
    ));
    // The watches neither wait out a backoff grown during the outage nor a second one for the
    // relist after 410.
    assert!(recovered < Duration::from_secs(1), "caught up {recovered:?} after the API server returned");
}

fn condition<'a>(object: &'a serde_json::Value, kind: &str) -> Option<&'a serde_json::Value> {
    object["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == kind)
}

fn lease_holder(api: &ApiServer) -> Option<String> {
    api.get("coordination.k8s.io/v1", "Lease", "default", "tidegate-controller")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

const FAST_LEASE: [&str; 6] =
    ["--lease-duration-seconds", "3", "--lease-renew-deadline-seconds", "2", "--lease-retry-period-seconds", "0.5"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_writes_status_and_a_replica_takes_over() {
    let cluster = Cluster::new();
    let api = &cluster.api;
    let web = echo("t", "web").await;
    api.apply_yaml(&service_yaml("t", "web", 80, "http", &[web]));
    api.apply_yaml(&ingress("a", "a.test", "web"));
    api.apply_yaml(&lua_route("hello", "lua.test", "ngx.say(\"hello\")"));
    api.apply_yaml(&lua_route("broken", "broken.test", "ngx.say(\"line one\")\nlocal x = = 1"));
    let flags = |name: &'static str| {
        let mut flags = vec!["--name", name, "--publish-status-address", "192.0.2.7,edge.example.com"];
        flags.extend(FAST_LEASE);
        flags
    };
    let c1 = cluster.controller(&flags("c1"));
    until("c1 leads", Duration::from_secs(10), async || lease_holder(api).as_deref() == Some("c1")).await;
    let c2 = cluster.controller(&flags("c2"));
    // The proxies subscribe to c2, which does not lead: c1 learns of them through c2's Lease.
    let (p1, p2) = cluster.proxies_of(&[&c2, &c1]).await;
    assert!(both(&p1, &p2, "a.test", StatusCode::OK).await);
    assert_eq!(c2.proxies()["p1"]["connected"], 1);

    until("the Ingress status", Duration::from_secs(10), async || {
        let ingress = api.get("networking.k8s.io/v1", "Ingress", "t", "a").unwrap_or_default();
        ingress["status"]["loadBalancer"]["ingress"]
            == serde_json::json!([{"ip": "192.0.2.7"}, {"hostname": "edge.example.com"}])
    })
    .await;
    until("hello Accepted and Programmed", Duration::from_secs(10), async || {
        let route = api.get("tidegate.dev/v1alpha1", "LuaRoute", "t", "hello").unwrap_or_default();
        condition(&route, "Accepted").is_some_and(|c| c["status"] == "True" && c["observedGeneration"] == 1)
            && condition(&route, "Programmed").is_some_and(|c| c["status"] == "True")
    })
    .await;
    let broken = api.get("tidegate.dev/v1alpha1", "LuaRoute", "t", "broken").expect("broken");
    let accepted = condition(&broken, "Accepted").expect("Accepted on the broken LuaRoute");
    assert_eq!(accepted["status"], "False", "{broken}");
    assert_eq!(accepted["reason"], "LuaSyntaxError", "{broken}");
    let message = accepted["message"].as_str().unwrap_or("");
    assert!(message.contains("line 2"), "the message names the Lua line: {message}");
    assert_eq!(condition(&broken, "Programmed").expect("Programmed")["status"], "False");
    let events = api.list("events.k8s.io/v1", "Event");
    assert!(
        events
            .iter()
            .any(|e| e["regarding"]["name"] == "broken" && e["reason"] == "LuaSyntaxError" && e["type"] == "Warning"),
        "an Event for the rejection: {events:?}"
    );
    // Other routes are fine.
    assert!(both(&p1, &p2, "lua.test", StatusCode::OK).await);

    // The leader dies without releasing the Lease: c2 takes it and writes status.
    let c1_stream = c1.stream;
    let killed = Instant::now();
    c1.kill();
    api.apply_yaml(&lua_route("hello", "lua.test", "ngx.say(\"hello again\")"));
    let took_over = until("c2 writes status", Duration::from_secs(15), async || {
        let route = api.get("tidegate.dev/v1alpha1", "LuaRoute", "t", "hello").unwrap_or_default();
        condition(&route, "Accepted").is_some_and(|c| c["observedGeneration"] == 2)
            && condition(&route, "Programmed").is_some_and(|c| c["status"] == "True" && c["observedGeneration"] == 2)
    })
    .await;
    assert_eq!(lease_holder(api).as_deref(), Some("c2"), "the Lease moved");
    report(&format!(
        "leader killed: c2 took the Lease and wrote status {:?} later (lease 3 s, retry 0.5 s)",
        killed.elapsed()
    ));
    assert!(
        took_over < Duration::from_millis(3000 + 500 + 1500),
        "within the lease duration plus retry: {took_over:?}"
    );

    // A replacement replica comes up where c1 was; then c2, serving the proxies, is killed: the
    // proxies move to the replacement, which also takes the Lease.
    let c3 = cluster.controller_on(&c1_stream.to_string(), &flags("c3"));
    let killed = Instant::now();
    c2.kill();
    let moved = until("proxies on c3 serve a new Ingress", Duration::from_secs(15), async || {
        api.apply_yaml(&ingress("b", "b.test", "web"));
        both(&p1, &p2, "b.test", StatusCode::OK).await
    })
    .await;
    report(&format!(
        "controller serving the proxies killed: they follow changes through another replica {moved:?} later"
    ));
    until("c3 leads and writes status", Duration::from_secs(15), async || {
        let ingress = api.get("networking.k8s.io/v1", "Ingress", "t", "b").unwrap_or_default();
        lease_holder(api).as_deref() == Some("c3") && ingress["status"]["loadBalancer"]["ingress"].is_array()
    })
    .await;
    report(&format!("c3 leads and wrote status {:?} after c2 was killed", killed.elapsed()));
    let proxies = c3.proxies();
    assert!(proxies["p1"]["connected"] == 1 && proxies["p2"]["connected"] == 1, "{proxies}");
    // Requests kept being answered throughout.
    assert!(both(&p1, &p2, "a.test", StatusCode::OK).await && both(&p1, &p2, "lua.test", StatusCode::OK).await);
    let alive = c3;

    // A clean stop releases the Lease at once.
    alive.terminate();
    until("the Lease released", Duration::from_secs(5), async || lease_holder(api).is_none()).await;
}

/// An Ingress with an `auth-snippet`, which tidegate does not honour yet, answers 503 on every proxy,
/// and gets a Warning Event naming the key; one whose only unsupported key changes behaviour,
/// not access, is served and gets a Warning Event too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_not_honoured_close_routes_and_raise_events() {
    let cluster = Cluster::new();
    let api = &cluster.api;
    let web = echo("t", "web").await;
    api.apply_yaml(&service_yaml("t", "web", 80, "http", &[web]));
    let annotate = |yaml: String, key: &str, value: &str| {
        yaml.replace("namespace: t}", &format!("namespace: t, annotations: {{{key}: {value:?}}}}}"))
    };
    let snippet = "nginx.ingress.kubernetes.io/auth-snippet";
    let buffering = "nginx.ingress.kubernetes.io/enable-opentelemetry";
    api.apply_yaml(&annotate(ingress("guarded", "guarded.test", "web"), snippet, "return 401;"));
    api.apply_yaml(&annotate(ingress("buffered", "buffered.test", "web"), buffering, "true"));
    let mut flags = vec!["--name", "c1"];
    flags.extend(FAST_LEASE);
    let controller = cluster.controller(&flags);
    let (p1, p2) = cluster.proxies(&controller).await;
    assert!(both(&p1, &p2, "guarded.test", StatusCode::SERVICE_UNAVAILABLE).await, "never served open");
    assert!(both(&p1, &p2, "buffered.test", StatusCode::OK).await);

    let event_for = |name: &str, key: &str| {
        api.list("events.k8s.io/v1", "Event").into_iter().find(|e| {
            e["regarding"]["name"] == name
                && e["regarding"]["kind"] == "Ingress"
                && e["type"] == "Warning"
                && e["reason"] == "UnsupportedAnnotation"
                && e["note"].as_str().is_some_and(|n| n.contains(key))
        })
    };
    until("Warning Events for both Ingresses", Duration::from_secs(10), async || {
        event_for("guarded", snippet).is_some() && event_for("buffered", buffering).is_some()
    })
    .await;
    // Passes that find the same problems announce nothing new.
    let count =
        || api.list("events.k8s.io/v1", "Event").iter().filter(|e| e["reason"] == "UnsupportedAnnotation").count();
    let before = count();
    api.apply_yaml(&ingress("other", "other.test", "web"));
    until("the new Ingress served", Duration::from_secs(10), async || {
        both(&p1, &p2, "other.test", StatusCode::OK).await
    })
    .await;
    assert_eq!(count(), before, "no Event repeated for problems already announced");
}

/// Basic auth in cluster mode: the controller reads the Opaque Secret an Ingress names (and no
/// other), and a change to it reaches both proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_secret_changes_apply_live() {
    let cluster = Cluster::new();
    let api = &cluster.api;
    let web = echo("t", "web").await;
    api.apply_yaml(&service_yaml("t", "web", 80, "http", &[web]));
    let secret = |users: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: users, namespace: t}}\ntype: Opaque\nstringData: {{auth: {users:?}}}\n"
        )
    };
    // htpasswd -s: ann's password is "secret", bob's "other".
    let ann = "ann:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n";
    let bob = "bob:{SHA}0JQeaNqPOBUf+Gph/Fn3xc+fyqI=\n";
    api.apply_yaml(&secret(&format!("{ann}{bob}")));
    api.apply_yaml(&ingress("guarded", "guarded.test", "web").replace(
        "namespace: t}",
        "namespace: t, annotations: {nginx.ingress.kubernetes.io/auth-type: basic, nginx.ingress.kubernetes.io/auth-secret: users}}",
    ));
    let controller = cluster.controller(&[]);
    let (p1, p2) = cluster.proxies(&controller).await;
    let status_with = async |proxy: &Tidegate, credentials: &str| {
        use base64::Engine;
        let mut request = get_request("guarded.test", "/");
        let value = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials));
        request.headers_mut().insert(http::header::AUTHORIZATION, value.parse().expect("header"));
        let mut h1 = support::H1::connect(proxy.http).await.expect("connect");
        h1.send(request).await.expect("answered").status
    };
    for proxy in [&p1, &p2] {
        assert_eq!(status_with(proxy, "ann:secret").await, StatusCode::OK);
        assert_eq!(status_with(proxy, "bob:other").await, StatusCode::OK);
        assert_eq!(status_with(proxy, "ann:wrong").await, StatusCode::UNAUTHORIZED);
    }
    assert!(both(&p1, &p2, "guarded.test", StatusCode::UNAUTHORIZED).await, "no credentials");
    timed(
        "auth Secret edited",
        || api.apply_yaml(&secret(ann)),
        async || {
            status_with(&p1, "bob:other").await == StatusCode::UNAUTHORIZED
                && status_with(&p2, "bob:other").await == StatusCode::UNAUTHORIZED
        },
    )
    .await;
    assert_eq!(status_with(&p1, "ann:secret").await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_published_before_every_kind_is_listed() {
    let cluster = Cluster::new();
    let api = &cluster.api;
    let web = echo("t", "web").await;
    api.apply_yaml(&service_yaml("t", "web", 80, "http", &[web]));
    api.apply_yaml(&ingress("a", "a.test", "web"));
    // LuaRoutes cannot be listed: without them the view is partial (an Ingress might attach one).
    api.fail("luaroutes", true);
    let controller = cluster.controller(&[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_ne!(
        support::admin_get(controller.admin, "/readyz").expect("readyz"),
        "ready\n",
        "not ready on a partial view"
    );
    assert!(api.requests().iter().any(|r| r.contains("/luaroutes")), "the controller tried");
    assert!(controller.proxies().as_object().is_none_or(serde_json::Map::is_empty));
    assert!(!controller.logs().iter().any(|l| l.contains("configuration published")), "nothing published");

    api.fail("luaroutes", false);
    until("ready once every kind is listed", Duration::from_secs(15), async || {
        support::admin_get(controller.admin, "/readyz").is_ok_and(|r| r == "ready\n")
    })
    .await;
    let (p1, p2) = cluster.proxies(&controller).await;
    assert!(both(&p1, &p2, "a.test", StatusCode::OK).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_resume_from_bookmarks() {
    let cluster = Cluster::new();
    let api = &cluster.api;
    api.apply_yaml(&ingress("a", "a.test", "web"));
    let controller = cluster.controller(&[]);
    until("ready", Duration::from_secs(10), async || {
        support::admin_get(controller.admin, "/readyz").is_ok_and(|r| r == "ready\n")
    })
    .await;
    // Changes to other kinds move the version on; Ingress watches learn it only from bookmarks.
    for i in 0..5 {
        api.apply_yaml(&format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{i}, namespace: t}}\n"));
    }
    let version = api.version();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = api.requests().len();
    api.end_watches();
    until("Ingress watch resumed", Duration::from_secs(10), async || {
        api.requests()[before..].iter().any(|r| r.contains("/ingresses?") && r.contains("watch=true"))
    })
    .await;
    let requests = api.requests();
    let resumed =
        requests[before..].iter().find(|r| r.contains("/ingresses?") && r.contains("watch=true")).expect("resumed");
    let from: u64 = resumed
        .split('&')
        .find_map(|p| p.strip_prefix("resourceVersion="))
        .and_then(|v| v.parse().ok())
        .expect("resourceVersion");
    assert!(from >= version, "resumed from {from}, before the bookmark's {version}: {resumed}");
    assert!(requests.iter().all(|r| !r.contains("allowWatchBookmarks") || r.contains("allowWatchBookmarks=true")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_namespace_narrows_what_is_read() {
    let cluster = Cluster::new();
    let api = &cluster.api;
    let web = echo("t", "web").await;
    api.apply_yaml(&service_yaml("t", "web", 80, "http", &[web]));
    api.apply_yaml(&ingress("a", "a.test", "web"));
    let elsewhere = ingress("x", "x.test", "web").replace("namespace: t}", "namespace: other}");
    api.apply_yaml(&service_yaml("other", "web", 80, "http", &[web]));
    api.apply_yaml(&elsewhere);
    // The proxies' Service, whose load-balancer addresses Ingress statuses report.
    let lb = "apiVersion: v1\nkind: Service\nmetadata: {name: edge, namespace: ingress}\nspec: {type: LoadBalancer, ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.4}]}}\n";
    api.apply_yaml(lb);
    let controller = cluster.controller(&["--watch-namespace", "t", "--publish-service", "ingress/edge"]);
    let (p1, p2) = cluster.proxies(&controller).await;
    assert!(both(&p1, &p2, "a.test", StatusCode::OK).await);
    assert!(both(&p1, &p2, "x.test", StatusCode::NOT_FOUND).await, "another namespace's Ingress is not served");
    let status = |name: &str, ns: &str| {
        api.get("networking.k8s.io/v1", "Ingress", ns, name).unwrap_or_default()["status"]["loadBalancer"]["ingress"]
            .clone()
    };
    until("the Ingress reports the Service's address", Duration::from_secs(10), async || {
        status("a", "t") == serde_json::json!([{"ip": "198.51.100.4"}])
    })
    .await;
    // The Service's address changes: so do the statuses.
    api.apply_yaml(&lb.replace("198.51.100.4", "edge.example.net").replace("ip:", "hostname:"));
    until("the new address", Duration::from_secs(10), async || {
        status("a", "t") == serde_json::json!([{"hostname": "edge.example.net"}])
    })
    .await;
    assert!(status("x", "other").is_null(), "an Ingress outside the watched namespaces is left alone");
    let requests = api.requests();
    let lists: Vec<&String> = requests
        .iter()
        .filter(|r| r.contains("/ingresses") || (r.contains("/services") && !r.contains("metadata.name%3Dedge")))
        .collect();
    assert!(!lists.is_empty() && lists.iter().all(|r| r.contains("/namespaces/t/")), "{lists:?}");
}

/// The global ConfigMap in cluster mode: read from its own namespace even when
/// `--watch-namespace` leaves that namespace out, an unknown key raised as a Warning Event on the
/// ConfigMap, and a change reaching both proxies live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_configmap_applies_live_and_reports_its_keys() {
    let cluster = Cluster::new();
    let api = &cluster.api;
    let web = echo("t", "web").await;
    api.apply_yaml(&service_yaml("t", "web", 80, "http", &[web]));
    api.apply_yaml(&ingress("a", "a.test", "web"));
    let settings = |agents: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: sys}}\ndata:\n  block-user-agents: {agents:?}\n  no-such-key: \"1\"\n"
        )
    };
    api.apply_yaml(&settings("~*evilbot"));
    let mut flags = vec!["--name", "c1", "--watch-namespace", "t", "--configmap", "sys/settings"];
    flags.extend(FAST_LEASE);
    let controller = cluster.controller(&flags);
    let (p1, p2) = cluster.proxies(&controller).await;
    let status_as = async |proxy: &Tidegate, agent: &str| {
        let mut request = get_request("a.test", "/");
        request.headers_mut().insert(http::header::USER_AGENT, agent.parse().expect("header"));
        let mut h1 = support::H1::connect(proxy.http).await.expect("connect");
        h1.send(request).await.expect("answered").status
    };
    for proxy in [&p1, &p2] {
        assert_eq!(status_as(proxy, "EvilBot/1").await, StatusCode::FORBIDDEN);
        assert_eq!(status_as(proxy, "curl/8").await, StatusCode::OK);
    }
    until("a Warning Event on the ConfigMap", Duration::from_secs(10), async || {
        api.list("events.k8s.io/v1", "Event").into_iter().any(|e| {
            e["regarding"]["kind"] == "ConfigMap"
                && e["regarding"]["name"] == "settings"
                && e["type"] == "Warning"
                && e["note"].as_str().is_some_and(|n| n.contains("no-such-key"))
        })
    })
    .await;
    timed(
        "global ConfigMap edited",
        || api.apply_yaml(&settings("~*curl")),
        async || {
            status_as(&p1, "curl/8").await == StatusCode::FORBIDDEN
                && status_as(&p2, "curl/8").await == StatusCode::FORBIDDEN
        },
    )
    .await;
    assert_eq!(status_as(&p1, "EvilBot/1").await, StatusCode::OK);
    assert!(
        api.requests().iter().any(|r| r.contains("/namespaces/sys/configmaps") && r.contains("metadata.name")),
        "the global ConfigMap watched by name in its namespace"
    );
    // Audit logs and the API server's metrics can tell the controller's requests apart.
    let agents = api.user_agents();
    let wanted = format!("tidegate/{}", env!("CARGO_PKG_VERSION"));
    assert!(!agents.is_empty() && agents.iter().all(|a| *a == wanted), "every request says {wanted}: {agents:?}");
}

/// `global-rate-limit` across proxies: two proxies subscribed to one controller share one limit
/// per key. Requests to the first, then (after a sync) to the second, together get no more than
/// the limit; another key has its own. Counts reach the other proxy within a few syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_rate_limit_is_shared_by_the_proxies() {
    let cluster = Cluster::new();
    let api = &cluster.api;
    let web = echo("t", "web").await;
    api.apply_yaml(&service_yaml("t", "web", 80, "http", &[web]));
    api.apply_yaml(&ingress("limited", "limited.test", "web").replace(
        "namespace: t}",
        "namespace: t, annotations: {nginx.ingress.kubernetes.io/global-rate-limit: \"10\", \
         nginx.ingress.kubernetes.io/global-rate-limit-window: 1h, \
         nginx.ingress.kubernetes.io/global-rate-limit-key: $http_x_tenant}}",
    ));
    let controller = cluster.controller(&[]);
    let (p1, p2) = cluster.proxies(&controller).await;
    let admitted = async |proxy: &Tidegate, tenant: &str, n: usize| {
        let mut ok = 0;
        for _ in 0..n {
            let mut request = get_request("limited.test", "/");
            request.headers_mut().insert("x-tenant", tenant.parse().expect("header"));
            let mut h1 = support::H1::connect(proxy.http).await.expect("connect");
            let status = h1.send(request).await.expect("answered").status;
            assert!(status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS, "{status}");
            ok += usize::from(status == StatusCode::OK);
        }
        ok
    };
    assert_eq!(admitted(&p1, "a", 6).await, 6);
    // A few syncs (100 ms each) for p1's counts to reach p2 through the controller.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = admitted(&p2, "a", 8).await;
    assert_eq!(second, 4, "p2 admits what p1 left of the 10");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(admitted(&p1, "a", 3).await, 0, "p1 sees p2's counts too");
    assert_eq!(admitted(&p2, "b", 3).await, 3, "another key");
    report(&format!("global-rate-limit 10/h shared by two proxies: 6 + {second} admitted"));
}

/// An unknown Lua phase that the API server would prune (field validation not strict,
/// `kubectl apply --validate=false`) reaches the controller, which reports it as a field error
/// and keeps the route closed, instead of serving it Accepted without the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_lua_phase_is_a_field_error_not_a_lost_handler() {
    let cluster = Cluster::new();
    let api = &cluster.api;
    // `acess` for `access`: the guard would be lost.
    api.apply_yaml(
        "apiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {name: guarded, namespace: t}\nspec:\n  hosts: [guarded.test]\n  lua:\n    acess: ngx.exit(403)\n  routes:\n  - name: all\n    match: {path: {type: Prefix, value: /}}\n    lua: {content: \"ngx.say('secret')\"}\n",
    );
    let stored = api.get("tidegate.dev/v1alpha1", "LuaRoute", "t", "guarded").expect("stored");
    assert_eq!(stored["spec"]["lua"]["acess"], "ngx.exit(403)", "kept by the API server for the controller to see");
    let mut flags = vec!["--name", "c1"];
    flags.extend(FAST_LEASE);
    let controller = cluster.controller(&flags);
    let (p1, p2) = cluster.proxies(&controller).await;
    assert!(!both(&p1, &p2, "guarded.test", StatusCode::OK).await, "never served without its guard");
    until("Accepted False naming spec.lua.acess", Duration::from_secs(10), async || {
        api.get("tidegate.dev/v1alpha1", "LuaRoute", "t", "guarded").is_some_and(|route| {
            condition(&route, "Accepted").is_some_and(|c| {
                c["status"] == "False" && c["message"].as_str().is_some_and(|m| m.contains("spec.lua.acess"))
            })
        })
    })
    .await;
}

/// Replica Leases do not pile up: a replica deletes its own when it stops cleanly, and the
/// leader deletes one that expired long ago (a replica that was killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_leases_are_deleted_on_stop_and_when_long_expired() {
    let cluster = Cluster::new();
    let api = &cluster.api;
    let long_ago = "2026-01-01T00:00:00.000000Z";
    api.apply_yaml(&format!(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: tidegate-controller-gone\n  namespace: default\n  labels: {{tidegate.dev/replica-of: tidegate-controller}}\nspec: {{holderIdentity: gone, leaseDurationSeconds: 3, renewTime: \"{long_ago}\"}}\n"
    ));
    let lease =
        |name: &str| api.get("coordination.k8s.io/v1", "Lease", "default", &format!("tidegate-controller-{name}"));
    let start = |name: &'static str| {
        let mut flags = vec!["--name", name];
        flags.extend(FAST_LEASE);
        cluster.controller(&flags)
    };
    let c1 = start("c1");
    let c2 = start("c2");
    until("both replicas' Leases, and the stale one gone", Duration::from_secs(15), async || {
        lease("c1").is_some() && lease("c2").is_some() && lease("gone").is_none()
    })
    .await;
    c2.terminate();
    until("the stopped replica's Lease deleted", Duration::from_secs(10), async || lease("c2").is_none()).await;
    assert!(lease("c1").is_some(), "the other replica's stays");
    drop(c1);
}

/// Two replicas stamp the same change with their own clocks; proxies subscribed to the one
/// that does not lead acknowledge its stamps. `Programmed` must still turn True on every
/// update: the replicas agree on what a version holds (its content), whatever their stamps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_agree_and_programmed_turns_true_on_every_update() {
    let cluster = Cluster::new();
    let api = &cluster.api;
    api.apply_yaml(&lua_route("hello", "lua.test", "ngx.say(\"0\")"));
    let flags = |name: &'static str| {
        let mut flags = vec!["--name", name];
        flags.extend(FAST_LEASE);
        flags
    };
    let c1 = cluster.controller(&flags("c1"));
    until("c1 leads", Duration::from_secs(10), async || lease_holder(api).as_deref() == Some("c1")).await;
    let c2 = cluster.controller(&flags("c2"));
    let (p1, p2) = cluster.proxies_of(&[&c2]).await;
    let programmed = |generation: i64| {
        api.get("tidegate.dev/v1alpha1", "LuaRoute", "t", "hello").is_some_and(|route| {
            condition(&route, "Programmed")
                .is_some_and(|c| c["status"] == "True" && c["observedGeneration"] == generation)
        })
    };
    until("programmed at first", Duration::from_secs(15), async || programmed(1)).await;
    let mut stuck = Vec::new();
    for update in 1..=30 {
        api.apply_yaml(&lua_route("hello", "lua.test", &format!("ngx.say(\"{update}\")")));
        let generation = 1 + update;
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while !programmed(generation) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !programmed(generation) {
            stuck.push(update);
        }
    }
    report(&format!("two replicas, proxies on the follower: Programmed stuck on {} of 30 updates", stuck.len()));
    assert!(stuck.is_empty(), "Programmed stayed False after updates {stuck:?}");
    drop((p1, p2, c2, c1));
}

/// The stand-in refuses EndpointSlice addresses a real API server refuses (loopback,
/// link-local), naming the field, and accepts routable ones; only tests that say so (the
/// documented exception) may put loopback backends in EndpointSlices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stand_in_refuses_endpoint_addresses_a_real_api_server_refuses() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = ApiServer::start();
    let post = async |address: &str| {
        let body = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("web-{}", address.replace([':', '.'], "-")), "namespace": "t",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": if address.contains(':') { "IPv6" } else { "IPv4" },
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [address]}],
        })
        .to_string();
        let mut stream = tokio::net::TcpStream::connect(api.addr).await.expect("connect");
        let request = format!(
            "POST /apis/discovery.k8s.io/v1/namespaces/t/endpointslices HTTP/1.1\r\nHost: stand-in\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer
    };
    for refused in ["127.0.0.1", "::1", "169.254.169.254", "fe80::1"] {
        let answer = post(refused).await;
        assert!(answer.starts_with("HTTP/1.1 422"), "{refused}: {answer}");
        assert!(answer.contains("endpoints[0].addresses[0]: Invalid value"), "{answer}");
    }
    let accepted = post("10.244.1.7").await;
    assert!(accepted.starts_with("HTTP/1.1 201"), "{accepted}");
}
