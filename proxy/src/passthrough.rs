//! `ssl-passthrough`: a TLS connection whose ClientHello asks for a passthrough host goes,
//! undecrypted, to that host's backend, which does the handshake with its own certificate (as
//! ingress-nginx's passthrough proxy, nginx's `ssl_preread`). The ClientHello is only peeked
//! at: the backend receives the connection from its first byte. Without passthrough hosts, TLS
//! connections are not peeked at at all.

use std::net::SocketAddr;
use std::time::Duration;

use tidegate_snapshot::Balance;

use crate::reactor::ClientStream;
use crate::worker::Worker;

/// How long a client has to send its ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A ClientHello larger than this is not looked into (the connection is served as usual).
const MAX_HELLO: usize = 16 * 1024 + 5;
/// How long connecting to the backend may take (ingress-nginx's default `proxy-connect-timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What became of a TLS connection.
pub(crate) enum Passed {
    /// Its server name is not a passthrough host: TLS ends here, as usual.
    No(ClientStream),
    /// Passed to the backend (or refused, when it could not be reached), and over.
    Done,
}

/// Passes the connection through when its server name is a passthrough host.
pub(crate) async fn serve(worker: &Worker, stream: ClientStream, remote: SocketAddr) -> Passed {
    let Some(name) = tokio::time::timeout(HELLO_TIMEOUT, server_name(&stream)).await.ok().flatten() else {
        return Passed::No(stream);
    };
    let runtime = worker.current_runtime();
    let Some(backend) = runtime.routing.passthrough.get(&name.to_ascii_lowercase()) else {
        return Passed::No(stream);
    };
    let pick = runtime.upstreams.get(backend).and_then(|endpoints| {
        let pick = endpoints.pick(&Balance::RoundRobin, None, &[])?;
        endpoints.abandoned(pick);
        Some(pick.address)
    });
    let Some(address) = pick else {
        tracing::debug!(%remote, host = name, "ssl-passthrough: the backend has no endpoint; connection closed");
        return Passed::Done;
    };
    drop(runtime);
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => {
            tracing::debug!(%remote, host = name, %address, error = %e, "ssl-passthrough: cannot connect; connection closed");
            return Passed::Done;
        }
        Err(_) => {
            tracing::debug!(%remote, host = name, %address, "ssl-passthrough: connect timed out; connection closed");
            return Passed::Done;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (mut client, mut upstream) = (stream, upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%remote, host = name, error = %e, "ssl-passthrough connection ended");
    }
    Passed::Done
}

/// The server name the connection's ClientHello asks for, read without consuming anything;
/// `None` when it names none, is not TLS, or is too large to look into.
async fn server_name(stream: &ClientStream) -> Option<String> {
    let mut buf = vec![0u8; MAX_HELLO];
    let mut seen = 0;
    loop {
        let n = stream.peek(&mut buf, seen).await.ok()?;
        if n == 0 {
            return None;
        }
        seen = n;
        let mut acceptor = rustls::server::Acceptor::default();
        let mut data = &buf[..n];
        while !data.is_empty() {
            if acceptor.read_tls(&mut data).ok()? == 0 {
                break;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return accepted.client_hello().server_name().map(str::to_owned),
            Ok(None) if n < buf.len() => {}
            _ => return None,
        }
    }
}
