//! Client sockets in the worker's own epoll set, from accept to close, as nginx keeps its
//! connections; and the HTTP/1 connections that wait there between requests without a task.
//!
//! Each accepted socket is registered once, edge-triggered for reading and writing, in the
//! worker's epoll set, which is itself one source of tokio's driver. The socket's slot in a
//! per-thread table holds what the set last reported (readable, writable) and the wakers of
//! whoever waits. A socket never moves between sets: a connection makes one `epoll_ctl` call in
//! its life (closing the socket takes it out of the set), and an idle connection parks and
//! comes back without any system call.
//!
//! ```text
//! accept ─> register (one slot) ─> task: serve ─(idle 20 ms)─> park: the stream waits in its slot
//! epoll set readable ─> dispatch: each event into its slot ─> wake its reader / writer,
//!                                                           or a parked connection: new task
//! once a second: close parked ones past their deadline; drain: close all, park no more
//! ```
//!
//! A read that fills less than it was offered has drained the socket, so the slot stops
//! claiming it readable: the next read waits for the set's next report instead of asking the
//! kernel for nothing (the set reports every arrival).
//!
//! # Assumptions
//! A socket is used on the thread that accepted it (a worker's connections never leave it); on
//! another thread its slot is unknown and it would wait forever. Its descriptor is never
//! duplicated, so closing it removes it from the set.

use std::cell::{Cell, RefCell};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::connection::Connection;
use crate::http1::{Idle, Io};

/// How often parked connections past their deadline are closed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Readiness events taken from the set at once.
const EVENTS: usize = 256;
/// Batches of events dispatched before the dispatcher lets other tasks run.
const BATCHES_PER_TURN: usize = 4;

/// A socket's place in its thread's table; the generation tells a slot's occupants apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    fn token(self) -> mio::Token {
        mio::Token(usize::try_from((u64::from(self.generation) << 32) | u64::from(self.index)).unwrap_or(usize::MAX))
    }

    fn of(token: mio::Token) -> Key {
        let raw = token.0 as u64;
        Key {
            index: u32::try_from(raw & u64::from(u32::MAX)).unwrap_or(u32::MAX),
            generation: u32::try_from(raw >> 32).unwrap_or(u32::MAX),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

/// What the set last said of a socket, and who waits on it.
#[derive(Default)]
struct Slot {
    generation: u32,
    occupied: bool,
    /// Not known to be drained since the set last reported bytes (or the end) to read.
    readable: bool,
    /// Not known to be full since the set last reported room to write.
    writable: bool,
    /// A connection waits in the worker's [`Reactor`] without a task.
    parked: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    vacant: Vec<u32>,
}

thread_local! {
    /// The sockets of the worker running on this thread.
    static TABLE: RefCell<Table> = RefCell::default();
}

impl Table {
    /// The slot `key` names, while its occupant is the one the key was given to.
    fn slot(&mut self, key: Key) -> Option<&mut Slot> {
        self.slots.get_mut(key.index as usize).filter(|s| s.occupied && s.generation == key.generation)
    }
}

fn with_slot<R>(key: Key, f: impl FnOnce(&mut Slot) -> R) -> Option<R> {
    TABLE.with(|table| table.borrow_mut().slot(key).map(f))
}

/// A new slot, taken to be readable and writable until a system call says otherwise: a client
/// often sends its request with its connection, and trying costs less than waiting for the
/// set's first report.
fn occupy() -> Key {
    TABLE.with(|table| {
        let mut table = table.borrow_mut();
        let index = table.vacant.pop().unwrap_or_else(|| {
            table.slots.push(Slot::default());
            u32::try_from(table.slots.len() - 1).unwrap_or(u32::MAX)
        });
        let slot = &mut table.slots[index as usize];
        slot.occupied = true;
        slot.readable = true;
        slot.writable = true;
        Key { index, generation: slot.generation }
    })
}

fn vacate(key: Key) {
    // Wakers are dropped outside the borrow: dropping one may free a task, whose sockets would
    // come back here.
    let wakers = TABLE.with(|table| {
        let mut table = table.borrow_mut();
        let slot = table.slot(key)?;
        let wakers = (slot.reader.take(), slot.writer.take());
        *slot = Slot { generation: slot.generation.wrapping_add(1), ..Slot::default() };
        table.vacant.push(key.index);
        Some(wakers)
    });
    drop(wakers);
}

/// Ready when the slot claims `direction`; otherwise `cx` is woken when the set reports it.
fn poll_ready(key: Key, direction: Direction, cx: &mut Context<'_>) -> Poll<()> {
    let ready = with_slot(key, |slot| {
        let (claimed, waiter) = match direction {
            Direction::Read => (slot.readable, &mut slot.reader),
            Direction::Write => (slot.writable, &mut slot.writer),
        };
        if !claimed && !waiter.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waiter = Some(cx.waker().clone());
        }
        claimed
    });
    // A slot this thread does not know: let the system call answer.
    if ready.unwrap_or(true) { Poll::Ready(()) } else { Poll::Pending }
}

fn clear(key: Key, direction: Direction) {
    with_slot(key, |slot| match direction {
        Direction::Read => slot.readable = false,
        Direction::Write => slot.writable = false,
    });
}

/// Runs a non-blocking operation on the socket at `key` when its slot claims `direction`;
/// `WouldBlock` withdraws the claim and waits for the set's next report.
fn poll_io<R>(
    key: Key,
    direction: Direction,
    cx: &mut Context<'_>,
    mut op: impl FnMut() -> io::Result<R>,
) -> Poll<io::Result<R>> {
    loop {
        ready!(poll_ready(key, direction, cx));
        match op() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => clear(key, direction),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            result => return Poll::Ready(result),
        }
    }
}

/// A client connection's socket, registered in its worker's epoll set.
#[derive(Debug)]
pub(crate) struct ClientStream {
    socket: mio::net::TcpStream,
    key: Key,
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        // The socket closes right after: that takes it out of the epoll set.
        vacate(self.key);
    }
}

/// Reads into the unfilled part of `buf` without initializing it first.
#[allow(unsafe_code)]
fn recv_into(socket: &mio::net::TcpStream, buf: &mut ReadBuf<'_>) -> io::Result<usize> {
    // SAFETY: `recv` writes only initialized bytes, and only into the first `n` of the slice it
    // is given, which is what `assume_init` then marks; nothing is de-initialized.
    unsafe {
        let n = socket2::SockRef::from(socket).recv(buf.unfilled_mut())?;
        buf.assume_init(n);
        Ok(n)
    }
}

impl ClientStream {
    /// Copies what has arrived into `buf` without taking it from the socket, once more than
    /// `seen` bytes have (or the peer closed: 0).
    pub(crate) async fn peek(&self, buf: &mut [u8], seen: usize) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            poll_io(self.key, Direction::Read, cx, || match self.socket.peek(buf)? {
                // Nothing new yet: wait for the next report of data.
                n if n > 0 && n <= seen && n < buf.len() => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            })
        })
        .await
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let offered = buf.remaining();
        if offered == 0 {
            return Poll::Ready(Ok(()));
        }
        let n = ready!(poll_io(self.key, Direction::Read, cx, || recv_into(&self.socket, buf)))?;
        buf.advance(n);
        if n > 0 && n < offered {
            clear(self.key, Direction::Read);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(poll_io(self.key, Direction::Write, cx, || (&self.socket).write(buf)))?;
        if n < buf.len() {
            clear(self.key, Direction::Write);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let offered: usize = bufs.iter().map(|b| b.len()).sum();
        let n = ready!(poll_io(self.key, Direction::Write, cx, || (&self.socket).write_vectored(bufs)))?;
        if n < offered {
            clear(self.key, Direction::Write);
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.socket.shutdown(std::net::Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl Io for ClientStream {
    #[cfg(test)]
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_ready(self.key, Direction::Read, cx).map(Ok)
    }

    fn key(&self) -> Option<Key> {
        Some(self.key)
    }

    fn into_client(self: Box<Self>) -> Result<ClientStream, Box<dyn Io>> {
        Ok(*self)
    }
}

impl Io for tokio_rustls::server::TlsStream<ClientStream> {
    #[cfg(test)]
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().0.poll_readable(cx)
    }

    fn key(&self) -> Option<Key> {
        Some(self.get_ref().0.key)
    }

    fn into_client(self: Box<Self>) -> Result<ClientStream, Box<dyn Io>> {
        Err(self)
    }
}

/// A listener in the worker's epoll set.
pub(crate) struct ClientListener {
    listener: mio::net::TcpListener,
    key: Key,
    local_port: u16,
}

impl ClientListener {
    /// The port its connections arrive on.
    pub(crate) fn local_port(&self) -> u16 {
        self.local_port
    }

    /// The next connection, registered in the same set.
    pub(crate) async fn accept(&self, reactor: &Reactor<impl Sized>) -> io::Result<(ClientStream, SocketAddr)> {
        let accept = |cx: &mut Context<'_>| poll_io(self.key, Direction::Read, cx, || self.listener.accept());
        let (socket, remote) = std::future::poll_fn(accept).await?;
        Ok((reactor.register(socket)?, remote))
    }
}

impl Drop for ClientListener {
    fn drop(&mut self) {
        vacate(self.key);
    }
}

/// A connection waiting for its next request.
enum Waiting {
    Plain(ClientStream),
    /// TLS state cannot be taken apart; it stays whole (and boxed).
    Tls(Box<dyn Io>),
}

struct Parked<G> {
    waiting: Waiting,
    key: Key,
    served: u64,
    deadline: Instant,
    /// What the connection's [`Connection`] is made of again when it comes back: a parked
    /// connection keeps no allocation of its own besides its socket, since long-lived small
    /// ones scattered among the freed buffers of its requests pin the allocator's pages.
    remote: SocketAddr,
    local_port: u16,
    tls: bool,
    client_certificates: Option<crate::tls::ClientCertificates>,
    /// Kept for as long as the connection is open (it counts open connections).
    guard: G,
}

/// A connection to be served: back from waiting, or new.
pub(crate) struct Resumed<G> {
    pub(crate) io: Box<dyn Io>,
    pub(crate) served: u64,
    pub(crate) conn: Rc<Connection>,
    pub(crate) guard: G,
}

/// One worker's epoll set of client sockets, and the connections parked in it.
pub(crate) struct Reactor<G> {
    /// Never borrowed across an await.
    epoll: RefCell<AsyncFd<mio::Poll>>,
    events: RefCell<mio::Events>,
    /// Parked connections by slot index.
    parked: RefCell<Vec<Option<Parked<G>>>>,
    /// Whom a batch of events wakes (kept between batches).
    wake: RefCell<Vec<Woken>>,
    /// Set once a drain starts: nothing parks any more.
    closed: Cell<bool>,
    /// Connections parked now (shared by the workers).
    count: Gauge,
}

/// The epoll set, itself watched by tokio's driver (readable: some socket in it is).
#[allow(unsafe_code)]
fn watched_epoll_set() -> io::Result<AsyncFd<mio::Poll>> {
    let epoll = mio::Poll::new()?;
    // SAFETY: the `AsyncFd` owns the `mio::Poll`, whose descriptor stays open, and the same,
    // until the `AsyncFd` is dropped.
    Ok(unsafe { AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE) }?)
}

impl<G> Reactor<G> {
    /// The reactor of the current worker (inside its runtime), counting parked connections in
    /// `count`.
    pub(crate) fn new(count: Gauge) -> io::Result<Self> {
        Ok(Reactor {
            epoll: RefCell::new(watched_epoll_set()?),
            events: RefCell::new(mio::Events::with_capacity(EVENTS)),
            parked: RefCell::default(),
            wake: RefCell::default(),
            closed: Cell::new(false),
            count,
        })
    }

    /// Puts a listener in the set.
    pub(crate) fn listen(&self, listener: std::net::TcpListener) -> io::Result<ClientListener> {
        let local_port = listener.local_addr()?.port();
        let mut listener = mio::net::TcpListener::from_std(listener);
        let key = self.add(&mut listener, mio::Interest::READABLE)?;
        Ok(ClientListener { listener, key, local_port })
    }

    /// Puts an accepted socket in the set.
    pub(crate) fn register(&self, mut socket: mio::net::TcpStream) -> io::Result<ClientStream> {
        let key = self.add(&mut socket, mio::Interest::READABLE | mio::Interest::WRITABLE)?;
        Ok(ClientStream { socket, key })
    }

    /// A slot for `source`, registered in the set under it.
    fn add(&self, source: &mut impl mio::event::Source, interest: mio::Interest) -> io::Result<Key> {
        let key = occupy();
        match self.epoll.borrow().get_ref().registry().register(source, key.token(), interest) {
            Ok(()) => Ok(key),
            Err(e) => {
                vacate(key);
                Err(e)
            }
        }
    }

    /// Parks a connection until its socket reports something to read. Gives it back when the
    /// socket may have something already (serve it now); after a drain it is closed.
    pub(crate) fn park(&self, idle: Idle, conn: Rc<Connection>, guard: G) -> Result<(), Resumed<G>> {
        if self.closed.get() {
            return Ok(());
        }
        let Idle { io, served, deadline } = idle;
        let Some(key) = io.key() else {
            return Err(Resumed { io, served, conn, guard });
        };
        // The task that served it ends: its wakers go, and with them its memory.
        let parked = with_slot(key, |slot| {
            if slot.readable {
                return None;
            }
            slot.parked = true;
            Some((slot.reader.take(), slot.writer.take()))
        });
        let Some(Some(wakers)) = parked else {
            return Err(Resumed { io, served, conn, guard });
        };
        drop(wakers);
        let waiting = match io.into_client() {
            Ok(stream) => Waiting::Plain(stream),
            Err(io) => Waiting::Tls(io),
        };
        let (remote, local_port, tls) = (conn.remote, conn.local_port, conn.tls);
        let client_certificates = conn.client_certificates.clone();
        drop(conn);
        let mut all = self.parked.borrow_mut();
        let index = key.index as usize;
        if all.len() <= index {
            all.resize_with(index + 1, || None);
        }
        all[index] =
            Some(Parked { waiting, key, served, deadline, remote, local_port, tls, client_certificates, guard });
        self.count.inc();
        Ok(())
    }

    /// Takes a parked connection out of its slot.
    fn unpark(&self, key: Key) -> Option<Resumed<G>> {
        let parked = self.parked.borrow_mut().get_mut(key.index as usize)?.take_if(|p| p.key == key)?;
        with_slot(key, |slot| slot.parked = false);
        self.count.dec();
        let Parked { waiting, served, remote, local_port, tls, client_certificates, guard, .. } = parked;
        let io: Box<dyn Io> = match waiting {
            Waiting::Plain(stream) => Box::new(stream),
            Waiting::Tls(io) => io,
        };
        let conn = Rc::new(Connection::new(remote, local_port, tls, client_certificates));
        Some(Resumed { io, served, conn, guard })
    }

    /// Hands each event of the set to its slot: readiness claimed, waiters woken, parked
    /// connections with something to read given back. Ready once some were; pending (and `cx`
    /// woken when there are more) once the set has nothing to report.
    fn poll_dispatch(&self, cx: &mut Context<'_>, resumed: &mut Vec<Resumed<G>>) -> Poll<()> {
        let mut batches = 0;
        let mut wake = self.wake.take();
        while batches < BATCHES_PER_TURN {
            {
                let mut epoll = self.epoll.borrow_mut();
                let mut guard = match epoll.poll_read_ready_mut(cx) {
                    Poll::Ready(Ok(guard)) => guard,
                    // An error: the runtime is shutting down.
                    Poll::Pending | Poll::Ready(Err(_)) => break,
                };
                let mut events = self.events.borrow_mut();
                if let Err(e) = guard.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                    tracing::debug!(error = %e, "polling client sockets failed");
                }
                if events.is_empty() {
                    // Cleared only if nothing new was reported since it was seen; then the next
                    // round registers the waker.
                    guard.clear_ready();
                    continue;
                }
                batches += 1;
                TABLE.with(|table| claim(&mut table.borrow_mut(), &events, &mut wake));
            }
            // Outside every borrow: waking may run code that reads or closes sockets.
            for woken in wake.drain(..) {
                match woken {
                    Woken::Waker(waker) => waker.wake(),
                    Woken::Parked(key) => resumed.extend(self.unpark(key)),
                }
            }
        }
        self.wake.replace(wake);
        if batches > 0 { Poll::Ready(()) } else { Poll::Pending }
    }

    /// Closes the parked connections that match, returning how many.
    fn close_where(&self, close: impl Fn(&Parked<G>) -> bool) -> usize {
        let closed: Vec<Parked<G>> =
            self.parked.borrow_mut().iter_mut().filter_map(|p| p.take_if(|p| close(p))).collect();
        for p in &closed {
            with_slot(p.key, |slot| slot.parked = false);
        }
        self.count.dec_by(i64::try_from(closed.len()).unwrap_or(i64::MAX));
        // Dropped outside the borrow: each closes its socket and vacates its slot.
        closed.len()
    }

    #[cfg(test)]
    fn parked_len(&self) -> usize {
        self.parked.borrow().iter().filter(|p| p.is_some()).count()
    }
}

enum Woken {
    Waker(Waker),
    Parked(Key),
}

/// Puts what the set reported into the slots, collecting whom to wake.
fn claim(table: &mut Table, events: &mio::Events, wake: &mut Vec<Woken>) {
    for event in events {
        let key = Key::of(event.token());
        let Some(slot) = table.slot(key) else { continue };
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            slot.readable = true;
            if slot.parked {
                wake.push(Woken::Parked(key));
            } else if let Some(waker) = slot.reader.take() {
                wake.push(Woken::Waker(waker));
            }
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            slot.writable = true;
            if let Some(waker) = slot.writer.take() {
                wake.push(Woken::Waker(waker));
            }
        }
    }
}

/// The reactor's loop: `resume` gets each parked connection that turned readable.
pub(crate) async fn dispatch<G>(
    reactor: &Reactor<G>,
    worker: usize,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut resume: impl FnMut(Resumed<G>),
) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resumed = Vec::new();
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            () = std::future::poll_fn(|cx| reactor.poll_dispatch(cx, &mut resumed)) => {
                resumed.drain(..).for_each(&mut resume);
                // The tasks just woken run before the next batch.
                tokio::task::yield_now().await;
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                let closed = reactor.close_where(|p| p.deadline <= now);
                if closed > 0 {
                    tracing::debug!(worker, closed, "idle connections timed out");
                }
            }
            // Connections still open keep being served (this loop wakes them) until they end.
            _ = shutdown.wait_for(|stop| *stop), if !draining => {
                draining = true;
                reactor.closed.set(true);
                reactor.close_where(|_| true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::mpsc;

    use super::*;

    /// Parked connections as they come back.
    type Back = mpsc::UnboundedReceiver<Resumed<Rc<()>>>;

    /// A reactor with its loop running; parked connections that come back arrive on the channel.
    fn start() -> (Rc<Reactor<Rc<()>>>, Back, tokio::sync::watch::Sender<bool>) {
        let reactor = Rc::new(Reactor::new(Gauge::default()).expect("reactor"));
        let (back, resumed) = mpsc::unbounded_channel();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let looping = Rc::clone(&reactor);
        tokio::task::spawn_local(async move {
            dispatch(&looping, 0, shutdown, |connection| {
                let _ = back.send(connection);
            })
            .await;
        });
        (reactor, resumed, stop)
    }

    /// A client and the server side of its connection, accepted through the reactor's set.
    async fn pair(reactor: &Reactor<Rc<()>>) -> (TcpStream, ClientStream) {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("non-blocking");
        let addr = std_listener.local_addr().expect("address");
        let listener = reactor.listen(std_listener).expect("listen");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept(reactor).await.expect("accept");
        (client, server)
    }

    /// Reads nothing for a while: the slot then knows the socket is drained.
    async fn read_nothing(stream: &mut ClientStream) {
        let nothing = tokio::time::timeout(Duration::from_millis(20), stream.read(&mut [0u8; 16])).await;
        assert!(nothing.is_err(), "nothing was sent");
    }

    fn readable(key: Key) -> bool {
        with_slot(key, |slot| slot.readable).expect("slot")
    }

    fn idle(io: Box<dyn Io>) -> Idle {
        Idle { io, served: 1, deadline: Instant::now() + Duration::from_secs(60) }
    }

    fn facts(tls: bool) -> Rc<Connection> {
        Rc::new(Connection::new("127.0.0.1:1".parse().expect("address"), 80, tls, None))
    }

    async fn next(resumed: &mut Back) -> Resumed<Rc<()>> {
        tokio::time::timeout(Duration::from_secs(2), resumed.recv()).await.expect("in time").expect("resumed")
    }

    /// A stream that cannot be taken apart when parked, as TLS cannot.
    struct Wrapped(ClientStream);

    impl AsyncRead for Wrapped {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Wrapped {
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

    impl Io for Wrapped {
        fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.0.poll_readable(cx)
        }

        fn key(&self) -> Option<Key> {
            self.0.key()
        }

        fn into_client(self: Box<Self>) -> Result<ClientStream, Box<dyn Io>> {
            Err(self)
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn streams_read_and_write_through_the_set() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let (reactor, _resumed, _stop) = start();
                let (mut client, mut server) = pair(&reactor).await;
                client.write_all(b"hello").await.expect("write");
                let mut got = [0u8; 64];
                let n = server.read(&mut got).await.expect("read");
                assert_eq!(&got[..n], b"hello");
                assert!(!readable(server.key), "a short read drained the socket: no system call for the next");

                // More than the socket buffers hold: the writer waits for room and is woken.
                let big: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
                let expected = big.clone();
                let writer = tokio::task::spawn_local(async move {
                    server.write_all(&big).await.expect("write all");
                    server.shutdown().await.expect("shutdown");
                    server
                });
                let mut received = Vec::new();
                client.read_to_end(&mut received).await.expect("read all");
                assert!(received == expected, "{} bytes came through unchanged", received.len());
                let server = writer.await.expect("writer");

                // The other way, after the client closes: the end of the stream.
                drop(client);
                let mut server = server;
                let mut rest = Vec::new();
                server.read_to_end(&mut rest).await.expect("read to end");
                assert!(rest.is_empty());
            })
            .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn parked_connections_come_back_when_readable_and_not_before() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let (reactor, mut resumed, _stop) = start();
                for tls in [false, true] {
                    let (mut client, mut server) = pair(&reactor).await;
                    read_nothing(&mut server).await;
                    let io: Box<dyn Io> = if tls { Box::new(Wrapped(server)) } else { Box::new(server) };
                    assert!(reactor.park(idle(io), facts(tls), Rc::new(())).is_ok(), "parked");
                    assert_eq!((reactor.parked_len(), reactor.count.get()), (1, 1));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    assert!(resumed.try_recv().is_err(), "nothing sent, nothing resumed");

                    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
                    let mut back = next(&mut resumed).await;
                    assert_eq!((back.served, back.conn.tls, reactor.parked_len(), reactor.count.get()), (1, tls, 0, 0));
                    let mut got = [0u8; 64];
                    let n = back.io.read(&mut got).await.expect("read");
                    assert_eq!(&got[..n], b"GET / HTTP/1.1\r\n\r\n");
                    back.io.write_all(b"answer").await.expect("write");
                    let n = client.read(&mut got).await.expect("read");
                    assert_eq!(&got[..n], b"answer", "the stream works as before");
                }

                // Closed by its client while parked: it comes back to read the end.
                let (client, mut server) = pair(&reactor).await;
                read_nothing(&mut server).await;
                assert!(reactor.park(idle(Box::new(server)), facts(false), Rc::new(())).is_ok());
                drop(client);
                let mut back = next(&mut resumed).await;
                assert_eq!(back.io.read(&mut [0u8; 8]).await.expect("read"), 0);

                // Something to read already: handed straight back.
                let (mut client, server) = pair(&reactor).await;
                client.write_all(b"x").await.expect("write");
                assert!(reactor.park(idle(Box::new(server)), facts(false), Rc::new(())).is_err());
            })
            .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn deadlines_and_drains_close_parked_connections() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let (reactor, _resumed, stop) = start();
                let guard = Rc::new(());
                let now = Instant::now();
                let mut clients = Vec::new();
                for deadline in [now, now + Duration::from_secs(60)] {
                    let (client, mut server) = pair(&reactor).await;
                    read_nothing(&mut server).await;
                    clients.push(client);
                    let parked = Idle { io: Box::new(server), served: 1, deadline };
                    assert!(reactor.park(parked, facts(false), Rc::clone(&guard)).is_ok());
                }
                assert_eq!((Rc::strong_count(&guard), reactor.count.get()), (3, 2));
                assert_eq!(reactor.close_where(|p| p.deadline <= now), 1);
                assert_eq!(reactor.count.get(), 1, "the gauge follows");
                assert_eq!(Rc::strong_count(&guard), 2, "the expired one is dropped");
                let n = clients[0].read(&mut [0u8; 1]).await.expect("read");
                assert_eq!(n, 0, "its client sees the close");

                // A drain closes the rest, and nothing parks after it.
                stop.send_replace(true);
                let n = tokio::time::timeout(Duration::from_secs(2), clients[1].read(&mut [0u8; 1])).await;
                assert_eq!(n.expect("closed in time").expect("read"), 0);
                let (_client, mut server) = pair(&reactor).await;
                read_nothing(&mut server).await;
                assert!(reactor.park(idle(Box::new(server)), facts(false), Rc::clone(&guard)).is_ok());
                assert_eq!((reactor.parked_len(), Rc::strong_count(&guard), reactor.count.get()), (0, 1, 0));
            })
            .await;
    }

    #[test]
    fn slots_are_reused_and_stale_keys_do_not_reach_new_occupants() {
        let first = occupy();
        vacate(first);
        let second = occupy();
        assert_eq!(second.index, first.index, "the slot is reused");
        assert_ne!(second.generation, first.generation);
        assert!(with_slot(first, |_| ()).is_none(), "the old key no longer reaches it");
        assert_eq!(Key::of(second.token()), second);
        vacate(second);
    }
}
