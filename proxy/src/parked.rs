//! HTTP/1 connections waiting for their next request, held by their worker instead of a task
//! each, as nginx holds its keep-alive connections.
//!
//! A connection that has had nothing to read for [`crate::http1::PARK_AFTER`] leaves the HTTP/1
//! loop and its task ends. What is left is a slot here with its socket, its deadline and the
//! connection's facts:
//!
//! - A plain socket leaves tokio's driver (whose per-socket state is a cache-aligned block) for
//!   the lot's own epoll set, where it costs the kernel's entry and nothing in the process.
//! - A TLS stream, which cannot be taken apart and put back, stays with tokio's driver, with
//!   the lot's waker as its reader.
//!
//! When the socket turns readable (a request, or the close) [`run`] hands the connection to a
//! new task, which serves it from where it stopped.
//!
//! ```text
//! task: serve ─(idle 20 ms)─> park ─> slot: plain socket in the lot's epoll | TLS + waker
//! readable ─> run: take the slot, socket back to tokio, spawn ─> serve again
//! once a second: close those past their deadline; drain: close all, park no more
//! ```

use std::cell::{Cell, RefCell};
use std::io::{self, Read as _};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;

use bytes::BytesMut;
use mio::unix::SourceFd;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::handler::{Connection, Worker};
use crate::http1::{Idle, Io, spare};
use crate::server::ConnectionGuard;

/// How often connections past their deadline are closed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Readiness events taken from the lot's epoll set at once.
const EVENTS: usize = 256;
/// Bytes read from a plain socket as it comes back (a request head, usually whole).
const FIRST_READ: usize = 4096;

/// A connection to be served: back from the lot, or new.
pub(crate) struct Resumed<G> {
    pub(crate) io: Box<dyn Io>,
    /// What was read from it on the way back.
    pub(crate) read: BytesMut,
    pub(crate) served: u64,
    pub(crate) conn: Rc<Connection>,
    pub(crate) guard: G,
}

enum Waiting {
    /// Out of tokio's driver, in the lot's epoll set.
    Plain(std::net::TcpStream),
    /// In tokio's driver, with the slot's waker.
    Driver(Box<dyn Io>),
}

struct Held<G> {
    waiting: Waiting,
    served: u64,
    deadline: Instant,
    /// What the connection's [`Connection`] is made of again when it comes back: a parked
    /// connection keeps no allocation of its own besides its socket, since long-lived small
    /// ones scattered among the freed buffers of its requests pin the allocator's pages.
    remote: SocketAddr,
    local_port: u16,
    tls: bool,
    /// Kept for as long as the connection is open (it counts open connections).
    guard: G,
}

struct Slot<G> {
    /// Bumped each time the slot is emptied, so that a late wake for an earlier occupant does
    /// not wake the next one.
    generation: u32,
    held: Option<Held<G>>,
}

/// Slots whose TLS streams turned readable, filled by wakers (on this worker's thread, from its
/// I/O driver) and drained by [`run`].
#[derive(Default)]
struct Woken {
    slots: Mutex<Vec<(u32, u32)>>,
    notify: Notify,
}

struct SlotWaker {
    index: u32,
    generation: u32,
    woken: Arc<Woken>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Ok(mut slots) = self.woken.slots.lock() {
            slots.push((self.index, self.generation));
        }
        self.woken.notify.notify_one();
    }
}

/// The lot's epoll set, itself watched by tokio's driver (readable: some socket in it is).
#[allow(unsafe_code)]
fn watched_epoll_set() -> io::Result<AsyncFd<mio::Poll>> {
    let epoll = mio::Poll::new()?;
    // SAFETY: the `AsyncFd` owns the `mio::Poll`, whose descriptor stays open, and the same,
    // until the `AsyncFd` is dropped.
    Ok(unsafe { AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE) }?)
}

fn token(index: u32, generation: u32) -> mio::Token {
    mio::Token(usize::try_from((u64::from(generation) << 32) | u64::from(index)).unwrap_or(usize::MAX))
}

fn slot_of(token: mio::Token) -> (u32, u32) {
    let raw = token.0 as u64;
    (u32::try_from(raw & u64::from(u32::MAX)).unwrap_or(u32::MAX), u32::try_from(raw >> 32).unwrap_or(u32::MAX))
}

/// One worker's parked connections.
pub(crate) struct ParkingLot<G> {
    slots: RefCell<Vec<Slot<G>>>,
    vacant: RefCell<Vec<u32>>,
    woken: Arc<Woken>,
    /// Never borrowed across an await.
    epoll: RefCell<AsyncFd<mio::Poll>>,
    events: RefCell<mio::Events>,
    /// Set once a drain starts: nothing parks any more.
    closed: Cell<bool>,
    /// Connections parked now (shared by the workers' lots).
    count: Gauge,
}

impl<G> ParkingLot<G> {
    /// A lot for the current worker (inside its runtime), counting its connections in `count`.
    pub(crate) fn new(count: Gauge) -> io::Result<Self> {
        Ok(ParkingLot {
            slots: RefCell::default(),
            vacant: RefCell::default(),
            woken: Arc::default(),
            epoll: RefCell::new(watched_epoll_set()?),
            events: RefCell::new(mio::Events::with_capacity(EVENTS)),
            closed: Cell::new(false),
            count,
        })
    }

    /// Parks a connection until its socket is readable. Gives it back when it already is (serve
    /// it now); after a drain, or if the socket cannot be watched, it is closed.
    pub(crate) fn park(&self, idle: Idle, conn: Rc<Connection>, guard: G) -> Result<(), Resumed<G>> {
        if self.closed.get() {
            return Ok(());
        }
        let Idle { io, served, deadline } = idle;
        let index = self.vacant.borrow_mut().pop().unwrap_or_else(|| {
            let mut slots = self.slots.borrow_mut();
            slots.push(Slot { generation: 0, held: None });
            u32::try_from(slots.len() - 1).unwrap_or(u32::MAX)
        });
        let generation = self.slots.borrow()[index as usize].generation;
        let waiting = match io.into_tcp() {
            Ok(tcp) => {
                // Bytes that arrive meanwhile are reported by the registration.
                let watched = tcp.into_std().and_then(|std| {
                    let fd = std.as_raw_fd();
                    let epoll = self.epoll.borrow();
                    let token = token(index, generation);
                    epoll.get_ref().registry().register(&mut SourceFd(&fd), token, mio::Interest::READABLE)?;
                    Ok(std)
                });
                match watched {
                    Ok(std) => Waiting::Plain(std),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot watch an idle connection; closing it");
                        self.vacant.borrow_mut().push(index);
                        return Ok(());
                    }
                }
            }
            Err(io) => {
                let waker = Waker::from(Arc::new(SlotWaker { index, generation, woken: Arc::clone(&self.woken) }));
                if io.poll_readable(&mut Context::from_waker(&waker)).is_ready() {
                    self.vacant.borrow_mut().push(index);
                    return Err(Resumed { io, read: BytesMut::new(), served, conn, guard });
                }
                Waiting::Driver(io)
            }
        };
        let (remote, local_port, tls) = (conn.remote, conn.local_port, conn.tls);
        drop(conn);
        self.slots.borrow_mut()[index as usize].held =
            Some(Held { waiting, served, deadline, remote, local_port, tls, guard });
        self.count.inc();
        Ok(())
    }

    /// Empties a slot, if it still holds the connection the wake was for.
    fn take(&self, index: u32, generation: u32) -> Option<Held<G>> {
        let mut slots = self.slots.borrow_mut();
        let slot = slots.get_mut(index as usize).filter(|s| s.generation == generation)?;
        let held = slot.held.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.vacant.borrow_mut().push(index);
        self.count.dec();
        Some(held)
    }

    /// A connection taken from its slot, its socket back in tokio's driver. A plain socket is
    /// read first: the new task starts with the request in hand (tokio would otherwise wait for
    /// its driver to report the socket again), and one that was closed goes without a task.
    fn resume(&self, held: Held<G>) -> Option<Resumed<G>> {
        let Held { waiting, served, remote, local_port, tls, guard, .. } = held;
        let mut read = BytesMut::new();
        let io: Box<dyn Io> = match waiting {
            Waiting::Driver(io) => io,
            Waiting::Plain(mut std) => {
                read = spare::take_read();
                read.resize(FIRST_READ, 0);
                // A socket closed here leaves the epoll set with its last descriptor: only one
                // that stays needs taking out.
                match std.read(&mut read) {
                    Ok(0) => return None,
                    Ok(n) => read.truncate(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => read.clear(),
                    Err(_) => return None,
                }
                let fd = std.as_raw_fd();
                let _ = self.epoll.borrow().get_ref().registry().deregister(&mut SourceFd(&fd));
                match TcpStream::from_std(std) {
                    Ok(tcp) => Box::new(tcp),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot resume an idle connection; closing it");
                        return None;
                    }
                }
            }
        };
        let conn = Rc::new(Connection::new(remote, local_port, tls));
        Some(Resumed { io, read, served, conn, guard })
    }

    /// Takes the TLS connections whose streams turned readable.
    fn take_woken(&self) -> Vec<Resumed<G>> {
        let keys = self.woken.slots.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
        keys.into_iter().filter_map(|(i, g)| self.take(i, g)).filter_map(|h| self.resume(h)).collect()
    }

    /// The plain connections the epoll set reports readable, once it reports some.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<Vec<Resumed<G>>> {
        loop {
            let keys = ready!(self.poll_events(cx));
            let resumed: Vec<_> =
                keys.into_iter().filter_map(|(i, g)| self.take(i, g)).filter_map(|h| self.resume(h)).collect();
            // None when every one reported had closed (or was stale).
            if !resumed.is_empty() {
                return Poll::Ready(resumed);
            }
        }
    }

    /// The slots of the sockets the epoll set reports readable, once it reports some.
    fn poll_events(&self, cx: &mut Context<'_>) -> Poll<Vec<(u32, u32)>> {
        let mut epoll = self.epoll.borrow_mut();
        let mut events = self.events.borrow_mut();
        loop {
            let mut ready = match epoll.poll_read_ready_mut(cx) {
                // An error: the runtime is shutting down.
                Poll::Pending | Poll::Ready(Err(_)) => return Poll::Pending,
                Poll::Ready(Ok(ready)) => ready,
            };
            if let Err(e) = ready.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                tracing::debug!(error = %e, "polling idle connections failed");
            }
            if !events.is_empty() {
                return Poll::Ready(events.iter().map(|event| slot_of(event.token())).collect());
            }
            // Cleared only if nothing new was reported since it was seen; then the next round
            // registers the waker.
            ready.clear_ready();
        }
    }

    /// Closes the connections that match, returning how many.
    fn close_where(&self, close: impl Fn(&Held<G>) -> bool) -> usize {
        let mut closed = Vec::new();
        {
            let mut slots = self.slots.borrow_mut();
            let mut vacant = self.vacant.borrow_mut();
            for (index, slot) in slots.iter_mut().enumerate() {
                if slot.held.as_ref().is_some_and(&close) {
                    closed.push(slot.held.take());
                    slot.generation = slot.generation.wrapping_add(1);
                    vacant.push(u32::try_from(index).unwrap_or(u32::MAX));
                }
            }
        }
        // Dropped outside the borrows (a closed socket leaves the epoll set by itself).
        self.count.dec_by(i64::try_from(closed.len()).unwrap_or(i64::MAX));
        closed.len()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.borrow().iter().filter(|s| s.held.is_some()).count()
    }
}

/// Serves the worker's parked connections as they turn readable, closes those past their
/// deadline, and all of them when a drain starts. Runs for as long as the worker does.
pub(crate) async fn run<F>(worker: Rc<Worker>, serve: impl Fn(Rc<Worker>, Resumed<ConnectionGuard>) -> F)
where
    F: Future<Output = ()> + 'static,
{
    let lot = &worker.parked;
    let mut shutdown = worker.shared.shutdown.subscribe();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let resumed = tokio::select! {
            () = lot.woken.notify.notified() => lot.take_woken(),
            resumed = std::future::poll_fn(|cx| lot.poll_readable(cx)) => resumed,
            _ = sweep.tick() => {
                let now = Instant::now();
                let closed = lot.close_where(|held| held.deadline <= now);
                if closed > 0 {
                    tracing::debug!(worker = worker.id, closed, "idle connections timed out");
                }
                continue;
            }
            _ = shutdown.wait_for(|stop| *stop) => {
                lot.closed.set(true);
                lot.close_where(|_| true);
                return;
            }
        };
        for connection in resumed {
            tokio::task::spawn_local(serve(Rc::clone(&worker), connection));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use super::*;
    use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
    use tokio::net::TcpListener;

    /// A connected pair whose server side has found nothing to read, as a connection that
    /// parks has (an accepted socket is taken to be readable until a read says otherwise).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let nothing = server.try_read(&mut [0u8; 1]).expect_err("nothing sent yet");
        assert_eq!(nothing.kind(), std::io::ErrorKind::WouldBlock);
        (client, server)
    }

    /// A stream that stays in tokio's driver when parked, as TLS does.
    struct InDriver(TcpStream);

    impl AsyncRead for InDriver {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for InDriver {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    impl Io for InDriver {
        fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.0.poll_read_ready(cx)
        }

        fn into_tcp(self: Box<Self>) -> Result<TcpStream, Box<dyn Io>> {
            Err(self)
        }
    }

    fn idle(io: Box<dyn Io>, deadline: Instant) -> Idle {
        Idle { io, served: 1, deadline }
    }

    fn facts() -> Rc<Connection> {
        let remote = "127.0.0.1:1".parse().expect("address");
        Rc::new(Connection::new(remote, 0, false))
    }

    /// Waits until the lot has something to give back.
    async fn next(lot: &ParkingLot<Rc<()>>) -> Vec<Resumed<Rc<()>>> {
        let wait = async {
            tokio::select! {
                () = lot.woken.notify.notified() => lot.take_woken(),
                back = std::future::poll_fn(|cx| lot.poll_readable(cx)) => back,
            }
        };
        tokio::time::timeout(Duration::from_secs(2), wait).await.expect("woken in time")
    }

    #[tokio::test]
    async fn parked_connections_come_back_when_readable_and_not_before() {
        let lot = ParkingLot::new(Gauge::default()).expect("lot");
        let far = Instant::now() + Duration::from_secs(60);
        let (mut plain_client, plain) = pair().await;
        let (mut tls_client, tls) = pair().await;
        assert!(lot.park(idle(Box::new(plain), far), facts(), Rc::new(())).is_ok());
        assert!(lot.park(idle(Box::new(InDriver(tls)), far), facts(), Rc::new(())).is_ok());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let nothing = std::future::poll_fn(|cx| Poll::Ready(lot.poll_readable(cx).is_pending())).await;
        assert!(lot.take_woken().is_empty() && nothing, "nothing sent, nothing woken");
        assert_eq!(lot.len(), 2);

        for client in [&mut plain_client, &mut tls_client] {
            client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
            let back = next(&lot).await;
            assert_eq!(back.len(), 1);
            assert_eq!(back[0].served, 1);
        }
        assert_eq!(lot.len(), 0);

        // A plain socket comes back with what was sent while it was parked, and back in tokio's
        // driver for what follows.
        let (mut plain_client, plain) = pair().await;
        assert!(lot.park(idle(Box::new(plain), far), facts(), Rc::new(())).is_ok());
        plain_client.write_all(b"hello").await.expect("write");
        let mut back = next(&lot).await.pop().expect("one");
        assert_eq!(&back.read[..], b"hello");
        plain_client.write_all(b"again").await.expect("write");
        let mut got = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut back.io, &mut got).await.expect("read");
        assert_eq!(&got, b"again");

        // One the client closed while parked goes without being served.
        let (plain_client, plain) = pair().await;
        assert!(lot.park(idle(Box::new(plain), far), facts(), Rc::new(())).is_ok());
        drop(plain_client);
        let waited = tokio::time::timeout(Duration::from_millis(300), next(&lot)).await;
        assert!(waited.is_err(), "a closed connection is not handed back");
        assert_eq!(lot.len(), 0);

        // Readable already: a stream in the driver is given straight back.
        let (mut client, tls) = pair().await;
        client.write_all(b"x").await.expect("write");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(lot.park(idle(Box::new(InDriver(tls)), far), facts(), Rc::new(())).is_err());
    }

    #[tokio::test]
    async fn deadlines_and_drains_close_parked_connections() {
        let lot = ParkingLot::new(Gauge::default()).expect("lot");
        let guard = Rc::new(());
        let now = Instant::now();
        let mut clients = Vec::new();
        for deadline in [now, now + Duration::from_secs(60)] {
            let (client, server) = pair().await;
            clients.push(client);
            assert!(lot.park(idle(Box::new(server), deadline), facts(), Rc::clone(&guard)).is_ok());
        }
        assert_eq!((Rc::strong_count(&guard), lot.count.get()), (3, 2));
        assert_eq!(lot.close_where(|held| held.deadline <= now), 1);
        assert_eq!(lot.count.get(), 1, "the gauge follows");
        assert_eq!(Rc::strong_count(&guard), 2, "the expired one is dropped");
        let mut closed = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut clients[0], &mut closed).await.expect("read");
        assert_eq!(n, 0, "its client sees the close");
        lot.closed.set(true);
        assert_eq!(lot.close_where(|_| true), 1);
        let (_client, server) = pair().await;
        assert!(lot.park(idle(Box::new(server), now), facts(), Rc::clone(&guard)).is_ok());
        assert_eq!((lot.len(), Rc::strong_count(&guard), lot.count.get()), (0, 1, 0), "after a drain nothing parks");
    }
}
