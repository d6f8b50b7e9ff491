//! The drain's schedule with paused time: when each connection is told to close. Tokio's clock
//! only moves when every task waits, so the instants below are exact, whatever the machine's
//! load; the system tests check what the clients see, not when.

use std::time::Duration;

use tokio::time::Instant;

use super::close_spread;
use crate::outbound::{self, Closing, Delivery, Inbox};

/// Runs `close_spread` for `count` connections over `over`, and returns the time after the start
/// at which each connection was told to close, sorted.
async fn close_times(count: usize, over: Duration) -> Vec<Duration> {
    let (queues, inboxes): (Vec<_>, Vec<Inbox>) = (0..count).map(|_| outbound::channel(8)).unzip();
    let start = Instant::now();
    // Each connection's side wakes in the instant its queue is closed: the clock does not move
    // while a task is ready to run.
    let closed = inboxes.into_iter().map(|mut inbox| {
        tokio::spawn(async move {
            match inbox.recv().await {
                Delivery::Close(closing) => (closing, start.elapsed()),
                Delivery::Frame(_) => panic!("a frame where a close was expected"),
            }
        })
    });
    let closed: Vec<_> = closed.collect();
    close_spread(queues, over).await;
    let mut times = Vec::new();
    for task in closed {
        let (closing, at) = task.await.expect("the connection side finished");
        assert_eq!(closing, Closing::Shutdown);
        times.push(at);
    }
    times.sort();
    times
}

/// How many connections were closed at each distinct instant, in order.
fn batches(times: &[Duration]) -> Vec<(Duration, usize)> {
    let mut batches: Vec<(Duration, usize)> = Vec::new();
    for &at in times {
        match batches.last_mut() {
            Some((last, n)) if *last == at => *n += 1,
            _ => batches.push((at, 1)),
        }
    }
    batches
}

#[tokio::test(start_paused = true)]
async fn forty_connections_over_a_second_are_closed_one_at_a_time_every_25_ms() {
    let times = close_times(40, Duration::from_secs(1)).await;
    let expected: Vec<Duration> = (0..40).map(|i| Duration::from_millis(25 * i)).collect();
    assert_eq!(times, expected);
}

#[tokio::test(start_paused = true)]
async fn many_connections_are_closed_in_even_batches_at_most_every_20_ms() {
    // 1,000 connections over 1 s: 50 batches (one per 20 ms) of 20.
    let times = close_times(1000, Duration::from_secs(1)).await;
    let batches = batches(&times);
    assert_eq!(batches.len(), 50, "{batches:?}");
    for (i, (at, n)) in batches.iter().enumerate() {
        assert_eq!(*at, Duration::from_millis(20 * i as u64), "batch {i}");
        assert_eq!(*n, 20, "batch {i}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_closes_spread_over_the_whole_window_and_end_within_it() {
    // The rolling restart's shape: a replica's clients over half of a 4 s drain timeout. No
    // quarter of the window sees more than a quarter of them (rounded up to a whole batch), so
    // the other replicas get a steady trickle of reconnects, not a storm.
    for count in [1, 7, 99, 300, 5000] {
        let over = Duration::from_secs(2);
        let times = close_times(count, over).await;
        assert_eq!(times.len(), count);
        assert_eq!(
            times[0],
            Duration::ZERO,
            "{count}: the first close is at once"
        );
        assert!(
            *times.last().unwrap() < over,
            "{count}: the last close is inside the window"
        );
        let batch = batches(&times).iter().map(|(_, n)| *n).max().unwrap();
        let quarter = over / 4;
        for (i, &from) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .take_while(|&&t| t < from + quarter)
                .count();
            assert!(
                in_window <= count.div_ceil(4) + batch,
                "{count}: {in_window} closes within {quarter:?} of {from:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn with_no_window_every_connection_is_closed_at_once() {
    let times = close_times(10, Duration::ZERO).await;
    assert_eq!(times, vec![Duration::ZERO; 10]);
}

#[tokio::test(start_paused = true)]
async fn with_no_connections_nothing_is_waited_for() {
    let start = Instant::now();
    close_spread(Vec::new(), Duration::from_secs(5)).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
}
