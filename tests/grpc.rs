//! gRPC end to end through the real binary, with a real gRPC server and client (grpcio, from
//! Debian's `python3-grpcio`, which `.ci/run` installs; the peer is `tests/grpc/peer.py`): the
//! four call kinds, trailers, status details, deadlines, a large message, a backend that is
//! down, over h2c and over TLS on both sides. Without grpcio the test prints a one-line skip
//! (under `CI` it fails instead).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{Tidegate, h2c, manifest_dir, self_signed, service_yaml, tls_secret_yaml, write_manifest};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc/peer.py");

/// A Python with grpcio: `TIDEGATE_PYTHON`, Debian's, or the one on `PATH`.
fn python() -> Option<String> {
    let candidates = std::env::var("TIDEGATE_PYTHON").into_iter().chain(["/usr/bin/python3".into(), "python3".into()]);
    candidates
        .into_iter()
        .find(|python| Command::new(python).args(["-c", "import grpc"]).output().is_ok_and(|out| out.status.success()))
}

/// The gRPC server, until dropped.
struct Server {
    child: Child,
    address: SocketAddr,
}

impl Server {
    fn start(python: &str, tls: Option<(&std::path::Path, &std::path::Path)>) -> Server {
        let mut command = Command::new(python);
        command.arg(PEER).arg("serve");
        if let Some((cert, key)) = tls {
            command.arg("--tls").arg(cert).arg(key);
        }
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("gRPC server");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("port");
        let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("the gRPC server printed {line:?}"));
        Server { child, address: SocketAddr::from(([127, 0, 0, 1], port)) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the client's calls through `target` as `authority`; `ca`: the TLS trust, when over TLS.
fn calls(python: &str, target: SocketAddr, authority: &str, ca: Option<&std::path::Path>) -> serde_json::Value {
    let mut command = Command::new(python);
    command.arg(PEER).arg("call").arg(target.to_string()).arg(authority);
    if let Some(ca) = ca {
        command.arg("--tls").arg(ca);
    }
    let out = command.output().expect("gRPC client");
    assert!(out.status.success(), "gRPC client: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("client output ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// An Ingress to a gRPC backend, its body limit raised to 8m (nginx's `client_max_body_size`
/// applies to gRPC calls too) unless `body_limit` says.
fn ingress(name: &str, host: &str, service: &str, protocol: &str, tls: bool) -> String {
    ingress_limited(name, host, service, protocol, tls, "8m")
}

fn ingress_limited(name: &str, host: &str, service: &str, protocol: &str, tls: bool, body_limit: &str) -> String {
    let tls = if tls { format!("  tls:\n  - hosts: [{host}]\n    secretName: {name}-tls\n") } else { String::new() };
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: {name}\n  namespace: t\n  annotations:\n    nginx.ingress.kubernetes.io/backend-protocol: {protocol}\n    nginx.ingress.kubernetes.io/proxy-body-size: {body_limit}\nspec:\n  ingressClassName: tidegate\n{tls}  rules:\n  - host: {host}\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: {service}, port: {{number: 80}}}}}}}}\n"
    )
}

/// Every call kind passes through unchanged, over h2c and over TLS to tidegate and to the
/// backend; a backend that is down is `UNAVAILABLE`; a call past its deadline is
/// `DEADLINE_EXCEEDED`, and tidegate answers it so itself when the backend keeps silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_pass_through() {
    let Some(python) = python() else {
        assert!(std::env::var_os("CI").is_none(), "gRPC tests need python3-grpcio under CI");
        println!("skipped: no Python with grpcio (Debian's python3-grpcio); gRPC tests not run");
        return;
    };
    let dir = manifest_dir();
    let (backend_cert, backend_key) = self_signed(&["grpc-backend.test"]);
    let (cert_path, key_path) = (dir.path().join("backend.crt"), dir.path().join("backend.key"));
    std::fs::write(&cert_path, &backend_cert).expect("write");
    std::fs::write(&key_path, &backend_key).expect("write");
    let plain = Server::start(&python, None);
    let tls = Server::start(&python, Some((&cert_path, &key_path)));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");

    let (front_cert, front_key) = self_signed(&["grpcs.test"]);
    let front_ca = dir.path().join("front.crt");
    std::fs::write(&front_ca, &front_cert).expect("write");
    let mut manifests = service_yaml("t", "plain", 80, "grpc", &[plain.address]);
    manifests.push_str(&service_yaml("t", "tls", 80, "grpcs", &[tls.address]));
    manifests.push_str(&service_yaml("t", "down", 80, "grpc", &[closed]));
    manifests.push_str(&tls_secret_yaml("t", "grpcs-tls", &front_cert, &front_key));
    manifests.push_str(&ingress("grpc", "grpc.test", "plain", "GRPC", false));
    manifests.push_str(&ingress("grpcs", "grpcs.test", "tls", "GRPCS", true));
    manifests.push_str(&ingress("down", "down.test", "down", "GRPC", false));
    manifests.push_str(&ingress_limited("small", "small.test", "plain", "GRPC", false, "1m"));
    // A backend that knows nothing of deadlines: tidegate's echo, over h2c.
    let slow = support::echo("t", "slow").await;
    manifests.push_str(&service_yaml("t", "slow", 80, "h2c", &[slow]));
    manifests.push_str(&ingress("slow", "slow.test", "slow", "GRPC", false));
    // The manifests folder holds the PEM files too; only YAML is read.
    write_manifest(dir.path(), "all.yaml", &manifests);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");

    let expected = serde_json::json!({
        "unary": {"ok": ["echo:hello", "unary"]},
        "server_stream": {"ok": ["item-0", "item-1", "item-2", "item-3", "item-4"]},
        "client_stream": {"ok": "3 messages, 60 bytes"},
        "bidi": {"ok": ["ONE", "TWO", "THREE"]},
        "large": {"ok": 3_000_005},
        "error": {"code": "INVALID_ARGUMENT", "details": "details: the request asked to fail"},
    });
    let (http, https) = (tidegate.http, tidegate.https);
    let (py, ca) = (python.clone(), front_ca.clone());
    let (over_h2c, over_tls) = tokio::task::spawn_blocking(move || {
        (calls(&py, http, "grpc.test", None), calls(&py, https, "grpcs.test", Some(&ca)))
    })
    .await
    .expect("clients");
    for (name, results) in [("h2c to GRPC", &over_h2c), ("TLS to GRPCS", &over_tls)] {
        for (call, want) in expected.as_object().expect("object") {
            assert_eq!(&results[call], want, "{name}: {call}");
        }
        assert_eq!(results["deadline"]["code"], "DEADLINE_EXCEEDED", "{name}: {}", results["deadline"]);
    }

    let py = python.clone();
    let down = tokio::task::spawn_blocking(move || calls(&py, http, "down.test", None)).await.expect("client");
    assert_eq!(down["unary"]["code"], "UNAVAILABLE", "a backend that is down: {}", down["unary"]);
    let py = python.clone();
    let small = tokio::task::spawn_blocking(move || calls(&py, http, "small.test", None)).await.expect("client");
    assert_eq!(small["unary"], expected["unary"]);
    assert_eq!(small["large"]["code"], "RESOURCE_EXHAUSTED", "3 MB over a 1m body limit: {}", small["large"]);

    // tidegate's own answer when the call's deadline passes before the backend answers (one
    // that does not enforce deadlines itself): HTTP 200 with grpc-status 4, not an HTTP 504.
    let request = Request::post("http://slow.test/test.Echo/Unary?delay_ms=3000")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 1, b'x'])))
        .expect("request");
    let started = std::time::Instant::now();
    let answer = h2c(http, request).await.expect("answer");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["grpc-status"], "4", "{:?}", answer.headers);
    assert_eq!(answer.headers["grpc-message"], "504 Gateway Timeout");
    assert!(started.elapsed() < std::time::Duration::from_millis(2500), "the deadline, not the backend, ended it");
    drop((plain, tls));
}
