//! Changes to the manifest folder while traffic flows: nothing fails, every change shows, and bad
//! input is reported once while everything else keeps answering.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use support::{
    H1, Tidegate, echo, get, get_request, manifest_dir, self_signed, service_yaml, tls_connector, tls_request,
    tls_secret_yaml, write_manifest,
};

fn ingress(name: &str, host: &str, paths: &[(&str, &str)], tls_secret: Option<&str>) -> String {
    let tls = tls_secret.map_or(String::new(), |s| format!("  tls: [{{hosts: [{host}], secretName: {s}}}]\n"));
    let mut out = format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  ingressClassName: tidegate\n{tls}  rules:\n  - host: {host}\n    http:\n      paths:\n"
    );
    for (path, service) in paths {
        out.push_str(&format!("      - {{path: {path}, pathType: Prefix, backend: {{service: {{name: {service}, port: {{number: 80}}}}}}}}\n"));
    }
    out
}

/// Polls until `check` holds (bounded), returning how long it took.
async fn observe<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(10), "change not observed within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    started.elapsed()
}

#[derive(Default)]
struct Traffic {
    sent: AtomicU64,
    failed: AtomicU64,
}

/// Requests that must complete between two edits.
const PER_EDIT: u64 = 5;

impl Traffic {
    /// Waits until `n` more requests have completed (at most 10 s: the clients report failures).
    async fn wait_for_more(&self, n: u64) {
        let target = self.sent.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.sent.load(Ordering::Relaxed) < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn record(&self, ok: bool, what: &str, detail: &str) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
            eprintln!("failed {what}: {detail}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_edits_under_traffic_lose_no_request() {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    let other = echo("t", "other").await;
    let services =
        format!("{}{}", service_yaml("t", "web", 80, "http", &[web]), service_yaml("t", "other", 80, "http", &[other]));
    write_manifest(dir.path(), "services.yaml", &services);
    write_manifest(dir.path(), "stable.yaml", &ingress("stable", "stable.test", &[("/", "web")], None));
    let (mut cert, key) = self_signed(&["secure.test"]);
    write_manifest(
        dir.path(),
        "secure.yaml",
        &format!(
            "{}{}",
            tls_secret_yaml("t", "secure-tls", &cert, &key),
            ingress("secure", "secure.test", &[("/", "web")], Some("secure-tls"))
        ),
    );
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");
    let (http, https) = (tidegate.http, tidegate.https);

    // Three clients for the whole run: one keep-alive connection, a new connection per
    // request, and TLS to the host whose certificate rotates.
    let traffic = Arc::new(Traffic::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    {
        let (traffic, stop) = (Arc::clone(&traffic), Arc::clone(&stop));
        clients.push(tokio::spawn(async move {
            let mut conn = H1::connect(http).await.expect("keep-alive connection");
            while !stop.load(Ordering::Relaxed) {
                let r = conn.get("stable.test", "/").await;
                traffic.record(matches!(&r, Ok(a) if a.status == StatusCode::OK), "keep-alive", &format!("{r:?}"));
            }
        }));
    }
    {
        let (traffic, stop) = (Arc::clone(&traffic), Arc::clone(&stop));
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = get(http, "stable.test", "/").await;
                traffic.record(matches!(&r, Ok(a) if a.status == StatusCode::OK), "new connection", &format!("{r:?}"));
            }
        }));
    }
    {
        let (traffic, stop) = (Arc::clone(&traffic), Arc::clone(&stop));
        clients.push(tokio::spawn(async move {
            let any = tls_connector(None, &[b"h2", b"http/1.1"]);
            while !stop.load(Ordering::Relaxed) {
                let r = tls_request(&any, https, "secure.test", get_request("secure.test", "/")).await;
                let ok = matches!(&r, Ok(a) if a.answer.status == StatusCode::OK);
                traffic.record(ok, "tls", &r.map(|a| a.answer.status.to_string()).unwrap_or_else(|e| e));
            }
        }));
    }

    let mut latencies = Vec::new();
    for i in 0..20 {
        // Every edit lands among requests: some go through before the next one is made.
        traffic.wait_for_more(PER_EDIT).await;
        let host = format!("r{i}.test");
        let latency = match i % 4 {
            // Add a host.
            0 => {
                write_manifest(dir.path(), "dynamic.yaml", &ingress("dynamic", &host, &[("/", "other")], None));
                observe(&format!("{host} added"), || async {
                    get(http, &host, "/").await.is_ok_and(|a| a.status == StatusCode::OK && a.served_by() == "other")
                })
                .await
            }
            // Remove it again.
            1 => {
                let previous = format!("r{}.test", i - 1);
                std::fs::remove_file(dir.path().join("dynamic.yaml")).expect("remove");
                observe(&format!("{previous} removed"), || async {
                    get(http, &previous, "/").await.is_ok_and(|a| a.status == StatusCode::NOT_FOUND)
                })
                .await
            }
            // Rotate the certificate of secure.test.
            2 => {
                let (new_cert, new_key) = self_signed(&["secure.test"]);
                cert = new_cert;
                write_manifest(
                    dir.path(),
                    "secure.yaml",
                    &format!(
                        "{}{}",
                        tls_secret_yaml("t", "secure-tls", &cert, &new_key),
                        ingress("secure", "secure.test", &[("/", "web")], Some("secure-tls"))
                    ),
                );
                let trusts_new = tls_connector(Some(&[cert.as_str()]), &[b"http/1.1"]);
                observe("certificate rotated", || async {
                    tls_request(&trusts_new, https, "secure.test", get_request("secure.test", "/")).await.is_ok()
                })
                .await
            }
            // Add a path on the stable host, leaving its other path alone.
            _ => {
                let path = format!("/v{i}");
                write_manifest(
                    dir.path(),
                    "stable.yaml",
                    &ingress("stable", "stable.test", &[("/", "web"), (&path, "other")], None),
                );
                observe(&format!("{path} added to stable.test"), || async {
                    get(http, "stable.test", &path).await.is_ok_and(|a| a.served_by() == "other")
                })
                .await
            }
        };
        latencies.push(latency);
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }

    latencies.sort();
    let sent = traffic.sent.load(Ordering::Relaxed);
    let failed = traffic.failed.load(Ordering::Relaxed);
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "live changes: 20 edits observed (median {:?}, max {:?} from write to served), {sent} requests, {failed} failed",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    assert_eq!(failed, 0, "no request may fail while the configuration changes");
    assert!(sent >= 20 * PER_EDIT, "traffic flowed throughout ({sent} requests)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_reported_once_and_everything_else_keeps_serving() {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    write_manifest(
        dir.path(),
        "good.yaml",
        &format!(
            "{}{}",
            service_yaml("t", "web", 80, "http", &[web]),
            ingress("good", "good.test", &[("/", "web")], None)
        ),
    );
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");
    let good = || async { get(tidegate.http, "good.test", "/").await.is_ok_and(|a| a.status == StatusCode::OK) };
    assert!(good().await);

    // 1. A file that is not YAML.
    let version = tidegate.version();
    write_manifest(dir.path(), "bad.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n");
    // 2. An Ingress naming a Service that does not exist.
    write_manifest(dir.path(), "ghost.yaml", &ingress("ghost", "ghost.test", &[("/", "nope")], None));
    // 3. A TLS Secret whose certificate does not match its key.
    let (cert, _) = self_signed(&["broken.test"]);
    let (_, other_key) = self_signed(&["elsewhere.test"]);
    write_manifest(
        dir.path(),
        "broken-tls.yaml",
        &format!(
            "{}{}",
            tls_secret_yaml("t", "broken-tls", &cert, &other_key),
            ingress("broken", "broken.test", &[("/", "web")], Some("broken-tls"))
        ),
    );
    tidegate.wait_version_after(version);
    let ghost = observe("ghost.test served", || async {
        get(tidegate.http, "ghost.test", "/").await.is_ok_and(|a| a.status == StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    assert!(ghost < Duration::from_secs(10));
    // Past a periodic rescan, so a problem logged on every rescan would show twice.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let bad_yaml = tidegate.problems_mentioning("bad.yaml");
    assert_eq!(bad_yaml.len(), 1, "one line for the bad file: {bad_yaml:#?}");
    assert!(bad_yaml[0].contains("not valid YAML"), "{}", bad_yaml[0]);

    let ghost_lines = tidegate.problems_mentioning("Ingress t/ghost");
    assert_eq!(ghost_lines.len(), 1, "one line for the missing Service: {ghost_lines:#?}");
    for part in ["ghost.yaml document 1", "spec.rules[0].http.paths[0].backend.service", "Service t/nope not found"] {
        assert!(ghost_lines[0].contains(part), "the line names {part}: {}", ghost_lines[0]);
    }

    let tls_lines = tidegate.problems_mentioning("t/broken-tls");
    assert_eq!(tls_lines.len(), 1, "one line for the broken Secret: {tls_lines:#?}");
    assert!(tls_lines[0].contains("does not match"), "{}", tls_lines[0]);
    // broken.test falls back to the default certificate and still answers.
    let any = tls_connector(None, &[b"http/1.1"]);
    let answer = tls_request(&any, tidegate.https, "broken.test", get_request("broken.test", "/"))
        .await
        .expect("default certificate");
    let default_name = b"tidegate-default.invalid";
    assert!(answer.peer_certificate.windows(default_name.len()).any(|w| w == default_name));
    assert_eq!(answer.answer.status, StatusCode::OK);

    assert!(good().await, "the good route kept answering");
    assert!(tidegate.logs().iter().all(|l| !l.contains("panicked")));

    // Fixing the file clears its error and restores the objects it describes.
    write_manifest(dir.path(), "bad.yaml", &service_yaml("t", "nope", 80, "http", &[web]));
    observe("ghost.test fixed by the repaired file", || async {
        get(tidegate.http, "ghost.test", "/").await.is_ok_and(|a| a.status == StatusCode::OK)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_finish_on_the_configuration_they_started_with() {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    write_manifest(dir.path(), "svc.yaml", &service_yaml("t", "web", 80, "http", &[web]));
    write_manifest(dir.path(), "route.yaml", &ingress("going", "going.test", &[("/", "web")], None));
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");
    let http = tidegate.http;
    // The upstream takes 1.5 s; the route disappears meanwhile.
    let slow = tokio::spawn(async move { get(http, "going.test", "/?delay_ms=1500").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let version = tidegate.version();
    std::fs::remove_file(dir.path().join("route.yaml")).expect("remove route");
    tidegate.wait_version_after(version);
    assert_eq!(
        get(http, "going.test", "/").await.expect("answer").status,
        StatusCode::NOT_FOUND,
        "new requests see the change"
    );
    let answer = slow.await.expect("task").expect("in-flight answer");
    assert_eq!(answer.status, StatusCode::OK, "the request in flight finished on the old configuration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    write_manifest(
        dir.path(),
        "all.yaml",
        &format!("{}{}", service_yaml("t", "web", 80, "http", &[web]), ingress("r", "r.test", &[("/", "web")], None)),
    );
    let path = dir.path().to_owned();
    let mut tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");
    let http = tidegate.http;
    let slow = tokio::spawn(async move { get(http, "r.test", "/?delay_ms=1000").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    tidegate.terminate();
    let answer = slow.await.expect("task").expect("in-flight answer");
    assert_eq!(answer.status, StatusCode::OK, "the request in flight completes during the drain");
    let status = tokio::task::spawn_blocking(move || {
        let status = tidegate.wait_exit(Duration::from_secs(10));
        (status, tidegate)
    })
    .await
    .expect("wait");
    assert!(status.0.is_some_and(|s| s.success()), "exits cleanly after draining: {:?}", status.0);
    assert!(get(http, "r.test", "/").await.is_err(), "no new connections after exit");
    assert!(status.1.logs().iter().any(|l| l.contains("draining")));
}
