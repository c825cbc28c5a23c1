//! The connection loop over real loopback sockets, driven by raw bytes from the client side.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

type TestBody = UnsyncBoxBody<Bytes, io::Error>;

fn body(text: impl Into<Bytes>) -> TestBody {
    Full::new(text.into()).map_err(|never| match never {}).boxed_unsync()
}

/// What the test service does, by path.
async fn service(mut request: Request<RequestStream>) -> Response<TestBody> {
    match request.uri().path() {
        "/echo" => {
            let got = request.into_body().collect().await.map(|c| c.to_bytes());
            match got {
                Ok(bytes) => Response::new(body(bytes)),
                Err(e) => Response::builder().status(500).body(body(e.to_string())).expect("response"),
            }
        }
        "/stream" => {
            let frames = ["one,", "two,", "three"].map(|s| Ok::<_, io::Error>(Frame::data(Bytes::from(s))));
            Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync())
        }
        "/upgrade" => {
            let upgrade = on_upgrade(&mut request).expect("an upgrade request");
            tokio::task::spawn_local(async move {
                let mut io = upgrade.wait().await.expect("switched");
                let mut buf = [0u8; 64];
                let n = io.read(&mut buf).await.expect("write");
                io.write_all(&buf[..n].to_ascii_uppercase()).await.expect("write");
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "shout")
                .body(body(""))
                .expect("response")
        }
        _ => Response::new(body("ignored")),
    }
}

/// Serves connections with [`service`] on a loopback port; returns the address and a channel
/// that gets the first bytes of a connection that opened with the HTTP/2 preface, and `parked`
/// each time a connection idles out of the loop (it is served again once readable).
async fn server() -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Bytes>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (handed, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::task::spawn_local(async move {
        let (_stop, shutdown) = watch::channel(false);
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let (shutdown, handed) = (shutdown.clone(), handed.clone());
            tokio::task::spawn_local(async move {
                let (mut io, mut served): (Box<dyn Io>, u64) = (Box::new(stream), 0);
                loop {
                    match serve(io, served, super::Limits::of(&Default::default()), service, shutdown.clone()).await {
                        Ended::Closed | Ended::Refused(_) => return,
                        Ended::Http2(mut detached) => {
                            let mut start = [0u8; 24];
                            detached.read_exact(&mut start).await.expect("write");
                            let _ = handed.send(Bytes::copy_from_slice(&start));
                            return;
                        }
                        Ended::Idle(idle) => {
                            let _ = handed.send(Bytes::from_static(b"parked"));
                            poll_fn(|cx| idle.io.poll_readable(cx)).await.expect("readable");
                            (io, served) = (idle.io, idle.served);
                        }
                    }
                }
            });
        }
    });
    (addr, receiver)
}

/// Reads until `done` says the bytes so far are complete (or the peer closes).
async fn read_until(stream: &mut TcpStream, done: impl Fn(&str) -> bool) -> String {
    let mut got = Vec::new();
    let reading = async {
        let mut buf = [0u8; 4096];
        while !done(&String::from_utf8_lossy(&got)) {
            let n = stream.read(&mut buf).await.expect("write");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), reading).await.expect("answer in time");
    String::from_utf8_lossy(&got).into_owned()
}

fn ends_with(suffix: &'static str) -> impl Fn(&str) -> bool {
    move |s| s.ends_with(suffix)
}

async fn local<F: Future>(test: F) -> F::Output {
    tokio::task::LocalSet::new().run_until(test).await
}

#[tokio::test]
async fn an_idle_connection_leaves_the_loop_and_is_served_again_when_it_speaks() {
    local(async {
        let (addr, mut events) = server().await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        for round in 0..2 {
            client.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi").await.expect("write");
            let answer = read_until(&mut client, ends_with("hi")).await;
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "round {round}: {answer}");
            let parked = tokio::time::timeout(PARK_AFTER * 3, events.recv()).await.expect("parked in time");
            assert_eq!(parked.as_deref(), Some(&b"parked"[..]));
        }
        // A request that comes before the connection parks is served by the same run.
        client.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n").await.expect("write");
        read_until(&mut client, ends_with("ignored")).await;
        client.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n").await.expect("write");
        read_until(&mut client, ends_with("ignored")).await;
        assert!(events.try_recv().is_err(), "no park while busy");
    })
    .await;
}

#[tokio::test]
async fn keep_alive_pipelining_and_bodies_of_both_framings() {
    local(async {
        let (addr, _) = server().await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        // Two pipelined requests in one write, the second chunked in pieces.
        client
            .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhelloPOST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            .await.expect("write");
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"2\r\nde\r\n0\r\n\r\n").await.expect("write");
        let answer = read_until(&mut client, ends_with("abcde")).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("content-length: 5\r\n\r\nhello"), "{answer}");
        assert!(answer.ends_with("content-length: 5\r\n\r\nabcde"), "{answer}");
        assert!(!answer.contains("connection: close"), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn streamed_bodies_go_out_chunked_and_head_gets_none() {
    local(async {
        let (addr, _) = server().await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n").await.expect("write");
        let answer = read_until(&mut client, ends_with("0\r\n\r\n")).await;
        assert!(answer.contains("transfer-encoding: chunked\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\n4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"), "{answer}");

        client
            .write_all(b"HEAD /stream HTTP/1.1\r\nHost: t\r\n\r\nGET /x HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let answer = read_until(&mut client, ends_with("ignored")).await;
        let (head_answer, rest) = answer.split_once("\r\n\r\n").expect("a head");
        assert!(!head_answer.contains("transfer-encoding"), "{answer}");
        assert!(rest.starts_with("HTTP/1.1 200 OK"), "the HEAD answer had a body: {answer}");
    })
    .await;
}

#[tokio::test]
async fn http10_closes_unless_asked_and_gets_an_http11_status_line() {
    local(async {
        let (addr, _) = server().await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(b"GET /stream HTTP/1.0\r\n\r\n").await.expect("write");
        let answer = read_until(&mut client, |_| false).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("connection: close\r\n") && answer.ends_with("\r\n\r\none,two,three"), "{answer}");

        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await.expect("write");
        let answer = read_until(&mut client, ends_with("ignored")).await;
        assert!(answer.contains("connection: keep-alive\r\n"), "{answer}");
        client.write_all(b"GET /x HTTP/1.0\r\n\r\n").await.expect("write");
        assert!(read_until(&mut client, |_| false).await.ends_with("ignored"));

        // Kept alive, but a body of unknown length can only end with the connection.
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await.expect("write");
        let answer = read_until(&mut client, |_| false).await;
        assert!(answer.contains("connection: close\r\n") && answer.ends_with("one,two,three"), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn continue_then_unread_bodies_are_discarded_before_the_next_request() {
    local(async {
        let (addr, _) = server().await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(b"PUT /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(read_until(&mut client, ends_with("\r\n\r\n")).await, "HTTP/1.1 100 Continue\r\n\r\n");
        client.write_all(b"abc").await.expect("write");
        assert!(read_until(&mut client, ends_with("abc")).await.starts_with("HTTP/1.1 200"));

        // /ignore never reads its body; the next request on the connection is still understood.
        client
            .write_all(b"POST /ignore HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n0123456789")
            .await
            .expect("write");
        client.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nok").await.expect("write");
        let answer = read_until(&mut client, ends_with("\r\n\r\nok")).await;
        assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    })
    .await;
}

#[tokio::test]
async fn malformed_and_oversized_heads_are_refused_and_closed() {
    local(async {
        let (addr, _) = server().await;
        for (request, status) in [
            (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_vec(), "400"),
            (b"GET /\x01 HTTP/1.1\r\n\r\n".to_vec(), "400"),
            ([&b"GET / HTTP/1.1\r\nX: "[..], &vec![b'a'; 70_000]].concat(), "431"),
        ] {
            let mut client = TcpStream::connect(addr).await.expect("connect");
            client.write_all(&request).await.expect("write");
            let answer = read_until(&mut client, |_| false).await;
            assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
            assert!(answer.contains("connection: close"), "{answer}");
        }
    })
    .await;
}

#[tokio::test]
async fn switches_protocols_and_hands_over_the_http2_preface() {
    local(async {
        let (addr, mut handed) = server().await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(b"GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: shout\r\n\r\n")
            .await
            .expect("write");
        let answer = read_until(&mut client, ends_with("\r\n\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{answer}");
        assert!(answer.contains("upgrade: shout\r\n") && !answer.contains("content-length"), "{answer}");
        client.write_all(b"hello").await.expect("write");
        assert_eq!(read_until(&mut client, |s| s.len() >= 5).await, "HELLO");

        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("write");
        let start =
            tokio::time::timeout(Duration::from_secs(5), handed.recv()).await.expect("in time").expect("handed over");
        assert_eq!(&start[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    })
    .await;
}

#[tokio::test]
async fn an_idle_connection_holds_no_read_buffer() {
    local(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let conn = RefCell::new(Conn::new(Box::new(stream), std::time::Duration::from_secs(60)));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(conn.borrow_mut().poll_fill_head(&mut cx).is_pending());
        assert_eq!(conn.borrow().buf.capacity(), 0, "waiting kept a buffer");
        client.write_all(b"GET").await.expect("write");
        let read = poll_fn(|cx| conn.borrow_mut().poll_fill_head(cx)).await.expect("write");
        assert_eq!(read, 3);
    })
    .await;
}

#[tokio::test]
async fn an_idle_connection_closes_soon_after_a_drain_starts() {
    local(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, shutdown) = watch::channel(false);
        let serving = tokio::task::spawn_local(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            serve(Box::new(stream), 0, Limits::of(&Default::default()), service, shutdown).await
        });
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.expect("write");
        let first = read_until(&mut client, ends_with("ignored")).await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");

        // Idle when the drain starts: closed by the time it would have parked, not kept.
        let drained = std::time::Instant::now();
        stop.send(true).expect("the connection is listening");
        let ended = tokio::time::timeout(Duration::from_secs(1), serving).await.expect("closed in time");
        assert!(matches!(ended.expect("served"), Ended::Closed));
        assert!(drained.elapsed() < PARK_AFTER * 10, "closed after {:?}", drained.elapsed());
        assert_eq!(read_until(&mut client, |_| false).await, "", "nothing more was sent");
    })
    .await;
}

/// `keep-alive-requests: 2`: the second response of a connection says `Connection: close` and
/// the connection ends; `keep-alive: 0` closes after the first.
#[tokio::test]
async fn a_connection_carries_at_most_keep_alive_requests() {
    for (settings, responses) in [
        (tidegate_snapshot::ClientConnections { keep_alive_requests: Some(2), ..Default::default() }, 2),
        (tidegate_snapshot::ClientConnections { keep_alive_seconds: Some(0), ..Default::default() }, 1),
    ] {
        local(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("address");
            let (_stop, shutdown) = watch::channel(false);
            let serving = tokio::task::spawn_local(async move {
                let (stream, _) = listener.accept().await.expect("accept");
                serve(Box::new(stream), 0, Limits::of(&settings), service, shutdown).await
            });
            let mut client = TcpStream::connect(addr).await.expect("connect");
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\n")
                .await
                .expect("write");
            let all = read_until(&mut client, |_| false).await;
            assert_eq!(all.matches("HTTP/1.1 200").count(), responses, "{all}");
            assert_eq!(all.matches("connection: close").count(), 1, "the last one says so: {all}");
            let ended = tokio::time::timeout(Duration::from_secs(1), serving).await.expect("closed in time");
            assert!(matches!(ended.expect("served"), Ended::Closed));
        })
        .await;
    }
}
