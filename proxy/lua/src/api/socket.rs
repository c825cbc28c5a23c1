//! Cosockets: `ngx.socket.tcp()` and `ngx.socket.connect(host, port)` (UDP ones: [`super::udp`]).
//!
//! A socket belongs to the worker that created it. Every call that waits (connect, send,
//! receive) suspends only the calling coroutine, bounded by the socket's timeouts; the worker
//! serves others meanwhile. Names are resolved off the worker (tokio's resolver thread pool).
//!
//! Tenant Lua must not reach what the proxy's network position exposes: an address in a range
//! of `--lua-socket-deny` (by default link-local, where cloud metadata services answer) is
//! refused with `nil, "destination not allowed"` after resolution and before any packet.
//!
//! Errors are returned as OpenResty returns them: `nil, "timeout"`, `nil, "closed"`,
//! `nil, "connection refused"`, with the partial data read so far as a third value for
//! `receive`. A read timeout leaves the connection usable; any other error closes it.
//!
//! `sslhandshake` turns the connection into TLS (rustls): SNI from `server_name` (else the host
//! given to `connect`), and the server's certificate verified against the proxy's trusted
//! authorities unless `ssl_verify` is `false`. A pooled TLS connection stays TLS.
//!
//! `setkeepalive` puts the connection in this worker's pool, keyed by the namespace of the Lua
//! and `host:port` (or the `pool` option of `connect`), for its idle timeout; a pool keeps at
//! most `size` connections and closes the least recently used past that. A pooled connection that the peer closed, or
//! that has unexpected bytes, is dropped instead of reused.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mlua::{Lua, MultiValue, Table, UserData, UserDataMethods, UserDataRef, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{current, require_phase};
use crate::request::WAITING_PHASES;

/// `lua_socket_connect_timeout`, `lua_socket_send_timeout`, `lua_socket_read_timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// `lua_socket_pool_size`.
const DEFAULT_POOL_SIZE: usize = 30;
/// `lua_socket_keepalive_timeout`.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Plain TCP, or TLS over it after `sslhandshake`.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

struct Connection {
    stream: Stream,
    /// Bytes received and not yet handed to Lua.
    buffer: Vec<u8>,
    /// How many times it was taken from a pool.
    reused: u32,
    pool: String,
    /// The host given to `connect` (SNI when `sslhandshake` names none).
    host: String,
}

/// The VM's `--lua-socket-deny` ranges.
pub(crate) struct Denied(pub(crate) Arc<Vec<crate::network::Network>>);

/// The TLS client settings of a worker's cosockets.
pub(crate) struct TlsClients {
    verified: Arc<rustls::ClientConfig>,
    unverified: Arc<rustls::ClientConfig>,
}

impl TlsClients {
    pub(crate) fn new(roots: &Arc<rustls::RootCertStore>) -> mlua::Result<TlsClients> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = || {
            rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .map_err(|e| mlua::Error::runtime(format!("TLS client settings: {e}")))
        };
        let verified = builder()?.with_root_certificates(Arc::clone(roots)).with_no_client_auth();
        let unverified = builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(Arc::clone(&provider))))
            .with_no_client_auth();
        Ok(TlsClients { verified: Arc::new(verified), unverified: Arc::new(unverified) })
    }
}

/// `sslhandshake(nil, name, false)`: the Lua asked not to verify the server's certificate.
/// Signatures are still checked, so the handshake itself is sound.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
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

struct Idle {
    connection: Connection,
    expires: Instant,
}

thread_local! {
    /// This worker's keep-alive pools, by pool name; most recently used last.
    static POOLS: RefCell<HashMap<String, Vec<Idle>>> = RefCell::new(HashMap::new());
}

/// A pooled connection still open and quiet, if there is one.
fn take_pooled(pool: &str) -> Option<Connection> {
    POOLS.with(|pools| {
        let mut pools = pools.borrow_mut();
        let idle = pools.get_mut(pool)?;
        let now = Instant::now();
        while let Some(Idle { mut connection, expires }) = idle.pop() {
            let mut probe = [0u8; 1];
            let quiet = match connection.stream.tcp().try_read(&mut probe) {
                Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                // TLS may get records (session tickets) while idle; only a closed peer disqualifies.
                Ok(n) => n > 0 && matches!(connection.stream, Stream::Tls(_)),
            };
            if expires > now && quiet {
                connection.reused += 1;
                return Some(connection);
            }
        }
        None
    })
}

fn put_pooled(connection: Connection, idle_timeout: Duration, size: usize) {
    POOLS.with(|pools| {
        let mut pools = pools.borrow_mut();
        let idle = pools.entry(connection.pool.clone()).or_default();
        let now = Instant::now();
        idle.retain(|i| i.expires > now);
        while idle.len() >= size.max(1) {
            idle.remove(0);
        }
        idle.push(Idle { connection, expires: now + idle_timeout });
    });
}

/// The object `ngx.socket.tcp()` returns.
struct TcpSocket {
    connection: RefCell<Option<Connection>>,
    /// Set while a call waits on the connection (it is taken out meanwhile).
    busy: Cell<bool>,
    connect_timeout: Cell<Duration>,
    send_timeout: Cell<Duration>,
    read_timeout: Cell<Duration>,
    reused: Cell<u32>,
}

impl TcpSocket {
    fn new() -> TcpSocket {
        TcpSocket {
            connection: RefCell::new(None),
            busy: Cell::new(false),
            connect_timeout: Cell::new(DEFAULT_TIMEOUT),
            send_timeout: Cell::new(DEFAULT_TIMEOUT),
            read_timeout: Cell::new(DEFAULT_TIMEOUT),
            reused: Cell::new(0),
        }
    }

    /// Takes the connection for one call, or says why there is none.
    fn take(&self) -> Result<Connection, &'static str> {
        if self.busy.get() {
            return Err("socket busy");
        }
        let connection = self.connection.borrow_mut().take().ok_or("closed")?;
        self.busy.set(true);
        Ok(connection)
    }

    /// Gives the connection back after a call (`None`: the call closed it).
    fn give_back(&self, connection: Option<Connection>) {
        self.busy.set(false);
        *self.connection.borrow_mut() = connection;
    }
}

/// `nil, err[, partial]`.
pub(super) fn failure(lua: &Lua, error: &str, partial: Option<&[u8]>) -> mlua::Result<MultiValue> {
    let mut values = vec![Value::Nil, Value::String(lua.create_string(error)?)];
    if let Some(partial) = partial {
        values.push(Value::String(lua.create_string(partial)?));
    }
    Ok(values.into_iter().collect())
}

pub(super) fn success(value: Value) -> MultiValue {
    std::iter::once(value).collect()
}

/// A timeout, logged as OpenResty logs it (`lua_socket_log_errors` is on by default), besides
/// the `nil, "timeout"` the call returns.
fn timed_out(what: &str) {
    super::log_line(3, &format!("lua tcp socket {what}"));
}

pub(super) fn io_error(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::TimedOut => "timeout".into(),
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => "closed".into(),
        _ => error.to_string(),
    }
}

pub(super) fn milliseconds(ms: Option<f64>) -> Option<Duration> {
    ms.filter(|ms| ms.is_finite() && *ms > 0.0).map(|ms| Duration::from_secs_f64(ms / 1000.0))
}

/// The bytes `send` writes: a string, a number, or an array of those (nested).
pub(super) fn flatten(value: &Value, out: &mut Vec<u8>, depth: usize) -> mlua::Result<()> {
    match value {
        Value::String(s) => out.extend_from_slice(&s.as_bytes()),
        Value::Integer(i) => out.extend_from_slice(i.to_string().as_bytes()),
        Value::Number(n) => out.extend_from_slice(crate::api::format_number(*n).as_bytes()),
        Value::Table(t) if depth < 32 => {
            for item in t.sequence_values::<Value>() {
                flatten(&item?, out, depth + 1)?;
            }
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "bad argument #1 to 'send' (string, number or array table expected, got {})",
                other.type_name()
            )));
        }
    }
    Ok(())
}

async fn connect(
    socket: &TcpSocket,
    lua: &Lua,
    host: String,
    port: Option<u16>,
    options: Option<Table>,
) -> mlua::Result<MultiValue> {
    let request = current("ngx.socket connect")?;
    require_phase(&request, "ngx.socket connect", WAITING_PHASES)?;
    if socket.busy.get() {
        return failure(lua, "socket busy", None);
    }
    if host.starts_with("unix:") {
        return failure(lua, "unix domain sockets are not supported", None);
    }
    let Some(port) = port else {
        return Err(mlua::Error::runtime("bad argument #2 to 'connect' (port expected)"));
    };
    // Pools are per namespace: Lua of one namespace never gets another's connections.
    let pool = match options.as_ref().map(|o| o.get::<Option<String>>("pool")).transpose()?.flatten() {
        Some(name) => format!("{}\0{name}", request.state.head.namespace),
        None => format!("{}\0{host}:{port}", request.state.head.namespace),
    };
    // A connected socket is closed first, as in OpenResty.
    socket.connection.borrow_mut().take();
    if let Some(connection) = take_pooled(&pool) {
        socket.reused.set(connection.reused);
        socket.give_back(Some(connection));
        return Ok(success(Value::Integer(1)));
    }
    socket.busy.set(true);
    let denied = lua.app_data_ref::<Denied>().map(|d| Arc::clone(&d.0)).unwrap_or_default();
    let connected = tokio::time::timeout(socket.connect_timeout.get(), async {
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
        let allowed: Vec<SocketAddr> =
            resolved.iter().copied().filter(|a| !denied.iter().any(|n| n.contains(a.ip()))).collect();
        if allowed.is_empty() && !resolved.is_empty() {
            tracing::warn!(
                route = %request.state.head.route,
                namespace = %request.state.head.namespace,
                destination = %format!("{host}:{port}"),
                "Lua cosocket refused: the destination is in a range --lua-socket-deny lists"
            );
            return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "destination not allowed"));
        }
        TcpStream::connect(allowed.as_slice()).await
    })
    .await;
    socket.busy.set(false);
    let stream = match connected {
        Err(_) => {
            timed_out(&format!("connect timed out, when connecting to {host}:{port}"));
            return failure(lua, "timeout", None);
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return failure(lua, "destination not allowed", None);
        }
        Ok(Err(e)) => return failure(lua, &io_error(&e), None),
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    socket.reused.set(0);
    socket.give_back(Some(Connection { stream: Stream::Plain(stream), buffer: Vec::new(), reused: 0, pool, host }));
    Ok(success(Value::Integer(1)))
}

enum Pattern {
    Line,
    All,
    Bytes(usize),
}

fn pattern(value: Option<Value>) -> mlua::Result<Pattern> {
    let bad = || mlua::Error::runtime("bad argument #1 to 'receive' (bad pattern argument)");
    match value {
        None | Some(Value::Nil) => Ok(Pattern::Line),
        Some(Value::String(s)) => match &*s.as_bytes() {
            b"*l" | b"l" => Ok(Pattern::Line),
            b"*a" | b"a" => Ok(Pattern::All),
            _ => Err(bad()),
        },
        Some(Value::Integer(n)) => usize::try_from(n).map(Pattern::Bytes).map_err(|_| bad()),
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Some(Value::Number(n)) if n >= 0.0 && n.is_finite() => Ok(Pattern::Bytes(n as usize)),
        Some(_) => Err(bad()),
    }
}

impl Connection {
    /// Reads more into the buffer; `false` at the end of the stream.
    async fn fill(&mut self) -> io::Result<bool> {
        self.buffer.reserve(8192);
        Ok(self.stream.read_buf(&mut self.buffer).await? > 0)
    }

    /// Hands over the first `n` buffered bytes.
    fn take(&mut self, n: usize) -> Vec<u8> {
        let rest = self.buffer.split_off(n);
        std::mem::replace(&mut self.buffer, rest)
    }

    /// What `pattern` can return from the buffer now, if anything.
    fn complete(&mut self, pattern: &Pattern) -> Option<Vec<u8>> {
        match pattern {
            Pattern::Line => {
                let end = self.buffer.iter().position(|b| *b == b'\n')?;
                let mut line = self.take(end + 1);
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Some(line)
            }
            Pattern::Bytes(n) => (self.buffer.len() >= *n).then(|| self.take(*n)),
            Pattern::All => None,
        }
    }
}

/// How one read ended: the data, and the error if it did not complete (with the partial data
/// as the data).
async fn read(connection: &mut Connection, pattern: &Pattern, timeout: Duration) -> (Vec<u8>, Option<String>) {
    let outcome = tokio::time::timeout(timeout, async {
        loop {
            if let Some(data) = connection.complete(pattern) {
                return Ok(data);
            }
            if !connection.fill().await? {
                return match pattern {
                    Pattern::All => Ok(connection.take(connection.buffer.len())),
                    _ => Err(io::ErrorKind::UnexpectedEof.into()),
                };
            }
        }
    })
    .await;
    match outcome {
        Ok(Ok(data)) => (data, None),
        Err(_) => {
            timed_out("read timed out");
            (connection.take(connection.buffer.len()), Some("timeout".into()))
        }
        Ok(Err(e)) => (connection.take(connection.buffer.len()), Some(io_error(&e))),
    }
}

/// The iterator `receiveuntil` returns: each call reads up to the next `boundary`.
struct Until {
    boundary: Vec<u8>,
    inclusive: bool,
    /// The boundary was returned as data (inclusive, sized reads): the next call says so.
    reached: Cell<bool>,
}

impl Until {
    /// Without `size`: everything before the boundary (and the boundary when inclusive). With
    /// `size`: at most `size` bytes before the boundary per call, then `nil` once it is reached.
    fn complete(&self, connection: &mut Connection, size: Option<usize>) -> Option<Option<Vec<u8>>> {
        let boundary = &self.boundary[..];
        let found = connection.buffer.windows(boundary.len()).position(|w| w == boundary);
        match (found, size) {
            (Some(at), None) => {
                let mut data = connection.take(at);
                let matched = connection.take(boundary.len());
                if self.inclusive {
                    data.extend_from_slice(&matched);
                }
                Some(Some(data))
            }
            (Some(0), Some(_)) => {
                let matched = connection.take(boundary.len());
                if self.inclusive {
                    self.reached.set(true);
                    Some(Some(matched))
                } else {
                    Some(None)
                }
            }
            (Some(at), Some(n)) => Some(Some(connection.take(at.min(n)))),
            (None, Some(n)) => {
                // Bytes that cannot begin a boundary are safe to hand over.
                let safe = connection.buffer.len().saturating_sub(boundary.len() - 1);
                (safe >= n.max(1)).then(|| Some(connection.take(n)))
            }
            (None, None) => None,
        }
    }
}

async fn read_until(socket: &TcpSocket, lua: &Lua, until: &Until, size: Option<usize>) -> mlua::Result<MultiValue> {
    if until.reached.replace(false) {
        return Ok(success(Value::Nil));
    }
    let mut connection = match socket.take() {
        Ok(c) => c,
        Err(why) => return failure(lua, why, None),
    };
    let outcome = tokio::time::timeout(socket.read_timeout.get(), async {
        loop {
            if let Some(data) = until.complete(&mut connection, size) {
                return Ok(data);
            }
            if !connection.fill().await? {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
        }
    })
    .await;
    let error = match outcome {
        Ok(Ok(data)) => {
            socket.give_back(Some(connection));
            return Ok(success(match data {
                Some(bytes) => Value::String(lua.create_string(&bytes)?),
                None => Value::Nil,
            }));
        }
        Err(_) => {
            timed_out("read timed out");
            "timeout".to_owned()
        }
        Ok(Err(e)) => io_error(&e),
    };
    let partial = connection.take(connection.buffer.len());
    socket.give_back((error == "timeout").then_some(connection));
    failure(lua, &error, Some(&partial))
}

impl UserData for TcpSocket {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_async_method(
            "connect",
            |lua, this: UserDataRef<TcpSocket>, (host, port, options): (String, Option<u16>, Option<Table>)| async move {
                connect(&this, &lua, host, port, options).await
            },
        );
        methods.add_method("settimeout", |_, this, ms: Option<f64>| {
            let timeout = milliseconds(ms).unwrap_or(DEFAULT_TIMEOUT);
            this.connect_timeout.set(timeout);
            this.send_timeout.set(timeout);
            this.read_timeout.set(timeout);
            Ok(())
        });
        methods.add_method("settimeouts", |_, this, (connect, send, read): (Option<f64>, Option<f64>, Option<f64>)| {
            this.connect_timeout.set(milliseconds(connect).unwrap_or(DEFAULT_TIMEOUT));
            this.send_timeout.set(milliseconds(send).unwrap_or(DEFAULT_TIMEOUT));
            this.read_timeout.set(milliseconds(read).unwrap_or(DEFAULT_TIMEOUT));
            Ok(())
        });
        methods.add_async_method("send", |lua, this: UserDataRef<TcpSocket>, data: Value| async move {
            let mut bytes = Vec::new();
            flatten(&data, &mut bytes, 0)?;
            let mut connection = match this.take() {
                Ok(c) => c,
                Err(why) => return failure(&lua, why, None),
            };
            let stream = &mut connection.stream;
            let written = tokio::time::timeout(this.send_timeout.get(), async {
                stream.write_all(&bytes).await?;
                stream.flush().await
            })
            .await;
            match written {
                Ok(Ok(())) => {
                    this.give_back(Some(connection));
                    Ok(success(Value::Integer(i64::try_from(bytes.len()).unwrap_or(i64::MAX))))
                }
                Err(_) => {
                    this.give_back(None);
                    timed_out("write timed out");
                    failure(&lua, "timeout", None)
                }
                Ok(Err(e)) => {
                    this.give_back(None);
                    failure(&lua, &io_error(&e), None)
                }
            }
        });
        methods.add_async_method(
            "receive",
            |lua, this: UserDataRef<TcpSocket>, pattern_arg: Option<Value>| async move {
                let pattern = pattern(pattern_arg)?;
                let mut connection = match this.take() {
                    Ok(c) => c,
                    Err(why) => return failure(&lua, why, None),
                };
                let (data, error) = read(&mut connection, &pattern, this.read_timeout.get()).await;
                match error {
                    None => {
                        this.give_back(Some(connection));
                        Ok(success(Value::String(lua.create_string(&data)?)))
                    }
                    // `*a` ends at end of stream: that is its success.
                    Some(e) if e == "closed" && matches!(pattern, Pattern::All) => {
                        this.give_back(None);
                        Ok(success(Value::String(lua.create_string(&data)?)))
                    }
                    Some(e) => {
                        this.give_back((e == "timeout").then_some(connection));
                        failure(&lua, &e, Some(&data))
                    }
                }
            },
        );
        methods.add_async_method("receiveany", |lua, this: UserDataRef<TcpSocket>, max: i64| async move {
            let max = usize::try_from(max)
                .ok()
                .filter(|m| *m > 0)
                .ok_or_else(|| mlua::Error::runtime("bad argument #2 to 'receiveany' (bad max argument)"))?;
            let mut connection = match this.take() {
                Ok(c) => c,
                Err(why) => return failure(&lua, why, None),
            };
            if connection.buffer.is_empty() {
                match tokio::time::timeout(this.read_timeout.get(), connection.fill()).await {
                    Err(_) => {
                        this.give_back(Some(connection));
                        timed_out("read timed out");
                        return failure(&lua, "timeout", None);
                    }
                    Ok(Err(e)) => {
                        this.give_back(None);
                        return failure(&lua, &io_error(&e), None);
                    }
                    Ok(Ok(false)) => {
                        this.give_back(None);
                        return failure(&lua, "closed", None);
                    }
                    Ok(Ok(true)) => {}
                }
            }
            let data = connection.take(connection.buffer.len().min(max));
            this.give_back(Some(connection));
            Ok(success(Value::String(lua.create_string(&data)?)))
        });
        methods.add_method("setkeepalive", |lua, this, (timeout, size): (Option<f64>, Option<i64>)| {
            let connection = match this.take() {
                Ok(c) => c,
                Err(why) => return failure(lua, why, None),
            };
            this.give_back(None);
            if !connection.buffer.is_empty() {
                return failure(lua, "unread data in buffer", None);
            }
            let size = size.and_then(|s| usize::try_from(s).ok()).filter(|s| *s > 0).unwrap_or(DEFAULT_POOL_SIZE);
            // 0 means no idle timeout: kept until the pool is full.
            let idle = match timeout {
                Some(0.0) => Duration::from_secs(u64::from(u32::MAX)),
                other => milliseconds(other).unwrap_or(DEFAULT_IDLE_TIMEOUT),
            };
            put_pooled(connection, idle, size);
            Ok(success(Value::Integer(1)))
        });
        methods.add_function(
            "receiveuntil",
            |lua, (socket, boundary, options): (mlua::AnyUserData, mlua::LuaString, Option<Table>)| {
                if boundary.as_bytes().is_empty() {
                    return Err(mlua::Error::runtime("bad argument #2 to 'receiveuntil' (pattern is empty)"));
                }
                let inclusive = options.map(|o| o.get::<Option<bool>>("inclusive")).transpose()?.flatten();
                let until = Rc::new(Until {
                    boundary: boundary.as_bytes().to_vec(),
                    inclusive: inclusive.unwrap_or(false),
                    reached: Cell::new(false),
                });
                lua.create_async_function(move |lua, size: Option<i64>| {
                    let socket = socket.clone();
                    let until = Rc::clone(&until);
                    async move {
                        let size = match size {
                            None => None,
                            Some(n) => Some(usize::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                                mlua::Error::runtime("bad argument #1 to iterator (size must be positive)")
                            })?),
                        };
                        let this = socket.borrow::<TcpSocket>()?;
                        read_until(&this, &lua, &until, size).await
                    }
                })
            },
        );
        methods.add_async_method(
            "sslhandshake",
            |lua, this: UserDataRef<TcpSocket>, (_session, name, verify): (Value, Option<String>, Option<bool>)| async move {
                handshake(&this, &lua, name, verify.unwrap_or(true)).await
            },
        );
        methods.add_method("getreusedtimes", |_, this, ()| Ok(this.reused.get()));
        methods.add_method("close", |lua, this, ()| match this.take() {
            Ok(_) => {
                this.give_back(None);
                Ok(success(Value::Integer(1)))
            }
            Err(why) => failure(lua, why, None),
        });
    }
}

async fn handshake(socket: &TcpSocket, lua: &Lua, name: Option<String>, verify: bool) -> mlua::Result<MultiValue> {
    let clients = lua
        .app_data_ref::<Rc<TlsClients>>()
        .map(|c| Rc::clone(&c))
        .ok_or_else(|| mlua::Error::runtime("TLS is not available in this VM"))?;
    let connection = match socket.take() {
        Ok(c) => c,
        Err(why) => return failure(lua, why, None),
    };
    if matches!(connection.stream, Stream::Tls(_)) {
        // A pooled TLS connection: already done.
        socket.give_back(Some(connection));
        return Ok(success(Value::Boolean(true)));
    }
    if !connection.buffer.is_empty() {
        socket.give_back(None);
        return failure(lua, "unread data in buffer", None);
    }
    let name = name.unwrap_or_else(|| connection.host.clone());
    let Ok(server_name) = rustls_pki_types::ServerName::try_from(name.clone()) else {
        socket.give_back(Some(connection));
        return Err(mlua::Error::runtime(format!("bad argument #2 to 'sslhandshake' (bad server name {name:?})")));
    };
    let Connection { stream, buffer, reused, pool, host } = connection;
    let Stream::Plain(tcp) = stream else { unreachable!("checked above") };
    let config = if verify { &clients.verified } else { &clients.unverified };
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
    match tokio::time::timeout(socket.connect_timeout.get(), connector.connect(server_name, tcp)).await {
        Ok(Ok(tls)) => {
            let stream = Stream::Tls(Box::new(tls));
            socket.give_back(Some(Connection { stream, buffer, reused, pool, host }));
            Ok(success(Value::Boolean(true)))
        }
        Ok(Err(e)) => {
            socket.give_back(None);
            let invalid = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
            let why =
                if invalid { format!("certificate verify failed: {e}") } else { format!("handshake failed: {e}") };
            failure(lua, &why, None)
        }
        Err(_) => {
            socket.give_back(None);
            failure(lua, "timeout", None)
        }
    }
}

pub(super) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let socket = lua.create_table()?;
    socket.raw_set("tcp", lua.create_function(|_, ()| Ok(TcpSocket::new()))?)?;
    socket.raw_set(
        "connect",
        lua.create_async_function(|lua, (host, port): (String, Option<u16>)| async move {
            let socket = TcpSocket::new();
            let connected = connect(&socket, &lua, host, port, None).await?;
            match connected.front() {
                Some(Value::Integer(1)) => Ok(success(Value::UserData(lua.create_userdata(socket)?))),
                _ => Ok(connected),
            }
        })?,
    )?;
    ngx.raw_set("socket", socket)
}
