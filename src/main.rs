//! `tidegate`: one binary, one subcommand per process role.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidegate::{cluster, echo, standalone};
use tidegate_controller::Options;
use tidegate_controller::manifests::parse_file;
use tidegate_proxy::ProxyConfig;

#[derive(Parser)]
#[command(
    name = "tidegate",
    version,
    about = "Kubernetes ingress controller whose proxy runs Lua handlers, OpenResty-style"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// What is logged: a level (`info`, `debug`, ...) or per-target directives
    /// (`info,lua=debug` adds `ngx.log(ngx.DEBUG, ...)` lines). `RUST_LOG`, when set, wins.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReportFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Ingresses of a folder of manifests, applying every change live.
    Standalone(StandaloneArgs),
    /// Translate objects into configurations and stream them to proxies (mutual TLS).
    Controller(ControllerArgs),
    /// Serve traffic with the configurations a controller streams; keep the last good one.
    Proxy(ProxyCommandArgs),
    /// Check manifests offline: parse, validate and translate, and print every problem.
    Validate {
        /// Manifest files (YAML, multi-document).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// References to objects not among the files (a Service, Secret or ConfigMap that is
        /// in the cluster) are errors too; without it they are warnings.
        #[arg(long)]
        strict: bool,
        #[command(flatten)]
        translation: TranslationArgs,
    },
    /// Report how tidegate takes existing Ingresses: every annotation and snippet line as
    /// honoured, translated, ignored or failing closed, with what to write instead, and the
    /// coverage. Exits 1 when an Ingress would answer 503 or the coverage is under
    /// `--min-coverage`.
    Report {
        /// Manifest files or folders (YAML, multi-document); none with `--cluster`.
        paths: Vec<PathBuf>,
        /// Read the objects from the cluster the kubeconfig names (as kubectl finds it).
        #[arg(long, conflicts_with = "paths")]
        cluster: bool,
        /// `text` for people, `json` for pipelines.
        #[arg(long, value_enum, default_value = "text")]
        format: ReportFormat,
        /// The least coverage (percent of annotation uses honoured or translated) that exits 0.
        #[arg(long, default_value_t = 0.0)]
        min_coverage: f64,
        /// Exit 0 even when some Ingress would answer 503 (the coverage still counts).
        #[arg(long)]
        allow_closed: bool,
        /// References to objects not among the files fail closed too.
        #[arg(long)]
        strict: bool,
        #[command(flatten)]
        translation: TranslationArgs,
    },
    /// Print the CustomResourceDefinitions tidegate serves (what `crds/` holds).
    Crd,
    /// A small backend that answers every request with a JSON description of it.
    Echo {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// The service name it reports.
        #[arg(long, default_value = "echo")]
        service: String,
        #[arg(long, default_value = "default")]
        namespace: String,
    },
}

/// How objects are read.
#[derive(clap::Args, Clone)]
struct TranslationArgs {
    /// IngressClass name that is ours.
    #[arg(long, default_value = "tidegate")]
    ingress_class: String,
    /// Also serve Ingresses that name no class.
    #[arg(long)]
    watch_ingress_without_class: bool,
    /// Let Ingresses ask for `ssl-passthrough`: TLS connections for their hosts go to the
    /// backend undecrypted (as ingress-nginx's flag of the same name).
    #[arg(long)]
    enable_ssl_passthrough: bool,
    /// Accept inline Lua in Ingress annotations (`tidegate.dev/access-by-lua` and the other
    /// phases). Off by default: whoever may edit an Ingress could then run code in the proxy.
    #[arg(long)]
    allow_snippet_annotations: bool,
    /// `NAMESPACE/NAME` of a TLS Secret served to names no Ingress or LuaRoute claims (instead
    /// of the proxies' self-signed certificate).
    #[arg(long, value_parser = parse_namespaced)]
    default_ssl_certificate: Option<(String, String)>,
    /// `NAMESPACE/NAME` of the ConfigMap of cluster-wide settings, with ingress-nginx's keys
    /// (`proxy-body-size`, `limit-req-status-code`, `global-auth-url`, `block-cidrs`...). In
    /// standalone mode it is read from the manifests folder. Its `global-auth-*` keys take the
    /// place of the `--global-auth-*` flags.
    #[arg(long, value_parser = parse_namespaced)]
    configmap: Option<(String, String)>,
    /// `NAMESPACE/NAME` of the Service (its first port) that answers requests no route matches,
    /// unless an Ingress's `spec.defaultBackend` does, and serves the error pages of
    /// `custom-http-errors` for Ingresses without the `default-backend` annotation.
    #[arg(long, value_parser = parse_namespaced)]
    default_backend_service: Option<(String, String)>,
    /// `NAME=SIZE` (e.g. `limits=10Mi`): an `ngx.shared` dictionary Lua of every namespace
    /// reaches, unless its namespace declares one of the same name (repeatable).
    #[arg(long = "shared-dict", value_parser = parse_shared_dict)]
    shared_dicts: Vec<(String, u64)>,
    /// The namespace whose Lua modules (ConfigMaps labelled `tidegate.dev/lua-modules`) every
    /// namespace may `require`; a namespace's own modules of the same name come first.
    #[arg(long)]
    lua_modules_namespace: Option<String>,
    /// External auth for every Ingress (and LuaRoute route) without one of its own, unless it
    /// sets `enable-global-auth: "false"` (`policies.globalAuth: false`): an `http://` or
    /// `https://` URL, nginx variables allowed (ingress-nginx's `global-auth-url`). The other `--global-auth-*` flags are the `auth-*` annotations of the
    /// same names.
    #[arg(long)]
    global_auth_url: Option<String>,
    #[arg(long)]
    global_auth_method: Option<String>,
    #[arg(long)]
    global_auth_signin: Option<String>,
    #[arg(long)]
    global_auth_signin_redirect_param: Option<String>,
    #[arg(long)]
    global_auth_response_headers: Option<String>,
    #[arg(long)]
    global_auth_request_redirect: Option<String>,
    #[arg(long)]
    global_auth_always_set_cookie: bool,
}

fn parse_shared_dict(text: &str) -> Result<(String, u64), String> {
    let (name, size) = text.split_once('=').ok_or_else(|| format!("{text:?} is not NAME=SIZE"))?;
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{name:?} is not a Lua name"));
    }
    Ok((name.to_owned(), tidegate_controller::luaroute::parse_quantity(size)?))
}

impl TranslationArgs {
    /// The options; `Err` when a `--global-auth-*` flag does not read.
    fn options(&self) -> Result<Options, String> {
        let always = self.global_auth_always_set_cookie.then_some("true");
        let flags = [
            ("auth-url", self.global_auth_url.as_deref()),
            ("auth-method", self.global_auth_method.as_deref()),
            ("auth-signin", self.global_auth_signin.as_deref()),
            ("auth-signin-redirect-param", self.global_auth_signin_redirect_param.as_deref()),
            ("auth-response-headers", self.global_auth_response_headers.as_deref()),
            ("auth-request-redirect", self.global_auth_request_redirect.as_deref()),
            ("auth-always-set-cookie", always),
        ];
        let set: Vec<(&str, &str)> = flags.iter().filter_map(|(k, v)| Some((*k, (*v)?))).collect();
        if self.global_auth_url.is_none() && !set.is_empty() {
            return Err("the --global-auth-* flags need --global-auth-url".into());
        }
        Ok(Options {
            ingress_class: self.ingress_class.clone(),
            watch_ingress_without_class: self.watch_ingress_without_class,
            allow_snippet_annotations: self.allow_snippet_annotations,
            default_certificate: self.default_ssl_certificate.clone(),
            shared_dicts: self.shared_dicts.clone(),
            global_auth: tidegate_controller::translate::global_auth(&set)?,
            configmap: self.configmap.clone(),
            default_backend_service: self.default_backend_service.clone(),
            enable_ssl_passthrough: self.enable_ssl_passthrough,
            lua_modules_namespace: self.lua_modules_namespace.clone(),
        })
    }
}

/// How the proxy listens and behaves.
#[derive(clap::Args, Clone)]
struct ProxyArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8443")]
    https_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin_addr: SocketAddr,
    /// Worker threads (default: number of cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Strict-Transport-Security max-age on TLS responses; 0 disables HSTS.
    #[arg(long, default_value_t = 31_536_000)]
    hsts_max_age: u64,
    /// Port used in HTTP-to-HTTPS redirects (default: the HTTPS listener's).
    #[arg(long)]
    https_redirect_port: Option<u16>,
    /// Turn off the JSON access log on stdout.
    #[arg(long)]
    no_access_log: bool,
    /// On SIGTERM or SIGINT, how long open connections may take to finish.
    #[arg(long, default_value_t = 30)]
    drain_timeout_seconds: u64,
    /// Lua time allowed per request (milliseconds), unless a LuaRoute sets `cpuBudget`.
    #[arg(long, default_value_t = 100)]
    lua_cpu_budget_ms: u64,
    /// Memory allowed to each worker's Lua VM (MiB).
    #[arg(long, default_value_t = 128)]
    lua_memory_limit_mb: usize,
    /// PEM bundle of certificate authorities that Lua cosockets trust in `sslhandshake`, in
    /// addition to the system's.
    #[arg(long)]
    lua_ssl_trusted_certificate: Option<PathBuf>,
    /// Address range (CIDR, or one address) that Lua cosockets may not connect to; repeatable.
    /// Giving it replaces the default, link-local (where cloud metadata services answer). Add
    /// the Kubernetes API server's and the nodes' ranges when tenants write Lua.
    #[arg(long, value_name = "CIDR", default_values = ["169.254.0.0/16", "fe80::/10"])]
    lua_socket_deny: Vec<tidegate_proxy::Network>,
    /// Begin `ngx.log` and `print` lines as OpenResty does, `[lua] <source>:<line>: <message>`
    /// (the source is the LuaRoute field or module), for log parsing written for OpenResty; the
    /// structured fields (route, phase, request id) stay.
    #[arg(long)]
    lua_openresty_log_lines: bool,
    /// Streams one HTTP/2 client connection may have open at once (100, as Envoy's edge
    /// guidance advises).
    #[arg(long, default_value_t = 100)]
    http2_max_concurrent_streams: u32,
    /// Name server (`ADDRESS:PORT`) to resolve ExternalName Services with, instead of the
    /// system's (`/etc/resolv.conf`); repeatable.
    #[arg(long, value_name = "ADDRESS:PORT")]
    dns_server: Vec<std::net::SocketAddr>,
}

impl ProxyArgs {
    fn config(&self) -> Result<ProxyConfig, String> {
        let roots = tidegate::trust::lua_trust_store(self.lua_ssl_trusted_certificate.as_deref())
            .map_err(|e| format!("--lua-ssl-trusted-certificate: {e}"))?;
        Ok(ProxyConfig {
            http_addr: self.http_addr,
            https_addr: self.https_addr,
            admin_addr: self.admin_addr,
            workers: self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from)),
            hsts_max_age: self.hsts_max_age,
            https_redirect_port: self.https_redirect_port,
            access_log: !self.no_access_log,
            lua_cpu_budget: std::time::Duration::from_millis(self.lua_cpu_budget_ms),
            lua_memory_limit: self.lua_memory_limit_mb << 20,
            lua_tls_roots: std::sync::Arc::new(roots),
            lua_socket_deny: std::sync::Arc::new(self.lua_socket_deny.clone()),
            lua_openresty_log_lines: self.lua_openresty_log_lines,
            http2_max_concurrent_streams: self.http2_max_concurrent_streams,
            dns_servers: self.dns_server.clone(),
        })
    }
}

/// Certificates for the config stream.
#[derive(clap::Args, Clone)]
struct TlsArgs {
    /// This side's certificate chain (PEM).
    #[arg(long)]
    tls_cert: PathBuf,
    /// This side's private key (PEM).
    #[arg(long)]
    tls_key: PathBuf,
    /// CA that signed the other side's certificates (PEM).
    #[arg(long)]
    tls_ca: PathBuf,
}

impl TlsArgs {
    fn files(&self) -> cluster::TlsFiles {
        cluster::TlsFiles { cert: self.tls_cert.clone(), key: self.tls_key.clone(), ca: self.tls_ca.clone() }
    }
}

#[derive(clap::Args)]
struct StandaloneArgs {
    /// Folder of Kubernetes manifests (*.yaml, *.yml).
    #[arg(long)]
    manifests: PathBuf,
    #[command(flatten)]
    proxy: ProxyArgs,
    #[command(flatten)]
    translation: TranslationArgs,
    /// Also run the built-in echo backend on this address (for trying tidegate out; the
    /// shipped examples point their Service at 127.0.0.1:9000).
    #[arg(long)]
    echo_backend: Option<SocketAddr>,
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Read objects from this folder of manifests instead of the Kubernetes API server.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Watch only this namespace (repeatable); every namespace when absent.
    #[arg(long = "watch-namespace")]
    watch_namespaces: Vec<String>,
    /// Watch only the `kubernetes.io/tls` Secrets with these labels (`key=value,...`).
    #[arg(long)]
    secret_label_selector: Option<String>,
    /// Where proxies subscribe.
    #[arg(long, default_value = "127.0.0.1:9443")]
    stream_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9902")]
    admin_addr: SocketAddr,
    /// Addresses (IPs or host names, comma-separated) Ingress statuses report as where they are
    /// exposed.
    #[arg(long, default_value = "")]
    publish_status_address: String,
    /// `NAMESPACE/NAME` of the proxies' Service: Ingress statuses report its load-balancer
    /// addresses (instead of `--publish-status-address`).
    #[arg(long, value_parser = parse_namespaced)]
    publish_service: Option<(String, String)>,
    /// This replica's name in the leader-election Lease (its pod name in a cluster).
    #[arg(long, env = "HOSTNAME", default_value = "controller")]
    name: String,
    /// The Lease replicas compete for; only its holder writes statuses.
    #[arg(long, default_value = "tidegate-controller")]
    lease_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// How long the Lease holds without renewal.
    #[arg(long, default_value_t = 15.0)]
    lease_duration_seconds: f64,
    /// A leader that could not renew for this long steps down.
    #[arg(long, default_value_t = 10.0)]
    lease_renew_deadline_seconds: f64,
    /// How often the leader renews and the others try to acquire.
    #[arg(long, default_value_t = 2.0)]
    lease_retry_period_seconds: f64,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    translation: TranslationArgs,
}

#[derive(clap::Args)]
struct ProxyCommandArgs {
    /// The controller's stream, `https://host:port`; repeat for several replicas (tried in
    /// turn when one goes away).
    #[arg(long = "controller", required = true)]
    controllers: Vec<http::Uri>,
    /// This proxy's name in acknowledgements (its pod name in a cluster).
    #[arg(long, env = "HOSTNAME", default_value = "proxy")]
    name: String,
    #[command(flatten)]
    proxy: ProxyArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

fn parse_namespaced(text: &str) -> Result<(String, String), String> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok((ns.into(), name.into())),
        _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
    }
}

fn seconds(value: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(value).unwrap_or(std::time::Duration::ZERO)
}

fn proxy_config(args: &ProxyArgs) -> Option<ProxyConfig> {
    args.config().map_err(|e| tracing::error!("{e}")).ok()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held until exit: dropping it flushes the log lines still queued.
    let _log_writer = init_logging(cli.log_format, &cli.log_level);
    let options = match &cli.command {
        Command::Standalone(StandaloneArgs { translation, .. })
        | Command::Controller(ControllerArgs { translation, .. })
        | Command::Validate { translation, .. }
        | Command::Report { translation, .. } => match translation.options() {
            Ok(options) => Some(options),
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    }
    .unwrap_or_default();
    let outcome = match cli.command {
        Command::Standalone(args) => {
            if let Some(addr) = args.echo_backend
                && let Err(e) = spawn_echo(addr)
            {
                tracing::error!("cannot start the echo backend on {addr}: {e}");
                return ExitCode::FAILURE;
            }
            let drain = std::time::Duration::from_secs(args.proxy.drain_timeout_seconds);
            let Some(config) = proxy_config(&args.proxy) else { return ExitCode::FAILURE };
            standalone::run(&args.manifests, &config, options, drain)
        }
        Command::Controller(args) => cluster::run_controller(&cluster::ControllerConfig {
            manifests: args.manifests,
            watch: tidegate_controller::watch::WatchConfig {
                namespaces: args.watch_namespaces,
                secret_labels: args.secret_label_selector,
                options: options.clone(),
            },
            stream_addr: args.stream_addr,
            admin_addr: args.admin_addr,
            tls: args.tls.files(),
            status_address: args.publish_status_address,
            publish_service: args.publish_service,
            election: tidegate_controller::election::ElectionConfig {
                namespace: args.lease_namespace,
                name: args.lease_name,
                identity: args.name,
                lease_duration: seconds(args.lease_duration_seconds),
                renew_deadline: seconds(args.lease_renew_deadline_seconds),
                retry_period: seconds(args.lease_retry_period_seconds),
            },
            options,
        }),
        Command::Proxy(args) => {
            let drain = std::time::Duration::from_secs(args.proxy.drain_timeout_seconds);
            let Some(config) = proxy_config(&args.proxy) else { return ExitCode::FAILURE };
            cluster::run_proxy(&config, args.controllers, args.name, &args.tls.files(), drain)
        }
        Command::Validate { files, strict, .. } => return validate(&files, options, strict),
        Command::Report { paths, cluster, format, min_coverage, allow_closed, strict, .. } => {
            let inputs = if cluster { cluster::list_inputs(options) } else { read_inputs(&paths, options) };
            let inputs = match inputs {
                Ok(inputs) => inputs,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let report = tidegate_controller::report::report(&inputs, strict);
            match format {
                ReportFormat::Text => print!("{}", report.text()),
                ReportFormat::Json => match serde_json::to_string_pretty(&report) {
                    Ok(json) => println!("{json}"),
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(2);
                    }
                },
            }
            let closed = report.totals.closed_ingresses > 0 && !allow_closed;
            return if closed || report.totals.coverage < min_coverage { ExitCode::FAILURE } else { ExitCode::SUCCESS };
        }
        Command::Echo { listen, service, namespace } => return run_echo(listen, service, namespace),
        Command::Crd => {
            print!("{}", tidegate_controller::luaroute::crd_yaml());
            return ExitCode::SUCCESS;
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run_echo(listen: SocketAddr, service: String, namespace: String) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(addr = %listener.local_addr().unwrap_or(listen), service, "echo backend listening");
        let pod = format!("{service}-{}", std::process::id());
        echo::serve(listener, echo::Identity { namespace, service, pod, ..Default::default() }).await;
        ExitCode::SUCCESS
    })
}

/// Runs the echo backend on its own thread.
fn spawn_echo(addr: SocketAddr) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    tracing::info!(%addr, "echo backend listening");
    std::thread::Builder::new().name("echo".into()).spawn(move || {
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    echo::serve(
                        l,
                        echo::Identity {
                            namespace: "default".into(),
                            service: "echo".into(),
                            pod: "echo-builtin".into(),
                            ..Default::default()
                        },
                    )
                    .await;
                }
                Err(e) => tracing::error!("echo backend: {e}"),
            }
        });
    })?;
    Ok(())
}

/// Parses and translates files offline; exits 1 when anything is wrong. A reference to an
/// object the files do not hold is only a warning unless `strict`: offline, it may well be in
/// the cluster.
fn validate(files: &[PathBuf], options: Options, strict: bool) -> ExitCode {
    let mut objects = Vec::new();
    let mut failed = false;
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                println!("{}: cannot read: {e}", file.display());
                failed = true;
                continue;
            }
        };
        let (parsed, errors) = parse_file(file, &text);
        for error in errors {
            println!("{error}");
            failed = true;
        }
        objects.extend(parsed);
    }
    let translation = tidegate_controller::translate(&tidegate_controller::manifests::into_inputs(objects, options));
    for status in &translation.statuses {
        for p in &status.problems {
            if p.severity == tidegate_controller::Severity::Error && p.names_absent_object() && !strict {
                println!(
                    "{}: field {}: {} (Warning: not among the files, it may be in the cluster; --strict makes this an error)",
                    status.object, p.field, p.message
                );
                continue;
            }
            println!("{}: field {}: {} ({:?}, {:?})", status.object, p.field, p.message, p.severity, p.reason);
            failed |= p.severity == tidegate_controller::Severity::Error;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        println!("ok: {} objects", translation.statuses.len());
        ExitCode::SUCCESS
    }
}

/// The objects of manifest files and folders (each folder's `*.yaml` / `*.yml` files), for the
/// report. A file that does not read, or a document that does not parse, is an error.
fn read_inputs(paths: &[PathBuf], options: Options) -> Result<tidegate_controller::Inputs, String> {
    if paths.is_empty() {
        return Err("no manifests: name files or folders, or --cluster".to_owned());
    }
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    let mut objects = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
        let (parsed, errors) = parse_file(file, &text);
        if let Some(error) = errors.first() {
            return Err(error.to_string());
        }
        objects.extend(parsed);
    }
    Ok(tidegate_controller::manifests::into_inputs(objects, options))
}

/// Logs go to stderr through a writer thread: a worker that logs (`ngx.log`, a failing handler)
/// never blocks on a slow terminal or pipe. When the queue is full, lines are dropped rather
/// than stalling traffic.
fn init_logging(format: LogFormat, level: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|e| {
            eprintln!("error: --log-level {level:?}: {e}");
            std::process::exit(2)
        });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}
