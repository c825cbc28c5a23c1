//! `tidegate controller` and `tidegate proxy`: the two halves in separate processes, joined by
//! the config stream (HTTP/2, mutual TLS).
//!
//! The controller's objects come from the Kubernetes API server (the kubeconfig in `KUBECONFIG`
//! or `~/.kube/config`, else the pod's service account), or from a folder of manifests with
//! `--manifests`. Every controller replica serves the stream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tidegate_controller::Options;
use tidegate_controller::election::ElectionConfig;
use tidegate_controller::metrics::ControllerMetrics;
use tidegate_controller::publish::Publisher;
use tidegate_controller::watch::WatchConfig;
use tidegate_proxy::subscribe::Subscription;
use tidegate_proxy::{Proxy, ProxyConfig};
use tidegate_snapshot::Snapshot;

use tidegate_controller::source::{self, Sink};

use crate::error::Error;

/// Certificate files of one side of the stream.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA that signed the other side's certificates.
    pub ca: PathBuf,
}

pub(crate) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(chain)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The controller's server side: its certificate, and proxies' certificates required.
///
/// # Errors
/// When a file does not hold what it should.
pub fn server_tls(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, String> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&files.ca)?), provider())
        .build()
        .map_err(|e| e.to_string())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(&files.cert)?, private_key(&files.key)?)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The proxy's client side: the controller's CA, and its own certificate.
///
/// # Errors
/// When a file does not hold what it should.
pub fn client_tls(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(certificates(&files.cert)?, private_key(&files.key)?)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The publisher as the place configurations go.
struct Published {
    publisher: Arc<Publisher>,
    metrics: Arc<ControllerMetrics>,
    status: Arc<Mutex<Bytes>>,
    ready: Arc<AtomicBool>,
    address: String,
}

impl Sink for Published {
    fn apply(&mut self, snapshot: &Snapshot) -> Result<Vec<String>, String> {
        self.publisher.publish(snapshot.clone());
        self.metrics.snapshot_version.set(i64::try_from(snapshot.version).unwrap_or(i64::MAX));
        tracing::info!(
            version = snapshot.version,
            hosts = snapshot.routing.virtual_hosts.len(),
            "configuration published"
        );
        Ok(Vec::new())
    }

    fn set_status(&self, json: Bytes, _rejected: usize) {
        if let Ok(mut status) = self.status.lock() {
            *status = json;
        }
    }

    fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    fn release_memory() -> fn() {
        tidegate_proxy::release_free_memory
    }
}

/// Controller settings.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Read objects from this folder instead of the API server.
    pub manifests: Option<PathBuf>,
    /// What to watch on the API server; carries `options` too.
    pub watch: WatchConfig,
    pub stream_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tls: TlsFiles,
    /// What Ingress statuses report (`--publish-status-address`, comma-separated).
    pub status_address: String,
    /// `--publish-service NAMESPACE/NAME`: Ingress statuses report this Service's addresses.
    pub publish_service: Option<(String, String)>,
    /// The Lease this replica competes for; only its holder writes statuses.
    pub election: ElectionConfig,
    pub options: Options,
}

/// Runs a controller until SIGTERM or SIGINT.
///
/// # Errors
/// Only at start: TLS material, listeners, the manifest folder.
pub fn run_controller(config: &ControllerConfig) -> Result<(), Error> {
    let tls = server_tls(&config.tls).map_err(Error::Start)?;
    let publisher = Publisher::new();
    let (status, ready) = (Arc::new(Mutex::new(Bytes::from_static(b"{}"))), Arc::new(AtomicBool::new(false)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Start(e.to_string()))?;
    let stream = runtime
        .block_on(tokio::net::TcpListener::bind(config.stream_addr))
        .map_err(|e| Error::Start(format!("{}: {e}", config.stream_addr)))?;
    let admin = runtime
        .block_on(tokio::net::TcpListener::bind(config.admin_addr))
        .map_err(|e| Error::Start(format!("{}: {e}", config.admin_addr)))?;
    let (stream_addr, admin_addr) =
        (stream.local_addr().unwrap_or(config.stream_addr), admin.local_addr().unwrap_or(config.admin_addr));
    runtime.spawn(Arc::clone(&publisher).serve(stream, tls));
    let metrics = Arc::new(ControllerMetrics::default());
    runtime.spawn(serve_admin(
        admin,
        Arc::clone(&publisher),
        Arc::clone(&metrics),
        Arc::clone(&status),
        Arc::clone(&ready),
    ));
    let source = config.manifests.as_ref().map_or_else(|| "API server".to_owned(), |m| m.display().to_string());
    tracing::info!(stream = %stream_addr, admin = %admin_addr, source, "controller listening");
    let sink = Published {
        publisher: Arc::clone(&publisher),
        metrics: Arc::clone(&metrics),
        status,
        ready,
        address: config.status_address.clone(),
    };
    if config.manifests.is_none() {
        config.election.check().map_err(Error::Start)?;
    }
    if let Some(manifests) = &config.manifests {
        source::folder::run(manifests, config.options.clone(), sink)?;
    } else {
        let client = runtime
            .block_on(api_client())
            .map_err(|e| Error::Start(format!("no Kubernetes API server configuration: {e}")))?;
        let status = source::cluster::StatusConfig {
            election: config.election.clone(),
            publish_service: config.publish_service.clone(),
            addresses: config
                .status_address
                .split(',')
                .map(|a| a.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect(),
        };
        let stop = runtime.block_on(async { source::signals::stop_signals() }).map_err(Error::Signals)?;
        runtime.block_on(source::cluster::run(client, &config.watch, status, publisher, metrics, sink, stop));
    }
    tracing::info!("controller stopped");
    Ok(())
}

async fn serve_admin(
    listener: tokio::net::TcpListener,
    publisher: Arc<Publisher>,
    metrics: Arc<ControllerMetrics>,
    status: Arc<Mutex<Bytes>>,
    ready: Arc<AtomicBool>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (publisher, status, ready) = (Arc::clone(&publisher), Arc::clone(&status), Arc::clone(&ready));
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let (code, body) = match request.uri().path() {
                    "/healthz" => (StatusCode::OK, Bytes::from_static(b"ok\n")),
                    "/readyz" if ready.load(Ordering::Acquire) => (StatusCode::OK, Bytes::from_static(b"ready\n")),
                    "/readyz" => {
                        (StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"no configuration published yet\n"))
                    }
                    "/status" => (StatusCode::OK, status.lock().map(|s| s.clone()).unwrap_or_default()),
                    "/metrics" => {
                        let connected = publisher.proxies().values().filter(|p| p.connected > 0).count();
                        metrics.proxies_connected.set(i64::try_from(connected).unwrap_or(i64::MAX));
                        (StatusCode::OK, Bytes::from(metrics.encode()))
                    }
                    "/proxies" => {
                        (StatusCode::OK, Bytes::from(serde_json::to_vec(&publisher.proxies()).unwrap_or_default()))
                    }
                    _ => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
                };
                let mut response = Response::new(Full::new(body));
                *response.status_mut() = code;
                std::future::ready(Ok::<_, Infallible>(response))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Runs a proxy fed by a controller until SIGTERM or SIGINT, then drains.
///
/// # Errors
/// Only at start: TLS material, listeners.
pub fn run_proxy(
    proxy_config: &ProxyConfig,
    controllers: Vec<http::Uri>,
    name: String,
    tls: &TlsFiles,
    drain_timeout: Duration,
) -> Result<(), Error> {
    let client = client_tls(tls).map_err(Error::Start)?;
    let proxy = Proxy::start(proxy_config)?;
    let a = proxy.addresses();
    let list = controllers.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    tracing::info!(http = %a.http, https = %a.https, admin = %a.admin, controllers = %list, "listening");
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::Start(e.to_string()))?;
    let subscription = Subscription { controllers, name, tls: client };
    let subscriber = proxy.clone();
    std::thread::Builder::new()
        .name("config-stream".into())
        .spawn(move || runtime.block_on(tidegate_proxy::subscribe::run(subscriber, subscription)))
        .map_err(|e| Error::Start(e.to_string()))?;
    source::signals::wait_for_signal().map_err(Error::Signals)?;
    tracing::info!(timeout_s = drain_timeout.as_secs_f64(), "draining: no new connections, open ones finish");
    let left = proxy.drain(drain_timeout);
    tracing::info!(connections_cut = left, "stopped");
    Ok(())
}

/// The objects of the cluster the kubeconfig names, listed once (for `tidegate report`): the
/// controller's own watches, until each has listed, then the inputs they hold.
///
/// # Errors
/// When the API server cannot be reached or does not answer every list within 30 s.
pub fn list_inputs(options: tidegate_controller::Options) -> Result<tidegate_controller::Inputs, String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let client = api_client().await?;
        let config = WatchConfig { options, ..WatchConfig::default() };
        let watched = tidegate_controller::watch::Watched::start(&client, &config);
        let listed = async {
            while !watched.synced() {
                watched.changed().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), listed)
            .await
            .map_err(|_| "the API server did not answer every list within 30 s".to_owned())?;
        let mut data = tidegate_controller::watch::SecretData::default();
        let (inputs, invalid) = watched.inputs(&client, &mut data).await;
        for object in invalid {
            eprintln!("{object:?}");
        }
        Ok(inputs)
    })
}

/// A client for the API server found the way kubectl finds it, whose requests say who sends
/// them (`User-Agent: tidegate/VERSION`), for audit logs and the API server's metrics.
async fn api_client() -> Result<kube::Client, String> {
    let mut config = kube::Config::infer().await.map_err(|e| e.to_string())?;
    let agent = http::HeaderValue::from_static(concat!("tidegate/", env!("CARGO_PKG_VERSION")));
    config.headers.push((http::header::USER_AGENT, agent));
    kube::Client::try_from(config).map_err(|e| e.to_string())
}
