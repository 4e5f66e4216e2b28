//! [`Deadline`]: the one way this crate says "by when". A start's deadline bounds every call and
//! retry made for it; a machine's session deadline travels in its labels as unix seconds.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

/// A point in time, held both as a monotonic instant (what timers and retries wait on) and as
/// wall-clock time (what labels carry and other replicas read back).
///
/// Two deadlines compare by their wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    instant: Instant,
    wall: DateTime<Utc>,
}

impl Deadline {
    /// `after` from now.
    pub fn after(after: Duration) -> Self {
        let wall = Utc::now() + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        Self {
            instant: Instant::now() + after,
            wall,
        }
    }

    /// A wall-clock deadline (read from a label, say); one in the past is already over.
    pub fn at(wall: DateTime<Utc>) -> Self {
        let left = (wall - Utc::now()).to_std().unwrap_or_default();
        Self {
            instant: Instant::now() + left,
            wall,
        }
    }

    /// The deadline at `secs` unix seconds, as labels carry it; `None` when out of range.
    pub fn from_unix_secs(secs: i64) -> Option<Self> {
        DateTime::from_timestamp(secs, 0).map(Self::at)
    }

    /// Whole unix seconds (labels' precision).
    pub fn unix_secs(&self) -> i64 {
        self.wall.timestamp()
    }

    pub fn instant(&self) -> Instant {
        self.instant
    }

    pub fn wall(&self) -> DateTime<Utc> {
        self.wall
    }

    /// Time left; zero once over.
    pub fn remaining(&self) -> Duration {
        self.instant.saturating_duration_since(Instant::now())
    }

    pub fn is_past(&self) -> bool {
        self.remaining().is_zero()
    }

    /// The earlier of the two.
    pub fn min(self, other: Self) -> Self {
        if other.wall < self.wall {
            other
        } else {
            self
        }
    }
}

impl PartialEq for Deadline {
    fn eq(&self, other: &Self) -> bool {
        self.wall == other.wall
    }
}

impl Eq for Deadline {}

impl PartialOrd for Deadline {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Deadline {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.wall.cmp(&other.wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clocks_agree_and_labels_round_trip() {
        let d = Deadline::after(Duration::from_secs(90));
        assert!(
            d.remaining() > Duration::from_secs(89) && d.remaining() <= Duration::from_secs(90)
        );
        let secs = d.unix_secs();
        let back = Deadline::from_unix_secs(secs).unwrap();
        assert_eq!(back.unix_secs(), secs);
        assert!(back.remaining() > Duration::from_secs(88));
        assert!(Deadline::from_unix_secs(1).unwrap().is_past());
        assert_eq!(d.min(back), back);
    }
}
