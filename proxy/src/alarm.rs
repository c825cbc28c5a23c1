//! A timer made once per connection and moved for each of its waits.
//!
//! tokio files a `Sleep` in the runtime's timer wheel when it is first polled and takes it out
//! when it is dropped, each time under the driver's lock: a keep-alive request, whose waits for
//! its next head and for the upstream's answer each made one, spent about 2,500 instructions
//! (a tenth of a proxied request) on timers that never fired. Moving a filed timer's deadline
//! later is one atomic update instead: when the old deadline comes round, the wheel finds the
//! new one and files the timer again (nginx keeps its timers the same way). A connection's
//! deadlines only move forward, so its waits after the first touch the wheel no more than once
//! per timeout.

use std::pin::Pin;

use tokio::time::{Instant, Sleep};

/// A connection's timer: none until its first wait.
#[derive(Default)]
pub(crate) struct Alarm(Option<Pin<Box<Sleep>>>);

impl Alarm {
    /// The alarm, set to ring at `deadline`.
    pub(crate) fn at(&mut self, deadline: Instant) -> Pin<&mut Sleep> {
        let sleep = self.0.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        sleep.as_mut().reset(deadline);
        sleep.as_mut()
    }

    /// Rings at `deadline`, set only once first polled: a wait that a ready read wins (in a
    /// `biased` select) leaves the timer as it was.
    pub(crate) async fn ring_at(&mut self, deadline: Instant) {
        self.at(deadline).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn rings_at_each_new_deadline_later_or_earlier() {
        let mut alarm = Alarm::default();
        let start = Instant::now();
        alarm.at(start + 40 * MS).await;
        assert!(start.elapsed() >= 40 * MS);

        // Later than the last (the usual move), then earlier than one set and never reached.
        let start = Instant::now();
        let later = tokio::time::timeout(30 * MS, alarm.at(start + 30_000 * MS)).await;
        assert!(later.is_err(), "rang before its deadline");
        alarm.ring_at(start + 60 * MS).await;
        let rang = start.elapsed();
        assert!(rang >= 60 * MS && rang < 10_000 * MS, "{rang:?}");
    }

    #[tokio::test]
    async fn a_wait_never_polled_leaves_the_deadline_alone() {
        let mut alarm = Alarm::default();
        let start = Instant::now();
        {
            let _unpolled = alarm.at(start + 30 * MS);
        }
        {
            let _never_polled = alarm.ring_at(start + 100_000 * MS);
        }
        alarm.0.as_mut().expect("set").await;
        let rang = start.elapsed();
        assert!(rang >= 30 * MS && rang < 10_000 * MS, "{rang:?}");
    }
}
