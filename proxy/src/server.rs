//! Workers: N OS threads, each with a current-thread tokio runtime, its own listeners
//! (SO_REUSEPORT, so the kernel spreads connections) and its own epoll set of client sockets
//! ([`crate::reactor`]), serving HTTP/1.1 (our own loop, [`crate::http1`]) and HTTP/2 (hyper;
//! h2 by ALPN on TLS, h2c with prior knowledge on plain) on their own thread from accept to
//! response.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::{ClientCertificates, ServerConfigs};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::Shared;
use crate::body::ClientBody;
use crate::connection::{Connection, ConnectionGuard};
use crate::http1::{CloseConnection, Detached, Ended, Io};
use crate::metrics::StatusLabels;
use crate::reactor::{ClientListener, ClientStream, Reactor, Resumed};
use crate::request::handle;
use crate::upstream::Pool;
use crate::worker::Worker;

/// Time allowed for a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds a listener that shares its port with the other workers' listeners.
pub(crate) fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Accepted connections inherit it (Linux), which spares a system call per connection.
    // Small responses must not wait for Nagle.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Binds `count` listeners on `addr`; with port 0, the first picks the port and the others join
/// it.
pub(crate) fn bind_group(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(bind_reuseport(bound)?);
    }
    Ok(listeners)
}

/// Runs one worker until the process ends (a drain closes its listeners, not its connections).
pub(crate) fn run_worker(
    index: usize,
    shared: Arc<Shared>,
    http: std::net::TcpListener,
    https: std::net::TcpListener,
    tls: ServerConfigs,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let config = tidegate_lua::LuaConfig { worker_id: index, ..shared.lua.clone() };
        let vm = tidegate_lua::Vm::new(config)
            .map_err(|e| std::io::Error::other(format!("cannot create the Lua VM: {e}")))?;
        let runtime = std::cell::RefCell::new(Rc::new(shared.runtime.load_full()));
        let reactor = Reactor::new(shared.metrics.parked_connections.clone())?;
        let http = reactor.listen(http)?;
        let https = reactor.listen(https)?;
        let worker = Rc::new(Worker {
            runtime,
            shared,
            pool: Rc::new(Pool::default()),
            reactor,
            vm: Rc::new(vm),
            id: index,
            scripts_version: std::cell::Cell::new(0),
            requests: std::cell::Cell::new(0),
            started: std::cell::Cell::new(0),
        });
        tracing::debug!(worker = index, "worker started");
        // Later runtimes are taken as requests find them (`Worker::current_runtime`), or within
        // a second by the worker's upkeep.
        worker.vm.set_subrequests(crate::request::subrequests(&worker));
        worker.adopt_lua(&worker.current_runtime().routing);
        tokio::task::spawn_local(crate::upkeep::run(Rc::clone(&worker)));
        tokio::task::spawn_local(serve_parked(Rc::clone(&worker), serve_http1));
        tokio::task::spawn_local(accept_loop(Rc::clone(&worker), http, None));
        accept_loop(Rc::clone(&worker), https, Some(tls)).await;
        // Lua timers still waiting run now, told they are premature.
        worker.vm.stop_timers();
        // Draining: the listeners are closed, but this worker's connections are tasks of this
        // LocalSet and must keep running until they finish; the process exits after the drain.
        std::future::pending::<std::io::Result<()>>().await
    })
}

/// Connections a listener accepts before it lets the worker's other tasks run.
const ACCEPTS_PER_TURN: usize = 64;

async fn accept_loop(worker: Rc<Worker>, listener: ClientListener, tls: Option<ServerConfigs>) {
    let mut shutdown = worker.shared.shutdown.subscribe();
    // Made once, not polled and dropped anew for every accept.
    let mut stopping = std::pin::pin!(shutdown.wait_for(|stop| *stop));
    // Every connection of a listener has its port: no getsockname per connection.
    let local_port = listener.local_port();
    let mut accepted_in_turn = 0;
    loop {
        let accepted = tokio::select! {
            biased;
            accepted = listener.accept(&worker.reactor) => accepted,
            _ = &mut stopping => return,
        };
        match accepted {
            Ok((stream, remote)) => {
                spawn_boxed(serve(Rc::clone(&worker), stream, remote, local_port, tls.clone()));
                accepted_in_turn += 1;
                // A burst of connections must not keep everything else waiting.
                if accepted_in_turn == ACCEPTS_PER_TURN {
                    accepted_in_turn = 0;
                    tokio::task::yield_now().await;
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(
    worker: Rc<Worker>,
    mut stream: ClientStream,
    mut remote: SocketAddr,
    local_port: u16,
    tls: Option<ServerConfigs>,
) {
    let guard = ConnectionGuard::new(&worker.shared);
    if worker.current_runtime().routing.client_rules.proxy_protocol {
        match Box::pin(proxy_header(&mut stream)).await {
            Ok(Some(source)) => remote = source,
            Ok(None) => {}
            Err(why) => {
                tracing::debug!(%remote, why, "PROXY protocol header refused; connection closed");
                worker.shared.metrics.proxy_protocol_refused.inc();
                return;
            }
        }
    }
    let tls_connection = tls.is_some();
    let (io, alpn_h2, client_certificates): (Box<dyn Io>, bool, _) = match tls {
        None => (Box::new(stream), false, None),
        // Boxed, like HTTP/2 below: a task is as large as its largest state, and a plain HTTP/1
        // connection waiting for its next request should not carry a TLS handshake's.
        Some(configs) => {
            // `ssl-passthrough` hosts: a connection for one goes to its backend undecrypted.
            if !worker.current_runtime().routing.passthrough.is_empty() {
                match Box::pin(crate::passthrough::serve(&worker, stream, remote)).await {
                    crate::passthrough::Passed::No(back) => stream = back,
                    crate::passthrough::Passed::Done => return,
                }
            }
            match Box::pin(handshake(&worker, configs, stream, remote)).await {
                Some(accepted) => accepted,
                None => return,
            }
        }
    };
    // Shared by the connection's requests (and small in the connection's task).
    let conn = Rc::new(Connection::new(remote, local_port, tls_connection, client_certificates));
    if alpn_h2 {
        let shutdown = worker.shared.shutdown.subscribe();
        Box::pin(serve_http2(worker, conn, Detached::new(io), shutdown)).await;
    } else {
        serve_http1(worker, Resumed { io, served: 0, conn, guard }).await;
    }
}

/// Serves HTTP/1 (on a new connection, or one back from waiting in its socket's slot) until the
/// connection closes, switches to HTTP/2, or idles and is parked.
async fn serve_http1(worker: Rc<Worker>, mut connection: Resumed<ConnectionGuard>) {
    let shutdown = worker.shared.shutdown.subscribe();
    loop {
        let Resumed { io, served, conn, guard } = connection;
        let (handler, facts) = (Rc::clone(&worker), Rc::clone(&conn));
        let service = move |request: http::Request<_>| {
            handle(Rc::clone(&handler), Rc::clone(&facts), request.map(ClientBody::Http1))
        };
        let limits = worker.current_runtime().routing.client_limits;
        match crate::http1::serve(io, served, limits, service, shutdown.clone()).await {
            Ended::Closed => return,
            Ended::Refused(status) => {
                let labels = StatusLabels { status: status.as_u16().to_string() };
                worker.shared.metrics.refused_requests.get_or_create(&labels).inc();
                return;
            }
            Ended::Http2(io) => {
                Box::pin(serve_http2(worker, conn, io, shutdown)).await;
                return;
            }
            Ended::Idle(idle) => match worker.reactor.park(idle, conn, guard) {
                // The task ends; the connection waits in the worker.
                Ok(()) => return,
                // Readable already.
                Err(back) => connection = back,
            },
        }
    }
}

/// The TLS handshake, within its time limit: the stream, whether ALPN chose HTTP/2, and the
/// client's certificates.
/// Reads the PROXY protocol header at the start of a connection, taking exactly its bytes:
/// the source address it names (`None`: keep the socket's peer), or why there is none.
async fn proxy_header(stream: &mut ClientStream) -> Result<Option<SocketAddr>, String> {
    use crate::client_address::{HEADER_TIMEOUT, Header, MAX_HEADER, parse_header};
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut buf = vec![0u8; MAX_HEADER];
        let mut seen = 0;
        loop {
            let n = stream.peek(&mut buf, seen).await.map_err(|e| e.to_string())?;
            seen = n;
            if n == 0 {
                return Err("closed before a PROXY protocol header".to_owned());
            }
            match parse_header(&buf[..n])? {
                Header::Incomplete if n == buf.len() => return Err("PROXY protocol header too long".to_owned()),
                Header::Incomplete => {}
                Header::Complete { length, source } => {
                    stream.read_exact(&mut buf[..length]).await.map_err(|e| e.to_string())?;
                    return Ok(source);
                }
            }
        }
    };
    tokio::time::timeout(HEADER_TIMEOUT, read).await.map_err(|_| "no PROXY protocol header in time".to_owned())?
}

async fn handshake(
    worker: &Rc<Worker>,
    configs: ServerConfigs,
    stream: ClientStream,
    remote: SocketAddr,
) -> Option<(Box<dyn Io>, bool, Option<ClientCertificates>)> {
    let hook = crate::lua_certificate::Handshake { worker, remote };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, crate::tls::accept(&configs, stream, &hook)).await {
        Ok(Ok((tls_stream, certificates))) => {
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            Some((Box::new(tls_stream), h2, certificates))
        }
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%remote, "TLS handshake timed out");
            None
        }
    }
}

async fn serve_http2(
    worker: Rc<Worker>,
    conn: Rc<Connection>,
    io: Detached,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let remote = conn.remote;
    let streams = worker.current_runtime().routing.http2_max_concurrent_streams;
    let settings = http2_settings(&worker.shared, streams);
    let resets = Rc::new(Resets::default());
    let watch = Rc::clone(&resets);
    let shared = Arc::clone(&worker.shared);
    let service = service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
        // A WebSocket over HTTP/2 goes through as the HTTP/1.1 upgrade it stands for.
        let websocket = crate::extended_connect::is_websocket(&request);
        if websocket {
            crate::extended_connect::into_upgrade(&mut request);
        }
        let response = handle(Rc::clone(&worker), Rc::clone(&conn), request.map(ClientBody::http2));
        let stream = StreamWatch { resets: Rc::clone(&watch), answered: false };
        async move {
            // Moved in whole: dropped with the call, whenever that is.
            let mut stream = stream;
            let mut response = response.await;
            stream.answered = true;
            if websocket {
                crate::extended_connect::answer(&mut response);
            }
            if response.extensions().get::<CloseConnection>().is_some() {
                // hyper resets the stream when the service fails.
                return Err(crate::body::BoxError::from("the handler closed the request without a response"));
            }
            Ok(response)
        }
    });
    let connection = settings.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    // Once a drain starts, the connection finishes what it is doing and closes. A client that
    // resets most of its streams before their answer (rapid reset) gets GOAWAY, and a second
    // to let go.
    let result = tokio::select! {
        biased;
        result = connection.as_mut() => result,
        _ = shutdown.wait_for(|stop| *stop) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = resets.tripped.notified() => {
            tracing::warn!(%remote, "HTTP/2 client reset most of its streams before their answer; closing the connection");
            shared.metrics.http2_reset_floods.inc();
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(std::time::Duration::from_secs(1), connection.as_mut()).await {
                Ok(result) => result,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}

/// Streams of one HTTP/2 connection that the client reset before their answer, among its
/// last 100 (CVE-2023-44487, rapid reset, paced or not): more than half trips the connection,
/// as Envoy's premature-reset check does. Resets that a client makes us send (MadeYouReset,
/// CVE-2025-8671) are h2's `max_local_error_reset_streams`.
#[derive(Default)]
struct Resets {
    /// The last streams, newest in the lowest bit: 1 for reset early.
    window: std::cell::Cell<u128>,
    streams: std::cell::Cell<u32>,
    tripped: tokio::sync::Notify,
}

/// How many of a connection's last streams are looked at, and how many resets trip it.
const RESET_WINDOW: u32 = 100;
const RESETS_ALLOWED: u32 = RESET_WINDOW / 2;

impl Resets {
    fn record(&self, reset_early: bool) {
        let mask = (1u128 << RESET_WINDOW) - 1;
        let window = ((self.window.get() << 1) | u128::from(reset_early)) & mask;
        self.window.set(window);
        self.streams.set(self.streams.get().saturating_add(1));
        if reset_early && window.count_ones() > RESETS_ALLOWED {
            self.tripped.notify_one();
        }
    }
}

/// One stream's service call: dropped before it answered means the stream was reset early.
struct StreamWatch {
    resets: Rc<Resets>,
    answered: bool,
}

impl Drop for StreamWatch {
    fn drop(&mut self) {
        self.resets.record(!self.answered);
    }
}

/// The HTTP/2 limits every client connection gets, pinned rather than left to hyper's
/// defaults: `max_concurrent_streams` from the configuration (100 by default), 1 MiB windows
/// per stream and per connection, 16 KiB frames, a 16 KiB header list, 400 KiB buffered per
/// stream for sending, at most 20 streams reset by the client before they were accepted and
/// 1,024 reset by us for errors before the connection is closed with GOAWAY; extended CONNECT
/// (RFC 8441) announced, for WebSockets ([`crate::extended_connect`]).
/// `streams`: the configuration's stream limit, over the proxy's own.
fn http2_settings(shared: &crate::Shared, streams: Option<u32>) -> hyper::server::conn::http2::Builder<LocalExec> {
    let mut builder = hyper::server::conn::http2::Builder::new(LocalExec);
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(streams.unwrap_or(shared.http2_max_concurrent_streams))
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(1 << 20)
        .max_frame_size(16 << 10)
        .max_header_list_size(16 << 10)
        .max_send_buf_size(400 << 10)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        // Extended CONNECT (RFC 8441), for WebSockets.
        .enable_connect_protocol();
    builder
}

/// Spawns a connection's task with its future in a box of its own. A task is aligned to a cache
/// line; with a large future inside, the allocator served it on its slow path, over-allocating
/// to align (3,700 instructions per request, for two tasks).
pub(crate) fn spawn_boxed(future: impl std::future::Future<Output = ()> + 'static) {
    tokio::task::spawn_local(Box::pin(future));
}

/// Runs hyper's per-stream HTTP/2 tasks on this worker's thread, so handlers need not be `Send`
/// (each worker will own a Lua VM).
#[derive(Clone, Copy, Debug)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: std::future::Future<Output = ()> + 'static,
{
    fn execute(&self, future: F) {
        // A stream's future is large too.
        spawn_boxed(future);
    }
}

/// Dispatches the worker's socket events, serves parked connections as they turn readable,
/// closes those past their deadline, and all of them when a drain starts. Runs for as long as
/// the worker does.
async fn serve_parked<F>(worker: Rc<Worker>, serve: impl Fn(Rc<Worker>, Resumed<ConnectionGuard>) -> F)
where
    F: Future<Output = ()> + 'static,
{
    let shutdown = worker.shared.shutdown.subscribe();
    crate::reactor::dispatch(&worker.reactor, worker.id, shutdown, |connection| {
        spawn_boxed(serve(Rc::clone(&worker), connection));
    })
    .await;
}
