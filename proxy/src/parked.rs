//! HTTP/1 connections waiting for their next request, held by their worker instead of a task
//! each, as nginx holds its keep-alive connections.
//!
//! A connection that has had nothing to read for [`crate::http1::PARK_AFTER`] leaves the HTTP/1
//! loop and its task ends. What is left is its socket, the connection's facts and a slot here,
//! whose waker the socket holds. When the socket turns readable (a request, or the close) the
//! waker queues the slot, and the worker's [`run`] loop hands the connection to a new task.
//!
//! ```text
//! task: serve ─(idle 200 ms)─> park ──────────────────────────────┐
//!                                                                   │ slot + waker
//! socket readable ─> waker queues the slot ─> run: take, spawn ─> serve again
//! once a second: close those past their deadline; drain: close all
//! ```

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::handler::{Connection, Worker};
use crate::http1::Idle;
use crate::server::ConnectionGuard;

/// How often connections past their deadline are closed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A parked connection: everything needed to serve it again.
pub(crate) struct Parked<G> {
    pub(crate) idle: Idle,
    pub(crate) conn: Rc<Connection>,
    /// Kept for as long as the connection is open (it counts open connections).
    pub(crate) guard: G,
}

struct Slot<G> {
    /// Bumped each time the slot is emptied, so that a late wake for an earlier occupant does
    /// not wake the next one.
    generation: u32,
    parked: Option<Parked<G>>,
}

/// Slots whose sockets turned readable, filled by wakers (on this worker's thread, from its
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

/// One worker's parked connections.
pub(crate) struct ParkingLot<G> {
    slots: RefCell<Vec<Slot<G>>>,
    vacant: RefCell<Vec<u32>>,
    woken: Arc<Woken>,
    /// Set once a drain starts: nothing parks any more.
    closed: Cell<bool>,
}

impl<G> Default for ParkingLot<G> {
    fn default() -> Self {
        ParkingLot {
            slots: RefCell::default(),
            vacant: RefCell::default(),
            woken: Arc::default(),
            closed: Cell::new(false),
        }
    }
}

impl<G> ParkingLot<G> {
    /// Parks a connection until its socket is readable. Gives it back when it already is (serve
    /// it now); a drain closes it instead.
    pub(crate) fn park(&self, parked: Parked<G>) -> Result<(), Parked<G>> {
        if self.closed.get() {
            return Ok(());
        }
        let index = self.vacant.borrow_mut().pop().unwrap_or_else(|| {
            let mut slots = self.slots.borrow_mut();
            slots.push(Slot { generation: 0, parked: None });
            u32::try_from(slots.len() - 1).unwrap_or(u32::MAX)
        });
        let generation = self.slots.borrow()[index as usize].generation;
        let waker = Waker::from(Arc::new(SlotWaker { index, generation, woken: Arc::clone(&self.woken) }));
        match parked.idle.io.poll_readable(&mut Context::from_waker(&waker)) {
            Poll::Pending => {
                self.slots.borrow_mut()[index as usize].parked = Some(parked);
                Ok(())
            }
            Poll::Ready(_) => {
                self.vacant.borrow_mut().push(index);
                Err(parked)
            }
        }
    }

    fn take(&self, index: u32, generation: u32) -> Option<Parked<G>> {
        let mut slots = self.slots.borrow_mut();
        let slot = slots.get_mut(index as usize).filter(|s| s.generation == generation)?;
        let parked = slot.parked.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.vacant.borrow_mut().push(index);
        Some(parked)
    }

    /// Takes the connections whose sockets turned readable.
    fn take_woken(&self) -> Vec<Parked<G>> {
        let keys = self.woken.slots.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
        keys.into_iter().filter_map(|(index, generation)| self.take(index, generation)).collect()
    }

    /// Closes the connections that match, returning how many.
    fn close_where(&self, close: impl Fn(&Parked<G>) -> bool) -> usize {
        let mut closed = Vec::new();
        {
            let mut slots = self.slots.borrow_mut();
            let mut vacant = self.vacant.borrow_mut();
            for (index, slot) in slots.iter_mut().enumerate() {
                if slot.parked.as_ref().is_some_and(&close) {
                    closed.push(slot.parked.take());
                    slot.generation = slot.generation.wrapping_add(1);
                    vacant.push(u32::try_from(index).unwrap_or(u32::MAX));
                }
            }
        }
        // Dropped outside the borrows: a guard's drop may do anything.
        closed.len()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.borrow().iter().filter(|s| s.parked.is_some()).count()
    }
}

/// Serves the worker's parked connections as they turn readable, closes those past their
/// deadline, and all of them when a drain starts. Runs for as long as the worker does.
pub(crate) async fn run<F>(worker: Rc<Worker>, serve: impl Fn(Rc<Worker>, Parked<ConnectionGuard>) -> F)
where
    F: Future<Output = ()> + 'static,
{
    let lot = &worker.parked;
    let mut shutdown = worker.shared.shutdown.subscribe();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = lot.woken.notify.notified() => {
                for parked in lot.take_woken() {
                    tokio::task::spawn_local(serve(Rc::clone(&worker), parked));
                }
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                let closed = lot.close_where(|p| p.idle.deadline <= now);
                if closed > 0 {
                    tracing::debug!(worker = worker.id, closed, "idle connections timed out");
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => {
                lot.closed.set(true);
                lot.close_where(|_| true);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use crate::http1::Io;

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

    fn parked(io: TcpStream, deadline: Instant, guard: Rc<()>) -> Parked<Rc<()>> {
        let remote = io.peer_addr().expect("peer");
        let conn = Rc::new(Connection {
            remote,
            client_ip: crate::headers::client_ip_value(remote),
            local_port: 0,
            tls: false,
        });
        let io: Box<dyn Io> = Box::new(io);
        Parked { idle: Idle { io, served: 1, deadline }, conn, guard }
    }

    #[tokio::test]
    async fn a_parked_connection_comes_back_when_readable_and_not_before() {
        let lot = ParkingLot::default();
        let (mut client, server) = pair().await;
        let far = Instant::now() + Duration::from_secs(60);
        assert!(lot.park(parked(server, far, Rc::new(()))).is_ok());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(lot.take_woken().is_empty(), "nothing sent, nothing woken");
        assert_eq!(lot.len(), 1);

        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
        tokio::time::timeout(Duration::from_secs(2), lot.woken.notify.notified()).await.expect("woken");
        let back = lot.take_woken();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].idle.served, 1);
        assert_eq!(lot.len(), 0);

        // Readable already: given straight back.
        let again = back.into_iter().next().expect("one");
        assert!(lot.park(again).is_err());
        assert_eq!(lot.len(), 0);
    }

    #[tokio::test]
    async fn deadlines_and_drains_close_parked_connections() {
        let lot = ParkingLot::default();
        let guard = Rc::new(());
        let now = Instant::now();
        for deadline in [now, now + Duration::from_secs(60)] {
            let (_client, server) = pair().await;
            assert!(lot.park(parked(server, deadline, Rc::clone(&guard))).is_ok());
        }
        assert_eq!(Rc::strong_count(&guard), 3);
        assert_eq!(lot.close_where(|p| p.idle.deadline <= now), 1);
        assert_eq!(Rc::strong_count(&guard), 2, "the expired one is dropped");
        lot.closed.set(true);
        assert_eq!(lot.close_where(|_| true), 1);
        let (_client, server) = pair().await;
        assert!(lot.park(parked(server, now, Rc::clone(&guard))).is_ok());
        assert_eq!((lot.len(), Rc::strong_count(&guard)), (0, 1), "after a drain nothing parks");
    }
}
