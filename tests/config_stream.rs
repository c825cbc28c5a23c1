//! The config stream with the real binaries on loopback: one controller, two proxies, mutual
//! TLS; changes reach both proxies, proxies outlive their controller and reconnect to it.

mod support;

use std::time::Duration;

use support::stream::{Controller, Pki, serves, until};
use support::{Tidegate, admin_get, echo, manifest_dir, service_yaml, spawn_logged, write_manifest};

fn ingress(name: &str, host: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  ingressClassName: tidegate\n  rules:\n  - host: {host}\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_follow_the_controller_and_outlive_it() {
    let certs = tempfile::tempdir().expect("dir");
    let pki = Pki::new("tidegate stream CA");
    let controller_tls = pki.issue(certs.path(), "controller", &["localhost"], &pki.ca_pem);
    let proxy_tls = pki.issue(certs.path(), "proxy", &["proxy"], &pki.ca_pem);

    let manifests = manifest_dir();
    let web = echo("t", "web").await;
    write_manifest(manifests.path(), "svc.yaml", &service_yaml("t", "web", 80, "http", &[web]));
    write_manifest(manifests.path(), "a.yaml", &ingress("a", "a.test"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
    let stream_addr = format!("127.0.0.1:{port}");
    let controller = Controller::start(manifests.path(), &controller_tls, &stream_addr);
    let url = format!("https://localhost:{}", controller.stream.port());

    let (p1, p2) = {
        let (url, tls, dir) = (url.clone(), proxy_tls.clone(), manifests.path().to_owned());
        tokio::task::spawn_blocking(move || {
            (Tidegate::proxy(&url, "p1", &tls, &dir), Tidegate::proxy(&url, "p2", &tls, &dir))
        })
        .await
        .expect("start proxies")
    };
    assert!(serves(&p1, "a.test").await && serves(&p2, "a.test").await, "both proxies serve the first snapshot");

    // A change reaches both proxies; both acknowledge it.
    write_manifest(manifests.path(), "b.yaml", &ingress("b", "b.test"));
    let latency = until("b.test on both proxies", Duration::from_secs(10), async || {
        serves(&p1, "b.test").await && serves(&p2, "b.test").await
    })
    .await;
    until("both proxies acknowledged", Duration::from_secs(5), async || {
        let proxies: serde_json::Value =
            serde_json::from_str(&admin_get(controller.admin, "/proxies").unwrap_or_default()).unwrap_or_default();
        ["p1", "p2"].iter().all(|p| proxies[p]["version"] == 2 && proxies[p]["error"].is_null())
    })
    .await;

    // The controller goes away: the proxies keep serving what they have.
    drop(controller);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..20 {
        assert!(serves(&p1, "a.test").await && serves(&p2, "b.test").await, "proxies serve without their controller");
    }
    assert_eq!(
        admin_get(p1.admin, "/readyz").expect("readyz"),
        "ready\n",
        "still ready: they serve the last good configuration"
    );

    // It comes back on the same address: the proxies reconnect and follow new changes.
    write_manifest(manifests.path(), "c.yaml", &ingress("c", "c.test"));
    let controller = Controller::start(manifests.path(), &controller_tls, &stream_addr);
    until("c.test after the controller returned", Duration::from_secs(15), async || {
        serves(&p1, "c.test").await && serves(&p2, "c.test").await
    })
    .await;

    // A proxy whose certificate another CA signed is refused.
    let other = Pki::new("someone else");
    let stranger_tls = other.issue(certs.path(), "stranger", &["stranger"], &pki.ca_pem);
    let url2 = url.clone();
    let refused = tokio::task::spawn_blocking(move || {
        let mut args: Vec<String> =
            vec!["proxy".into(), "--controller".into(), url2, "--name".into(), "stranger".into()];
        args.extend(stranger_tls);
        args.extend(support::EPHEMERAL_LISTENERS.map(String::from));
        let (mut child, _, logs) = spawn_logged(&args, "listening");
        std::thread::sleep(Duration::from_millis(800));
        let _ = child.kill();
        let _ = child.wait();
        logs.lock().expect("logs").clone()
    })
    .await
    .expect("stranger");
    assert!(!refused.iter().any(|l| l.contains("configuration applied")), "an unknown proxy gets no configuration");
    let proxies = admin_get(controller.admin, "/proxies").expect("proxies");
    assert!(!proxies.contains("stranger"), "{proxies}");

    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "config stream: manifest change served by both proxies in {latency:?}");
}
