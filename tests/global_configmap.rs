//! The global ConfigMap (`--configmap NS/NAME`) through the real binary: ingress-nginx's keys
//! set every route's defaults and cluster-wide checks, the ConfigMaps of headers it names reach
//! responses and upstream requests, a change applies live, an unknown key is reported, and a
//! protecting key whose value does not read closes the routes (503) instead of opening them.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{Tidegate, echo, manifest_dir, service_yaml, write_manifest};

/// An Ingress `name` for `host` to Service `web`, with annotations.
fn ingress(name: &str, host: &str, annotations: &[(&str, &str)]) -> String {
    support::ingress_to(name, host, "web", annotations)
}

fn config_map(namespace: &str, name: &str, data: &[(&str, &str)]) -> String {
    let mut yaml =
        format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {namespace}}}\ndata:\n");
    for (key, value) in data {
        yaml.push_str(&format!("  {key}: {value:?}\n"));
    }
    yaml
}

async fn send(tidegate: &Tidegate, method: &str, host: &str, headers: &[(&str, &str)], body: &[u8]) -> support::Answer {
    let mut request = http::Request::builder().method(method).uri("/some/path?q=1").header("host", host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(support::Body::from(body.to_vec())).expect("request");
    let mut h1 = support::H1::connect(tidegate.http).await.expect("connect");
    h1.send(request).await.expect("answered")
}

fn object_problems(tidegate: &Tidegate, kind: &str, name: &str) -> Vec<serde_json::Value> {
    let status = tidegate.status();
    let objects = status["objects"].as_array().cloned().unwrap_or_default();
    let object = objects
        .into_iter()
        .find(|o| o["object"]["kind"] == kind && o["object"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} in /status: {status}"));
    object["problems"].as_array().cloned().unwrap_or_default()
}

const SETTINGS: &[(&str, &str)] = &[
    ("proxy-body-size", "1k"),
    ("limit-req-status-code", "429"),
    ("block-user-agents", "~*evilbot, BadBot/1.0"),
    ("block-referers", "~*spam\\.example"),
    ("add-headers", "tidegate/response-headers"),
    ("proxy-set-headers", "upstream-headers"),
    ("global-allowed-response-headers", "X-Custom-One"),
    ("no-such-key", "1"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_configmap_sets_what_every_route_does() {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    let manifests = [
        service_yaml("t", "web", 80, "http", &[web]),
        ingress("plain", "plain.test", &[]),
        ingress("big", "big.test", &[("nginx.ingress.kubernetes.io/proxy-body-size", "1m")]),
        ingress("lim", "lim.test", &[("nginx.ingress.kubernetes.io/limit-rps", "1")]),
        ingress("custom", "custom.test", &[("nginx.ingress.kubernetes.io/custom-headers", "custom")]),
        config_map("t", "custom", &[("X-Custom-One", "one"), ("X-Custom-Two", "two")]),
        config_map("tidegate", "response-headers", &[("X-Frame-Options", "SAMEORIGIN"), ("X-Served-Host", "$host")]),
        config_map("tidegate", "upstream-headers", &[("X-Team", "edge"), ("X-Seen-Uri", "$request_uri")]),
    ]
    .concat();
    write_manifest(dir.path(), "all.yaml", &manifests);
    write_manifest(dir.path(), "settings.yaml", &config_map("tidegate", "settings", SETTINGS));
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &["--configmap", "tidegate/settings"]))
        .await
        .expect("start");

    // add-headers and proxy-set-headers, variables expanded.
    let plain = send(&tidegate, "GET", "plain.test", &[], b"").await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(plain.headers["x-frame-options"], "SAMEORIGIN");
    assert_eq!(plain.headers["x-served-host"], "plain.test");
    let upstream = support::echoed_headers(&plain);
    assert_eq!(upstream.get("X-Team"), Some(&vec!["edge".to_owned()]), "{upstream:?}");
    assert_eq!(upstream.get("X-Seen-Uri"), Some(&vec!["/some/path?q=1".to_owned()]));
    // Responses the proxy makes itself carry them too.
    let refused = send(&tidegate, "GET", "plain.test", &[("user-agent", "Mozilla EvilBot/2")], b"").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "block-user-agents, a regular expression ignoring case");
    assert_eq!(refused.headers["x-frame-options"], "SAMEORIGIN");
    let exact = send(&tidegate, "GET", "plain.test", &[("user-agent", "badbot/1.0")], b"").await.status;
    assert_eq!(exact, StatusCode::FORBIDDEN, "a whole string, ignoring case");
    let longer = send(&tidegate, "GET", "plain.test", &[("user-agent", "BadBot/1.0 more")], b"").await.status;
    assert_eq!(longer, StatusCode::OK, "a string matches whole");
    let referer = send(&tidegate, "GET", "plain.test", &[("referer", "https://SPAM.example/x")], b"").await.status;
    assert_eq!(referer, StatusCode::FORBIDDEN, "block-referers");

    // proxy-body-size as every route's default, an annotation still winning.
    let body = vec![b'x'; 2048];
    assert_eq!(send(&tidegate, "POST", "plain.test", &[], &body).await.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(send(&tidegate, "POST", "big.test", &[], &body).await.status, StatusCode::OK);

    // limit-req-status-code: limit-rps 1 admits its burst of 5 and one more, then 429.
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(send(&tidegate, "GET", "lim.test", &[], b"").await.status.as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 6, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 4, "{statuses:?}");

    // custom-headers: only what global-allowed-response-headers lists.
    let custom = send(&tidegate, "GET", "custom.test", &[], b"").await;
    assert_eq!(custom.headers["x-custom-one"], "one");
    assert!(!custom.headers.contains_key("x-custom-two"), "not allowed");
    let problems = object_problems(&tidegate, "Ingress", "custom");
    assert!(problems.iter().any(|p| p["message"].as_str().is_some_and(|m| m.contains("x-custom-two"))), "{problems:?}");
    let problems = object_problems(&tidegate, "ConfigMap", "settings");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0]["field"], "data[\"no-such-key\"]");
    assert_eq!(problems[0]["severity"], "warning");

    // A change applies live: block-cidrs refuses this client on every route.
    let before = tidegate.version();
    let mut changed = SETTINGS.to_vec();
    changed.push(("block-cidrs", "10.0.0.0/8, 127.0.0.1"));
    write_manifest(dir.path(), "settings.yaml", &config_map("tidegate", "settings", &changed));
    let version = tokio::task::block_in_place(|| tidegate.wait_version_after(before));
    assert_eq!(send(&tidegate, "GET", "plain.test", &[], b"").await.status, StatusCode::FORBIDDEN, "block-cidrs");
    assert_eq!(send(&tidegate, "GET", "big.test", &[], b"").await.status, StatusCode::FORBIDDEN);

    // A protecting key that does not read closes every route rather than open them.
    changed.pop();
    changed.push(("block-cidrs", "10.0.0.0/33"));
    write_manifest(dir.path(), "settings.yaml", &config_map("tidegate", "settings", &changed));
    tokio::task::block_in_place(|| tidegate.wait_version_after(version));
    for host in ["plain.test", "big.test", "custom.test"] {
        assert_eq!(send(&tidegate, "GET", host, &[], b"").await.status, StatusCode::SERVICE_UNAVAILABLE, "{host}");
    }
    let problems = object_problems(&tidegate, "ConfigMap", "settings");
    assert!(problems.iter().any(|p| p["field"] == "data[\"block-cidrs\"]" && p["severity"] == "error"), "{problems:?}");
    drop(tidegate);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Starts on one route (`plain.test` to an echo backend) and the global ConfigMap
/// `sys/settings` with `settings`; the folder and the manifests, to change them.
async fn plain_with_settings(settings: &[(&str, &str)]) -> (Tidegate, tempfile::TempDir, String) {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    let manifests = [
        service_yaml("t", "web", 80, "http", &[web]),
        ingress("plain", "plain.test", &[]),
        config_map("sys", "settings", settings),
    ]
    .concat();
    write_manifest(dir.path(), "all.yaml", &manifests);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &["--configmap", "sys/settings"]))
        .await
        .expect("start");
    (tidegate, dir, manifests)
}

/// `keep-alive-requests`, `keep-alive`, `client-header-timeout` and `client-body-timeout` from
/// the ConfigMap: a connection carries at most that many requests (the last answer says
/// `Connection: close`), a client that starts a head and stalls is cut at the header timeout,
/// and one that stops sending its body gets 408 at the body timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connection_keys_limit_keep_alive_and_slow_heads() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let settings = [
        ("keep-alive-requests", "2"),
        ("keep-alive", "10"),
        ("client-header-timeout", "1"),
        ("client-body-timeout", "1"),
    ];
    let (tidegate, _dir, _) = plain_with_settings(&settings).await;

    let mut client = tokio::net::TcpStream::connect(tidegate.http).await.expect("connect");
    let request = b"GET / HTTP/1.1\r\nHost: plain.test\r\n\r\n";
    client.write_all(&[&request[..], &request[..], &request[..]].concat()).await.expect("write");
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut all))
        .await
        .expect("closed in time")
        .expect("read");
    let all = String::from_utf8_lossy(&all);
    assert_eq!(all.matches("HTTP/1.1 200").count(), 2, "two requests, then closed: {all}");
    assert_eq!(all.matches("connection: close").count(), 1, "{all}");

    let mut slow = tokio::net::TcpStream::connect(tidegate.http).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: pla").await.expect("write");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest))
        .await
        .expect("cut in time")
        .expect("read");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut at the 1 s header timeout, not 30 s: {:?}",
        started.elapsed()
    );

    let mut stalled = tokio::net::TcpStream::connect(tidegate.http).await.expect("connect");
    stalled.write_all(b"POST / HTTP/1.1\r\nHost: plain.test\r\nContent-Length: 10\r\n\r\nabc").await.expect("write");
    let started = std::time::Instant::now();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "client-body-timeout: {answer}");
    assert!(started.elapsed() < Duration::from_secs(3), "at the 1 s body timeout: {:?}", started.elapsed());
}

/// `ssl-protocols: TLSv1.3`: a client that offers only TLS 1.2 is refused in the handshake, one
/// that offers 1.3 is served; the key applies live to new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_protocols_set_what_clients_may_use() {
    let (tidegate, dir, manifests) = plain_with_settings(&[("ssl-protocols", "TLSv1.3")]).await;
    let handshake = async |versions: &[&'static rustls::SupportedProtocolVersion]| {
        let connector = support::tls_connector_with_versions(None, &[b"http/1.1"], versions);
        let tcp = tokio::net::TcpStream::connect(tidegate.https).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from("plain.test").expect("name");
        connector.connect(name, tcp).await.map(|s| s.get_ref().1.protocol_version())
    };
    assert!(handshake(&[&rustls::version::TLS12]).await.is_err(), "TLS 1.2 refused");
    assert_eq!(handshake(&[&rustls::version::TLS13]).await.expect("TLS 1.3"), Some(rustls::ProtocolVersion::TLSv1_3));

    write_manifest(
        dir.path(),
        "all.yaml",
        &manifests.replace("ssl-protocols: \"TLSv1.3\"", "ssl-protocols: \"TLSv1.2 TLSv1.3\""),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while handshake(&[&rustls::version::TLS12]).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "TLS 1.2 allowed again within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `allow-snippet-annotations` in the ConfigMap takes `annotations-risk-level: Critical` too, as
/// in ingress-nginx (whose default level, High, refuses the Critical snippet annotations): at
/// High the snippet's route is refused (500, as without the flag), at Critical its snippet runs; a level tidegate cannot
/// honour (Medium: it does not know every key's risk) closes every route. `server-tokens`
/// reads (tidegate's `Server` never names a version).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snippets_need_the_critical_risk_level() {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    let snippet = [("nginx.ingress.kubernetes.io/configuration-snippet", "more_set_headers \"X-Snippet: ran\";")];
    let manifests = [
        service_yaml("t", "web", 80, "http", &[web]),
        ingress("plain", "plain.test", &[]),
        ingress("snip", "snip.test", &snippet),
    ]
    .concat();
    write_manifest(dir.path(), "all.yaml", &manifests);
    let settings = |level: &str| {
        config_map(
            "sys",
            "settings",
            &[("allow-snippet-annotations", "true"), ("annotations-risk-level", level), ("server-tokens", "false")],
        )
    };
    write_manifest(dir.path(), "settings.yaml", &settings("High"));
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &["--configmap", "sys/settings"]))
        .await
        .expect("start");
    let at_high = send(&tidegate, "GET", "snip.test", &[], b"").await;
    assert_eq!(at_high.status, StatusCode::INTERNAL_SERVER_ERROR, "High refuses Critical annotations");
    assert_eq!(send(&tidegate, "GET", "plain.test", &[], b"").await.status, StatusCode::OK);

    let before = tidegate.version();
    write_manifest(dir.path(), "settings.yaml", &settings("Critical"));
    let version = tokio::task::block_in_place(|| tidegate.wait_version_after(before));
    let at_critical = send(&tidegate, "GET", "snip.test", &[], b"").await;
    assert_eq!(at_critical.status, StatusCode::OK);
    assert_eq!(at_critical.headers["x-snippet"], "ran");
    assert_eq!(at_critical.headers["server"], "tidegate", "no version");

    write_manifest(dir.path(), "settings.yaml", &settings("Medium"));
    tokio::task::block_in_place(|| tidegate.wait_version_after(version));
    assert_eq!(send(&tidegate, "GET", "plain.test", &[], b"").await.status, StatusCode::SERVICE_UNAVAILABLE);
    let snip = send(&tidegate, "GET", "snip.test", &[], b"").await.status;
    assert!(snip.is_server_error(), "refused: {snip}");
    let problems = object_problems(&tidegate, "ConfigMap", "settings");
    assert!(problems.iter().any(|p| p["field"] == "data[\"annotations-risk-level\"]"), "{problems:?}");
}

/// `log-format-upstream` (with `log-format-escape-json`) writes the access log as nginx's
/// `log_format` does: here ingress-nginx's default format, and a JSON one with a header and
/// the request ID the client sent; values are escaped as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_upstream_writes_the_access_log_as_nginx() {
    const DEFAULT: &str = "$remote_addr - $remote_user [$time_local] \"$request\" $status $body_bytes_sent \"$http_referer\" \"$http_user_agent\" $request_length $request_time [$proxy_upstream_name] [$proxy_alternative_upstream_name] $upstream_addr $upstream_response_length $upstream_response_time $upstream_status $req_id";
    const JSON: &str = "{\"time\": \"$time_iso8601\", \"ip\": \"$remote_addr\", \"request\": \"$request\", \"status\": $status, \"agent\": \"$http_user_agent\", \"id\": \"$req_id\", \"ns\": \"$namespace\", \"ingress\": \"$ingress_name\", \"service\": \"$service_name\"}";
    for (format, json) in [(DEFAULT, false), (JSON, true)] {
        let dir = manifest_dir();
        let web = echo("t", "web").await;
        let mut data = vec![("log-format-upstream", format)];
        if json {
            data.push(("log-format-escape-json", "true"));
        }
        let manifests = [
            service_yaml("t", "web", 80, "http", &[web]),
            ingress("plain", "plain.test", &[]),
            config_map("sys", "settings", &data),
        ]
        .concat();
        write_manifest(dir.path(), "all.yaml", &manifests);
        let logged = support::AccessLogged::start(dir.path(), &["--configmap", "sys/settings"]);
        let http = logged.http;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let request = || {
            http::Request::get("/p?q=1")
                .header("host", "plain.test")
                .header("user-agent", "agent \"quoted\"")
                .header("referer", "http://from.test/")
                .header("x-request-id", "abc123")
                .body(support::Body::default())
                .expect("request")
        };
        loop {
            let answer = match support::H1::connect(http).await {
                Ok(mut connection) => connection.send(request()).await,
                Err(e) => Err(e),
            };
            if answer.is_ok_and(|a| a.status == StatusCode::OK) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "serving within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let line = logged.line_with("/p?q=1", deadline).await;
        if json {
            let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(entry["request"], "GET /p?q=1 HTTP/1.1");
            assert_eq!(entry["status"], 200);
            assert_eq!(entry["agent"], "agent \"quoted\"", "JSON-escaped");
            assert_eq!(entry["id"], "abc123");
            assert_eq!(
                (entry["ns"].as_str(), entry["ingress"].as_str(), entry["service"].as_str()),
                (Some("t"), Some("plain"), Some("web"))
            );
            assert!(entry["time"].as_str().is_some_and(|t| t.ends_with("+00:00")), "{line}");
        } else {
            assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
            assert!(line.contains("] \"GET /p?q=1 HTTP/1.1\" 200 "), "{line}");
            assert!(
                line.contains("\"http://from.test/\" \"agent \\x22quoted\\x22\""),
                "nginx's default escaping: {line}"
            );
            assert!(line.contains(" [t-web-80] [-] 127.0.0.1:"), "{line}");
            assert!(line.ends_with(" 200 abc123"), "{line}");
        }
    }
}

/// `ssl-ciphers` (OpenSSL's names, as nginx's `ssl_ciphers`) narrows the TLS 1.2 suites: a TLS
/// 1.2 client gets the one listed; TLS 1.3 keeps its suites. A list with no suite rustls has is
/// reported and the defaults stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_ciphers_narrow_the_tls12_suites() {
    let (tidegate, _dir, _) =
        plain_with_settings(&[("ssl-ciphers", "ECDHE-ECDSA-CHACHA20-POLY1305:AES128-SHA:!aNULL")]).await;
    let handshake = async |versions: &[&'static rustls::SupportedProtocolVersion]| {
        let connector = support::tls_connector_with_versions(None, &[b"http/1.1"], versions);
        let tcp = tokio::net::TcpStream::connect(tidegate.https).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from("plain.test").expect("name");
        connector
            .connect(name, tcp)
            .await
            .map(|s| s.get_ref().1.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())))
    };
    let tls12 = handshake(&[&rustls::version::TLS12]).await.expect("TLS 1.2");
    assert_eq!(tls12.as_deref(), Some("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"));
    let tls13 = handshake(&[&rustls::version::TLS13]).await.expect("TLS 1.3");
    assert!(tls13.is_some_and(|s| s.starts_with("TLS13_")));
    drop(tidegate);

    let (tidegate, _dir, _) = plain_with_settings(&[("ssl-ciphers", "AES128-SHA:DHE-RSA-AES256-SHA")]).await;
    let problems = object_problems(&tidegate, "ConfigMap", "settings");
    assert!(
        problems.iter().any(|p| p["field"] == "data[\"ssl-ciphers\"]" && p["severity"] == "warning"),
        "{problems:?}"
    );
}
