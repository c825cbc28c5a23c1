//! The config stream's two ends as tests start them: a CA for mutual TLS, a controller.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;

use super::{Tidegate, admin_get, get, spawn_logged_with};

/// A CA and certificates it signs, written as PEM files into `dir`.
pub struct Pki {
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub ca_pem: String,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("CA");
        Pki { ca_pem: cert.pem(), ca: rcgen::Issuer::new(params, key) }
    }

    /// Writes `<tag>.crt`, `<tag>.key` for `names` and `ca.crt`; returns the flags for them.
    pub fn issue(&self, dir: &Path, tag: &str, names: &[&str], ca_for_peer: &str) -> Vec<String> {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("signed");
        let (crt, key_path, ca) =
            (dir.join(format!("{tag}.crt")), dir.join(format!("{tag}.key")), dir.join(format!("{tag}-peer-ca.crt")));
        std::fs::write(&crt, cert.pem()).expect("write");
        std::fs::write(&key_path, key.serialize_pem()).expect("write");
        std::fs::write(&ca, ca_for_peer).expect("write");
        vec![
            "--tls-cert".into(),
            crt.display().to_string(),
            "--tls-key".into(),
            key_path.display().to_string(),
            "--tls-ca".into(),
            ca.display().to_string(),
        ]
    }
}

pub struct Controller {
    child: Child,
    pub stream: SocketAddr,
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Controller {
    /// `tidegate controller` on a folder of manifests.
    pub fn start(manifests: &Path, tls: &[String], stream: &str) -> Controller {
        let args = ["--manifests".to_owned(), manifests.display().to_string()];
        Controller::run(&args, tls, stream, &[])
    }

    /// `tidegate controller` on the API server `kubeconfig` points at, with `extra` flags.
    pub fn on_api(kubeconfig: &Path, tls: &[String], stream: &str, extra: &[&str]) -> Controller {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        Controller::run(&extra, tls, stream, &[("KUBECONFIG", kubeconfig)])
    }

    fn run(source: &[String], tls: &[String], stream: &str, env: &[(&str, &Path)]) -> Controller {
        let mut args: Vec<String> = vec!["controller".into()];
        args.extend(source.iter().cloned());
        args.extend(["--stream-addr".into(), stream.into(), "--admin-addr".into(), "127.0.0.1:0".into()]);
        args.extend(tls.iter().cloned());
        let (child, line, logs) = spawn_logged_with(&args, env, "controller listening");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        let field = |k: &str| v["fields"][k].as_str().expect("field").parse().expect("address");
        Controller { child, stream: field("stream"), admin: field("admin"), logs }
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("logs").clone()
    }

    /// Sends SIGTERM, as Kubernetes does to a pod it stops.
    pub fn terminate(&self) {
        super::sigterm(self.child.id());
    }

    /// Stops it at once (SIGKILL), as a crashed pod would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn proxies(&self) -> serde_json::Value {
        serde_json::from_str(&admin_get(self.admin, "/proxies").unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn serves(proxy: &Tidegate, host: &str) -> bool {
    get(proxy.http, host, "/").await.is_ok_and(|a| a.status == StatusCode::OK)
}

pub async fn until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}
