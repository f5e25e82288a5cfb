//! Where a newly owned partition starts counting, and which partitions still wait for that
//! decision. Pure: the group loop in [`crate::positions`] gathers the inputs (stored
//! positions, topic ids, log end) and applies the result (seek, resume).
//!
//! Stored positions are only meaningful in the topics they were counted in. A topic deleted
//! and created again under the same name, or an embedded broker that starts over with new
//! storage while the database stays, has a new Kafka topic id: its offsets start at 0 again
//! and the old stored offsets (and source watermarks) would silently skip its first messages.
//! Positions are therefore stored with the ids of the topics they refer to
//! ([`crate::store::TopicIdentity`]) and compared on assignment:
//!
//! | stored vs. now | start | why |
//! |---|---|---|
//! | no stored offset | beginning | nothing counted yet |
//! | same ids, or ids unknown | stored offset | the normal case |
//! | consumed topic's id differs | beginning, watermarks dropped | a new topic: none of it was counted |
//! | raw topic's id differs | stored offset, watermarks dropped | the watermarks count raw offsets of a topic that is gone |
//! | stored offset beyond the log end | log end | the broker lost messages that were counted; what arrives now is new |
//!
//! Counts already in the database are kept in every case: they are real visits. Each unusual
//! case is logged as one line that says what happened and what it means for the counts.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::tally::Start;
use crate::store::{StoredPositions, TopicIdentity};

/// Something unusual found while positioning a partition, worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The consumed topic has another id than the one the stored positions were counted in.
    TopicRecreated { stored: String, now: String },
    /// The raw topic has another id than the one the stored watermarks count in.
    SourceRecreated { stored: String, now: String },
    /// The stored offset is past the partition's log end (same topic).
    BeyondLogEnd { stored: i64, log_end: i64 },
}

/// Decides where `partition` starts, from what the database stored, the topics' ids now and
/// the partition's log end (`None` when not known).
pub fn start_of(
    partition: i32,
    stored: &StoredPositions,
    now: &TopicIdentity,
    log_end: Option<i64>,
) -> (Start, Option<Notice>) {
    let offset = stored.offset(partition);
    let sources = stored.watermarks(partition);
    let Some(offset) = offset else {
        return (Start::stored(None, sources), None);
    };
    let was = stored.identities.get(&partition);
    let changed = |old: Option<&String>, new: Option<&String>| match (old, new) {
        (Some(old), Some(new)) if old != new => Some((old.clone(), new.clone())),
        _ => None,
    };
    if let Some((stored_id, now_id)) =
        changed(was.and_then(|w| w.topic_id.as_ref()), now.topic_id.as_ref())
    {
        let start = Start {
            expected: Some(offset),
            from: 0,
            sources: Default::default(),
            reset_sources: true,
        };
        return (
            start,
            Some(Notice::TopicRecreated {
                stored: stored_id,
                now: now_id,
            }),
        );
    }
    if let Some((stored_id, now_id)) = changed(
        was.and_then(|w| w.source_topic_id.as_ref()),
        now.source_topic_id.as_ref(),
    ) {
        let start = Start {
            expected: Some(offset),
            from: offset,
            sources: Default::default(),
            reset_sources: true,
        };
        return (
            start,
            Some(Notice::SourceRecreated {
                stored: stored_id,
                now: now_id,
            }),
        );
    }
    match log_end {
        Some(end) if offset > end => (
            Start {
                expected: Some(offset),
                from: end,
                sources,
                reset_sources: false,
            },
            Some(Notice::BeyondLogEnd {
                stored: offset,
                log_end: end,
            }),
        ),
        _ => (Start::stored(Some(offset), sources), None),
    }
}

/// Partitions owned but not yet positioned (just assigned, or after a fencing conflict), and
/// when to try again after a failed attempt (database or broker unreachable, a seek refused).
/// A partition leaves only when it was positioned or revoked: a failure never drops it.
#[derive(Debug, Default)]
pub struct Awaiting {
    partitions: BTreeSet<i32>,
    /// No attempt before this instant (after a failure).
    not_before: Option<Instant>,
    /// Consecutive failed attempts, for the backoff.
    failures: u32,
}

impl Awaiting {
    pub fn add(&mut self, partition: i32) {
        self.partitions.insert(partition);
    }

    /// The partition was revoked: nothing to position any more.
    pub fn remove(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    pub fn clear(&mut self) {
        self.partitions.clear();
    }

    /// When the next attempt is due: `None` when nothing waits.
    pub fn due_at(&self) -> Option<Instant> {
        if self.partitions.is_empty() {
            return None;
        }
        Some(self.not_before.unwrap_or_else(Instant::now))
    }

    /// The partitions to position now (taken out), or nothing before the backoff ends.
    pub fn take_due(&mut self, now: Instant) -> Vec<i32> {
        if self.not_before.is_some_and(|t| now < t) {
            return Vec::new();
        }
        std::mem::take(&mut self.partitions).into_iter().collect()
    }

    /// Positioning these partitions failed: they wait again, for a growing delay.
    pub fn failed(&mut self, partitions: impl IntoIterator<Item = i32>, now: Instant) {
        self.partitions.extend(partitions);
        self.failures = self.failures.saturating_add(1);
        self.not_before = Some(now + self.backoff());
    }

    /// An attempt went through: the next failure starts the backoff from the beginning.
    pub fn succeeded(&mut self) {
        if self.partitions.is_empty() {
            self.failures = 0;
            self.not_before = None;
        }
    }

    /// 200 ms, doubling, at most 10 s.
    pub fn backoff(&self) -> Duration {
        Duration::from_millis(100u64 << self.failures.min(7)).min(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn ids(topic: &str, source: &str) -> TopicIdentity {
        TopicIdentity {
            topic_id: Some(topic.into()),
            source_topic_id: Some(source.into()),
        }
    }

    fn stored(offset: i64, identity: Option<TopicIdentity>) -> StoredPositions {
        StoredPositions {
            offsets: HashMap::from([(0, offset)]),
            watermarks: HashMap::from([(0, HashMap::from([(3, 900)]))]),
            identities: identity
                .map(|i| HashMap::from([(0, i)]))
                .unwrap_or_default(),
            event_clocks: HashMap::new(),
            state: HashMap::new(),
        }
    }

    #[test]
    fn same_topics_continue_where_the_counts_end() {
        let s = stored(40, Some(ids("A", "R")));
        let (start, notice) = start_of(0, &s, &ids("A", "R"), Some(100));
        assert_eq!(start, Start::stored(Some(40), HashMap::from([(3, 900)])));
        assert_eq!(notice, None);
        // Written by a version that did not record ids, or a broker that has none: the same.
        for (was, now) in [
            (None, ids("A", "R")),
            (Some(ids("A", "R")), TopicIdentity::default()),
        ] {
            let (start, notice) = start_of(0, &stored(40, was), &now, Some(40));
            assert_eq!(start.from, 40);
            assert_eq!(notice, None);
        }
        // Nothing stored: from the beginning.
        let (start, _) = start_of(0, &StoredPositions::default(), &ids("A", "R"), Some(9));
        assert_eq!(start, Start::stored(None, HashMap::new()));
    }

    /// The demo run again on a new in-memory broker, `broker.db` deleted, or a topic deleted
    /// and created again: the new topic is counted from its first message, the old watermarks
    /// (raw offsets of the old raw topic) are dropped, the flush moves the old stored offset.
    #[test]
    fn a_recreated_topic_starts_from_the_beginning() {
        let (start, notice) = start_of(
            0,
            &stored(5000, Some(ids("A", "R"))),
            &ids("B", "S"),
            Some(7000),
        );
        assert_eq!(
            start,
            Start {
                expected: Some(5000),
                from: 0,
                sources: HashMap::new(),
                reset_sources: true
            }
        );
        assert_eq!(
            notice,
            Some(Notice::TopicRecreated {
                stored: "A".into(),
                now: "B".into()
            })
        );
    }

    #[test]
    fn a_recreated_raw_topic_drops_only_the_watermarks() {
        let (start, notice) = start_of(
            0,
            &stored(40, Some(ids("A", "R"))),
            &ids("A", "S"),
            Some(100),
        );
        assert_eq!(
            start,
            Start {
                expected: Some(40),
                from: 40,
                sources: HashMap::new(),
                reset_sources: true
            }
        );
        assert!(matches!(notice, Some(Notice::SourceRecreated { .. })));
    }

    #[test]
    fn an_offset_beyond_the_log_end_resumes_at_the_log_end() {
        let (start, notice) = start_of(
            0,
            &stored(40, Some(ids("A", "R"))),
            &ids("A", "R"),
            Some(25),
        );
        assert_eq!(
            start,
            Start {
                expected: Some(40),
                from: 25,
                sources: HashMap::from([(3, 900)]),
                reset_sources: false
            }
        );
        assert_eq!(
            notice,
            Some(Notice::BeyondLogEnd {
                stored: 40,
                log_end: 25
            })
        );
    }

    /// A partition whose positioning fails (here: the seek after a fencing conflict) waits
    /// and is tried again after a backoff; it is never dropped while it is owned. (Before,
    /// a failed seek took the partition out of the tally until the next rebalance, which in
    /// a stable group never came.)
    #[test]
    fn a_failed_attempt_is_retried_after_a_backoff() {
        let mut a = Awaiting::default();
        let t0 = Instant::now();
        a.add(3);
        a.add(1);
        assert!(a.due_at().is_some_and(|t| t <= Instant::now()));
        assert_eq!(a.take_due(t0), vec![1, 3]);
        assert_eq!(a.due_at(), None);
        a.failed([3], t0);
        assert!(a.take_due(t0).is_empty(), "no retry before the backoff");
        assert_eq!(a.due_at(), Some(t0 + Duration::from_millis(200)));
        let retry = a.take_due(t0 + Duration::from_millis(200));
        assert_eq!(retry, vec![3]);
        a.failed(retry, t0 + Duration::from_millis(200));
        assert_eq!(a.backoff(), Duration::from_millis(400));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(a.take_due(later), vec![3]);
        a.succeeded();
        assert_eq!(a.due_at(), None);
        // A revoked partition is not positioned.
        a.add(5);
        a.remove(5);
        assert_eq!(a.due_at(), None);
    }
}
