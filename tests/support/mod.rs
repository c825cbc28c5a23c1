//! Shared by the integration tests: the real `tidegate` binary on loopback, real echo upstreams,
//! real HTTP/1.1, HTTP/2 and TLS clients.
#![allow(dead_code, unreachable_pub)]

pub mod apiserver;
pub mod stream;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub type Body = Full<Bytes>;

/// Listener flags for a test instance: every port picked by the kernel, no access log.
pub const EPHEMERAL_LISTENERS: [&str; 7] =
    ["--http-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--no-access-log"];

/// A running `tidegate standalone`, killed on drop.
pub struct Tidegate {
    child: Child,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Tidegate {
    /// Starts the binary on `dir` with ports chosen by the kernel and waits until it is ready.
    pub fn start(dir: &Path, extra: &[&str]) -> Tidegate {
        let mut args: Vec<String> = vec!["standalone".into(), "--manifests".into(), dir.display().to_string()];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Tidegate::run(&args, dir)
    }

    /// `tidegate proxy` fed by a controller; waits until it serves a configuration.
    pub fn proxy(controller: &str, name: &str, tls: &[String], dir: &Path) -> Tidegate {
        Tidegate::proxy_of(&[controller.to_owned()], name, tls, dir)
    }

    /// `tidegate proxy` with several controller replicas.
    pub fn proxy_of(controllers: &[String], name: &str, tls: &[String], dir: &Path) -> Tidegate {
        let mut args: Vec<String> = vec!["proxy".into(), "--name".into(), name.into()];
        for controller in controllers {
            args.extend(["--controller".into(), controller.clone()]);
        }
        args.extend(tls.iter().cloned());
        Tidegate::run(&args, dir)
    }

    fn run(args: &[String], dir: &Path) -> Tidegate {
        // Two workers unless the test says how many.
        let workers = if args.iter().any(|a| a == "--workers") { vec![] } else { vec!["--workers".into(), "2".into()] };
        let all: Vec<String> =
            args.iter().cloned().chain(EPHEMERAL_LISTENERS.iter().map(|s| (*s).to_owned())).chain(workers).collect();
        let (child, line, logs) = spawn_logged(&all, "listening");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        let field = |k: &str| v["fields"][k].as_str().expect("address field").parse().expect("socket address");
        let tidegate = Tidegate {
            http: field("http"),
            https: field("https"),
            admin: field("admin"),
            child,
            dir: dir.to_owned(),
            logs,
        };
        tidegate.wait_ready();
        tidegate
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(body) = admin_get(self.admin, "/readyz")
                && body.starts_with("ready")
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tidegate did not become ready; logs:\n{}", self.logs().join("\n"));
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        sigterm(self.pid());
    }

    /// Waits for the process to exit, returning its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Every stderr line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log lock").clone()
    }

    /// Whether a log line containing `needle` arrives within `limit` (lines reach the log
    /// reader a little after the response that caused them).
    pub fn logged_within(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.logs().iter().any(|l| l.contains(needle)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Lines of level ERROR or WARN whose message contains `needle`.
    pub fn problems_mentioning(&self, needle: &str) -> Vec<String> {
        self.logs()
            .into_iter()
            .filter(|l| (l.contains("\"ERROR\"") || l.contains("\"WARN\"")) && l.contains(needle))
            .collect()
    }

    /// The admin `/status` document.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&admin_get(self.admin, "/status").expect("status")).expect("status json")
    }

    /// The version of the configuration being served.
    pub fn version(&self) -> u64 {
        self.status()["version"].as_u64().unwrap_or(0)
    }

    /// Waits until a configuration newer than `after` is served.
    pub fn wait_version_after(&self, after: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.version();
            if v > after {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no configuration after version {after}; logs:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Tidegate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGTERM to `pid` (through kill(1): no unsafe code here).
pub fn sigterm(pid: u32) {
    let status = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("kill runs");
    assert!(status.success());
}

/// Starts the binary with `args` (JSON logs) and waits for a log line whose message is
/// `announce`; returns the child, that line, and every log line as it comes.
pub fn spawn_logged(args: &[String], announce: &str) -> (Child, String, Arc<Mutex<Vec<String>>>) {
    spawn_logged_with(args, &[], announce)
}

/// [`spawn_logged`] with environment variables set for the child.
pub fn spawn_logged_with(
    args: &[String],
    env: &[(&str, &Path)],
    announce: &str,
) -> (Child, String, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["--log-format", "json"])
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tidegate binary starts");
    let stderr = child.stderr.take().expect("stderr piped");
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = Arc::clone(&logs);
    let needle = format!("\"message\":\"{announce}\"");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(&needle) {
                let _ = tx.send(line.clone());
            }
            sink.lock().expect("log lock").push(line);
        }
    });
    let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) else {
        std::thread::sleep(Duration::from_millis(100));
        panic!("tidegate did not announce {announce:?}; its output:\n{}", logs.lock().expect("log lock").join("\n"));
    };
    (child, line, logs)
}

/// A blocking GET on the admin port (plain HTTP/1.0, no client library needed).
pub fn admin_get(admin: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// A folder of manifests that is removed when dropped.
pub fn manifest_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("tidegate-test-").tempdir().expect("temp dir")
}

/// Writes a manifest atomically (write then rename), as `kubectl`-style tools and editors do.
pub fn write_manifest(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, dir.join(name)).expect("rename manifest");
}

/// An echo backend on a loopback port, serving until the test's runtime ends.
pub async fn echo(namespace: &str, service: &str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let identity = tidegate::echo::Identity {
        namespace: namespace.into(),
        service: service.into(),
        pod: format!("{service}-{}", addr.port()),
        ..Default::default()
    };
    tokio::spawn(tidegate::echo::serve(listener, identity));
    addr
}

/// An Ingress `name` in namespace `t` for `host`, path `/` to port 80 of Service `service`,
/// with annotations.
pub fn ingress_to(name: &str, host: &str, service: &str, annotations: &[(&str, &str)]) -> String {
    let mut meta = format!("metadata:\n  name: {name}\n  namespace: t\n");
    if !annotations.is_empty() {
        meta.push_str("  annotations:\n");
        for (key, value) in annotations {
            meta.push_str(&format!("    {key}: {value:?}\n"));
        }
    }
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\n{meta}spec:\n  ingressClassName: tidegate\n  rules:\n  - host: {host}\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: {service}, port: {{number: 80}}}}}}}}\n"
    )
}

/// A Service `name` with port `port` (named `port_name`), and an EndpointSlice sending it to
/// `endpoints` (loopback servers).
pub fn service_yaml(namespace: &str, name: &str, port: u16, port_name: &str, endpoints: &[SocketAddr]) -> String {
    let target = endpoints.first().map_or(1, SocketAddr::port);
    let mut out = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  ports: [{{name: {port_name}, port: {port}, targetPort: {target}}}]\n"
    );
    // One slice per endpoint port: EndpointSlice ports apply to all endpoints of a slice.
    for (i, endpoint) in endpoints.iter().enumerate() {
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{i}\n  namespace: {namespace}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: {port_name}, port: {}}}]\nendpoints:\n- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n",
            endpoint.port(),
            endpoint.ip()
        ));
    }
    out
}

/// A response with its body read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn served_by(&self) -> String {
        self.json()["service"].as_str().unwrap_or("").to_owned()
    }
}

async fn collect(response: Response<hyper::body::Incoming>) -> Result<Answer, String> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Answer { status: parts.status, version: parts.version, headers: parts.headers, body })
}

/// An HTTP/1.1 connection that stays open between requests.
pub struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Body>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> Result<H1, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        // No limit on response headers short of what a server may send (hyper's default is 100).
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_headers(1000)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(H1 { sender })
    }

    pub async fn send(&mut self, request: Request<Body>) -> Result<Answer, String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let response = self.sender.send_request(request).await.map_err(|e| e.to_string())?;
        collect(response).await
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<Answer, String> {
        self.send(get_request(host, path)).await
    }
}

pub fn get_request(host: &str, path: &str) -> Request<Body> {
    Request::get(path).header("host", host).body(Body::default()).expect("request")
}

/// One GET on a new HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Answer, String> {
    H1::connect(addr).await?.get(host, path).await
}

/// One request over HTTP/2 with prior knowledge (h2c) on a new connection.
pub async fn h2c(addr: SocketAddr, request: Request<Body>) -> Result<Answer, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    h2_over(TokioIo::new(stream), request).await
}

async fn h2_over<T>(io: TokioIo<T>, request: Request<Body>) -> Result<Answer, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    collect(response).await
}

/// A self-signed certificate and key for `hosts`, as PEM.
pub fn self_signed(hosts: &[&str]) -> (String, String) {
    let names = hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>();
    let c = rcgen::generate_simple_self_signed(names).expect("generate certificate");
    (c.cert.pem(), c.signing_key.serialize_pem())
}

pub fn tls_secret_yaml(namespace: &str, name: &str, cert_pem: &str, key_pem: &str) -> String {
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(cert_pem),
        indent(key_pem)
    )
}

/// What a TLS handshake negotiated.
pub struct TlsAnswer {
    pub answer: Answer,
    /// DER of the certificate the server presented.
    pub peer_certificate: Vec<u8>,
    pub alpn: Option<Vec<u8>>,
}

/// A TLS client that trusts `trusted` (PEM certificates) or, with `None`, accepts any
/// certificate (to look at the default one).
pub fn tls_connector(trusted: Option<&[&str]>, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    tls_connector_with_versions(trusted, alpn, rustls::DEFAULT_VERSIONS)
}

/// [`tls_connector`] offering only `versions`.
pub fn tls_connector_with_versions(
    trusted: Option<&[&str]>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .expect("versions");
    let mut config = match trusted {
        Some(pems) => {
            let mut roots = rustls::RootCertStore::empty();
            for pem in pems {
                use rustls_pki_types::pem::PemObject;
                for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    roots.add(cert.expect("pem")).expect("add root");
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAny(provider))).with_no_client_auth()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TLS client that accepts any server certificate and presents `client` (certificate chain
/// PEM, key PEM) when the server asks for one.
pub fn tls_connector_with_client(client: Option<(&str, &str)>, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)));
    let mut config = match client {
        Some((chain, key)) => {
            let chain =
                rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<Vec<_>, _>>();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
            builder.with_client_auth_cert(chain.expect("chain"), key).expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One request over TLS to `addr` with SNI `server_name`; HTTP/2 when ALPN picks h2.
pub async fn tls_request(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    server_name: &str,
    request: Request<Body>,
) -> Result<TlsAnswer, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    let tls = connector.connect(name, stream).await.map_err(|e| format!("TLS handshake: {e}"))?;
    let (_, session) = tls.get_ref();
    let peer_certificate = session.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let answer = if alpn.as_deref() == Some(b"h2") {
        h2_over(TokioIo::new(tls), request).await?
    } else {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        collect(sender.send_request(request).await.map_err(|e| e.to_string())?).await?
    };
    Ok(TlsAnswer { answer, peer_certificate, alpn })
}

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Canonical names of the headers an echo saw.
pub fn echoed_headers(answer: &Answer) -> BTreeMap<String, Vec<String>> {
    serde_json::from_value(answer.json()["headers"].clone()).unwrap_or_default()
}

/// `tidegate standalone` with its access log on (the other tests' proxies have it off), one
/// worker, and every stdout line kept: the tests of what it logs.
pub struct AccessLogged {
    child: Child,
    pub http: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl AccessLogged {
    pub fn start(dir: &Path, extra: &[&str]) -> AccessLogged {
        let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tidegate"))
            .args(["standalone", "--manifests", &dir.display().to_string(), "--http-addr", &http.to_string()])
            .args(["--https-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--workers", "1"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tidegate starts");
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let (stdout, sink) = (child.stdout.take().expect("stdout"), Arc::clone(&lines));
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lock").push(line);
            }
        });
        AccessLogged { child, http, lines }
    }

    /// Whether a line logged so far contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.lines.lock().expect("lock").iter().any(|l| l.contains(text))
    }

    /// The first line that contains `text`, waiting for it until `deadline`.
    pub async fn line_with(&self, text: &str, deadline: Instant) -> String {
        loop {
            if let Some(line) = self.lines.lock().expect("lock").iter().find(|l| l.contains(text)).cloned() {
                return line;
            }
            assert!(Instant::now() < deadline, "a line with {text:?} logged in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for AccessLogged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
