//! How requests spread over a backend's endpoints, and go on to others when one fails, through
//! the real binary against real servers on loopback: round robin, peak EWMA, consistent hash
//! (and its subsets), and `proxy-next-upstream` with a refusing and a dropping endpoint.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::Full;
use support::{H1, Tidegate, echo, manifest_dir, service_yaml, write_manifest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An echo backend that waits `delay` before every answer.
async fn slow_echo(service: &str, delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let identity = tidegate::echo::Identity {
        namespace: "t".into(),
        service: service.into(),
        pod: format!("{service}-{}", addr.port()),
        delay,
    };
    tokio::spawn(tidegate::echo::serve(listener, identity));
    addr
}

/// An endpoint that reads each request head and closes without answering; it records the
/// `x-id` of each request it read.
async fn dropper(seen: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut read = 0;
                while !buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf[read..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read += n,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..read]).to_lowercase();
                if let Some(id) = head.lines().find_map(|l| l.strip_prefix("x-id: ")) {
                    seen.lock().expect("lock").push(id.trim().to_owned());
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

fn ingress(name: &str, annotations: &[(&str, &str)]) -> String {
    let mut meta = format!("metadata:\n  name: {name}\n  namespace: t\n");
    if !annotations.is_empty() {
        meta.push_str("  annotations:\n");
        for (key, value) in annotations {
            meta.push_str(&format!("    nginx.ingress.kubernetes.io/{key}: {value:?}\n"));
        }
    }
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\n{meta}spec:\n  ingressClassName: tidegate\n  rules:\n  - host: {name}.test\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: {name}, port: {{number: 80}}}}}}}}\n"
    )
}

async fn start(manifests: String) -> (Tidegate, tempfile::TempDir) {
    let dir = manifest_dir();
    write_manifest(dir.path(), "all.yaml", &manifests);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");
    (tidegate, dir)
}

/// Which pod answered each of `n` GETs of `path(i)`, counted.
async fn spread(tidegate: &Tidegate, host: &str, n: usize, path: impl Fn(usize) -> String) -> BTreeMap<String, usize> {
    let mut client = H1::connect(tidegate.http).await.expect("connect");
    let mut pods = BTreeMap::new();
    for i in 0..n {
        let answer = client.get(host, &path(i)).await.expect("answer");
        assert_eq!(answer.status, StatusCode::OK, "{host}{}", path(i));
        *pods.entry(answer.json()["pod"].as_str().unwrap_or("").to_owned()).or_insert(0) += 1;
    }
    pods
}

/// Round robin is even; EWMA keeps away from an endpoint 100 ms slower than the others; a
/// hash key always reaches the same endpoint, and a subset spreads a key over its few.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_as_the_balance_says() {
    let even = [echo("t", "even").await, echo("t", "even").await, echo("t", "even").await];
    let ewma = [echo("t", "ewma").await, echo("t", "ewma").await, slow_echo("ewma", Duration::from_millis(100)).await];
    let slow_pod = format!("ewma-{}", ewma[2].port());
    let mut hash = Vec::new();
    for _ in 0..6 {
        hash.push(echo("t", "hash").await);
    }
    let mut manifests = service_yaml("t", "even", 80, "http", &even);
    manifests.push_str(&service_yaml("t", "ewma", 80, "http", &ewma));
    manifests.push_str(&service_yaml("t", "hash", 80, "http", &hash));
    manifests.push_str(&service_yaml("t", "subset", 80, "http", &hash));
    manifests.push_str(&ingress("even", &[]));
    manifests.push_str(&ingress("ewma", &[("load-balance", "ewma")]));
    manifests.push_str(&ingress("hash", &[("upstream-hash-by", "$request_uri")]));
    manifests.push_str(&ingress(
        "subset",
        &[
            ("upstream-hash-by", "$http_x_user"),
            ("upstream-hash-by-subset", "true"),
            ("upstream-hash-by-subset-size", "2"),
        ],
    ));
    let (tidegate, _dir) = start(manifests).await;

    let pods = spread(&tidegate, "even.test", 300, |_| "/".into()).await;
    assert_eq!(pods.len(), 3, "{pods:?}");
    assert!(pods.values().all(|n| (90..=110).contains(n)), "round robin within ±10%: {pods:?}");

    let pods = spread(&tidegate, "ewma.test", 200, |_| "/".into()).await;
    let slow = pods.get(&slow_pod).copied().unwrap_or(0);
    assert!(slow * 100 < 200 * 15, "under 15% to the slow endpoint: {pods:?}");

    let mut first: BTreeMap<String, String> = BTreeMap::new();
    for round in 0..3 {
        let mut client = H1::connect(tidegate.http).await.expect("connect");
        for i in 0..50 {
            let path = format!("/item/{i}");
            let pod =
                client.get("hash.test", &path).await.expect("answer").json()["pod"].as_str().unwrap_or("").to_owned();
            match first.get(&path) {
                Some(earlier) => assert_eq!(earlier, &pod, "round {round}: {path} moved"),
                None => {
                    first.insert(path, pod);
                }
            }
        }
    }
    let used: BTreeSet<&String> = first.values().collect();
    assert!(used.len() >= 4, "keys spread over the endpoints: {used:?}");

    let mut client = H1::connect(tidegate.http).await.expect("connect");
    for user in ["ana", "bo", "cy"] {
        let mut pods = BTreeSet::new();
        for _ in 0..20 {
            let request = Request::get("/").header("host", "subset.test").header("x-user", user).body(Full::default());
            let answer = client.send(request.expect("request")).await.expect("answer");
            pods.insert(answer.json()["pod"].as_str().unwrap_or("").to_owned());
        }
        assert_eq!(pods.len(), 2, "{user}'s requests spread over one subset of 2: {pods:?}");
    }
}

/// `proxy-next-upstream` (`error timeout` by default, 3 tries): with one endpoint refusing
/// connections and one closing them unanswered, a POST that reached the endpoint that closed
/// is not sent again (502), one refused a connection goes on, and no GET fails. Passive
/// health: an endpoint failing 5 times in a row is left out for 10 s, then tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_endpoints_are_passed_over() {
    let web = echo("t", "retry").await;
    let refusing = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let dropped = Arc::new(Mutex::new(Vec::new()));
    let closing = dropper(Arc::clone(&dropped)).await;
    let mut manifests = service_yaml("t", "retry", 80, "http", &[web, refusing, closing]);
    manifests.push_str(&service_yaml("t", "noretry", 80, "http", &[web, refusing]));
    manifests.push_str(&ingress("retry", &[]));
    manifests.push_str(&ingress("noretry", &[("proxy-next-upstream", "off")]));
    let (tidegate, _dir) = start(manifests).await;

    let mut failed = BTreeSet::new();
    let mut answered = BTreeSet::new();
    for i in 0..60 {
        let id = format!("post-{i}");
        let request = Request::post("/")
            .header("host", "retry.test")
            .header("x-id", &id)
            .body(Full::new(bytes::Bytes::from_static(b"x")))
            .expect("request");
        let mut client = H1::connect(tidegate.http).await.expect("connect");
        let answer = client.send(request).await.expect("answer");
        match answer.status {
            StatusCode::OK => answered.insert(id),
            StatusCode::BAD_GATEWAY => failed.insert(id),
            other => panic!("POST {i}: {other}"),
        };
    }
    let dropped: BTreeSet<String> = dropped.lock().expect("lock").iter().cloned().collect();
    // Then GETs, which any endpoint may take again.
    let mut client = H1::connect(tidegate.http).await.expect("connect");
    for i in 0..500 {
        let answer = client.get("retry.test", &format!("/{i}")).await.expect("answer");
        assert_eq!(answer.status, StatusCode::OK, "GET {i}");
    }
    assert!(!failed.is_empty() && !answered.is_empty(), "both kinds of endpoint were reached");
    assert_eq!(
        failed,
        dropped.intersection(&failed).cloned().collect(),
        "each 502 is a POST the closing endpoint read"
    );
    assert!(answered.is_disjoint(&dropped), "a POST the closing endpoint read was never sent again");

    // With retries off, the refusing endpoint's turns are 502s until it has failed 5 times in
    // a row: then it is left out (passive health), and every request is answered.
    let mut client = H1::connect(tidegate.http).await.expect("connect");
    let mut statuses = BTreeMap::new();
    for i in 0..40 {
        let answer = client.get("noretry.test", &format!("/{i}")).await.expect("answer");
        *statuses.entry(answer.status.as_u16()).or_insert(0) += 1;
    }
    assert_eq!(statuses.get(&502), Some(&5), "{statuses:?}");
    // After 10 s it is tried again: listening now, it gets its turns.
    let back = tokio::net::TcpListener::bind(refusing).await.expect("the port again");
    let identity = tidegate::echo::Identity { service: "back".into(), pod: "back".into(), ..Default::default() };
    tokio::spawn(tidegate::echo::serve(back, identity));
    tokio::time::sleep(Duration::from_millis(10_300)).await;
    let pods = spread(&tidegate, "noretry.test", 20, |i| format!("/{i}")).await;
    assert_eq!(pods.get("back"), Some(&10), "back in the round robin: {pods:?}");
}

/// `affinity: cookie`: the first response sets the session cookie (name, path, attributes as
/// the `session-cookie-*` keys say), and every request carrying it reaches the same endpoint,
/// in both modes; requests without it keep spreading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_affinity_sticks() {
    let mut web = Vec::new();
    for _ in 0..4 {
        web.push(echo("t", "sticky").await);
    }
    let mut manifests = service_yaml("t", "sticky", 80, "http", &web);
    manifests.push_str(&service_yaml("t", "persistent", 80, "http", &web));
    manifests.push_str(&ingress("sticky", &[("affinity", "cookie")]));
    manifests.push_str(&ingress(
        "persistent",
        &[
            ("affinity", "cookie"),
            ("affinity-mode", "persistent"),
            ("session-cookie-name", "route"),
            ("session-cookie-max-age", "3600"),
            ("session-cookie-samesite", "Lax"),
            ("session-cookie-secure", "true"),
        ],
    ));
    let (tidegate, _dir) = start(manifests).await;

    for (host, name, attributes) in [
        ("sticky.test", "INGRESSCOOKIE", "; Path=/; HttpOnly"),
        ("persistent.test", "route", "; Path=/; Max-Age=3600; SameSite=Lax; Secure; HttpOnly"),
    ] {
        let mut pods_of_sessions = BTreeSet::new();
        for _ in 0..6 {
            let mut client = H1::connect(tidegate.http).await.expect("connect");
            let first = client.get(host, "/").await.expect("answer");
            let set = first.headers[http::header::SET_COOKIE].to_str().expect("ascii").to_owned();
            assert!(set.starts_with(&format!("{name}=")) && set.ends_with(attributes), "{host}: {set}");
            let cookie = set.split(';').next().expect("pair").to_owned();
            let pod = first.json()["pod"].as_str().unwrap_or("").to_owned();
            for i in 0..20 {
                let request = Request::get(format!("/{i}")).header("host", host).header("cookie", &cookie);
                let answer = client.send(request.body(Full::default()).expect("request")).await.expect("answer");
                assert_eq!(answer.json()["pod"], pod.as_str(), "{host}: the session stays on its endpoint");
                assert!(!answer.headers.contains_key(http::header::SET_COOKIE), "set once");
            }
            pods_of_sessions.insert(pod);
        }
        assert!(pods_of_sessions.len() >= 2, "{host}: sessions spread over endpoints: {pods_of_sessions:?}");
    }
}

/// A canary Ingress for the same host and path as another (`canary: "true"`): the header
/// decides first (`always`, `never`, or a value), then the cookie, then the weight; 30 of 100
/// by weight is 30% ± 5% of 1,000 requests. A canary is never a route of its own: one with no
/// Ingress to join serves nothing and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_ingresses_take_their_share() {
    let (main, canary) = (echo("t", "main").await, echo("t", "canary").await);
    let mut manifests = service_yaml("t", "shop", 80, "http", &[main]);
    manifests.push_str(&service_yaml("t", "shop-canary", 80, "http", &[canary]));
    manifests.push_str(&ingress("shop", &[]));
    let canary_of = |name: &str, host: &str, annotations: &[(&str, &str)]| {
        ingress(name, annotations)
            .replace(&format!("host: {name}.test"), &format!("host: {host}"))
            .replace(&format!("name: {name}, port"), "name: shop-canary, port")
    };
    manifests.push_str(&canary_of(
        "shop-canary",
        "shop.test",
        &[
            ("canary", "true"),
            ("canary-by-header", "X-Canary"),
            ("canary-by-cookie", "canary"),
            ("canary-weight", "30"),
        ],
    ));
    manifests.push_str(&canary_of("lonely", "lonely.test", &[("canary", "true"), ("canary-weight", "100")]));
    let (tidegate, _dir) = start(manifests).await;

    // A connection carries 1,000 requests (`keep-alive-requests`): a new one every 500.
    let (addr, mut client, mut sent) = (tidegate.http, H1::connect(tidegate.http).await.expect("connect"), 0);
    let mut served_by = async |headers: &[(&str, &str)]| {
        let mut request = Request::get("/").header("host", "shop.test");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        sent += 1;
        if sent % 500 == 0 {
            client = H1::connect(addr).await.expect("connect");
        }
        client.send(request.body(Full::default()).expect("request")).await.expect("answer").served_by()
    };
    for _ in 0..20 {
        assert_eq!(served_by(&[("x-canary", "always")]).await, "canary");
        assert_eq!(served_by(&[("x-canary", "never"), ("cookie", "canary=always")]).await, "main", "the header first");
        assert_eq!(served_by(&[("cookie", "canary=always")]).await, "canary");
        assert_eq!(served_by(&[("cookie", "canary=never")]).await, "main", "the cookie before the weight");
    }
    let mut to_canary = 0;
    for _ in 0..1000 {
        if served_by(&[]).await == "canary" {
            to_canary += 1;
        }
    }
    assert!((250..=350).contains(&to_canary), "canary-weight 30: {to_canary} of 1000");

    let lonely = support::get(tidegate.http, "lonely.test", "/").await.expect("answer");
    assert_eq!(lonely.status, StatusCode::NOT_FOUND, "a canary is no route of its own");
    let status = tidegate.status();
    let lonely_problems = status["objects"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| o["object"]["name"] == "lonely")
        .map(|o| o["problems"].to_string())
        .unwrap_or_default();
    assert!(lonely_problems.contains("the canary waits for one"), "{lonely_problems}");
}

/// `affinity-canary-behavior`: with sessions on both the main and the canary backend, a
/// session stays on the backend that started it (`sticky`, the default), whatever the weight;
/// with `legacy`, the weight decides each request again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_sessions_stick_unless_legacy() {
    let (main, canary) = (echo("t", "main").await, echo("t", "canary").await);
    let mut manifests = service_yaml("t", "app", 80, "http", &[main]);
    manifests.push_str(&service_yaml("t", "app-canary", 80, "http", &[canary]));
    manifests.push_str(&service_yaml("t", "old", 80, "http", &[main]));
    manifests.push_str(&service_yaml("t", "old-canary", 80, "http", &[canary]));
    manifests.push_str(&ingress("app", &[("affinity", "cookie")]));
    manifests.push_str(&ingress("old", &[("affinity", "cookie")]));
    let canary_of = |name: &str, service: &str, behavior: &str| {
        ingress(
            name,
            &[
                ("canary", "true"),
                ("canary-weight", "50"),
                ("affinity", "cookie"),
                ("affinity-canary-behavior", behavior),
            ],
        )
        .replace(&format!("host: {name}.test"), &format!("host: {service}.test"))
        .replace(&format!("name: {name}, port"), &format!("name: {service}-canary, port"))
    };
    manifests.push_str(&canary_of("app-c", "app", "sticky"));
    manifests.push_str(&canary_of("old-c", "old", "legacy"));
    let (tidegate, _dir) = start(manifests).await;

    for (host, sticky) in [("app.test", true), ("old.test", false)] {
        let mut started = BTreeMap::new();
        let mut moved = 0;
        for _ in 0..10 {
            let mut client = H1::connect(tidegate.http).await.expect("connect");
            let first = client.get(host, "/").await.expect("answer");
            let cookie = first.headers[http::header::SET_COOKIE]
                .to_str()
                .expect("ascii")
                .split(';')
                .next()
                .expect("pair")
                .to_owned();
            let backend = first.served_by();
            *started.entry(backend.clone()).or_insert(0) += 1;
            for i in 0..10 {
                let request = Request::get(format!("/{i}")).header("host", host).header("cookie", &cookie);
                let answer = client.send(request.body(Full::default()).expect("request")).await.expect("answer");
                moved += usize::from(answer.served_by() != backend);
            }
        }
        assert_eq!(started.len(), 2, "{host}: sessions start on both backends: {started:?}");
        if sticky {
            assert_eq!(moved, 0, "{host}: every session stays on its backend");
        } else {
            assert!(moved >= 20, "{host}: legacy: the weight decides again ({moved} of 100 moved)");
        }
    }
}
