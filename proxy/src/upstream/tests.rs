//! The upstream client against real loopback servers that answer with scripted bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::body::LocalBody;

const TIMEOUTS: Timeouts = Timeouts { connect_ms: 1_000, read_ms: 2_000, send_ms: 2_000 };

/// What a scripted upstream does with each request head it reads.
#[derive(Clone, Copy)]
enum Script {
    /// Answers with these bytes and keeps the connection for more requests.
    Answer(&'static str),
    /// Answers, then closes.
    AnswerAndClose(&'static str),
    /// Reads the head and the body (by its `content-length` or chunked) and answers with what
    /// it received, head and body, as a `text/plain` body.
    Echo,
    /// Never answers.
    Silent,
}

/// A loopback upstream that runs `script` on every connection; the counter is the connections
/// accepted.
async fn upstream(script: Script) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(request) = read_request(&mut socket, &mut buf).await else { return };
                    let answer = match script {
                        Script::Answer(a) | Script::AnswerAndClose(a) => a.as_bytes().to_vec(),
                        Script::Echo => {
                            let mut a =
                                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", request.len()).into_bytes();
                            a.extend_from_slice(&request);
                            a
                        }
                        Script::Silent => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                    };
                    if socket.write_all(&answer).await.is_err() || matches!(script, Script::AnswerAndClose(_)) {
                        return;
                    }
                }
            });
        }
    });
    (address, accepted)
}

/// One request's head and body (by `content-length`, or chunked up to the last chunk), with
/// what follows kept in `buf`; `None` when the client closed.
async fn read_request(socket: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse::<usize>().expect("length"));
            let whole = if head.contains("transfer-encoding: chunked") {
                buf.windows(5).position(|w| w == b"0\r\n\r\n").map(|p| p + 5)
            } else {
                Some(end + 4 + length).filter(|&n| buf.len() >= n)
            };
            if let Some(n) = whole {
                return Some(buf.drain(..n).collect());
            }
        }
        let mut chunk = [0u8; 65536];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn get(path: &str) -> Request<RequestBody> {
    Request::get(path).header("host", "up.test").body(LocalBody::new(http_body_util::Empty::new())).expect("request")
}

async fn text(response: Response<UpstreamBody>) -> String {
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn a_length_delimited_answer_and_its_connection_is_reused() {
    let (address, accepted) =
        upstream(Script::Answer("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello")).await;
    let pool = Rc::new(Pool::default());
    for _ in 0..3 {
        let response = pool
            .send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, TIMEOUTS)
            .await
            .expect("answered");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-a"], "b");
        assert_eq!(text(response).await, "hello");
        assert_eq!(pool.idle_count(address), 1, "back in the pool once read");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// `upstream-keepalive-requests: 2`: a connection serves two requests and is closed, the
/// third goes on a new one; `upstream-keepalive-connections: 0` keeps none.
#[tokio::test]
async fn upstream_keepalive_settings_bound_the_pool() {
    let (address, accepted) = upstream(Script::Answer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
    let pool = Rc::new(Pool::default());
    pool.configure(PoolLimits::of(&tidegate_snapshot::UpstreamConnections { requests: Some(2), ..Default::default() }));
    for _ in 0..3 {
        let response = pool
            .send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, TIMEOUTS)
            .await
            .expect("answered");
        assert_eq!(text(response).await, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "two requests on the first connection, the third on a second");
    pool.configure(PoolLimits::of(&tidegate_snapshot::UpstreamConnections {
        idle_per_endpoint: Some(0),
        ..Default::default()
    }));
    let response =
        pool.send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, TIMEOUTS).await.expect("answered");
    assert_eq!(text(response).await, "ok");
    assert_eq!(pool.idle_count(address), 0, "none kept");
}

#[tokio::test]
async fn a_chunked_answer_is_decoded_and_the_connection_reused() {
    let answer =
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-T: 1\r\n\r\n";
    let (address, accepted) = upstream(Script::Answer(answer)).await;
    let pool = Rc::new(Pool::default());
    for _ in 0..2 {
        let response = pool
            .send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, TIMEOUTS)
            .await
            .expect("answered");
        assert_eq!(text(response).await, "abcdefg");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.idle_count(address), 1);
}

#[tokio::test]
async fn an_answer_delimited_by_the_close_is_read_to_the_end_and_not_pooled() {
    let (address, accepted) = upstream(Script::AnswerAndClose("HTTP/1.1 200 OK\r\n\r\nuntil the end")).await;
    let pool = Rc::new(Pool::default());
    for _ in 0..2 {
        let response = pool
            .send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, TIMEOUTS)
            .await
            .expect("answered");
        assert_eq!(text(response).await, "until the end");
        assert_eq!(pool.idle_count(address), 0);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used() {
    let (address, accepted) = upstream(Script::AnswerAndClose("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
    let pool = Rc::new(Pool::default());
    for _ in 0..3 {
        let response = pool
            .send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, TIMEOUTS)
            .await
            .expect("answered");
        assert_eq!(text(response).await, "ok");
        // Let the close arrive, as it would while a connection idles.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    pool.sweep();
    assert_eq!(pool.idle_count(address), 0, "the sweep closes what the upstream closed");
}

#[tokio::test]
async fn a_get_whose_reused_connection_fails_unanswered_is_sent_again() {
    let (address, accepted) = upstream(Script::AnswerAndClose("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
    let pool = Rc::new(Pool::default());
    let response =
        pool.send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, TIMEOUTS).await.expect("answered");
    assert_eq!(text(response).await, "ok");
    // Straight away: the close has not been seen yet, so the pooled connection is tried.
    let response = pool
        .send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, TIMEOUTS)
        .await
        .expect("answered on a new connection");
    assert_eq!(text(response).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn request_bodies_go_out_with_their_length_or_chunked() {
    let (address, _) = upstream(Script::Echo).await;
    let pool = Rc::new(Pool::default());

    let request = Request::post("/p").header("host", "up.test").body(LocalBody::new(Full::new(Bytes::from("abc"))));
    let response = pool
        .send(&mut Attempts::one(address), &Transport::plain(), request.expect("request"), None, TIMEOUTS)
        .await
        .expect("answered");
    let seen = text(response).await;
    assert!(seen.starts_with("POST /p HTTP/1.1\r\nhost: up.test\r\n"), "{seen}");
    assert!(seen.ends_with("content-length: 3\r\n\r\nabc"), "{seen}");

    let frames = ["one", "", "three"].map(|s| Ok::<_, io::Error>(Frame::data(Bytes::from(s))));
    let streamed = LocalBody::new(StreamBody::new(futures_util::stream::iter(frames)));
    let request = Request::put("/s").header("host", "up.test").body(streamed).expect("request");
    let response =
        pool.send(&mut Attempts::one(address), &Transport::plain(), request, None, TIMEOUTS).await.expect("answered");
    let seen = text(response).await;
    assert!(seen.ends_with("transfer-encoding: chunked\r\n\r\n3\r\none\r\n5\r\nthree\r\n0\r\n\r\n"), "{seen}");

    let request = Request::post("/e").header("host", "up.test").body(LocalBody::new(http_body_util::Empty::new()));
    let response = pool
        .send(&mut Attempts::one(address), &Transport::plain(), request.expect("request"), None, TIMEOUTS)
        .await
        .expect("answered");
    assert!(text(response).await.ends_with("content-length: 0\r\n\r\n"));
}

#[tokio::test]
async fn an_early_answer_is_heard_while_the_body_is_still_going_out() {
    // Answers as soon as the head is in, without reading the body, then closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 1024];
        let _ = socket.read(&mut buf).await;
        let _ = socket.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n").await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    // More than the socket buffers hold, so the write must wait on the upstream.
    let big = Bytes::from(vec![b'x'; 32 << 20]);
    let request = Request::post("/").header("host", "up.test").body(LocalBody::new(Full::new(big)));
    let pool = Rc::new(Pool::default());
    let response = pool
        .send(&mut Attempts::one(address), &Transport::plain(), request.expect("request"), None, TIMEOUTS)
        .await
        .expect("answered");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    drop(response);
    assert_eq!(pool.idle_count(address), 0, "a request cut short leaves its connection unusable");
}

#[tokio::test]
async fn interim_answers_are_skipped_and_surprises_are_errors() {
    let (address, _) = upstream(Script::Answer("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")).await;
    let pool = Rc::new(Pool::default());
    let response =
        pool.send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, TIMEOUTS).await.expect("answered");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    let (address, _) = upstream(Script::Answer("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")).await;
    let error = pool
        .send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, TIMEOUTS)
        .await
        .expect_err("101 to a plain request");
    assert!(matches!(error, UpstreamError::Malformed(..)) && error.status() == StatusCode::BAD_GATEWAY, "{error}");

    let (address, _) =
        upstream(Script::Answer("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")).await;
    let error = pool
        .send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, TIMEOUTS)
        .await
        .expect_err("ambiguous framing");
    assert!(error.to_string().contains("differing Content-Length"), "{error}");

    let (address, _) = upstream(Script::AnswerAndClose("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")).await;
    let response = pool
        .send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, TIMEOUTS)
        .await
        .expect("head answered");
    assert!(response.into_body().collect().await.is_err(), "a body cut short is an error");
}

#[tokio::test]
async fn timeouts_and_refusals_have_their_status() {
    let (address, _) = upstream(Script::Silent).await;
    let pool = Rc::new(Pool::default());
    let quick = Timeouts { read_ms: 100, ..TIMEOUTS };
    let error = pool
        .send(&mut Attempts::one(address), &Transport::plain(), get("/"), None, quick)
        .await
        .expect_err("no answer");
    assert!(matches!(error, UpstreamError::ReadTimeout(_)) && error.status() == StatusCode::GATEWAY_TIMEOUT);

    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("address");
    let error = pool
        .send(&mut Attempts::one(closed), &Transport::plain(), get("/"), None, TIMEOUTS)
        .await
        .expect_err("nothing listens");
    assert!(matches!(error, UpstreamError::Connect(..)) && error.status() == StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn a_switched_connection_is_handed_over_with_what_followed_the_head() {
    let answer = "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nfirst";
    let (address, _) = upstream(Script::Answer(answer)).await;
    let pool = Rc::new(Pool::default());
    let request = Request::get("/ws")
        .header("host", "up.test")
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(LocalBody::new(http_body_util::Empty::new()))
        .expect("request");
    let mut response =
        pool.send(&mut Attempts::one(address), &Transport::plain(), request, None, TIMEOUTS).await.expect("answered");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut switched = response.body_mut().take_switched().expect("the connection");
    let mut first = [0u8; 5];
    switched.read_exact(&mut first).await.expect("read");
    assert_eq!(&first, b"first");
}

/// A body that sends `pieces` pieces `every` apart, then stops for `then_stall` (if any) before
/// its end.
fn trickle(pieces: usize, every: Duration, then_stall: Option<Duration>) -> RequestBody {
    let stream = futures_util::stream::unfold(0, move |i| async move {
        if i == pieces {
            if let Some(stall) = then_stall {
                tokio::time::sleep(stall).await;
            }
            return None;
        }
        tokio::time::sleep(every).await;
        Some((Ok::<_, io::Error>(Frame::data(Bytes::from_static(b"piece"))), i + 1))
    });
    LocalBody::new(StreamBody::new(stream))
}

#[tokio::test]
async fn the_send_timeout_runs_from_the_last_progress_of_an_upload() {
    let (address, _) = upstream(Script::Echo).await;
    let pool = Rc::new(Pool::default());
    // The read timeout is long: while the request goes out, only the send timeout counts.
    let short = Timeouts { connect_ms: 1_000, read_ms: 30_000, send_ms: 300 };

    // Ten pieces 100 ms apart: a second in all, three times the timeout, always moving.
    let request = Request::post("/up").header("host", "up.test").body(trickle(10, Duration::from_millis(100), None));
    let response = pool
        .send(&mut Attempts::one(address), &Transport::plain(), request.expect("request"), None, short)
        .await
        .expect("a moving upload passes");
    assert!(text(response).await.ends_with("5\r\npiece\r\n0\r\n\r\n"));

    // Pieces further apart than a short read timeout, within a long send timeout: the read
    // timeout only starts once the request has gone out.
    let patient = Timeouts { connect_ms: 1_000, read_ms: 300, send_ms: 30_000 };
    let request = Request::post("/up").header("host", "up.test").body(trickle(3, Duration::from_millis(400), None));
    let response = pool
        .send(&mut Attempts::one(address), &Transport::plain(), request.expect("request"), None, patient)
        .await
        .expect("the read timeout waits");
    assert!(text(response).await.ends_with("5\r\npiece\r\n0\r\n\r\n"));

    // Two pieces, then nothing for longer than the timeout.
    let stalled = trickle(2, Duration::from_millis(50), Some(Duration::from_secs(5)));
    let request = Request::post("/up").header("host", "up.test").body(stalled).expect("request");
    let started = std::time::Instant::now();
    let error = pool
        .send(&mut Attempts::one(address), &Transport::plain(), request, None, short)
        .await
        .expect_err("a stalled upload fails");
    assert!(matches!(error, UpstreamError::SendTimeout(_)) && error.status() == StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(2), "cut after the timeout: {:?}", started.elapsed());
}
