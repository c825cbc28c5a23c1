//! Ingresses written for ingress-nginx, unchanged, through the real binary: regular-expression
//! paths (`use-regex`) and `rewrite-target` with capture groups, as ingress-nginx's rewrite
//! example and path-matching guide describe them.

mod support;

use http::StatusCode;
use support::{Tidegate, echo, get, manifest_dir, service_yaml, write_manifest};

/// An Ingress for `host` with annotations and (pathType, path, service) paths.
fn ingress(name: &str, host: &str, annotations: &[(&str, &str)], paths: &[(&str, &str, &str)]) -> String {
    let mut meta = format!("metadata:\n  name: {name}\n  namespace: t\n");
    if !annotations.is_empty() {
        meta.push_str("  annotations:\n");
        for (key, value) in annotations {
            meta.push_str(&format!("    {key}: {value:?}\n"));
        }
    }
    let mut rules = String::new();
    for (kind, path, service) in paths {
        rules.push_str(&format!(
            "      - {{path: {path:?}, pathType: {kind}, backend: {{service: {{name: {service}, port: {{number: 80}}}}}}}}\n"
        ));
    }
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\n{meta}spec:\n  ingressClassName: tidegate\n  rules:\n  - host: {host}\n    http:\n      paths:\n{rules}"
    )
}

/// `rewrite-target: /$2` with `/something(/|$)(.*)` (ingress-nginx's rewrite example): the
/// backend gets `/` for `/something`, `/new` for `/something/new`, the query kept. On a host
/// whose paths are expressions (another Ingress sets `use-regex`), the longest expression that
/// matches wins, ignoring case, and a path that is not an expression elsewhere stays a prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_paths_and_rewrite_target() {
    let dir = manifest_dir();
    let (web, api) = (echo("t", "web").await, echo("t", "api").await);
    let manifests = [
        service_yaml("t", "web", 80, "http", &[web]),
        service_yaml("t", "api", 80, "http", &[api]),
        ingress(
            "rewrite",
            "rewrite.test",
            &[("nginx.ingress.kubernetes.io/rewrite-target", "/$2")],
            &[("ImplementationSpecific", "/something(/|$)(.*)", "web")],
        ),
        ingress(
            "regex",
            "regex.test",
            &[("nginx.ingress.kubernetes.io/use-regex", "true")],
            &[("ImplementationSpecific", "/api/v[0-9]+/.*", "api")],
        ),
        // Another Ingress for the same host, without the annotation: its paths are expressions
        // too, and the shorter one comes after.
        ingress("other", "regex.test", &[], &[("Prefix", "/", "web")]),
        ingress("plain", "plain.test", &[], &[("Prefix", "/api/v[0-9]+", "api")]),
    ]
    .concat();
    write_manifest(dir.path(), "all.yaml", &manifests);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");

    for (request, path, query) in [
        ("/something", "/", ""),
        ("/something/", "/", ""),
        ("/something/new", "/new", ""),
        ("/SomeThing/new/deep?a=1&b=2", "/new/deep", "a=1&b=2"),
    ] {
        let answer = get(tidegate.http, "rewrite.test", request).await.expect("answered");
        assert_eq!(answer.status, StatusCode::OK, "{request}");
        let seen = answer.json();
        assert_eq!((seen["path"].as_str(), seen["query"].as_str()), (Some(path), Some(query)), "{request}: {seen}");
    }
    let other = get(tidegate.http, "rewrite.test", "/somethingelse").await.expect("answered");
    assert_eq!(other.status, StatusCode::NOT_FOUND, "(/|$) does not match 'e'");

    let served_by = |host: &'static str, path: &'static str| {
        let addr = tidegate.http;
        async move {
            let answer = get(addr, host, path).await.expect("answered");
            assert_eq!(answer.status, StatusCode::OK, "{host}{path}");
            (answer.json()["service"].as_str().unwrap_or_default().to_owned(), answer.json()["path"].clone())
        }
    };
    assert_eq!(served_by("regex.test", "/API/V2/users").await.0, "api", "an expression, ignoring case");
    let (service, path) = served_by("regex.test", "/api/vx/users").await;
    assert_eq!((service.as_str(), path.as_str()), ("web", Some("/api/vx/users")), "no rewrite without rewrite-target");
    assert_eq!(served_by("plain.test", "/api/v[0-9]+/x").await.0, "api", "a prefix elsewhere, taken literally");
    assert_eq!(get(tidegate.http, "plain.test", "/api/v2/x").await.expect("answered").status, StatusCode::NOT_FOUND);
}

fn config_map(data: &[(&str, &str)]) -> String {
    let mut yaml =
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings, namespace: sys}\ndata:\n".to_owned();
    for (key, value) in data {
        yaml.push_str(&format!("  {key}: {value:?}\n"));
    }
    yaml
}

/// Starts on a web Service, the Ingresses, and the global ConfigMap `sys/settings`.
async fn start_with_settings(ingresses: &[String], settings: &[(&str, &str)]) -> (Tidegate, tempfile::TempDir) {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    let mut manifests = service_yaml("t", "web", 80, "http", &[web]);
    manifests.push_str(&ingresses.concat());
    manifests.push_str(&config_map(settings));
    write_manifest(dir.path(), "all.yaml", &manifests);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &["--configmap", "sys/settings"]))
        .await
        .expect("start");
    (tidegate, dir)
}

/// Sends `prefix` then a GET for `host` on one connection; the status and the echoed JSON, or
/// `None` when the proxy closed the connection without an answer.
async fn raw_get(addr: std::net::SocketAddr, prefix: &[u8], host: &str) -> Option<(u16, serde_json::Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut bytes = prefix.to_vec();
    bytes.extend(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes());
    stream.write_all(&bytes).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let json = text.split_once("\r\n\r\n").and_then(|(_, body)| serde_json::from_str(body).ok()).unwrap_or_default();
    Some((status, json))
}

fn seen_header(json: &serde_json::Value, name: &str) -> Option<String> {
    json["headers"][name][0].as_str().map(str::to_owned)
}

/// `use-proxy-protocol`: the PROXY header's source is the client, for IP rules and the headers
/// the upstream gets, v1 and v2; `LOCAL` keeps the peer; a connection without a header is
/// closed unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_names_the_client() {
    let ingresses = [
        ingress("open", "open.test", &[], &[("Prefix", "/", "web")]),
        ingress(
            "guarded",
            "guarded.test",
            &[("nginx.ingress.kubernetes.io/denylist-source-range", "203.0.113.0/24")],
            &[("Prefix", "/", "web")],
        ),
    ];
    let (tidegate, _dir) = start_with_settings(&ingresses, &[("use-proxy-protocol", "true")]).await;
    let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 80\r\n";
    let (status, json) = raw_get(tidegate.http, v1, "open.test").await.expect("answered");
    assert_eq!(status, 200);
    assert_eq!(seen_header(&json, "X-Real-Ip").as_deref(), Some("203.0.113.7"), "{json}");
    assert_eq!(seen_header(&json, "X-Forwarded-For").as_deref(), Some("203.0.113.7"));
    assert_eq!(raw_get(tidegate.http, v1, "guarded.test").await.expect("answered").0, 403, "the denylist sees it");

    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend([0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0xC0, 0x01, 0, 80]);
    let (status, json) = raw_get(tidegate.http, &v2, "guarded.test").await.expect("answered");
    assert_eq!((status, seen_header(&json, "X-Real-Ip").as_deref()), (200, Some("198.51.100.9")));
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend([0x20, 0x00, 0, 0]);
    let (_, json) = raw_get(tidegate.http, &local, "open.test").await.expect("answered");
    assert_eq!(seen_header(&json, "X-Real-Ip").as_deref(), Some("127.0.0.1"), "LOCAL keeps the peer");
    assert!(raw_get(tidegate.http, b"", "open.test").await.is_none(), "no header: closed unanswered");
}

/// `use-forwarded-headers`: from a peer in `proxy-real-ip-cidr`, `X-Forwarded-For` names the
/// client (right to left, trusted addresses skipped) for IP rules and the upstream, and
/// `X-Forwarded-Proto` passes on; `compute-full-forwarded-for` keeps the list and appends the
/// peer. From a peer outside the trusted networks the header is not believed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_forwarding_header_names_the_client() {
    let ingresses = [
        ingress("open", "open.test", &[], &[("Prefix", "/", "web")]),
        ingress(
            "allow",
            "allow.test",
            &[("nginx.ingress.kubernetes.io/whitelist-source-range", "203.0.113.0/24")],
            &[("Prefix", "/", "web")],
        ),
    ];
    let forwarded = b"";
    let request = |host: &str| {
        format!(
            "GET / HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 198.51.100.1, 203.0.113.7, 127.0.0.5\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n"
        )
    };
    let send = async |tidegate: &Tidegate, host: &str| {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(tidegate.http).await.expect("connect");
        stream.write_all(forwarded).await.expect("write");
        stream.write_all(request(host).as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("read");
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status: u16 = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let json: serde_json::Value =
            text.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str(b).ok()).unwrap_or_default();
        (status, json)
    };
    let settings = [
        ("use-forwarded-headers", "true"),
        ("proxy-real-ip-cidr", "127.0.0.0/8"),
        ("compute-full-forwarded-for", "true"),
    ];
    let (tidegate, _dir) = start_with_settings(&ingresses, &settings).await;
    let (status, json) = send(&tidegate, "open.test").await;
    assert_eq!(status, 200);
    assert_eq!(seen_header(&json, "X-Real-Ip").as_deref(), Some("203.0.113.7"), "{json}");
    assert_eq!(
        seen_header(&json, "X-Forwarded-For").as_deref(),
        Some("198.51.100.1, 203.0.113.7, 127.0.0.5, 127.0.0.1"),
        "the list kept, the peer appended"
    );
    assert_eq!(seen_header(&json, "X-Forwarded-Proto").as_deref(), Some("https"), "passed on");
    assert_eq!(send(&tidegate, "allow.test").await.0, 200, "the allowlist sees the client");
    drop(tidegate);

    let untrusted = [("use-forwarded-headers", "true"), ("proxy-real-ip-cidr", "10.0.0.0/8")];
    let (tidegate, _dir) = start_with_settings(&ingresses, &untrusted).await;
    let (_, json) = send(&tidegate, "open.test").await;
    assert_eq!(seen_header(&json, "X-Real-Ip").as_deref(), Some("127.0.0.1"), "not believed: {json}");
    assert_eq!(seen_header(&json, "X-Forwarded-Proto").as_deref(), Some("http"));
    assert_eq!(send(&tidegate, "allow.test").await.0, 403);
}

/// `server-alias` serves an Ingress's rules under more names (not one another Ingress names);
/// `from-to-www-redirect` sends the other name of a host to it (308, path and query kept);
/// `proxy-redirect-from` / `-to` rewrite the start of the upstream's `Location`, and a path
/// there becomes absolute unless `relative-redirects`; the ConfigMap's `hsts*` keys set
/// `Strict-Transport-Security` on TLS responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_www_redirects_and_location_rewrites() {
    let ingresses = [
        ingress(
            "aliased",
            "a.test",
            &[("nginx.ingress.kubernetes.io/server-alias", "b.test, taken.test")],
            &[("Prefix", "/", "web")],
        ),
        ingress("taken", "taken.test", &[], &[("Prefix", "/only", "web")]),
        ingress(
            "www",
            "shop.test",
            &[("nginx.ingress.kubernetes.io/from-to-www-redirect", "true")],
            &[("Prefix", "/", "web")],
        ),
        ingress(
            "moved",
            "moved.test",
            &[
                ("nginx.ingress.kubernetes.io/proxy-redirect-from", "http://internal.svc/"),
                ("nginx.ingress.kubernetes.io/proxy-redirect-to", "https://moved.test/app/"),
            ],
            &[("Prefix", "/", "web")],
        ),
        ingress(
            "relative",
            "relative.test",
            &[("nginx.ingress.kubernetes.io/relative-redirects", "true")],
            &[("Prefix", "/", "web")],
        ),
    ];
    let settings = [("hsts-max-age", "600"), ("hsts-preload", "true")];
    let (tidegate, _dir) = start_with_settings(&ingresses, &settings).await;
    let status = |host: &'static str, path: &'static str| {
        let addr = tidegate.http;
        async move { get(addr, host, path).await.expect("answered") }
    };
    assert_eq!(status("b.test", "/x").await.status, StatusCode::OK, "an alias");
    assert_eq!(status("taken.test", "/x").await.status, StatusCode::NOT_FOUND, "a host another Ingress names");
    let redirected = status("www.shop.test", "/cart?item=1").await;
    assert_eq!(redirected.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(redirected.headers["location"], "http://shop.test/cart?item=1");
    assert_eq!(status("shop.test", "/cart").await.status, StatusCode::OK);
    let moved = status("moved.test", "/?location=http://internal.svc/login?next=1").await;
    assert_eq!(moved.status, StatusCode::FOUND);
    assert_eq!(moved.headers["location"], "https://moved.test/app/login?next=1");
    let untouched = status("moved.test", "/?location=http://elsewhere/x").await;
    assert_eq!(untouched.headers["location"], "http://elsewhere/x", "only the configured start");
    // A path in Location becomes absolute, as nginx's absolute_redirect (ingress-nginx's
    // default), without the listener's port; `relative-redirects: "true"` keeps it.
    let absolute = status("shop.test", "/?location=/next?a=1").await;
    assert_eq!(absolute.headers["location"], "http://shop.test/next?a=1");
    let relative = status("relative.test", "/?location=/next").await;
    assert_eq!(relative.headers["location"], "/next");

    let connector = support::tls_connector(None, &[b"http/1.1"]);
    let tls = support::tls_request(&connector, tidegate.https, "a.test", support::get_request("a.test", "/"))
        .await
        .expect("TLS");
    assert_eq!(
        tls.answer.headers.get("strict-transport-security").map(|v| v.to_str().unwrap_or("")),
        Some("max-age=600; includeSubDomains; preload"),
        "ingress-nginx's defaults for the keys not set"
    );
}

/// `custom-http-errors` with `default-backend`: an upstream answer with one of the codes, and
/// the proxy's own 502, are replaced by the error Service's answer to `GET /`, which gets the
/// headers ingress-nginx's custom-errors page lists; other codes pass; with
/// `disable-proxy-intercept-errors` the upstream's errors pass too. The `default-backend`
/// Service also takes the traffic of a Service without endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_error_pages_from_the_default_backend() {
    let dir = manifest_dir();
    let (web, errors) = (echo("t", "web").await, echo("t", "errors").await);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let pages = [
        ("nginx.ingress.kubernetes.io/custom-http-errors", "404, 502"),
        ("nginx.ingress.kubernetes.io/default-backend", "errors"),
    ];
    let manifests = [
        service_yaml("t", "web", 80, "http", &[web]),
        service_yaml("t", "errors", 80, "http", &[errors]),
        service_yaml("t", "down", 80, "http", &[closed]),
        service_yaml("t", "nobody", 80, "http", &[]),
        ingress("errs", "errs.test", &pages, &[("Prefix", "/", "web")]),
        ingress("down", "down.test", &pages, &[("Prefix", "/", "down")]),
        ingress("empty", "empty.test", &pages[1..], &[("Prefix", "/", "nobody")]),
        ingress(
            "passing",
            "passing.test",
            &[pages[0], pages[1], ("nginx.ingress.kubernetes.io/disable-proxy-intercept-errors", "true")],
            &[("Prefix", "/", "web")],
        ),
    ]
    .concat();
    write_manifest(dir.path(), "all.yaml", &manifests);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");
    let fetch = |host: &'static str, path: &'static str| {
        let addr = tidegate.http;
        async move { get(addr, host, path).await.expect("answered") }
    };

    let page = fetch("errs.test", "/missing?status=404").await;
    let seen = page.json();
    assert_eq!(seen["service"], "errors", "the error Service answered: {seen}");
    assert_eq!(seen["path"], "/");
    for (name, value) in [
        ("X-Code", "404"),
        ("X-Original-Uri", "/missing?status=404"),
        ("X-Namespace", "t"),
        ("X-Ingress-Name", "errs"),
        ("X-Service-Name", "web"),
        ("X-Service-Port", "80"),
    ] {
        assert_eq!(seen["headers"][name][0], value, "{name}: {seen}");
    }
    assert!(seen["headers"]["X-Format"][0].is_string() && seen["headers"]["X-Request-Id"][0].is_string());
    assert_eq!(fetch("errs.test", "/?status=500").await.status, StatusCode::INTERNAL_SERVER_ERROR, "not listed");
    let down = fetch("down.test", "/").await.json();
    assert_eq!((down["service"].as_str(), down["headers"]["X-Code"][0].as_str()), (Some("errors"), Some("502")));
    assert_eq!(fetch("empty.test", "/").await.json()["service"], "errors", "no endpoints: the default backend serves");
    assert_eq!(fetch("passing.test", "/?status=404").await.status, StatusCode::NOT_FOUND, "intercept disabled");
}

/// What a mirror receiver got: method, URI, headers and body of each copy.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, String, http::HeaderMap, bytes::Bytes)>>>;

/// A real HTTP/1.1 server that keeps every request it gets and answers 204 after `delay`.
async fn mirror_receiver(delay: std::time::Duration) -> (std::net::SocketAddr, Received) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received: Received = Received::default();
    let kept = std::sync::Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = std::sync::Arc::clone(&kept);
            let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let kept = std::sync::Arc::clone(&kept);
                async move {
                    let (parts, body) = request.into_parts();
                    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    kept.lock().expect("lock").push((
                        parts.method.to_string(),
                        parts.uri.to_string(),
                        parts.headers,
                        body,
                    ));
                    tokio::time::sleep(delay).await;
                    let mut answer = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                    *answer.status_mut() = StatusCode::NO_CONTENT;
                    Ok::<_, std::convert::Infallible>(answer)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, received)
}

/// `mirror-target` (with `mirror-host`, and `mirror-request-body: off`): each request goes to
/// its route and a copy to the mirror, with the client's URI (before `rewrite-target`), method,
/// headers and body; the mirror's answer is thrown away, and neither a slow mirror nor one that
/// is down delays or fails the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_get_copies_and_never_delay_the_request() {
    let (fast, fast_got) = mirror_receiver(std::time::Duration::ZERO).await;
    let (slow, slow_got) = mirror_receiver(std::time::Duration::from_secs(3)).await;
    let down = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let target = |addr: std::net::SocketAddr| format!("http://{addr}$request_uri");
    let ingresses = [
        ingress(
            "copied",
            "copied.test",
            &[
                ("nginx.ingress.kubernetes.io/mirror-target", &target(fast)),
                ("nginx.ingress.kubernetes.io/mirror-host", "shadow.example"),
                ("nginx.ingress.kubernetes.io/rewrite-target", "/$1"),
            ],
            &[("ImplementationSpecific", "/app/(.*)", "web")],
        ),
        ingress(
            "bodiless",
            "bodiless.test",
            &[
                ("nginx.ingress.kubernetes.io/mirror-target", &target(fast)),
                ("nginx.ingress.kubernetes.io/mirror-request-body", "off"),
            ],
            &[("Prefix", "/", "web")],
        ),
        ingress(
            "slow",
            "slow.test",
            &[("nginx.ingress.kubernetes.io/mirror-target", &target(slow))],
            &[("Prefix", "/", "web")],
        ),
        ingress(
            "down",
            "down.test",
            &[("nginx.ingress.kubernetes.io/mirror-target", &target(down))],
            &[("Prefix", "/", "web")],
        ),
    ];
    let (tidegate, _dir) = start_with_settings(&ingresses, &[]).await;
    let post = |host: &str, path: &str, body: &'static str| {
        http::Request::post(path)
            .header("host", host)
            .header("x-trace", "7")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())))
            .expect("request")
    };

    let mut client = support::H1::connect(tidegate.http).await.expect("connect");
    let answer = client.send(post("copied.test", "/app/items?page=2", "hello mirror")).await.expect("answer");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["path"], "/items", "the route's own request is rewritten");
    let answer = client.send(post("bodiless.test", "/b", "not copied")).await.expect("answer");
    assert_eq!(answer.status, StatusCode::OK);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fast_got.lock().expect("lock").len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the copies did not arrive");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let got = fast_got.lock().expect("lock").clone();
    let (method, uri, headers, body) = &got[0];
    assert_eq!((method.as_str(), uri.as_str()), ("POST", "/app/items?page=2"), "the client's URI");
    assert_eq!(headers["host"], "shadow.example");
    assert_eq!(headers["x-trace"], "7");
    assert_eq!(&body[..], b"hello mirror");
    let (method, uri, headers, body) = &got[1];
    assert_eq!((method.as_str(), uri.as_str()), ("POST", "/b"));
    assert_eq!(headers["host"], &fast.to_string(), "the target's host");
    // (A POST without a body goes with `Content-Length: 0`.)
    let length = headers.get("content-length").map(|v| v.to_str().unwrap_or("?").to_owned());
    assert!(body.is_empty() && length.as_deref().is_none_or(|l| l == "0"), "mirror-request-body: off: {length:?}");

    for host in ["slow.test", "down.test"] {
        let started = std::time::Instant::now();
        let answer = client.send(post(host, "/", "x")).await.expect("answer");
        assert_eq!(answer.status, StatusCode::OK, "{host}");
        assert!(started.elapsed() < std::time::Duration::from_millis(500), "{host}: {:?}", started.elapsed());
    }
    while slow_got.lock().expect("lock").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the slow mirror got no copy");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The controller-wide default backend (`--default-backend-service NS/NAME`, ingress-nginx's
/// flag): it answers requests no route matches, and serves the error pages of
/// `custom-http-errors` for an Ingress without the `default-backend` annotation (in another
/// namespace too). Without the flag, unmatched requests get the proxy's own 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_wide_default_backend() {
    let dir = manifest_dir();
    let (web, fallback) = (echo("t", "web").await, echo("sys", "fallback").await);
    let manifests = [
        service_yaml("t", "web", 80, "http", &[web]),
        service_yaml("sys", "fallback", 8080, "http", &[fallback]),
        ingress(
            "pages",
            "pages.test",
            &[("nginx.ingress.kubernetes.io/custom-http-errors", "404")],
            &[("Prefix", "/", "web")],
        ),
    ]
    .concat();
    write_manifest(dir.path(), "all.yaml", &manifests);
    let path = dir.path().to_owned();
    let tidegate =
        tokio::task::spawn_blocking(move || Tidegate::start(&path, &["--default-backend-service", "sys/fallback"]))
            .await
            .expect("start");
    let unmatched = get(tidegate.http, "nowhere.test", "/anything").await.expect("answer");
    assert_eq!(unmatched.json()["service"], "fallback", "no route matched: the default backend answered");
    let page = get(tidegate.http, "pages.test", "/missing?status=404").await.expect("answer").json();
    assert_eq!(page["service"], "fallback", "the error page: {page}");
    assert_eq!(page["headers"]["X-Code"][0], "404");
    assert_eq!(page["headers"]["X-Ingress-Name"][0], "pages");
    let served = get(tidegate.http, "pages.test", "/ok").await.expect("answer");
    assert_eq!(served.json()["service"], "web");
}

/// `configuration-snippet` with `--allow-snippet-annotations`: its `access_by_lua_block` runs in
/// the access phase, unchanged, and its `more_set_headers` / `proxy_set_header` set headers;
/// `allow` / `deny` are checked in order; the rewrite module's `set`, `if`, `rewrite` and
/// `return`, and `more_clear_headers`, `more_set_input_headers` and `expires`, act as in nginx;
/// a snippet with a directive tidegate has no equivalent for (`auth_request`) closes the route
/// (503) rather than serve it without; without the flag, any snippet closes it (500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_snippets_run_their_lua_and_headers() {
    let snippet = "more_set_headers \"X-Frame-Options: DENY\";\nproxy_set_header X-From-Snippet $host;\naccess_by_lua_block {\n  if ngx.var.arg_block then\n    return ngx.exit(403)\n  end\n}\n";
    let ingresses = [
        ingress(
            "snip",
            "snip.test",
            &[("nginx.ingress.kubernetes.io/configuration-snippet", snippet)],
            &[("Prefix", "/", "web")],
        ),
        ingress(
            "denied",
            "denied.test",
            &[("nginx.ingress.kubernetes.io/configuration-snippet", "auth_request /auth;")],
            &[("Prefix", "/", "web")],
        ),
        ingress(
            "walled",
            "walled.test",
            &[("nginx.ingress.kubernetes.io/configuration-snippet", "deny 192.0.2.0/24;\nallow 127.0.0.1;\ndeny all;")],
            &[("Prefix", "/", "web")],
        ),
        ingress(
            "closed",
            "closed.test",
            &[("nginx.ingress.kubernetes.io/server-snippet", "allow 10.0.0.0/8;\ndeny all;")],
            &[("Prefix", "/", "web")],
        ),
        ingress(
            "rewritten",
            "rewritten.test",
            &[(
                "nginx.ingress.kubernetes.io/configuration-snippet",
                "set $prefix \"/v2\";\nif ($http_x_old_client) {\n  return 426;\n}\nif ($arg_go = \"away\") {\n  return 302 https://elsewhere.test$uri;\n}\nif ($request_uri ~* \"^/SHOUT\") {\n  return 200 \"quiet, $host\";\n}\nrewrite ^/api/(.*)$ $prefix/$1?from=api break;\nmore_clear_headers Content-Type;\nmore_set_input_headers \"X-Input: $prefix\";\nexpires 1h;\n",
            )],
            &[("Prefix", "/", "web")],
        ),
        ingress(
            "moved",
            "moved.test",
            &[("nginx.ingress.kubernetes.io/configuration-snippet", "return 301 https://new.example$request_uri;")],
            &[("Prefix", "/", "web")],
        ),
    ];
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    let mut manifests = service_yaml("t", "web", 80, "http", &[web]);
    manifests.push_str(&ingresses.concat());
    write_manifest(dir.path(), "all.yaml", &manifests);
    for allowed in [true, false] {
        let path = dir.path().to_owned();
        let args: &'static [&'static str] = if allowed { &["--allow-snippet-annotations"] } else { &[] };
        let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, args)).await.expect("start");
        let open = get(tidegate.http, "snip.test", "/a").await.expect("answer");
        if allowed {
            assert_eq!(open.status, StatusCode::OK);
            assert_eq!(open.headers["x-frame-options"], "DENY");
            assert_eq!(open.json()["headers"]["X-From-Snippet"][0], "snip.test", "{}", open.json());
            let blocked = get(tidegate.http, "snip.test", "/a?block=1").await.expect("answer");
            assert_eq!(blocked.status, StatusCode::FORBIDDEN, "the snippet's Lua ran");
            let moved = get(tidegate.http, "moved.test", "/p?q=1").await.expect("answer");
            assert_eq!(moved.status, StatusCode::MOVED_PERMANENTLY);
            assert_eq!(moved.headers["location"], "https://new.example/p?q=1");
            // allow / deny, first match: the client (127.0.0.1) is allowed on one, not the other.
            assert_eq!(get(tidegate.http, "walled.test", "/").await.expect("answer").status, StatusCode::OK);
            assert_eq!(get(tidegate.http, "closed.test", "/").await.expect("answer").status, StatusCode::FORBIDDEN);
            // The rewrite module: set, rewrite ... break with arguments, the header directives.
            let rewritten = get(tidegate.http, "rewritten.test", "/api/users?page=2").await.expect("answer");
            assert_eq!(rewritten.status, StatusCode::OK);
            let echoed = rewritten.json();
            assert_eq!(echoed["path"], "/v2/users", "{echoed}");
            assert_eq!(echoed["query"], "from=api&page=2", "{echoed}");
            assert_eq!(echoed["headers"]["X-Input"][0], "/v2");
            assert!(!rewritten.headers.contains_key("content-type"), "more_clear_headers: {:?}", rewritten.headers);
            assert_eq!(rewritten.headers["cache-control"], "max-age=3600");
            assert!(rewritten.headers["expires"].to_str().expect("text").ends_with(" GMT"), "{:?}", rewritten.headers);
            let away = get(tidegate.http, "rewritten.test", "/x?go=away").await.expect("answer");
            assert_eq!(
                (away.status, away.headers["location"].to_str().expect("text")),
                (StatusCode::FOUND, "https://elsewhere.test/x")
            );
            let shout = get(tidegate.http, "rewritten.test", "/shout/now").await.expect("answer");
            assert_eq!(
                (shout.status, String::from_utf8_lossy(&shout.body).to_string()),
                (StatusCode::OK, "quiet, rewritten.test".to_owned())
            );
            let request = http::Request::get("/api/a")
                .header("host", "rewritten.test")
                .header("x-old-client", "1")
                .body(support::Body::default())
                .expect("request");
            let old = support::H1::connect(tidegate.http).await.expect("connect").send(request).await.expect("answer");
            assert_eq!(old.status.as_u16(), 426, "if ($http_x_old_client) {{ return 426; }}");
        } else {
            // Refused as inline Lua annotations are without the flag: the route cannot be
            // served as written (500), never served without its snippet.
            assert_eq!(open.status, StatusCode::INTERNAL_SERVER_ERROR, "snippets need the flag");
        }
        let denied = get(tidegate.http, "denied.test", "/").await.expect("answer");
        assert_eq!(denied.status, StatusCode::SERVICE_UNAVAILABLE, "auth_request has no equivalent: closed");
        let problems = tidegate.problems_mentioning("configuration-snippet");
        assert!(!problems.is_empty(), "reported");
        if allowed {
            assert!(problems.iter().any(|p| p.contains("`auth_request` has no tidegate equivalent")), "{problems:?}");
        }
    }
}
