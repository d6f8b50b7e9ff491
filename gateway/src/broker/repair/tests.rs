//! Gap repair with paused time and a scripted history reader: reads are retried with backoff,
//! given up after [`REPAIR_GIVE_UP_AFTER`], and are tasks that shutdown stops.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use publisher_lib::contract::EventKind;

use super::*;

fn west() -> Group {
    Group::try_dispatch("west").expect("valid region")
}

fn at(seq: u64) -> Position {
    Position {
        epoch: "e".to_owned(),
        seq,
    }
}

fn event(seq: u64) -> Publication {
    Publication {
        group: west(),
        kind: EventKind::RecommendationReady,
        payload: Bytes::from(seq.to_string()),
        published_at: SystemTime::UNIX_EPOCH,
        position: Some(at(seq)),
    }
}

/// Fan-out that records the payloads it got.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Fanout for Recorder {
    fn fan_out(&self, publication: &Publication) {
        let payload = String::from_utf8_lossy(&publication.payload).into_owned();
        self.0.lock().unwrap().push(payload);
    }
}

impl Recorder {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// A reader that answers from a script, then fails; it counts its reads.
#[derive(Default)]
struct Scripted {
    answers: Mutex<VecDeque<Result<History, BrokerError>>>,
    reads: Mutex<Vec<(Instant, Position)>>,
}

impl CursorReader for Scripted {
    fn read_after_cursor(&self, _group: Group, cursor: Position) -> Reading {
        self.reads.lock().unwrap().push((Instant::now(), cursor));
        let answer = self
            .answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| Err(down()));
        Box::pin(async move { answer })
    }
}

fn down() -> BrokerError {
    BrokerError::Unavailable("redis is down".to_owned())
}

/// Cursors over a recorder and a reader answering `answers` (then failing).
fn cursors(
    answers: Vec<Result<History, BrokerError>>,
) -> (
    Cursors,
    RepairResults,
    Arc<Recorder>,
    Arc<Scripted>,
    Shutdown,
) {
    let recorder = Arc::new(Recorder::default());
    let reader = Arc::new(Scripted {
        answers: Mutex::new(answers.into()),
        ..Scripted::default()
    });
    let shutdown = Shutdown::new();
    let (cursors, results) = Cursors::new(recorder.clone(), reader.clone(), &shutdown);
    (cursors, results, recorder, reader, shutdown)
}

fn filled(missed: Vec<Publication>, head: u64) -> Result<History, BrokerError> {
    Ok(History {
        head: at(head),
        recovered: Some(true),
        missed,
    })
}

#[tokio::test(start_paused = true)]
async fn a_gap_is_filled_after_failed_reads_retried_with_growing_pauses() {
    let (mut cursors, mut results, recorder, reader, _shutdown) = cursors(vec![
        Err(down()),
        Err(down()),
        filled(vec![event(2), event(3)], 3),
    ]);
    cursors.live(event(1));
    cursors.live(event(4));
    cursors.live(event(5));
    assert_eq!(
        recorder.take(),
        ["1"],
        "what follows a gap waits for the read"
    );

    let result = results.recv().await.unwrap();
    cursors.finish(result);
    assert_eq!(recorder.take(), ["2", "3", "4", "5"]);

    let reads = reader.reads.lock().unwrap().clone();
    assert_eq!(reads.len(), 3);
    assert!(reads.iter().all(|(_, after)| *after == at(1)));
    let pauses: Vec<Duration> = reads.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(
        pauses[0] >= RETRY_MIN / 2 && pauses[0] <= RETRY_MIN,
        "{pauses:?}"
    );
    assert!(
        pauses[1] >= RETRY_MIN && pauses[1] <= RETRY_MIN * 2,
        "{pauses:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_read_failing_for_good_is_given_up_and_the_gap_delivered_across() {
    let (mut cursors, mut results, recorder, reader, _shutdown) = cursors(Vec::new());
    cursors.live(event(1));
    let start = Instant::now();
    cursors.live(event(4));

    let result = results.recv().await.unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= REPAIR_GIVE_UP_AFTER && waited <= REPAIR_GIVE_UP_AFTER + RETRY_MAX,
        "{waited:?}"
    );
    assert!(matches!(result.history, Err(BrokerError::Unavailable(_))));
    cursors.finish(result);
    assert_eq!(recorder.take(), ["1", "4"]);
    let reads = reader.reads.lock().unwrap().len();
    assert!(reads > 20, "retried about every second, not once: {reads}");
    cursors.live(event(4));
    cursors.live(event(5));
    assert_eq!(recorder.take(), ["5"], "repeats stay dropped after a gap");
}

#[tokio::test(start_paused = true)]
async fn a_reconnect_reads_every_group_after_its_cursor() {
    let (mut cursors, mut results, recorder, reader, _shutdown) =
        cursors(vec![filled(vec![event(3)], 3)]);
    cursors.live(event(1));
    cursors.live(event(2));
    cursors.reconnected();
    cursors.live(event(4));
    let result = results.recv().await.unwrap();
    cursors.finish(result);
    assert_eq!(recorder.take(), ["1", "2", "3", "4"]);
    assert_eq!(reader.reads.lock().unwrap()[0].1, at(2));
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_reads_in_progress() {
    let (mut cursors, _results, _recorder, _reader, shutdown) = cursors(Vec::new());
    cursors.live(event(1));
    cursors.live(event(3));
    assert_eq!(shutdown.background().len(), 1, "the read is a tracked task");
    shutdown.stop_background(Duration::from_secs(1)).await;
    assert_eq!(shutdown.background().len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_forgotten_group_ignores_a_late_read_and_starts_afresh() {
    let (mut cursors, mut results, recorder, _reader, _shutdown) =
        cursors(vec![filled(vec![event(2)], 2)]);
    cursors.live(event(1));
    cursors.live(event(3));
    cursors.forget(&west());
    let result = results.recv().await.unwrap();
    cursors.finish(result);
    assert_eq!(recorder.take(), ["1"]);
    cursors.live(event(7));
    assert_eq!(
        recorder.take(),
        ["7"],
        "a new subscription starts from what arrives"
    );
}
