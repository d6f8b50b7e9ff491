//! Capped exponential backoff with equal jitter: the one retry schedule of the workspace.
//!
//! Each pause is the current delay's half plus a random share of the other half, and the delay
//! doubles after every pause up to a cap. Half is fixed so a retry never comes at once; half is
//! random so many clients that failed together (replicas after a Redis restart, publishers
//! after a blip) spread their retries out. It keeps no clock: [`Backoff::next_delay`] is pure
//! given its random source, and [`Backoff::wait`] sleeps on tokio's clock, so schedules are
//! tested with a seeded RNG and paused time.

use std::time::Duration;

use rand::Rng;

/// A retry schedule: `initial`, doubling after each pause up to `max`, with equal jitter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A schedule whose first pause is about `initial` and whose pauses never exceed `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The next pause, drawn from `rng`: between half of the current delay and all of it.
    /// The delay then doubles, up to the cap.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let delay = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        let half = delay / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// Sleeps for the next pause (drawn from the thread's RNG).
    ///
    /// # Cancel safety
    /// Cancel-safe; a cancelled wait still counts as a pause taken.
    pub async fn wait(&mut self) {
        let delay = self.next_delay(&mut rand::rng());
        tokio::time::sleep(delay).await;
    }

    /// Starts again from the first delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pauses_double_up_to_the_cap_within_equal_jitter() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(100 * MS, 500 * MS);
        let expected = [100, 200, 400, 500, 500, 500];
        for (attempt, delay) in expected.into_iter().enumerate() {
            let pause = backoff.next_delay(&mut rng);
            let delay = delay * MS;
            assert!(
                pause >= delay / 2 && pause <= delay,
                "attempt {attempt}: {pause:?} outside [{:?}, {delay:?}]",
                delay / 2
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_others_differ() {
        let schedule = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut backoff = Backoff::new(100 * MS, 5000 * MS);
            (0..8)
                .map(|_| backoff.next_delay(&mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(schedule(1), schedule(1));
        assert_ne!(schedule(1), schedule(2), "jitter spreads retries out");
    }

    #[test]
    fn reset_starts_from_the_first_delay_and_initial_never_exceeds_max() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut backoff = Backoff::new(100 * MS, 400 * MS);
        for _ in 0..5 {
            backoff.next_delay(&mut rng);
        }
        backoff.reset();
        assert!(backoff.next_delay(&mut rng) <= 100 * MS);
        let mut capped = Backoff::new(10 * MS * 1000, 300 * MS);
        assert!(capped.next_delay(&mut rng) <= 300 * MS);
    }

    #[test]
    fn a_zero_delay_never_sleeps_and_huge_ones_saturate() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(
            Backoff::new(Duration::ZERO, Duration::ZERO).next_delay(&mut rng),
            Duration::ZERO
        );
        let mut huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert!(huge.next_delay(&mut rng) >= Duration::MAX / 2);
        assert!(huge.next_delay(&mut rng) >= Duration::MAX / 2);
    }
}
