//! The proxy with real clients over loopback: HTTP/2, TLS with SNI, WebSocket, streamed uploads,
//! and the status for each way an upstream can fail.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use support::{
    Body, Tidegate, echo, echoed_headers, get, get_request, h2c, manifest_dir, self_signed, service_yaml,
    tls_connector, tls_request, tls_secret_yaml, write_manifest,
};

fn ingress(name: &str, host: &str, service: &str, annotations: &str, tls: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: {name}\n  namespace: t\n  annotations: {{{annotations}}}\nspec:\n  ingressClassName: tidegate\n{tls}  rules:\n  - host: {host}\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: {service}, port: {{number: 80}}}}}}}}\n"
    )
}

/// A free loopback port with nothing listening on it.
fn refused_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

struct Setup {
    tidegate: Tidegate,
    _dir: tempfile::TempDir,
    certs: Vec<(String, String)>,
}

/// Hosts: `a.test` and `b.test` with their own certificates, `plain.test` without TLS,
/// `refused.test` (nothing listens), `empty.test` (no endpoints), `slow.test` (1 s read timeout).
async fn setup() -> Setup {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    let (a_cert, a_key) = self_signed(&["a.test"]);
    let (b_cert, b_key) = self_signed(&["b.test"]);
    let mut text = String::new();
    text.push_str(&service_yaml("t", "web", 80, "http", &[web]));
    text.push_str(&service_yaml("t", "refused", 80, "http", &[refused_port()]));
    text.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: t}\nspec:\n  ports: [{name: http, port: 80}]\n");
    text.push_str(&tls_secret_yaml("t", "a-tls", &a_cert, &a_key));
    text.push_str(&tls_secret_yaml("t", "b-tls", &b_cert, &b_key));
    text.push_str(&ingress("a", "a.test", "web", "", "  tls: [{hosts: [a.test], secretName: a-tls}]\n"));
    text.push_str(&ingress("b", "b.test", "web", "", "  tls: [{hosts: [b.test], secretName: b-tls}]\n"));
    // Uploads here are larger than the default 1m body limit.
    text.push_str(&ingress("plain", "plain.test", "web", "nginx.ingress.kubernetes.io/proxy-body-size: 16m", ""));
    text.push_str(&ingress("refused", "refused.test", "refused", "", ""));
    text.push_str(&ingress("empty", "empty.test", "empty", "", ""));
    text.push_str(&ingress("slow", "slow.test", "web", "nginx.ingress.kubernetes.io/proxy-read-timeout: \"1\"", ""));
    write_manifest(dir.path(), "all.yaml", &text);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");
    Setup { tidegate, _dir: dir, certs: vec![(a_cert, "a.test".into()), (b_cert, "b.test".into())] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2c_reach_the_upstream_over_http1() {
    let s = setup().await;
    let one = get(s.tidegate.http, "plain.test", "/x?y=1").await.expect("http/1.1");
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.json()["path"], "/x");
    assert_eq!(one.headers["server"], "tidegate");
    assert!(one.headers.contains_key("date"));

    let request = Request::get("http://plain.test/over-h2").body(Body::default()).expect("request");
    let two = h2c(s.tidegate.http, request).await.expect("h2c");
    assert_eq!(two.version, Version::HTTP_2);
    assert_eq!(two.status, StatusCode::OK);
    let echoed = two.json();
    assert_eq!(echoed["proto"], "HTTP/1.1", "upstreams are spoken to in HTTP/1.1");
    assert_eq!(echoed["host"], "plain.test", "the :authority becomes the upstream Host");
    assert_eq!(two.headers["server"], "tidegate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_picks_certificates_by_sni_and_falls_back_to_the_default() {
    let s = setup().await;
    for (cert, host) in &s.certs {
        let connector = tls_connector(Some(&[cert.as_str()]), &[b"h2", b"http/1.1"]);
        let request = Request::get(format!("https://{host}/secure")).body(Body::default()).expect("request");
        let answer =
            tls_request(&connector, s.tidegate.https, host, request).await.unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(answer.alpn.as_deref(), Some(&b"h2"[..]), "h2 is negotiated by ALPN");
        assert_eq!(answer.answer.status, StatusCode::OK);
        assert_eq!(answer.answer.json()["host"], host.as_str());
        assert_eq!(answer.answer.headers["strict-transport-security"], "max-age=31536000");
        let forwarded = echoed_headers(&answer.answer);
        assert_eq!(forwarded["X-Forwarded-Proto"], vec!["https"]);
    }
    // A name nothing claims gets the self-signed default certificate (and routing says 404).
    let any = tls_connector(None, &[b"http/1.1"]);
    let answer = tls_request(&any, s.tidegate.https, "unknown.test", get_request("unknown.test", "/"))
        .await
        .expect("default cert");
    let default_name = b"tidegate-default.invalid";
    assert!(
        answer.peer_certificate.windows(default_name.len()).any(|w| w == default_name),
        "the default certificate is served"
    );
    assert_eq!(answer.answer.status, StatusCode::NOT_FOUND);
    // b.test's certificate is not accepted for a.test: SNI really selects.
    let only_b = tls_connector(Some(&[s.certs[1].0.as_str()]), &[b"http/1.1"]);
    assert!(tls_request(&only_b, s.tidegate.https, "a.test", get_request("a.test", "/")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_certificate_from_a_secret_replaces_the_self_signed_one() {
    let dir = support::manifest_dir();
    let (cert, key) = support::self_signed(&["fallback.example"]);
    support::write_manifest(dir.path(), "secret.yaml", &support::tls_secret_yaml("t", "fallback", &cert, &key));
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || {
        support::Tidegate::start(&path, &["--default-ssl-certificate", "t/fallback"])
    })
    .await
    .expect("start");
    let any = tls_connector(None, &[b"http/1.1"]);
    let answer =
        tls_request(&any, tidegate.https, "unknown.test", get_request("unknown.test", "/")).await.expect("tls");
    let fallback = b"fallback.example";
    assert!(
        answer.peer_certificate.windows(fallback.len()).any(|w| w == fallback),
        "the Secret's certificate is served"
    );

    // A flag naming a Secret that does not exist says so once, and the self-signed one serves.
    let dir = support::manifest_dir();
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || {
        support::Tidegate::start(&path, &["--default-ssl-certificate", "t/missing"])
    })
    .await
    .expect("start");
    let answer =
        tls_request(&any, tidegate.https, "unknown.test", get_request("unknown.test", "/")).await.expect("tls");
    let default_name = b"tidegate-default.invalid";
    assert!(answer.peer_certificate.windows(default_name.len()).any(|w| w == default_name));
    let problems = tidegate.problems_mentioning("--default-ssl-certificate");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("Secret t/missing not found"), "{problems:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_tls_host_is_redirected() {
    let s = setup().await;
    let answer = get(s.tidegate.http, "a.test", "/p?q=1").await.expect("redirect");
    assert_eq!(answer.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(answer.headers["location"], format!("https://a.test:{}/p?q=1", s.tidegate.https.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_is_tunnelled() {
    let s = setup().await;
    let stream = tokio::net::TcpStream::connect(s.tidegate.http).await.expect("connect");
    let (mut socket, response) =
        tokio_tungstenite::client_async("ws://plain.test/ws", stream).await.expect("websocket handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "through the tunnel"] {
        socket.send(tokio_tungstenite::tungstenite::Message::text(text)).await.expect("send");
        let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("echo in time")
            .expect("message")
            .expect("ok");
        assert_eq!(echoed.into_text().expect("text").as_str(), text);
    }
}

/// A WebSocket client frame: FIN, `opcode`, masked (as a client's must be) with `mask`.
fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut frame = vec![0x80 | opcode, 0x80 | u8::try_from(payload.len()).expect("short")];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// WebSocket over HTTP/2 (RFC 8441): the proxy announces extended CONNECT in its SETTINGS, an
/// extended CONNECT with `:protocol: websocket` is answered 200 once the upstream (over
/// HTTP/1.1) switched, and messages go both ways on the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_http2_is_tunnelled() {
    let s = setup().await;
    let tcp = tokio::net::TcpStream::connect(s.tidegate.http).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    // The server's SETTINGS have been read once a first answer came.
    let (first, _) =
        client.send_request(Request::get("http://plain.test/").body(()).expect("request"), true).expect("send");
    assert_eq!(first.await.expect("answer").status(), StatusCode::OK);
    let mut client = client.ready().await.expect("ready");
    assert!(client.is_extended_connect_protocol_enabled(), "SETTINGS_ENABLE_CONNECT_PROTOCOL");
    let mut request =
        Request::connect("http://plain.test/ws").header("sec-websocket-version", "13").body(()).expect("request");
    request.extensions_mut().insert(h2::ext::Protocol::from_static("websocket"));
    let (answer, mut send) = client.send_request(request, false).expect("send");
    let answer = tokio::time::timeout(Duration::from_secs(5), answer).await.expect("in time").expect("answer");
    assert_eq!(answer.status(), StatusCode::OK);
    assert!(!answer.headers().contains_key("sec-websocket-accept"), "the HTTP/1.1 handshake stays upstream");
    let mut receive = answer.into_body();
    for text in ["hello", "over one HTTP/2 stream"] {
        send.send_data(Bytes::from(client_frame(0x1, text.as_bytes(), [7, 1, 9, 3])), false).expect("send frame");
        let mut got = Vec::new();
        while got.len() < 2 + text.len() {
            let data = tokio::time::timeout(Duration::from_secs(5), receive.data())
                .await
                .expect("echo in time")
                .expect("data")
                .expect("ok");
            let _ = receive.flow_control().release_capacity(data.len());
            got.extend_from_slice(&data);
        }
        // A server's frame: FIN + text, unmasked, the length, the payload.
        assert_eq!(&got[..2], &[0x81, u8::try_from(text.len()).expect("short")]);
        assert_eq!(&got[2..], text.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_streams_through() {
    let s = setup().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
    let body = StreamBody::new(tokio_stream_from(rx));
    let request = Request::post("/upload").header("host", "plain.test").body(body).expect("request");
    let stream = tokio::net::TcpStream::connect(s.tidegate.http).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let sending = tokio::spawn(async move {
        // 8 MiB in 64 KiB chunks of unknown total length: Transfer-Encoding: chunked.
        for _ in 0..128 {
            tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024])))).await.expect("chunk accepted");
        }
    });
    let response = sender.send_request(request).await.expect("response");
    sending.await.expect("sent");
    let body = response.into_body().collect().await.expect("body").to_bytes();
    let echoed: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(echoed["body_length"], 8 * 1024 * 1024);
}

/// RFC 9112 §6.1 forbids applying chunked twice: `Transfer-Encoding: chunked, chunked`, or two
/// lines of it, get 400 and a closed connection, and nothing reaches the upstream; once stays
/// fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_applied_twice_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let exchange = |framing: &'static str| {
        let addr = s.tidegate.http;
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let request = format!("POST / HTTP/1.1\r\nHost: plain.test\r\n{framing}\r\n5\r\nhello\r\n0\r\n\r\n");
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
            assert!(read.is_ok(), "{framing:?}: the connection is closed after the answer");
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    for framing in [
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip, Chunked\r\n",
    ] {
        let answer = exchange(framing).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{framing:?}: {answer}");
    }
    let once = exchange("Transfer-Encoding: chunked\r\nConnection: close\r\n").await;
    assert!(once.starts_with("HTTP/1.1 200") && once.contains("\"body_length\":5"), "{once}");
}

fn tokio_stream_from<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_map_to_502_503_504() {
    let s = setup().await;
    let refused = get(s.tidegate.http, "refused.test", "/").await.expect("answer");
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY, "connection refused");
    let empty = get(s.tidegate.http, "empty.test", "/").await.expect("answer");
    assert_eq!(empty.status, StatusCode::SERVICE_UNAVAILABLE, "no ready endpoint");
    let started = Instant::now();
    let slow = get(s.tidegate.http, "slow.test", "/?delay_ms=5000").await.expect("answer");
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT, "read timeout");
    assert!(started.elapsed() < Duration::from_secs(4), "the 1 s read timeout applies, not the default 60 s");
    let fast = get(s.tidegate.http, "slow.test", "/?delay_ms=10").await.expect("answer");
    assert_eq!(fast.status, StatusCode::OK, "within the timeout it answers");
    for answer in [&refused, &empty, &slow] {
        assert_eq!(answer.headers["server"], "tidegate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_set_and_hop_by_hop_headers_dropped() {
    let s = setup().await;
    let request = Request::get("/")
        .header("host", "plain.test")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-end-to-end", "kept")
        .body(Body::default())
        .expect("request");
    let answer = support::H1::connect(s.tidegate.http).await.expect("connect").send(request).await.expect("answer");
    let headers = echoed_headers(&answer);
    assert_eq!(headers["X-Forwarded-For"], vec!["127.0.0.1"], "client-sent X-Forwarded-For is not trusted");
    assert_eq!(headers["X-Real-Ip"], vec!["127.0.0.1"]);
    assert_eq!(headers["X-Forwarded-Proto"], vec!["http"]);
    assert_eq!(headers["X-Forwarded-Host"], vec!["plain.test"]);
    assert_eq!(headers["X-Forwarded-Port"], vec![s.tidegate.http.port().to_string()]);
    assert_eq!(headers["X-End-To-End"], vec!["kept"]);
    assert!(!headers.contains_key("X-Hop"), "headers named by Connection are hop-by-hop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_health_readiness_and_metrics() {
    let s = setup().await;
    get(s.tidegate.http, "plain.test", "/").await.expect("answer");
    let metrics = support::admin_get(s.tidegate.admin, "/metrics").expect("metrics");
    for name in [
        "tidegate_requests_total{host=\"plain.test\",route=\"t/plain/0/0\",status=\"2xx\"}",
        "tidegate_request_duration_seconds_bucket",
        "tidegate_upstream_duration_seconds_bucket",
        "tidegate_active_connections",
        "tidegate_config_version 1",
        "tidegate_config_apply_duration_seconds_count 1",
        "tidegate_rejected_objects 0",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }
    assert_eq!(support::admin_get(s.tidegate.admin, "/healthz").expect("healthz"), "ok\n");

    // An idle keep-alive connection parks; a malformed head is refused and counted.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut idle = tokio::net::TcpStream::connect(s.tidegate.http).await.expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: plain.test\r\n\r\n").await.expect("write");
    let mut answer = [0u8; 1024];
    let n = idle.read(&mut answer).await.expect("read");
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer[..n]));
    let mut bad = tokio::net::TcpStream::connect(s.tidegate.http).await.expect("connect");
    bad.write_all(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n").await.expect("write");
    let mut refused = Vec::new();
    bad.read_to_end(&mut refused).await.expect("read");
    assert!(refused.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&refused));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = support::admin_get(s.tidegate.admin, "/metrics").expect("metrics");
    assert!(metrics.contains("tidegate_refused_requests_total{status=\"400\"} 1"), "{metrics}");
    let parked: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tidegate_parked_connections "))
        .and_then(|v| v.trim().parse().ok())
        .expect("parked connections reported");
    assert!(parked >= 1, "the idle connection is parked: {metrics}");
    // Parked, it still answers.
    idle.write_all(b"GET / HTTP/1.1\r\nHost: plain.test\r\n\r\n").await.expect("write");
    let n = idle.read(&mut answer).await.expect("read");
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer[..n]));
}

/// A loopback listener that never accepts, with its backlog filled: further connection attempts
/// hang in SYN retries, which is what an unreachable endpoint looks like.
fn blackhole() -> (socket2::Socket, Vec<std::net::TcpStream>, std::net::SocketAddr) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().expect("addr").into()).expect("bind");
    socket.listen(0).expect("listen");
    let addr = socket.local_addr().expect("addr").as_socket().expect("inet");
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
    }
    (socket, fillers, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_is_504() {
    let (_socket, _fillers, addr) = blackhole();
    let dir = manifest_dir();
    let mut text = service_yaml("t", "hole", 80, "http", &[addr]);
    text.push_str(&ingress(
        "hole",
        "hole.test",
        "hole",
        "nginx.ingress.kubernetes.io/proxy-connect-timeout: \"1\"",
        "",
    ));
    write_manifest(dir.path(), "all.yaml", &text);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");
    let started = Instant::now();
    let answer = get(tidegate.http, "hole.test", "/").await.expect("answer");
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(4), "the 1 s connect timeout applies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stalls_mid_body_is_cut_after_the_read_timeout() {
    // Headers and part of a 1 MB body, then silence.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\npartial").await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let dir = manifest_dir();
    let mut text = service_yaml("t", "stall", 80, "http", &[addr]);
    text.push_str(&ingress(
        "stall",
        "stall.test",
        "stall",
        "nginx.ingress.kubernetes.io/proxy-read-timeout: \"1\"",
        "",
    ));
    write_manifest(dir.path(), "all.yaml", &text);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), get(tidegate.http, "stall.test", "/"))
        .await
        .expect("ends in time");
    assert!(result.is_err(), "the body is cut, not completed: {result:?}");
    assert!(started.elapsed() < Duration::from_secs(4), "cut after the 1 s read timeout, took {:?}", started.elapsed());
}

/// The HTTP/2 limits a client is told in SETTINGS: 100 concurrent streams by default, the
/// number `--http2-max-concurrent-streams` gives otherwise, and the global ConfigMap's
/// `http2-max-concurrent-streams` over both; past them, the client waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_stream_limit_is_a_setting() {
    let configmap = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings, namespace: sys}\ndata: {http2-max-concurrent-streams: \"9\"}\n";
    let cases: [(&[&str], &str, usize); 3] = [
        (&[], "", 100),
        (&["--http2-max-concurrent-streams", "7"], "", 7),
        (&["--http2-max-concurrent-streams", "7", "--configmap", "sys/settings"], configmap, 9),
    ];
    for (flags, extra, expected) in cases {
        let dir = manifest_dir();
        let web = echo("t", "web").await;
        let manifests =
            format!("{}{}{extra}", service_yaml("t", "web", 80, "http", &[web]), ingress("w", "w.test", "web", "", ""));
        write_manifest(dir.path(), "all.yaml", &manifests);
        let (path, given) = (dir.path().to_owned(), flags.to_vec());
        let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &given)).await.expect("start");
        let tcp = tokio::net::TcpStream::connect(tidegate.http).await.expect("connect");
        let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
        tokio::spawn(connection);
        let mut client = client.ready().await.expect("ready");
        let request = Request::get("http://w.test/").body(()).expect("request");
        let (response, _) = client.send_request(request, true).expect("send");
        assert_eq!(response.await.expect("response").status(), StatusCode::OK);
        assert_eq!(client.current_max_send_streams(), expected, "flags {flags:?}");
        drop(tidegate);
    }
}

/// Rapid reset, paced (CVE-2023-44487 as it was first exploited around fixes for batched
/// floods): HEADERS then RST_STREAM, one pair every 2 ms. Once more than half of a connection's
/// last 100 streams were reset before their answer, it gets GOAWAY; a client that lets its
/// streams finish keeps its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_rapid_reset_gets_goaway() {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    let manifests =
        format!("{}{}", service_yaml("t", "web", 80, "http", &[web]), ingress("w", "w.test", "web", "", ""));
    write_manifest(dir.path(), "all.yaml", &manifests);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");

    let open = async || {
        let tcp = tokio::net::TcpStream::connect(tidegate.http).await.expect("connect");
        let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
        (client, tokio::spawn(connection))
    };
    let (mut client, connection) = open().await;
    let mut pairs = 0;
    for _ in 0..300 {
        let Ok(ready) = client.clone().ready().await else { break };
        let request = Request::get("http://w.test/?delay_ms=500").body(()).expect("request");
        let Ok((_response, mut stream)) = ready.clone().send_request(request, true) else { break };
        stream.send_reset(h2::Reason::CANCEL);
        pairs += 1;
        client = ready;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(3), connection).await;
    assert!(ended.is_ok(), "the connection was closed (after {pairs} pairs)");
    assert!((51..300).contains(&pairs), "closed once more than half of 100 were reset early: {pairs}");
    // Logs go out through a writer thread: the line may follow the GOAWAY by a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !tidegate.logs().iter().any(|l| l.contains("reset most of its streams")) {
        assert!(std::time::Instant::now() < deadline, "logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (client, connection) = open().await;
    let mut client = client.ready().await.expect("ready");
    for i in 0..300 {
        let request = Request::get(format!("http://w.test/{i}")).body(()).expect("request");
        let (response, _) = client.send_request(request, true).expect("send");
        assert_eq!(response.await.expect("answer").status(), StatusCode::OK, "request {i}");
        client = client.ready().await.expect("still open");
    }
    assert!(!connection.is_finished(), "a client whose streams finish keeps its connection");
}
