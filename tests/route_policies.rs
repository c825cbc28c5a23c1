//! Route policies through the real binary: what an Ingress's annotations ask of a route, and
//! what happens when tidegate cannot honour it (the route answers 503, never served open).

mod support;

use http::StatusCode;
use support::{Tidegate, echo, get, manifest_dir, service_yaml, write_manifest};

/// An Ingress `name` for `host` to Service `web`, with annotations.
fn ingress(name: &str, host: &str, annotations: &[(&str, &str)]) -> String {
    support::ingress_to(name, host, "web", annotations)
}

async fn start(manifests: &str) -> (Tidegate, tempfile::TempDir) {
    start_with(manifests, &[]).await
}

/// Starts on `manifests` in one file and each of `files` (name, text) beside it.
async fn start_with(manifests: &str, files: &[(&str, &str)]) -> (Tidegate, tempfile::TempDir) {
    start_flags(manifests, files, &[]).await
}

/// The same, with command-line flags.
async fn start_flags(manifests: &str, files: &[(&str, &str)], flags: &[&str]) -> (Tidegate, tempfile::TempDir) {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    write_manifest(dir.path(), "all.yaml", &format!("{}{manifests}", service_yaml("t", "web", 80, "http", &[web])));
    for (name, text) in files {
        write_manifest(dir.path(), name, text);
    }
    let path = dir.path().to_owned();
    let flags: Vec<String> = flags.iter().map(|f| (*f).to_owned()).collect();
    let tidegate = tokio::task::spawn_blocking(move || {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Tidegate::start(&path, &flags)
    })
    .await
    .expect("start");
    (tidegate, dir)
}

/// The problems `/status` lists for Ingress `t/name`.
fn problems(tidegate: &Tidegate, name: &str) -> Vec<serde_json::Value> {
    let status = tidegate.status();
    let objects = status["objects"].as_array().cloned().unwrap_or_default();
    let object = objects
        .into_iter()
        .find(|o| o["object"]["kind"] == "Ingress" && o["object"]["name"] == name)
        .unwrap_or_else(|| panic!("Ingress {name} in /status: {status}"));
    object["problems"].as_array().cloned().unwrap_or_default()
}

/// Each key that restricts who may reach a route, or how much, and that tidegate does not
/// honour (or whose value it cannot read), under either prefix: the Ingress's routes answer 503
/// and `/status` names the key as an error. An Ingress beside it keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restrictive_annotations_not_honoured_answer_503() {
    let restrictive = [
        ("nginx.ingress.kubernetes.io/whitelist-source-range", "10.0.0.0/33"),
        ("nginx.ingress.kubernetes.io/denylist-source-range", "not-an-address"),
        ("nginx.ingress.kubernetes.io/auth-type", "digest"),
        ("nginx.ingress.kubernetes.io/auth-secret", "users"),
        ("nginx.ingress.kubernetes.io/auth-url", "ftp://auth.example/check"),
        ("nginx.ingress.kubernetes.io/auth-cache-key", "$no_such_variable"),
        ("nginx.ingress.kubernetes.io/auth-snippet", "proxy_set_header X-Tenant a;"),
        ("nginx.ingress.kubernetes.io/auth-tls-verify-client", "on"),
        ("nginx.ingress.kubernetes.io/satisfy", "maybe"),
        ("nginx.ingress.kubernetes.io/limit-rps", "1.5"),
        ("nginx.ingress.kubernetes.io/limit-connections", "none"),
        ("nginx.ingress.kubernetes.io/global-rate-limit", "100"),
        ("tidegate.dev/auth-type", "basic"),
        ("tidegate.dev/auth-tls-secret", "t/ca"),
        ("tidegate.dev/configuration-snippet", "auth_request /auth;"),
    ];
    let mut manifests = ingress("open", "open.test", &[]);
    for (i, (key, value)) in restrictive.iter().enumerate() {
        manifests.push_str(&ingress(&format!("guarded-{i}"), &format!("guarded-{i}.test"), &[(key, value)]));
    }
    let (tidegate, _dir) = start(&manifests).await;

    let open = get(tidegate.http, "open.test", "/").await.expect("open");
    assert_eq!(open.status, StatusCode::OK, "an Ingress without such keys is served");
    for (i, (key, _)) in restrictive.iter().enumerate() {
        let host = format!("guarded-{i}.test");
        let answer = get(tidegate.http, &host, "/").await.expect("guarded");
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{key} is not honoured: 503, never open");
        assert!(String::from_utf8_lossy(&answer.body).contains("503"), "an error page, not the backend");
        let problems = problems(&tidegate, &format!("guarded-{i}"));
        assert!(
            problems.iter().any(|p| p["severity"] == "error" && p["field"] == format!("metadata.annotations[{key:?}]")),
            "{key} is named in /status: {problems:?}"
        );
        let logged = tidegate.problems_mentioning(key);
        assert!(!logged.is_empty(), "{key} is logged");
    }
}

/// A key that changes behaviour but not access is ignored with a warning: the route serves,
/// `/status` and the log say the key was not honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_annotations_not_honoured_serve_with_a_warning() {
    let key = "nginx.ingress.kubernetes.io/enable-opentelemetry";
    let (tidegate, _dir) = start(&ingress("buffered", "buffered.test", &[(key, "true")])).await;
    let answer = get(tidegate.http, "buffered.test", "/").await.expect("served");
    assert_eq!(answer.status, StatusCode::OK);
    let problems = problems(&tidegate, "buffered");
    assert!(
        problems.iter().any(|p| p["reason"] == "UnsupportedAnnotation" && p["severity"] == "warning"),
        "{problems:?}"
    );
    assert!(!tidegate.problems_mentioning(key).is_empty(), "logged as a warning");
}

/// An Ingress name, its annotations, and the status its host answers.
type Case = (&'static str, &'static [(&'static str, &'static str)], StatusCode);

/// IP rules (`whitelist-source-range`, `allowlist-source-range`, `denylist-source-range`, under
/// either prefix): the test client is 127.0.0.1, so an allowlist without it and a denylist with
/// it answer 403, and an allowlist with it serves. On a route with Lua, the rules run before
/// the Lua access handler, which never sees a refused client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_rules_admit_and_refuse_clients() {
    let lua_route = "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {name: teapot, namespace: t}\nspec:\n  lua:\n    access: |\n      ngx.exit(418)\n  routes: []\n";
    let cases: &[Case] = &[
        (
            "other-net",
            &[("nginx.ingress.kubernetes.io/whitelist-source-range", "10.0.0.0/8, 192.168.0.0/16")],
            StatusCode::FORBIDDEN,
        ),
        (
            "loopback",
            &[("nginx.ingress.kubernetes.io/whitelist-source-range", "10.0.0.0/8, 127.0.0.0/8")],
            StatusCode::OK,
        ),
        ("v6-only", &[("tidegate.dev/allowlist-source-range", "::1/128")], StatusCode::FORBIDDEN),
        ("single", &[("nginx.ingress.kubernetes.io/allowlist-source-range", "127.0.0.1")], StatusCode::OK),
        ("denied", &[("nginx.ingress.kubernetes.io/denylist-source-range", "127.0.0.1/32")], StatusCode::FORBIDDEN),
        ("deny-other", &[("nginx.ingress.kubernetes.io/denylist-source-range", "10.0.0.0/8")], StatusCode::OK),
        (
            "deny-wins",
            &[
                ("nginx.ingress.kubernetes.io/whitelist-source-range", "127.0.0.0/8"),
                ("nginx.ingress.kubernetes.io/denylist-source-range", "127.0.0.1"),
            ],
            StatusCode::FORBIDDEN,
        ),
        (
            "lua-refused",
            &[
                ("nginx.ingress.kubernetes.io/whitelist-source-range", "10.0.0.0/8"),
                ("tidegate.dev/lua-route", "teapot"),
            ],
            StatusCode::FORBIDDEN,
        ),
        (
            "lua-admitted",
            &[
                ("nginx.ingress.kubernetes.io/whitelist-source-range", "127.0.0.1"),
                ("tidegate.dev/lua-route", "teapot"),
            ],
            StatusCode::IM_A_TEAPOT,
        ),
    ];
    let mut manifests = lua_route.to_owned();
    for (name, annotations, _) in cases {
        manifests.push_str(&ingress(name, &format!("{name}.test"), annotations));
    }
    let (tidegate, _dir) = start(&manifests).await;
    for (name, _, expected) in cases {
        let host = format!("{name}.test");
        let answer = get(tidegate.http, &host, "/").await.expect("answered");
        assert_eq!(answer.status, *expected, "{name}");
        if *expected == StatusCode::OK {
            assert_eq!(answer.json()["host"], host, "{name}: the backend answered");
        }
        assert!(problems(&tidegate, name).is_empty(), "{name}: honoured, nothing to report");
    }
}

/// The same IP rules as typed LuaRoute fields: `spec.policies` for every route, a route's own
/// `policies` replacing them field by field, and a network that does not read closing the
/// routes (503) with the field named in `/status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_rules_as_lua_route_fields() {
    let lua_route = |name: &str, policies: &str, route_policies: &str| {
        format!(
            "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  hosts: [{name}.test]\n  policies: {policies}\n  routes:\n  - name: main\n    match: {{path: {{type: Prefix, value: /}}}}\n    lua: {{content: \"ngx.say('hello')\"}}\n  - name: own\n    match: {{path: {{type: Prefix, value: /own}}}}\n    lua: {{content: \"ngx.say('own')\"}}\n    policies: {route_policies}\n"
        )
    };
    let manifests = [
        lua_route("elsewhere", "{ipAllowlist: [10.0.0.0/8]}", "{ipAllowlist: [127.0.0.0/8]}"),
        lua_route("denied", "{ipDenylist: [\"127.0.0.1\"]}", "{ipDenylist: [\"::1\"]}"),
        lua_route("broken", "{ipAllowlist: [10.0.0.0/99]}", "{}"),
    ]
    .concat();
    let (tidegate, _dir) = start(&manifests).await;
    let status = |host: &str, path: &str| {
        let host = host.to_owned();
        let path = path.to_owned();
        let addr = tidegate.http;
        async move { get(addr, &host, &path).await.expect("answered").status }
    };
    assert_eq!(status("elsewhere.test", "/").await, StatusCode::FORBIDDEN, "spec.policies applies");
    assert_eq!(status("elsewhere.test", "/own").await, StatusCode::OK, "the route's own allowlist replaces it");
    assert_eq!(status("denied.test", "/").await, StatusCode::FORBIDDEN);
    assert_eq!(status("denied.test", "/own").await, StatusCode::OK, "the route's denylist replaces it");
    assert_eq!(status("broken.test", "/").await, StatusCode::SERVICE_UNAVAILABLE, "never served open");
    let objects = tidegate.status()["objects"].as_array().cloned().unwrap_or_default();
    let broken = objects.iter().find(|o| o["object"]["name"] == "broken").expect("broken in /status");
    assert!(
        broken["problems"].as_array().into_iter().flatten().any(|p| p["field"] == "spec.policies.ipAllowlist"),
        "{broken}"
    );
}

/// Runs a hashing tool and returns its last output line.
fn tool(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed (Debian's apache2-utils, openssl): {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap_or_default().to_owned()
}

fn opaque_secret(name: &str, entries: &[(&str, &str)]) -> String {
    let mut yaml = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: t}}\ntype: Opaque\nstringData:\n"
    );
    for (key, value) in entries {
        yaml.push_str(&format!("  {key}: {value:?}\n"));
    }
    yaml
}

fn basic(user_password: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_password))
}

async fn get_with(tidegate: &Tidegate, host: &str, authorization: Option<&str>) -> support::Answer {
    let mut request = support::get_request(host, "/");
    if let Some(value) = authorization {
        request.headers_mut().insert(http::header::AUTHORIZATION, value.parse().expect("header"));
    }
    let mut h1 = support::H1::connect(tidegate.http).await.expect("connect");
    h1.send(request).await.expect("answered")
}

/// Basic auth with hashes made by the real tools (`htpasswd -B/-m/-s`, `openssl passwd
/// -1/-5/-6`), from an htpasswd file (`auth-file`) and from one key per user (`auth-map`): the
/// right password passes to the backend, anything else gets 401 with the realm, a missing
/// Secret closes the routes (503), and a change to the Secret applies live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_hashes_from_real_tools() {
    let users = [
        ("bcrypt", tool("htpasswd", &["-nbB", "bcrypt", "pw-bcrypt"])),
        ("apr1", tool("htpasswd", &["-nbm", "apr1", "pw-apr1"])),
        ("sha", tool("htpasswd", &["-nbs", "sha", "pw-sha"])),
        ("md5", format!("md5:{}", tool("openssl", &["passwd", "-1", "pw-md5"]))),
        ("sha256", format!("sha256:{}", tool("openssl", &["passwd", "-5", "pw-sha256"]))),
        ("sha512", format!("sha512:{}", tool("openssl", &["passwd", "-6", "pw-sha512"]))),
    ];
    let file: String = users.iter().map(|(_, line)| format!("{line}\n")).collect();
    let map: Vec<(&str, &str)> =
        users.iter().map(|(user, line)| (*user, line.split_once(':').map_or("", |(_, h)| h))).collect();
    fn auth(secret: &str) -> Vec<(&'static str, &str)> {
        vec![
            ("nginx.ingress.kubernetes.io/auth-type", "basic"),
            ("nginx.ingress.kubernetes.io/auth-secret", secret),
            ("nginx.ingress.kubernetes.io/auth-realm", "Staff only"),
        ]
    }
    let mut map_auth = auth("t/users-map");
    map_auth.push(("nginx.ingress.kubernetes.io/auth-secret-type", "auth-map"));
    let manifests = [
        opaque_secret("users-map", &map),
        ingress("file", "file.test", &auth("users")),
        ingress("map", "map.test", &map_auth),
        ingress("missing", "missing.test", &auth("nobody")),
    ]
    .concat();
    let (tidegate, dir) = start_with(&manifests, &[("users.yaml", &opaque_secret("users", &[("auth", &file)]))]).await;

    for host in ["file.test", "map.test"] {
        for (user, _) in &users {
            let answer = get_with(&tidegate, host, Some(&basic(&format!("{user}:pw-{user}")))).await;
            assert_eq!(answer.status, StatusCode::OK, "{host}: {user} with the right password");
            assert_eq!(answer.json()["host"], host, "the backend answered");
            let wrong = get_with(&tidegate, host, Some(&basic(&format!("{user}:pw-other")))).await;
            assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{host}: {user} with a wrong password");
        }
        let none = get_with(&tidegate, host, None).await;
        assert_eq!(none.status, StatusCode::UNAUTHORIZED, "{host}: no credentials");
        assert_eq!(none.headers[http::header::WWW_AUTHENTICATE], "Basic realm=\"Staff only\"");
        let stranger = get_with(&tidegate, host, Some(&basic("mallory:pw-bcrypt"))).await;
        assert_eq!(stranger.status, StatusCode::UNAUTHORIZED, "{host}: an unknown user");
    }
    let missing = get_with(&tidegate, "missing.test", Some(&basic("bcrypt:pw-bcrypt"))).await;
    assert_eq!(missing.status, StatusCode::SERVICE_UNAVAILABLE, "a missing Secret never serves open");
    assert!(problems(&tidegate, "missing").iter().any(|p| p["reason"] == "SecretNotFound"));

    // The Secret loses a user: that user is refused from the next configuration on.
    let version = tidegate.version();
    let fewer: String = users.iter().filter(|(u, _)| *u != "apr1").map(|(_, line)| format!("{line}\n")).collect();
    write_manifest(dir.path(), "users.yaml", &opaque_secret("users", &[("auth", &fewer)]));
    tidegate.wait_version_after(version);
    let gone = get_with(&tidegate, "file.test", Some(&basic("apr1:pw-apr1"))).await;
    assert_eq!(gone.status, StatusCode::UNAUTHORIZED, "a user removed from the Secret is refused");
    let kept = get_with(&tidegate, "file.test", Some(&basic("sha:pw-sha"))).await;
    assert_eq!(kept.status, StatusCode::OK);
}

/// Sends `head` (and `body`) on a new connection and returns the response's status line and
/// the parsed JSON body when there is one; the connection is closed after.
async fn raw_exchange(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> (u16, Option<serde_json::Value>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    // The proxy may answer and close before taking the whole body: that is the point.
    let _ = stream.write_all(body).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let json = text.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str(b).ok());
    (status, json)
}

/// `proxy-body-size` (1m when unset, `0` for none): a declared length over the limit gets 413
/// before anything reaches the backend; an undeclared (chunked) body is cut where it passes the
/// limit and answered 413; bodies within the limit arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_size_limits_requests() {
    let manifests = [
        ingress("default", "default.test", &[]),
        ingress("small", "small.test", &[("nginx.ingress.kubernetes.io/proxy-body-size", "10")]),
        ingress("unlimited", "unlimited.test", &[("nginx.ingress.kubernetes.io/proxy-body-size", "0")]),
    ]
    .concat();
    let (tidegate, _dir) = start(&manifests).await;
    let post = |host: &str, length: usize| {
        format!("POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n")
    };
    let chunked = |host: &str| {
        format!("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    };
    let chunks = |total: usize| {
        let mut out = Vec::new();
        for _ in 0..total / 5 {
            out.extend_from_slice(b"5\r\nhello\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    };
    let megabyte = 1 << 20;
    let (status, _) = raw_exchange(tidegate.http, &post("default.test", megabyte + 1), &[]).await;
    assert_eq!(status, 413, "over the default 1m, declared");
    let (status, json) = raw_exchange(tidegate.http, &post("default.test", megabyte), &vec![b'x'; megabyte]).await;
    assert_eq!(status, 200, "exactly 1m passes");
    assert_eq!(json.expect("echo")["body_length"], megabyte);
    let (status, _) = raw_exchange(tidegate.http, &post("small.test", 11), b"hello world").await;
    assert_eq!(status, 413);
    let (status, json) = raw_exchange(tidegate.http, &post("small.test", 10), b"helloworld").await;
    assert_eq!((status, json.expect("echo")["body_length"].as_u64()), (200, Some(10)));
    let (status, _) = raw_exchange(tidegate.http, &chunked("small.test"), &chunks(20)).await;
    assert_eq!(status, 413, "a chunked body is cut at the limit");
    let (status, json) = raw_exchange(tidegate.http, &chunked("small.test"), &chunks(10)).await;
    assert_eq!((status, json.expect("echo")["body_length"].as_u64()), (200, Some(10)), "chunked within the limit");
    let big = 3 * megabyte;
    let (status, json) = raw_exchange(tidegate.http, &post("unlimited.test", big), &vec![b'x'; big]).await;
    assert_eq!((status, json.expect("echo")["body_length"].as_u64()), (200, Some(big as u64)), "0: no limit");
}

async fn send(tidegate: &Tidegate, method: &str, host: &str, headers: &[(&str, &str)]) -> support::Answer {
    let mut request = http::Request::builder().method(method).uri("/").header("host", host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(support::Body::default()).expect("request");
    let mut h1 = support::H1::connect(tidegate.http).await.expect("connect");
    h1.send(request).await.expect("answered")
}

/// CORS as a browser meets it: a preflight (`OPTIONS` with `Origin` and the
/// `Access-Control-Request-*` headers, no credentials) is answered 204 by the proxy even on a
/// route behind Basic auth; the actual request's response carries the headers, its 401 too; with
/// an origin list, an allowed origin (a wildcard one included) is sent back, and another origin
/// gets no CORS header while its `OPTIONS` goes to the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_and_headers() {
    let users = opaque_secret("users", &[("auth", "ann:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n")]);
    let open = [
        ("nginx.ingress.kubernetes.io/enable-cors", "true"),
        ("nginx.ingress.kubernetes.io/auth-type", "basic"),
        ("nginx.ingress.kubernetes.io/auth-secret", "users"),
    ];
    let listed = [
        ("nginx.ingress.kubernetes.io/enable-cors", "true"),
        ("nginx.ingress.kubernetes.io/cors-allow-origin", "https://app.example.com, https://*.example.org"),
        ("nginx.ingress.kubernetes.io/cors-allow-methods", "GET, POST"),
        ("nginx.ingress.kubernetes.io/cors-allow-credentials", "false"),
        ("nginx.ingress.kubernetes.io/cors-expose-headers", "X-Total"),
        ("nginx.ingress.kubernetes.io/cors-max-age", "600"),
    ];
    let manifests = [users, ingress("open", "open.test", &open), ingress("listed", "listed.test", &listed)].concat();
    let (tidegate, _dir) = start(&manifests).await;
    let preflight = [
        ("origin", "https://app.example.com"),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "content-type"),
    ];

    let answer = send(&tidegate, "OPTIONS", "open.test", &preflight).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "answered by the proxy, before auth");
    let h = &answer.headers;
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(h["access-control-allow-methods"], "GET, PUT, POST, DELETE, PATCH, OPTIONS");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "1728000");
    assert!(h["access-control-allow-headers"].to_str().expect("text").contains("Content-Type"));
    assert_eq!(h["content-length"], "0");
    let refused = send(&tidegate, "GET", "open.test", &[("origin", "https://app.example.com")]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.headers["access-control-allow-origin"], "*", "an error response carries them too");
    let allowed =
        send(&tidegate, "GET", "open.test", &[("origin", "https://x.test"), ("authorization", &basic("ann:secret"))])
            .await;
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(allowed.headers["access-control-allow-origin"], "*");

    for origin in ["https://app.example.com", "https://shop.example.org"] {
        let answer =
            send(&tidegate, "OPTIONS", "listed.test", &[("origin", origin), ("access-control-request-method", "POST")])
                .await;
        assert_eq!(answer.status, StatusCode::NO_CONTENT, "{origin}");
        assert_eq!(answer.headers["access-control-allow-origin"], origin, "the request's own origin");
        assert_eq!(answer.headers["access-control-allow-methods"], "GET, POST");
        assert_eq!(answer.headers["access-control-max-age"], "600");
        assert!(!answer.headers.contains_key("access-control-allow-credentials"));
        let get = send(&tidegate, "GET", "listed.test", &[("origin", origin)]).await;
        assert_eq!(get.headers["access-control-allow-origin"], origin);
        assert_eq!(get.headers["access-control-expose-headers"], "X-Total");
    }
    for origin in ["https://evil.test", "https://a.b.example.org", "http://app.example.com"] {
        let answer =
            send(&tidegate, "OPTIONS", "listed.test", &[("origin", origin), ("access-control-request-method", "POST")])
                .await;
        assert_eq!(answer.status, StatusCode::OK, "{origin}: not a preflight of ours, the backend answers");
        assert_eq!(answer.json()["method"], "OPTIONS");
        assert!(!answer.headers.contains_key("access-control-allow-origin"), "{origin}");
    }
}

/// Limits per client, shared by the proxy's two workers (each request on a new connection, so
/// that both take some): `limit-rps 5` with the default burst multiplier (5) admits a burst of
/// 26 at once and then 5 a second, 503 beyond; `limit-whitelist` exempts the client;
/// `limit-connections 2` refuses a third request in progress at once and admits again once
/// one is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_and_concurrency_limits() {
    let manifests = [
        ingress("rps", "rps.test", &[("nginx.ingress.kubernetes.io/limit-rps", "5")]),
        ingress(
            "exempt",
            "exempt.test",
            &[
                ("nginx.ingress.kubernetes.io/limit-rps", "1"),
                ("nginx.ingress.kubernetes.io/limit-whitelist", "127.0.0.0/8"),
            ],
        ),
        ingress("conn", "conn.test", &[("nginx.ingress.kubernetes.io/limit-connections", "2")]),
    ]
    .concat();
    let (tidegate, _dir) = start(&manifests).await;
    let burst = |host: &'static str, count: usize| {
        let addr = tidegate.http;
        async move {
            let mut statuses = Vec::new();
            for _ in 0..count {
                statuses.push(get(addr, host, "/").await.expect("answered").status);
            }
            statuses
        }
    };
    let started = std::time::Instant::now();
    let statuses = burst("rps.test", 40).await;
    let elapsed = started.elapsed();
    let admitted = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE).count();
    assert_eq!(admitted + refused, 40, "only 200 and 503: {statuses:?}");
    // 26 at once, and 5 a second more for the time the burst took.
    let drained = (elapsed.as_secs_f64() * 5.0).floor() as usize;
    assert!((26..=26 + drained + 1).contains(&admitted), "{admitted} admitted in {elapsed:?}");
    assert_eq!(statuses[..26].iter().filter(|s| **s == StatusCode::OK).count(), 26, "the burst passes first");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let again = burst("rps.test", 10).await.iter().filter(|s| **s == StatusCode::OK).count();
    assert!((5..=7).contains(&again), "about 5 a second later: {again}");

    let exempt = burst("exempt.test", 20).await;
    assert!(exempt.iter().all(|s| *s == StatusCode::OK), "an exempt client is not limited: {exempt:?}");

    let slow = |i: usize| {
        let addr = tidegate.http;
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(50 * i as u64)).await;
            get(addr, "conn.test", "/?delay_ms=600").await.expect("answered").status
        }
    };
    let (a, b, c) = tokio::join!(slow(0), slow(1), slow(2));
    assert_eq!(
        (a, b, c),
        (StatusCode::OK, StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE),
        "a third at once is refused"
    );
    assert_eq!(get(tidegate.http, "conn.test", "/").await.expect("answered").status, StatusCode::OK, "freed when done");
}

/// `tidegate.dev/limit-key` counts the limits by a header instead of the address: two API keys
/// from one client address each get their own burst, and a request without the header is
/// counted by its address (leaving the header out escapes nothing). `global-rate-limit` in one
/// proxy (standalone): the limit per window and key, then 429, ingress-nginx's default; clients
/// in `global-rate-limit-ignored-cidrs` are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_by_key_and_the_global_rate_limit() {
    let manifests = [
        ingress(
            "keyed",
            "keyed.test",
            &[("nginx.ingress.kubernetes.io/limit-rpm", "1"), ("tidegate.dev/limit-key", "$http_x_api_key")],
        ),
        ingress(
            "global",
            "global.test",
            &[
                ("nginx.ingress.kubernetes.io/global-rate-limit", "10"),
                ("nginx.ingress.kubernetes.io/global-rate-limit-window", "1h"),
                ("nginx.ingress.kubernetes.io/global-rate-limit-key", "$http_x_tenant"),
            ],
        ),
        ingress(
            "ignored",
            "ignored.test",
            &[
                ("nginx.ingress.kubernetes.io/global-rate-limit", "1"),
                ("nginx.ingress.kubernetes.io/global-rate-limit-window", "1h"),
                ("nginx.ingress.kubernetes.io/global-rate-limit-ignored-cidrs", "127.0.0.1/32"),
            ],
        ),
        ingress("half", "half.test", &[("nginx.ingress.kubernetes.io/global-rate-limit", "5")]),
    ]
    .concat();
    let (tidegate, _dir) = start(&manifests).await;
    let count = |host: &'static str, header: Option<(&'static str, &'static str)>, n: usize| {
        let tidegate = &tidegate;
        async move {
            let mut statuses = Vec::new();
            for _ in 0..n {
                let headers: Vec<(&str, &str)> = header.into_iter().collect();
                statuses.push(send(tidegate, "GET", host, &headers).await.status.as_u16());
            }
            statuses
        }
    };
    // limit-rpm 1: a burst of 5, so 6 at once per key.
    for key in ["alpha", "beta"] {
        let statuses = count("keyed.test", Some(("x-api-key", key)), 8).await;
        assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 6, "{key}: {statuses:?}");
    }
    let unkeyed = count("keyed.test", None, 8).await;
    assert_eq!(unkeyed.iter().filter(|s| **s == 200).count(), 6, "by address: {unkeyed:?}");

    let statuses = count("global.test", Some(("x-tenant", "a")), 14).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10, "{statuses:?}");
    assert!(statuses[10..].iter().all(|s| *s == 429), "then 429: {statuses:?}");
    let other = count("global.test", Some(("x-tenant", "b")), 3).await;
    assert!(other.iter().all(|s| *s == 200), "another key: {other:?}");
    let ignored = count("ignored.test", None, 5).await;
    assert!(ignored.iter().all(|s| *s == 200), "not counted: {ignored:?}");

    // Without its window, global-rate-limit closes the routes rather than go unlimited.
    assert_eq!(send(&tidegate, "GET", "half.test", &[]).await.status, StatusCode::SERVICE_UNAVAILABLE);
    let half = problems(&tidegate, "half");
    assert!(
        half.iter().any(|p| p["message"].as_str().is_some_and(|m| m.contains("global-rate-limit-window"))),
        "{half:?}"
    );
}

/// `limit-rate` (KB/s) after `limit-rate-after` (KB): a 200,000-byte response with 50 KB free
/// and 100 KB/s after takes about 1.45 s, where the same response without a pace takes a
/// fraction of that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_rate_paces_responses() {
    let big = "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {name: big, namespace: t}\nspec:\n  lua:\n    content: ngx.print(string.rep('x', 200000))\n  routes: []\n";
    let manifests = [
        big.to_owned(),
        ingress(
            "paced",
            "paced.test",
            &[
                ("tidegate.dev/lua-route", "big"),
                ("nginx.ingress.kubernetes.io/limit-rate", "100"),
                ("nginx.ingress.kubernetes.io/limit-rate-after", "50"),
            ],
        ),
        ingress("free", "free.test", &[("tidegate.dev/lua-route", "big")]),
    ]
    .concat();
    let (tidegate, _dir) = start(&manifests).await;
    for (host, range) in [("free.test", 0.0..0.5), ("paced.test", 1.3..3.0)] {
        let started = std::time::Instant::now();
        let answer = get(tidegate.http, host, "/").await.expect("answered");
        let took = started.elapsed().as_secs_f64();
        assert_eq!((answer.status, answer.body.len()), (StatusCode::OK, 200_000), "{host}");
        assert!(range.contains(&took), "{host} took {took:.2} s, expected {range:?}");
    }
}

/// What the auth server saw of one auth request.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    uri: String,
    headers: http::HeaderMap,
}

/// A real HTTP auth service on loopback, in the manner of oauth2-proxy: `Authorization: Bearer
/// good` passes (200, with user headers and a cookie), `plain` too without a cookie, `private`
/// with `Cache-Control: private`, `forbidden` gets 403, `broken` 502, nothing 401 with a
/// challenge; `/slow` takes a second. It records every request.
async fn auth_server() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<Seen>>>) {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let log = std::sync::Arc::clone(&log);
            tokio::spawn(async move {
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let log = std::sync::Arc::clone(&log);
                    async move {
                        log.lock().expect("log").push(Seen {
                            method: request.method().to_string(),
                            uri: request.uri().to_string(),
                            headers: request.headers().clone(),
                        });
                        if request.uri().path() == "/slow" {
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                        let token = request.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
                        let response = http::Response::builder();
                        let response = match token {
                            "Bearer good" => response
                                .status(200)
                                .header("x-auth-user", "ann")
                                .header("x-auth-email", "ann@example.com")
                                .header("set-cookie", "session=abc; Path=/"),
                            "Bearer plain" => response.status(200).header("x-auth-user", "bob"),
                            "Bearer private" => {
                                response.status(200).header("x-auth-user", "eve").header("cache-control", "private")
                            }
                            "Bearer forbidden" => response.status(403),
                            "Bearer broken" => response.status(502),
                            _ if request.uri().path() == "/slow" => response.status(200),
                            _ => response.status(401).header("www-authenticate", "Bearer realm=\"test\""),
                        };
                        Ok::<_, std::convert::Infallible>(response.body(support::Body::default()).expect("response"))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// External auth against a real auth service: 2xx lets the request through with the named
/// headers added and the service's cookie set; 401 is passed with its challenge, or redirected
/// to the sign-in page with the original URL; 403 is passed; anything else, and a service that
/// is down, is 500. The service gets the headers ingress-nginx sends. While it takes a second
/// over one HTTP/2 connection (one worker), that worker answers other requests at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_auth_against_a_real_service() {
    let (auth, seen) = auth_server().await;
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let url = format!("http://{auth}/auth?uri=$escaped_request_uri");
    let manifests = [
        ingress(
            "ext",
            "ext.test",
            &[
                ("nginx.ingress.kubernetes.io/auth-url", &url),
                ("nginx.ingress.kubernetes.io/auth-response-headers", "X-Auth-User, X-Auth-Email"),
            ],
        ),
        ingress(
            "signin",
            "signin.test",
            &[
                ("nginx.ingress.kubernetes.io/auth-url", &url),
                ("nginx.ingress.kubernetes.io/auth-signin", "https://login.example/start"),
            ],
        ),
        ingress("slow", "slow.test", &[("nginx.ingress.kubernetes.io/auth-url", &format!("http://{auth}/slow"))]),
        ingress("down", "down.test", &[("nginx.ingress.kubernetes.io/auth-url", &format!("http://{down}/auth"))]),
        ingress("fast", "fast.test", &[]),
    ]
    .concat();
    let (tidegate, _dir) = start(&manifests).await;
    let bearer = |token: &str| format!("Bearer {token}");
    let with = |host: &'static str, token: Option<String>| {
        let addr = tidegate.http;
        async move {
            let mut request = support::get_request(host, "/some/path?x=1");
            if let Some(token) = token {
                request.headers_mut().insert("authorization", token.parse().expect("header"));
            }
            let mut h1 = support::H1::connect(addr).await.expect("connect");
            h1.send(request).await.expect("answered")
        }
    };

    let none = with("ext.test", None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.headers["www-authenticate"], "Bearer realm=\"test\"", "the service's challenge");
    let good = with("ext.test", Some(bearer("good"))).await;
    assert_eq!(good.status, StatusCode::OK, "the backend answered");
    let upstream = support::echoed_headers(&good);
    assert_eq!(upstream.get("X-Auth-User"), Some(&vec!["ann".to_owned()]), "{upstream:?}");
    assert_eq!(upstream.get("X-Auth-Email"), Some(&vec!["ann@example.com".to_owned()]));
    assert_eq!(good.headers["set-cookie"], "session=abc; Path=/", "the service's cookie reaches the client");
    assert_eq!(with("ext.test", Some(bearer("forbidden"))).await.status, StatusCode::FORBIDDEN);
    assert_eq!(with("ext.test", Some(bearer("broken"))).await.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(with("down.test", Some(bearer("good"))).await.status, StatusCode::INTERNAL_SERVER_ERROR, "service down");

    let asked = seen
        .lock()
        .expect("log")
        .iter()
        .find(|s| s.headers.get("authorization").is_some_and(|v| v == "Bearer good"))
        .cloned()
        .expect("asked");
    assert_eq!(asked.method, "GET");
    assert_eq!(asked.uri, "/auth?uri=%2Fsome%2Fpath%3Fx%3D1", "$escaped_request_uri expanded");
    for (name, value) in [
        ("x-original-url", "http://ext.test/some/path?x=1"),
        ("x-original-method", "GET"),
        ("x-original-uri", "/some/path?x=1"),
        ("x-sent-from", "nginx-ingress-controller"),
        ("x-auth-request-redirect", "/some/path?x=1"),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-real-ip", "127.0.0.1"),
        ("host", &auth.to_string()),
    ] {
        assert_eq!(asked.headers.get(name).and_then(|v| v.to_str().ok()), Some(value), "{name}");
    }

    let redirected = with("signin.test", None).await;
    assert_eq!(redirected.status, StatusCode::FOUND);
    assert_eq!(
        redirected.headers["location"],
        "https://login.example/start?rd=http%3A%2F%2Fsignin.test%2Fsome%2Fpath%3Fx%3D1"
    );

    // One HTTP/2 connection: both requests on one worker.
    let stream = tokio::net::TcpStream::connect(tidegate.http).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c");
    tokio::spawn(conn);
    let h2 = |host: &str| {
        let mut sender = sender.clone();
        let request = http::Request::get(format!("http://{host}/")).body(support::Body::default()).expect("request");
        async move { sender.send_request(request).await.expect("answered").status() }
    };
    let slow = tokio::spawn(h2("slow.test"));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut took = Vec::new();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        assert_eq!(h2("fast.test").await, StatusCode::OK);
        took.push(started.elapsed());
    }
    assert!(!slow.is_finished(), "the auth service is still thinking");
    took.sort();
    eprintln!("route policies: while the auth service takes 1 s, the same worker answers in {took:?}");
    assert!(took[2] < std::time::Duration::from_millis(10), "median under 10 ms: {took:?}");
    assert_eq!(slow.await.expect("slow"), StatusCode::OK);
}

/// `auth-cache-key` and `auth-cache-duration`, as nginx's `proxy_cache` on the auth location:
/// within the time, a key's answer is reused without asking the service, and its headers still
/// reach the upstream; a status the durations do not name, an answer with a cookie and one
/// marked private are asked each time. `auth-proxy-set-headers` (a ConfigMap in the Ingress's
/// namespace) adds headers to the auth request, variables expanded; a missing one closes the
/// routes (503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_answers_cached_and_auth_request_headers() {
    let (auth, seen) = auth_server().await;
    let url = format!("http://{auth}/cached");
    let headers = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: auth-headers, namespace: t}\ndata:\n  X-Client: \"$remote_addr\"\n  X-Static: \"yes\"\n";
    let manifests = [
        headers.to_owned(),
        ingress(
            "cached",
            "cached.test",
            &[
                ("nginx.ingress.kubernetes.io/auth-url", &url),
                ("nginx.ingress.kubernetes.io/auth-response-headers", "X-Auth-User"),
                ("nginx.ingress.kubernetes.io/auth-cache-key", "$http_authorization"),
                ("nginx.ingress.kubernetes.io/auth-cache-duration", "200 202 1m"),
                ("nginx.ingress.kubernetes.io/auth-proxy-set-headers", "auth-headers"),
            ],
        ),
        ingress(
            "missing",
            "missing.test",
            &[
                ("nginx.ingress.kubernetes.io/auth-url", &url),
                ("nginx.ingress.kubernetes.io/auth-proxy-set-headers", "t/no-such-headers"),
            ],
        ),
    ]
    .concat();
    let (tidegate, _dir) = start(&manifests).await;
    let asked = |token: &str| {
        seen.lock().expect("log").iter().filter(|s| s.headers.get("authorization").is_some_and(|v| v == token)).count()
    };
    for _ in 0..3 {
        let answer = get_with(&tidegate, "cached.test", Some("Bearer plain")).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            support::echoed_headers(&answer).get("X-Auth-User"),
            Some(&vec!["bob".to_owned()]),
            "from the kept answer too"
        );
    }
    assert_eq!(asked("Bearer plain"), 1, "one 200 kept for a minute");
    for token in ["Bearer good", "Bearer private"] {
        for _ in 0..2 {
            assert_eq!(get_with(&tidegate, "cached.test", Some(token)).await.status, StatusCode::OK);
        }
        assert_eq!(asked(token), 2, "{token}: not kept");
    }
    for _ in 0..2 {
        assert_eq!(get_with(&tidegate, "cached.test", Some("Bearer forbidden")).await.status, StatusCode::FORBIDDEN);
    }
    assert_eq!(asked("Bearer forbidden"), 2, "403 is not among the durations");
    let first = seen.lock().expect("log").iter().find(|s| s.uri == "/cached").cloned().expect("asked");
    assert_eq!(first.headers.get("x-client").and_then(|v| v.to_str().ok()), Some("127.0.0.1"), "$remote_addr");
    assert_eq!(first.headers.get("x-static").and_then(|v| v.to_str().ok()), Some("yes"));

    assert_eq!(get_with(&tidegate, "missing.test", Some("Bearer plain")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    let missing = problems(&tidegate, "missing");
    assert!(
        missing
            .iter()
            .any(|p| p["field"] == "metadata.annotations[\"nginx.ingress.kubernetes.io/auth-proxy-set-headers\"]"
                && p["reason"] == "ConfigMapNotFound"),
        "{missing:?}"
    );
}

/// `satisfy`: with `any`, a client the IP rules admit needs no password, and one they refuse
/// may still pass Basic auth (a 401 with its challenge, not a 403, when it has none); with
/// `all` (the default), it must pass both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn satisfy_any_or_all() {
    let users = opaque_secret("users", &[("auth", "ann:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n")]);
    let with = |allow: &'static str, satisfy: &'static str| {
        vec![
            ("nginx.ingress.kubernetes.io/whitelist-source-range", allow),
            ("nginx.ingress.kubernetes.io/auth-type", "basic"),
            ("nginx.ingress.kubernetes.io/auth-secret", "users"),
            ("nginx.ingress.kubernetes.io/satisfy", satisfy),
        ]
    };
    let manifests = [
        users,
        ingress("any-in", "any-in.test", &with("127.0.0.1", "any")),
        ingress("any-out", "any-out.test", &with("10.0.0.0/8", "any")),
        ingress("all-in", "all-in.test", &with("127.0.0.1", "all")),
    ]
    .concat();
    let (tidegate, _dir) = start(&manifests).await;
    let ann = basic("ann:secret");
    for (host, credentials, expected) in [
        ("any-in.test", None, StatusCode::OK),
        ("any-out.test", None, StatusCode::UNAUTHORIZED),
        ("any-out.test", Some(ann.as_str()), StatusCode::OK),
        ("all-in.test", None, StatusCode::UNAUTHORIZED),
        ("all-in.test", Some(ann.as_str()), StatusCode::OK),
    ] {
        let answer = get_with(&tidegate, host, credentials).await;
        assert_eq!(answer.status, expected, "{host} with {credentials:?}");
        if expected == StatusCode::UNAUTHORIZED {
            assert!(answer.headers.contains_key("www-authenticate"), "{host}: the challenge");
        }
    }
}

/// `upstream-vhost` replaces the `Host` the backend gets, while `X-Forwarded-Host` keeps the
/// client's; `x-forwarded-prefix` adds `X-Forwarded-Prefix`; `connection-proxy-header` sets
/// the `Connection` the backend gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_vhost_and_forwarded_prefix() {
    let manifests = ingress(
        "vhost",
        "vhost.test",
        &[
            ("nginx.ingress.kubernetes.io/upstream-vhost", "internal.example"),
            ("nginx.ingress.kubernetes.io/x-forwarded-prefix", "/shop"),
            ("nginx.ingress.kubernetes.io/connection-proxy-header", "keep-alive"),
        ],
    );
    let (tidegate, _dir) = start(&manifests).await;
    let answer = get(tidegate.http, "vhost.test", "/").await.expect("answered");
    assert_eq!(answer.status, StatusCode::OK);
    let headers = support::echoed_headers(&answer);
    assert_eq!(answer.json()["host"], "internal.example", "the backend's Host");
    assert_eq!(headers.get("X-Forwarded-Host"), Some(&vec!["vhost.test".to_owned()]), "{headers:?}");
    assert_eq!(headers.get("X-Forwarded-Prefix"), Some(&vec!["/shop".to_owned()]));
    assert_eq!(headers.get("Connection"), Some(&vec!["keep-alive".to_owned()]), "{headers:?}");
}

/// Global external auth (`--global-auth-url`): every Ingress without its own `auth-url` asks it,
/// but one that sets `enable-global-auth: "false"`; an Ingress's own `auth-url` takes its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_auth_applies_unless_turned_off() {
    let (auth, seen) = auth_server().await;
    let global = format!("http://{auth}/global");
    let manifests = [
        ingress("plain", "plain.test", &[]),
        ingress("turned-off", "off.test", &[("nginx.ingress.kubernetes.io/enable-global-auth", "false")]),
        ingress("own", "own.test", &[("nginx.ingress.kubernetes.io/auth-url", &format!("http://{auth}/own"))]),
    ]
    .concat();
    let flags = ["--global-auth-url", global.as_str(), "--global-auth-response-headers", "X-Auth-User"];
    let (tidegate, _dir) = start_flags(&manifests, &[], &flags).await;
    let good = "Bearer good";
    assert_eq!(get_with(&tidegate, "plain.test", None).await.status, StatusCode::UNAUTHORIZED, "global auth applies");
    let passed = get_with(&tidegate, "plain.test", Some(good)).await;
    assert_eq!(passed.status, StatusCode::OK);
    assert_eq!(support::echoed_headers(&passed).get("X-Auth-User"), Some(&vec!["ann".to_owned()]));
    assert_eq!(get_with(&tidegate, "off.test", None).await.status, StatusCode::OK, "enable-global-auth: false");
    assert_eq!(get_with(&tidegate, "own.test", Some(good)).await.status, StatusCode::OK);
    let paths: Vec<String> = seen.lock().expect("log").iter().map(|s| s.uri.clone()).collect();
    assert!(paths.contains(&"/own".to_owned()) && paths.iter().filter(|p| *p == "/own").count() == 1, "{paths:?}");
    assert_eq!(
        paths.iter().filter(|p| *p == "/global").count(),
        2,
        "only plain.test asked the global service: {paths:?}"
    );
}

/// A certificate authority and client certificates it signs, made with rcgen.
struct Authority {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let pem = params.self_signed(&key).expect("CA").pem();
        Authority { pem, issuer: rcgen::Issuer::new(params, key) }
    }

    /// An intermediate CA this one signs.
    fn intermediate(&self, name: &str) -> Authority {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let pem = params.signed_by(&key, &self.issuer).expect("intermediate").pem();
        Authority { pem, issuer: rcgen::Issuer::new(params, key) }
    }

    /// A client certificate for `common_name` (chain PEM, key PEM).
    fn client(&self, common_name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "Example");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        (params.signed_by(&key, &self.issuer).expect("signed").pem(), key.serialize_pem())
    }
}

/// Client certificates over real TLS (`auth-tls-*`): with `on`, a certificate the CA signed
/// passes and the upstream learns the verdict and the names; none, or one another CA signed,
/// gets 400 (or the error page); `optional` admits no certificate but not a bad one;
/// `optional_no_ca` admits both, telling the upstream; `auth-tls-match-cn` refuses other
/// subjects with 403. A host without client certificates never asks for one, and a request
/// for a guarded host over a handshake made for another is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_over_real_tls() {
    let ca = Authority::new("Test CA");
    let stranger = Authority::new("Other CA");
    let good = ca.client("client.example");
    let other_name = ca.client("intruder.example");
    let bad = stranger.client("client.example");
    // A client certificate one intermediate CA away: its chain is the certificate and the
    // intermediate's.
    let middle = ca.intermediate("Middle CA");
    let far = middle.client("far.example");
    let far = (format!("{}{}", far.0, middle.pem), far.1);
    let hosts = ["on.test", "optional.test", "noca.test", "cn.test", "page.test", "plain.test", "deep.test"];
    let (cert, key) = support::self_signed(&hosts);
    let mut manifests = support::tls_secret_yaml("t", "site", &cert, &key);
    manifests.push_str(&opaque_secret("ca", &[("ca.crt", ca.pem.as_str())]));
    let tls_ingress = |name: &str, host: &str, annotations: &[(&str, &str)]| {
        ingress(name, host, annotations).replace(
            "spec:\n  ingressClassName: tidegate\n",
            &format!("spec:\n  ingressClassName: tidegate\n  tls: [{{hosts: [{host}], secretName: site}}]\n"),
        )
    };
    let guard = |verify: &'static str| {
        vec![
            ("nginx.ingress.kubernetes.io/auth-tls-secret", "t/ca"),
            ("nginx.ingress.kubernetes.io/auth-tls-verify-client", verify),
            ("nginx.ingress.kubernetes.io/auth-tls-pass-certificate-to-upstream", "true"),
        ]
    };
    let mut cn = guard("on");
    cn.push(("nginx.ingress.kubernetes.io/auth-tls-match-cn", "CN=client\\.example"));
    let mut page = guard("on");
    page.push(("nginx.ingress.kubernetes.io/auth-tls-error-page", "https://example.com/certificate-needed"));
    for (name, host, annotations) in [
        ("verify-on", "on.test", guard("on")),
        ("verify-optional", "optional.test", guard("optional")),
        ("verify-noca", "noca.test", guard("optional_no_ca")),
        ("verify-cn", "cn.test", cn),
        ("verify-page", "page.test", page),
        ("verify-none", "plain.test", vec![]),
        ("verify-deep", "deep.test", {
            let mut deep = guard("on");
            deep.push(("nginx.ingress.kubernetes.io/auth-tls-verify-depth", "2"));
            deep
        }),
    ] {
        manifests.push_str(&tls_ingress(name, host, &annotations));
    }
    let (tidegate, _dir) = start(&manifests).await;

    let ask = |client: Option<&(String, String)>, sni: &'static str, host: &'static str| {
        let connector =
            support::tls_connector_with_client(client.map(|(c, k)| (c.as_str(), k.as_str())), &[b"http/1.1"]);
        let addr = tidegate.https;
        async move {
            support::tls_request(&connector, addr, sni, support::get_request(host, "/")).await.expect("answered").answer
        }
    };
    let good_answer = ask(Some(&good), "on.test", "on.test").await;
    assert_eq!(good_answer.status, StatusCode::OK);
    let upstream = support::echoed_headers(&good_answer);
    let header = |name: &str| upstream.get(name).and_then(|v| v.first()).cloned().unwrap_or_default();
    assert_eq!(header("Ssl-Client-Verify"), "SUCCESS", "{upstream:?}");
    assert_eq!(header("Ssl-Client-Subject-Dn"), "O=Example,CN=client.example");
    assert_eq!(header("Ssl-Client-Issuer-Dn"), "CN=Test CA");
    assert!(header("Ssl-Client-Cert").starts_with("-----BEGIN%20CERTIFICATE-----%0A"), "the escaped PEM");
    assert_eq!(ask(None, "on.test", "on.test").await.status, StatusCode::BAD_REQUEST, "on: none");
    assert_eq!(ask(Some(&bad), "on.test", "on.test").await.status, StatusCode::BAD_REQUEST, "on: another CA");

    assert_eq!(ask(None, "optional.test", "optional.test").await.status, StatusCode::OK, "optional: none");
    assert_eq!(ask(Some(&bad), "optional.test", "optional.test").await.status, StatusCode::BAD_REQUEST);
    let unverified = ask(Some(&bad), "noca.test", "noca.test").await;
    assert_eq!(unverified.status, StatusCode::OK, "optional_no_ca: admitted");
    let verdict = support::echoed_headers(&unverified).get("Ssl-Client-Verify").cloned().unwrap_or_default();
    assert!(verdict.first().is_some_and(|v| v.starts_with("FAILED:")), "{verdict:?}");

    // auth-tls-verify-depth: 1 (the default) takes certificates the CA signed itself; 2 one
    // intermediate away too.
    assert_eq!(ask(Some(&far), "on.test", "on.test").await.status, StatusCode::BAD_REQUEST, "depth 1");
    assert_eq!(ask(Some(&far), "deep.test", "deep.test").await.status, StatusCode::OK, "depth 2");
    assert_eq!(ask(Some(&good), "cn.test", "cn.test").await.status, StatusCode::OK);
    assert_eq!(ask(Some(&other_name), "cn.test", "cn.test").await.status, StatusCode::FORBIDDEN, "another subject");
    let redirected = ask(None, "page.test", "page.test").await;
    assert_eq!(redirected.status, StatusCode::FOUND);
    assert_eq!(redirected.headers["location"], "https://example.com/certificate-needed");

    // A host without client certificates: the client is not asked (it would present its
    // certificate only when asked, and the upstream would hear of it).
    let plain = ask(Some(&good), "plain.test", "plain.test").await;
    assert_eq!(plain.status, StatusCode::OK);
    assert!(!support::echoed_headers(&plain).contains_key("Ssl-Client-Verify"));
    // A handshake for plain.test asked for nothing: on.test over it has no certificate.
    assert_eq!(ask(Some(&good), "plain.test", "on.test").await.status, StatusCode::BAD_REQUEST);
}

/// The other policies as typed LuaRoute fields, read by the annotations' own parsers: Basic auth
/// from a Secret, a request rate, CORS and the upstream Host, on a route with Lua content and on
/// one with a backend; a Secret that is missing closes its route (503) and names the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_as_lua_route_fields() {
    let users = opaque_secret("users", &[("auth", "ann:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n")]);
    let lua_route = "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {name: typed, namespace: t}\nspec:\n  hosts: [typed.test]\n  policies:\n    basicAuth: {secretName: users, realm: Typed}\n    limits: {rps: 1, burstMultiplier: 2}\n    cors: {allowOrigins: [\"https://app.example.com\"]}\n  routes:\n  - name: hello\n    match: {path: {type: Prefix, value: /hello}}\n    lua: {content: \"ngx.say('hello')\"}\n  - name: proxied\n    match: {path: {type: Prefix, value: /proxied}}\n    backend: {service: {name: web, port: {number: 80}}}\n    policies: {upstreamHost: internal.example, basicAuth: {secretName: users}}\n  - name: missing\n    match: {path: {type: Prefix, value: /missing}}\n    lua: {content: \"ngx.say('never')\"}\n    policies: {basicAuth: {secretName: nobody}}\n";
    let (tidegate, _dir) = start(&[users, lua_route.to_owned()].concat()).await;
    let ann = basic("ann:secret");
    let send_to = |path: &'static str, credentials: Option<&str>| {
        let mut request = support::get_request("typed.test", path);
        request.headers_mut().insert("origin", "https://app.example.com".parse().expect("origin"));
        if let Some(value) = credentials {
            request.headers_mut().insert("authorization", value.parse().expect("header"));
        }
        let addr = tidegate.http;
        async move { support::H1::connect(addr).await.expect("connect").send(request).await.expect("answered") }
    };
    let refused = send_to("/hello", None).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.headers["www-authenticate"], "Basic realm=\"Typed\"");
    assert_eq!(refused.headers["access-control-allow-origin"], "https://app.example.com", "CORS from spec.policies");
    let hello = send_to("/hello", Some(&ann)).await;
    assert_eq!((hello.status, hello.body.as_ref()), (StatusCode::OK, b"hello\n".as_ref()));
    let proxied = send_to("/proxied", Some(&ann)).await;
    assert_eq!(proxied.status, StatusCode::OK);
    assert_eq!(proxied.json()["host"], "internal.example", "the route's own upstreamHost");
    // rps 1 with a burst of 2, counted per route: five quick requests cannot all pass.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(send_to("/hello", Some(&ann)).await.status);
    }
    assert!(statuses.contains(&StatusCode::SERVICE_UNAVAILABLE), "the rate applies: {statuses:?}");
    assert_eq!(send_to("/missing", Some(&ann)).await.status, StatusCode::SERVICE_UNAVAILABLE);
    let objects = tidegate.status()["objects"].as_array().cloned().unwrap_or_default();
    let typed = objects.iter().find(|o| o["object"]["name"] == "typed").expect("typed in /status");
    assert!(
        typed["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["field"] == "spec.routes[2].policies.basicAuth.secretName" && p["reason"] == "SecretNotFound"),
        "{typed}"
    );
}

/// Redirects instead of the upstream, as ingress-nginx: `permanent-redirect` (301, or its
/// `-code`) and `temporal-redirect` (302) with nginx variables, and `app-root`, which sends a
/// request for `/` to the application's root (302) and lets every other path through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_answer_instead_of_the_upstream() {
    let manifests = [
        ingress(
            "moved",
            "moved.test",
            &[("nginx.ingress.kubernetes.io/permanent-redirect", "https://new.example$request_uri")],
        ),
        ingress(
            "moved308",
            "moved308.test",
            &[
                ("nginx.ingress.kubernetes.io/permanent-redirect", "https://new.example/"),
                ("nginx.ingress.kubernetes.io/permanent-redirect-code", "308"),
            ],
        ),
        ingress(
            "away",
            "away.test",
            &[("nginx.ingress.kubernetes.io/temporal-redirect", "https://maintenance.example/")],
        ),
        ingress("rooted", "rooted.test", &[("nginx.ingress.kubernetes.io/app-root", "/app")]),
    ]
    .concat();
    let (tidegate, _dir) = start(&manifests).await;
    let moved = get(tidegate.http, "moved.test", "/a/b?c=1").await.expect("answer");
    assert_eq!(moved.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(moved.headers["location"], "https://new.example/a/b?c=1");
    let moved = get(tidegate.http, "moved308.test", "/x").await.expect("answer");
    assert_eq!(
        (moved.status, moved.headers["location"].to_str().expect("ascii")),
        (StatusCode::PERMANENT_REDIRECT, "https://new.example/")
    );
    let away = get(tidegate.http, "away.test", "/x").await.expect("answer");
    assert_eq!(
        (away.status, away.headers["location"].to_str().expect("ascii")),
        (StatusCode::FOUND, "https://maintenance.example/")
    );
    let root = get(tidegate.http, "rooted.test", "/").await.expect("answer");
    assert_eq!(
        (root.status, root.headers["location"].to_str().expect("ascii")),
        (StatusCode::FOUND, "http://rooted.test/app")
    );
    let app = get(tidegate.http, "rooted.test", "/app").await.expect("answer");
    assert_eq!(app.status, StatusCode::OK, "other paths reach the backend");
}

/// `enable-access-log: "false"` leaves a route's requests out of the access log (JSON lines on
/// stdout); others are logged as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_can_be_turned_off_per_ingress() {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    let manifests = [
        service_yaml("t", "web", 80, "http", &[web]),
        ingress("quiet", "quiet.test", &[("nginx.ingress.kubernetes.io/enable-access-log", "false")]),
        ingress("loud", "loud.test", &[]),
    ]
    .concat();
    write_manifest(dir.path(), "all.yaml", &manifests);
    // The access log on, unlike the other tests' proxies: stdout is read here.
    let log = support::AccessLogged::start(dir.path(), &[]);
    let http = log.http;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !get(http, "loud.test", "/").await.is_ok_and(|a| a.status == StatusCode::OK) {
        assert!(std::time::Instant::now() < deadline, "serving within 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(get(http, "quiet.test", "/").await.expect("answer").status, StatusCode::OK);
    let logged = |host: &str| log.logged(&format!("\"host\":\"{host}\""));
    while !logged("loud.test") {
        assert!(std::time::Instant::now() < deadline, "the other Ingress's requests are logged");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Both requests went through the same worker, in order: the quiet one is not late.
    let _ = get(http, "loud.test", "/second").await;
    while !log.logged("/second") {
        assert!(std::time::Instant::now() < deadline, "the last request is logged");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!logged("quiet.test"), "enable-access-log false: not logged");
}
