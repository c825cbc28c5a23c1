//! Backends as ingress-nginx users run them, through the real binary against real servers on
//! loopback: HTTPS upstreams with and without verification, SNI, client certificates, HTTP/2
//! with prior knowledge (`GRPC`), over TLS (`GRPCS`), negotiated by ALPN (`AUTO_HTTP`), and the
//! Service port's `appProtocol`.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::ingress_to as ingress;
use support::{Tidegate, echo, get, h2c, manifest_dir, service_yaml, write_manifest};

/// A certificate authority and the certificates it signs.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let key = rcgen::KeyPair::generate().expect("key");
        let pem = params.self_signed(&key).expect("CA").pem();
        Ca { issuer: rcgen::Issuer::new(params, key), pem }
    }

    /// A certificate for `names`, and its key, as PEM.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    }
}

/// The echo backend over TLS with `cert`, speaking what `alpn` offers, and asking for client
/// certificates signed by `client_ca` when given.
async fn tls_echo(service: &str, cert: &(String, String), alpn: &[&[u8]], client_ca: Option<&str>) -> SocketAddr {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = vec![CertificateDer::from_pem_slice(cert.0.as_bytes()).expect("cert")];
    let key = PrivateKeyDer::from_pem_slice(cert.1.as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from_pem_slice(pem.as_bytes()).expect("ca")).expect("root");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).expect("server config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let identity = tidegate::echo::Identity {
        namespace: "t".into(),
        service: service.into(),
        pod: format!("{service}-{}", addr.port()),
        ..Default::default()
    };
    tokio::spawn(tidegate::echo::serve_tls(listener, identity, Arc::new(config)));
    addr
}

/// An Opaque Secret with these entries.
fn secret(name: &str, entries: &[(&str, &str)]) -> String {
    let mut out = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: t}}\ntype: Opaque\nstringData:\n"
    );
    for (key, value) in entries {
        out.push_str(&format!("  {key}: |\n"));
        for line in value.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

async fn start(manifests: String) -> (Tidegate, tempfile::TempDir) {
    let dir = manifest_dir();
    write_manifest(dir.path(), "all.yaml", &manifests);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");
    (tidegate, dir)
}

/// The problems `/status` lists for Ingress `t/name`.
fn problems(tidegate: &Tidegate, name: &str) -> String {
    let status = tidegate.status();
    let objects = status["objects"].as_array().cloned().unwrap_or_default();
    let object = objects
        .into_iter()
        .find(|o| o["object"]["kind"] == "Ingress" && o["object"]["name"] == name)
        .unwrap_or_else(|| panic!("Ingress {name} in /status: {status}"));
    object["problems"].to_string()
}

const NGINX: &str = "nginx.ingress.kubernetes.io/";

fn key(name: &str) -> String {
    format!("{NGINX}{name}")
}

/// `backend-protocol: HTTPS` as ingress-nginx: no verification unless asked (any certificate,
/// no SNI); with `proxy-ssl-verify: on`, the CA of `proxy-ssl-secret` and the name (the
/// Service's `NAME.NAMESPACE.svc` unless `proxy-ssl-name` says) must match, else 502; SNI only
/// with `proxy-ssl-server-name: on`. Verification asked without a CA closes the routes (503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backends_verified_as_asked() {
    let (ca, other) = (Ca::new("backend CA"), Ca::new("another CA"));
    let backend = tls_echo("web", &ca.issue(&["web.t.svc", "api.internal"]), &[b"http/1.1"], None).await;
    let https = key("backend-protocol");
    let (verify, ssl_secret, name, sni) =
        (key("proxy-ssl-verify"), key("proxy-ssl-secret"), key("proxy-ssl-name"), key("proxy-ssl-server-name"));
    let mut manifests = service_yaml("t", "web", 80, "https", &[backend]);
    manifests.push_str(&secret("backend-ca", &[("ca.crt", &ca.pem)]));
    manifests.push_str(&secret("other-ca", &[("ca.crt", &other.pem)]));
    manifests.push_str(&ingress("open", "open.test", "web", &[(&https, "HTTPS")]));
    manifests.push_str(&ingress(
        "verified",
        "verified.test",
        "web",
        &[(&https, "HTTPS"), (&verify, "on"), (&ssl_secret, "t/backend-ca")],
    ));
    manifests.push_str(&ingress(
        "wrong-ca",
        "wrong-ca.test",
        "web",
        &[(&https, "HTTPS"), (&verify, "on"), (&ssl_secret, "other-ca")],
    ));
    manifests.push_str(&ingress(
        "wrong-name",
        "wrong-name.test",
        "web",
        &[(&https, "HTTPS"), (&verify, "on"), (&ssl_secret, "backend-ca"), (&name, "db.internal")],
    ));
    manifests.push_str(&ingress(
        "named",
        "named.test",
        "web",
        &[(&https, "HTTPS"), (&verify, "on"), (&ssl_secret, "backend-ca"), (&name, "api.internal"), (&sni, "on")],
    ));
    manifests.push_str(&ingress("no-ca", "no-ca.test", "web", &[(&https, "HTTPS"), (&verify, "on")]));
    manifests.push_str(&ingress("cleartext", "cleartext.test", "web", &[]));
    let (tidegate, _dir) = start(manifests).await;

    let open = get(tidegate.http, "open.test", "/").await.expect("open");
    assert_eq!(open.status, StatusCode::OK, "{:?}", open.body);
    assert_eq!(open.json()["proto"], "HTTP/1.1");
    assert_eq!(open.json()["sni"], "", "no SNI unless proxy-ssl-server-name is on, as nginx");
    assert_eq!(open.json()["headers"]["X-Forwarded-Host"][0], "open.test");

    let verified = get(tidegate.http, "verified.test", "/").await.expect("verified");
    assert_eq!(verified.status, StatusCode::OK, "verified against the CA, name web.t.svc: {:?}", verified.body);
    assert_eq!(get(tidegate.http, "wrong-ca.test", "/").await.expect("answer").status, StatusCode::BAD_GATEWAY);
    assert_eq!(get(tidegate.http, "wrong-name.test", "/").await.expect("answer").status, StatusCode::BAD_GATEWAY);
    let named = get(tidegate.http, "named.test", "/").await.expect("named");
    assert_eq!(named.status, StatusCode::OK, "{:?}", named.body);
    assert_eq!(named.json()["sni"], "api.internal");

    assert_eq!(get(tidegate.http, "no-ca.test", "/").await.expect("answer").status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        problems(&tidegate, "no-ca").contains("proxy-ssl-verify on needs the CA"),
        "{}",
        problems(&tidegate, "no-ca")
    );
    // Plain HTTP to a TLS port: the backend refuses it, and the client gets 502.
    assert_eq!(get(tidegate.http, "cleartext.test", "/").await.expect("answer").status, StatusCode::BAD_GATEWAY);
    // A connection verified for one route is never lent to a route that did not verify, nor
    // the other way: each answers as its own settings say, again and again.
    for _ in 0..3 {
        assert_eq!(get(tidegate.http, "open.test", "/").await.expect("open").status, StatusCode::OK);
        assert_eq!(get(tidegate.http, "wrong-ca.test", "/").await.expect("x").status, StatusCode::BAD_GATEWAY);
    }
}

/// `proxy-ssl-secret` with `tls.crt` and `tls.key`: the certificate is presented to a backend
/// that requires one; without it, the backend refuses the handshake (502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_to_backends() {
    let (server_ca, client_ca) = (Ca::new("backend CA"), Ca::new("client CA"));
    let backend = tls_echo("web", &server_ca.issue(&["web.t.svc"]), &[], Some(&client_ca.pem)).await;
    let (cert, key_pem) = client_ca.issue(&["tidegate.client"]);
    let mut manifests = service_yaml("t", "web", 80, "https", &[backend]);
    manifests.push_str(&secret("identity", &[("tls.crt", &cert), ("tls.key", &key_pem), ("ca.crt", &server_ca.pem)]));
    manifests.push_str(&ingress(
        "mtls",
        "mtls.test",
        "web",
        &[
            (&key("backend-protocol"), "HTTPS"),
            (&key("proxy-ssl-secret"), "t/identity"),
            (&key("proxy-ssl-verify"), "on"),
        ],
    ));
    manifests.push_str(&ingress("anonymous", "anonymous.test", "web", &[(&key("backend-protocol"), "HTTPS")]));
    let (tidegate, _dir) = start(manifests).await;
    let answer = get(tidegate.http, "mtls.test", "/").await.expect("mtls");
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.json()["client_certificate"], true);
    assert_eq!(get(tidegate.http, "anonymous.test", "/").await.expect("answer").status, StatusCode::BAD_GATEWAY);
}

/// HTTP/2 to backends: `GRPC` (h2c), `GRPCS` (h2 over TLS), `AUTO_HTTP` (what ALPN picks), and
/// `appProtocol: kubernetes.io/h2c` on the Service port. Requests from HTTP/1.1 clients go as
/// HTTP/2 with their host as `:authority`, the `X-Forwarded-*` headers and their bodies; many
/// at once share few connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_backends() {
    let ca = Ca::new("backend CA");
    let certificate = ca.issue(&["web.t.svc"]);
    let plain = echo("t", "plain").await;
    let h2_tls = tls_echo("h2tls", &certificate, &[b"h2", b"http/1.1"], None).await;
    let h1_tls = tls_echo("h1tls", &certificate, &[b"http/1.1"], None).await;
    let protocol = key("backend-protocol");
    let mut manifests = service_yaml("t", "plain", 80, "http", &[plain]);
    manifests.push_str(&service_yaml("t", "h2tls", 80, "https", &[h2_tls]));
    manifests.push_str(&service_yaml("t", "h1tls", 80, "https", &[h1_tls]));
    manifests.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: h2c, namespace: t}}\nspec:\n  ports: [{{name: grpc, port: 80, targetPort: {port}, appProtocol: kubernetes.io/h2c}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: h2c-0\n  namespace: t\n  labels: {{kubernetes.io/service-name: h2c}}\naddressType: IPv4\nports: [{{name: grpc, port: {port}}}]\nendpoints:\n- addresses: [\"127.0.0.1\"]\n  conditions: {{ready: true}}\n",
        port = plain.port()
    ));
    manifests.push_str(&ingress("h1", "h1.test", "plain", &[]));
    manifests.push_str(&ingress("grpc", "grpc.test", "plain", &[(&protocol, "GRPC")]));
    manifests.push_str(&ingress("app", "app.test", "h2c", &[]));
    manifests.push_str(&ingress("grpcs", "grpcs.test", "h2tls", &[(&protocol, "GRPCS")]));
    manifests.push_str(&ingress("auto-h2", "auto-h2.test", "h2tls", &[(&protocol, "AUTO_HTTP")]));
    manifests.push_str(&ingress("auto-h1", "auto-h1.test", "h1tls", &[(&protocol, "auto_http")]));
    manifests.push_str(&ingress("fcgi", "fcgi.test", "plain", &[(&protocol, "FCGI")]));
    let (tidegate, _dir) = start(manifests).await;

    let proto = async |host: &str| {
        let answer = get(tidegate.http, host, "/").await.expect("answer");
        assert_eq!(answer.status, StatusCode::OK, "{host}: {:?}", answer.body);
        answer.json()["proto"].as_str().unwrap_or("").to_owned()
    };
    assert_eq!(proto("h1.test").await, "HTTP/1.1");
    assert_eq!(proto("grpc.test").await, "HTTP/2.0");
    assert_eq!(proto("app.test").await, "HTTP/2.0", "appProtocol kubernetes.io/h2c");
    assert_eq!(proto("grpcs.test").await, "HTTP/2.0");
    assert_eq!(proto("auto-h2.test").await, "HTTP/2.0", "the backend offered h2");
    assert_eq!(proto("auto-h1.test").await, "HTTP/1.1", "the backend offered only http/1.1");
    let fcgi = get(tidegate.http, "fcgi.test", "/").await.expect("fcgi");
    assert_eq!(fcgi.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(problems(&tidegate, "fcgi").contains("FastCGI"), "{}", problems(&tidegate, "fcgi"));

    // What the backend is told, and a body, over HTTP/2.
    let answer = get(tidegate.http, "grpc.test", "/x?y=1").await.expect("answer");
    let echoed = answer.json();
    assert_eq!(echoed["host"], "grpc.test");
    assert_eq!(echoed["path"], "/x");
    assert_eq!(echoed["query"], "y=1");
    assert_eq!(echoed["headers"]["X-Forwarded-For"][0], "127.0.0.1");
    assert_eq!(echoed["headers"]["X-Forwarded-Proto"][0], "http");
    let body = Bytes::from(vec![b'x'; 300_000]);
    let request =
        Request::post("http://grpc.test/upload").header("host", "grpc.test").body(Full::new(body)).expect("request");
    let answer = support::H1::connect(tidegate.http).await.expect("connect").send(request).await.expect("post");
    assert_eq!(answer.json()["body_length"], 300_000, "a body larger than the stream's first window");

    // Many requests at once from HTTP/2 clients: all answered, over the pooled connections.
    let mut calls = Vec::new();
    for i in 0..200 {
        let http = tidegate.http;
        calls.push(tokio::spawn(async move {
            let request =
                Request::get(format!("http://grpcs.test/{i}")).body(Full::new(Bytes::new())).expect("request");
            h2c(http, request).await.map(|a| (a.status, a.json()["path"].as_str().unwrap_or("").to_owned()))
        }));
    }
    for (i, call) in calls.into_iter().enumerate() {
        let (status, path) = call.await.expect("task").expect("answer");
        assert_eq!((status, path), (StatusCode::OK, format!("/{i}")));
    }
}

/// `auth-url` with `https`: the auth request goes over TLS (not verified, as nginx's
/// `proxy_pass https://` by default), and its 2xx lets the request on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_auth_services() {
    let ca = Ca::new("auth CA");
    let auth = tls_echo("auth", &ca.issue(&["auth.internal"]), &[b"http/1.1"], None).await;
    let web = echo("t", "web").await;
    let mut manifests = service_yaml("t", "web", 80, "http", &[web]);
    let url = format!("https://127.0.0.1:{}/check", auth.port());
    manifests.push_str(&ingress("guarded", "guarded.test", "web", &[(&key("auth-url"), &url)]));
    let (tidegate, _dir) = start(manifests).await;
    let answer = get(tidegate.http, "guarded.test", "/").await.expect("answer");
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.served_by(), "web", "the auth service let the request on to the backend");
}

/// An ExternalName Service is followed by name: the proxy resolves it off its workers (here
/// `localhost`, to the echo backend's loopback address) and serves it once resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_name_services_are_resolved() {
    let web = echo("t", "web").await;
    let mut manifests = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: outside, namespace: t}}\nspec: {{type: ExternalName, externalName: localhost, ports: [{{port: {port}}}]}}\n",
        port = web.port()
    );
    manifests.push_str(
        &ingress("outside", "outside.test", "outside", &[]).replace("number: 80", &format!("number: {}", web.port())),
    );
    let (tidegate, _dir) = start(manifests).await;
    let started = std::time::Instant::now();
    loop {
        let answer = get(tidegate.http, "outside.test", "/").await.expect("answer");
        if answer.status == StatusCode::OK {
            assert_eq!(answer.served_by(), "web");
            break;
        }
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "no endpoint until the name resolves");
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "resolved within 5 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// An echo backend for Service `service` on `ip:port`, if that port is free there.
async fn echo_at(ip: [u8; 4], port: u16, service: &str) -> Option<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((ip, port))).await.ok()?;
    let addr = listener.local_addr().ok()?;
    let identity = tidegate::echo::Identity {
        namespace: "t".into(),
        service: service.into(),
        pod: service.into(),
        ..Default::default()
    };
    tokio::spawn(tidegate::echo::serve(listener, identity));
    Some(addr)
}

/// A real DNS server (Debian's dnsmasq) on loopback answering from a hosts file with a 1 s TTL;
/// killed on drop.
struct Dns {
    child: std::process::Child,
    addr: SocketAddr,
    hosts: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Dns {
    fn start(hosts: &str) -> Dns {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("hosts");
        std::fs::write(&file, hosts).expect("hosts");
        let port = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let child = std::process::Command::new("dnsmasq")
            .args(["--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces"])
            .args(["--listen-address=127.0.0.1", "--user=root", "--local-ttl=1", "--pid-file="])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", file.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian's dnsmasq-base; .ci/run installs it)");
        std::thread::sleep(std::time::Duration::from_millis(200));
        Dns { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), hosts: file, _dir: dir }
    }

    /// Answers from `hosts` from now on (dnsmasq reads its hosts files again on SIGHUP).
    fn change(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).expect("hosts");
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill");
        assert!(status.success());
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An ExternalName Service is followed as its DNS answer's TTL ends: when the name moves to
/// another address, requests follow within about the TTL (1 s here) plus a second, not the 30
/// s the proxy used to wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_names_follow_their_ttl() {
    // Two backends on the same port of two loopback addresses.
    let (first, second) = loop {
        let first = echo_at([127, 0, 0, 2], 0, "first").await.expect("first");
        if let Some(second) = echo_at([127, 0, 0, 3], first.port(), "second").await {
            break (first, second);
        }
    };
    let dns = Dns::start(&format!("{} moving.test\n", first.ip()));
    let port = first.port();
    let mut manifests = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: moving, namespace: t}}\nspec: {{type: ExternalName, externalName: moving.test, ports: [{{port: {port}}}]}}\n"
    );
    manifests
        .push_str(&ingress("moving", "moving.test", "moving", &[]).replace("number: 80", &format!("number: {port}")));
    let dir = manifest_dir();
    write_manifest(dir.path(), "all.yaml", &manifests);
    let (path, server) = (dir.path().to_owned(), dns.addr.to_string());
    let tidegate =
        tokio::task::spawn_blocking(move || Tidegate::start(&path, &["--dns-server", &server])).await.expect("start");
    // Until the name resolves, the route answers 503 (no endpoint), which names no backend.
    let served_by = async || {
        let answer = get(tidegate.http, "moving.test", "/").await;
        answer.ok().filter(|a| a.status == StatusCode::OK).map(|a| a.served_by()).unwrap_or_default()
    };
    let started = std::time::Instant::now();
    while served_by().await != "first" {
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "resolved within 5 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    dns.change(&format!("{} moving.test\n", second.ip()));
    let moved = std::time::Instant::now();
    while served_by().await != "second" {
        assert!(moved.elapsed() < std::time::Duration::from_secs(5), "followed the new address within 5 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    eprintln!("requests followed the name's new address after {:?}", moved.elapsed());
}

/// `ssl-passthrough` with `--enable-ssl-passthrough`: a TLS connection whose SNI names the host
/// goes to the backend undecrypted. The client completes its handshake with the backend's own
/// certificate (trusting only the backend's CA) and the backend answers; another host on the
/// same port still ends TLS in tidegate. Without the flag the annotation is reported and TLS
/// ends in tidegate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_passthrough_sends_tls_to_the_backend_undecrypted() {
    let ca = Ca::new("backend CA");
    let cert = ca.issue(&["pass.test"]);
    let backend = tls_echo("secure", &cert, &[b"http/1.1"], None).await;
    let web = echo("t", "web").await;
    let mut manifests = service_yaml("t", "secure", 80, "https", &[backend]);
    manifests.push_str(&service_yaml("t", "web", 80, "http", &[web]));
    manifests.push_str(&ingress(
        "pass",
        "pass.test",
        "secure",
        &[("nginx.ingress.kubernetes.io/ssl-passthrough", "true")],
    ));
    manifests.push_str(&ingress("plain", "plain.test", "web", &[]));
    let dir = manifest_dir();
    write_manifest(dir.path(), "all.yaml", &manifests);
    for enabled in [true, false] {
        let path = dir.path().to_owned();
        let args: &'static [&'static str] = if enabled { &["--enable-ssl-passthrough"] } else { &[] };
        let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, args)).await.expect("start");
        let request = || Request::get("/x").header("host", "pass.test").body(Full::new(Bytes::new())).expect("request");
        let trusting_backend = support::tls_connector(Some(&[ca.pem.as_str()]), &[b"http/1.1"]);
        let passed = support::tls_request(&trusting_backend, tidegate.https, "pass.test", request()).await;
        if enabled {
            let passed = passed.expect("the backend's own handshake");
            assert_eq!(passed.answer.status, StatusCode::OK);
            assert_eq!(passed.answer.json()["service"], "secure", "the backend answered itself");
            assert_eq!(passed.answer.json()["sni"], "pass.test", "it saw the client's SNI");
        } else {
            assert!(
                passed.is_err(),
                "without the flag TLS ends in tidegate, whose certificate the client does not trust"
            );
            let status = tidegate.status().to_string();
            assert!(status.contains("--enable-ssl-passthrough"), "{status}");
        }
        // Another host on the same port: TLS ends in tidegate.
        let any = support::tls_connector(None, &[b"http/1.1"]);
        let plain = Request::get("/y").header("host", "plain.test").body(Full::new(Bytes::new())).expect("request");
        let terminated = support::tls_request(&any, tidegate.https, "plain.test", plain).await.expect("tidegate");
        assert_eq!(terminated.answer.json()["service"], "web");
    }
}
