//! The pure core of a consumer group that writes results to the database: per-partition
//! in-memory results (the aggregator's counts, an alerter's windows) and offsets.
//!
//! Counts are kept per events partition so that a revoked partition's un-flushed counts can
//! be dropped exactly (its new owner re-reads them from the stored offset).
//!
//! # Dropping replays from the preprocessors (stage 1 → 2 exactly-once)
//!
//! A preprocessor that dies after producing events but before committing its raw offsets
//! makes its successor produce those events again. Every event carries the raw partition and
//! offset of its line ([`crate::event::headers`]). For each (events partition, raw partition)
//! the tally keeps the highest raw offset counted, its *source watermark*, and counts an event
//! only above it. This is exact because:
//! - one preprocessor reads a raw partition in offset order, and its idempotent producer
//!   keeps its events in that order within each events partition (retries cannot reorder);
//! - a successor starts at the committed raw offset, which is at most one past the last line
//!   whose events were acknowledged, and replays the same lines into the same events (the
//!   enrichment is deterministic and the key is the country), so whatever it re-sends at or
//!   below the watermark was already counted;
//! - a zombie (a preprocessor still producing after losing the raw partition) interleaves
//!   with its successor, but every raw offset reaches the events partition first in order
//!   from one of them: whichever copy comes first is counted, every later copy is at or below
//!   the watermark.
//!
//! Watermarks are flushed in the same transaction as the counts and offsets, so they are
//! exactly as durable as the counts they protect.

use std::collections::HashMap;

use crate::store::{FlushBatch, OffsetUpdate, Results, TopicIdentity, WatermarkUpdate};

pub use crate::event::Source;

/// What a consumer group accumulates per partition between two flushes (the aggregator's
/// [`crate::aggregate::dimensions::Counts`]). The tally keeps one per owned partition, so a
/// revoked partition's un-flushed share is dropped exactly.
pub trait Accumulator {
    /// What the group writes with a flush, besides its positions (its own tables).
    type Flush: Results;
    /// The same configuration, nothing accumulated.
    fn empty_like(&self) -> Self;
    fn is_empty(&self) -> bool;
    /// Adds back what a failed flush took out.
    fn merge(&mut self, other: Self);
    /// What a flush takes out, leaving the partition's accumulator empty of it; state that
    /// outlives a flush (an alerter's event-time clock) stays.
    fn take(&mut self) -> Self
    where
        Self: Sized,
    {
        let empty = self.empty_like();
        std::mem::replace(self, empty)
    }
    /// True when the partition must be written at the next flush even if its offset did not
    /// move (an alerter reports that a partition is caught up).
    fn must_flush(&self) -> bool {
        false
    }
    /// The partition was just positioned from `stored`: load what the group keeps per
    /// partition beyond offsets (an alerter's event-time clock).
    fn resume_from(&mut self, _partition: i32, _stored: &crate::store::StoredPositions) {}
}

/// What [`Tally::record`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Counted,
    /// The raw line was already counted (a preprocessor replay); the offset still advances.
    DuplicateSource,
    /// At or before an offset already read (a replay after a seek): ignored.
    SeenOffset,
    /// A partition this aggregator does not own (any more): ignored.
    NotOwned,
}

/// Where counting of a newly owned partition starts, decided from what the database stored
/// and what the broker has (see [`crate::positions::start`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Start {
    /// The offset stored in the database (`None`: no row): what the next flush's
    /// compare-and-set expects.
    pub expected: Option<i64>,
    /// The first offset to count; messages before it are ignored.
    pub from: i64,
    /// Raw partition → highest raw offset counted (replays at or below are dropped).
    pub sources: HashMap<i32, i64>,
    /// The stored watermarks belong to a raw topic that no longer exists: the next flush
    /// replaces them instead of adding to them.
    pub reset_sources: bool,
}

impl Start {
    /// Continue exactly where the stored positions end (`None`: from the beginning).
    pub fn stored(expected: Option<i64>, sources: HashMap<i32, i64>) -> Start {
        Start {
            expected,
            from: expected.unwrap_or(0),
            sources,
            reset_sources: false,
        }
    }
}

/// What this aggregator knows about one partition it owns.
#[derive(Debug, Clone)]
pub struct PartitionTally<A> {
    /// What was counted since the last flush.
    pub counts: A,
    /// Next offset to read: one past the last counted message.
    pub next_offset: i64,
    /// The offset stored in the database, as this owner last read or wrote it.
    pub stored: Option<i64>,
    /// Raw partition → highest raw offset counted into this partition.
    pub sources: HashMap<i32, i64>,
    /// The same, as stored in the database.
    pub stored_sources: HashMap<i32, i64>,
    /// The stored positions must be rewritten at the next flush even if nothing moved: they
    /// refer to another topic (see [`Start`]), or their watermarks must be replaced.
    pub rebound: bool,
    /// The stored watermarks are replaced, not added to, at the next flush.
    pub reset_sources: bool,
    /// Messages skipped since the last flush: offsets the broker no longer had (deleted by
    /// its retention before this group read them). Written with the next flush.
    pub lost: u64,
}

/// All partitions this aggregator owns.
#[derive(Debug)]
pub struct Tally<A> {
    partitions: HashMap<i32, PartitionTally<A>>,
    /// Empty counts, copied for each newly owned partition.
    template: A,
}

/// Counts taken out for a flush; give them back with [`Tally::restore`] if it fails. The
/// batch holds the positions; the caller adds what it writes from [`Pending::counts`].
#[derive(Debug, Clone)]
pub struct Pending<A: Accumulator> {
    pub batch: FlushBatch<A::Flush>,
    per_partition: Vec<(i32, A)>,
    /// Per partition, the lost messages the batch reports (given back on failure).
    lost: Vec<(i32, u64)>,
}

impl<A: Accumulator> Pending<A> {
    /// What each flushed partition counted.
    pub fn counts(&self) -> impl Iterator<Item = &A> {
        self.per_partition.iter().map(|(_, a)| a)
    }

    /// The same, with each one's partition.
    pub fn per_partition(&self) -> impl Iterator<Item = (i32, &A)> {
        self.per_partition.iter().map(|(p, a)| (*p, a))
    }
}

impl<A: Accumulator> Tally<A> {
    /// No partitions yet; each one owned later starts from `template`'s configuration.
    pub fn new(template: A) -> Tally<A> {
        Tally {
            partitions: HashMap::new(),
            template,
        }
    }

    /// Takes ownership of `partition`, starting at the stored offset (`None`: from the start)
    /// with the stored source watermarks.
    #[cfg(test)]
    pub fn assign(&mut self, partition: i32, stored: Option<i64>, sources: HashMap<i32, i64>) {
        self.start(partition, Start::stored(stored, sources));
    }

    /// Takes ownership of `partition` as `start` says.
    pub fn start(&mut self, partition: i32, start: Start) {
        let rebound = start.reset_sources || start.expected.is_some_and(|e| e != start.from);
        self.partitions.insert(
            partition,
            PartitionTally {
                counts: self.template.empty_like(),
                next_offset: start.from,
                stored: start.expected,
                stored_sources: if start.reset_sources {
                    HashMap::new()
                } else {
                    start.sources.clone()
                },
                sources: start.sources,
                rebound,
                reset_sources: start.reset_sources,
                lost: 0,
            },
        );
    }

    /// Gives `partition` up, dropping what was counted and not flushed.
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// The next offset expected from `partition` (`None`: not owned).
    pub fn next_offset(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).map(|p| p.next_offset)
    }

    /// The accumulator of an owned partition (to set state loaded with its position).
    pub fn accumulator_mut(&mut self, partition: i32) -> Option<&mut A> {
        self.partitions.get_mut(&partition).map(|p| &mut p.counts)
    }

    /// Counts the message at `offset` of `partition` (`count` adds it to the partition's
    /// counts), unless its raw line was counted already (see the module docs). Events without
    /// a source are always counted.
    pub fn record(
        &mut self,
        partition: i32,
        offset: i64,
        source: Option<Source>,
        count: impl FnOnce(&mut A),
    ) -> Recorded {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return Recorded::NotOwned;
        };
        if offset < p.next_offset {
            return Recorded::SeenOffset;
        }
        // Our producers write no transaction markers and the topic is not compacted: a jump
        // means messages the broker no longer has (see `GroupMember::record`).
        p.lost += u64::try_from(offset - p.next_offset).unwrap_or(0);
        p.next_offset = offset + 1;
        if let Some(src) = source {
            match p.sources.get_mut(&src.partition) {
                Some(w) if src.offset <= *w => return Recorded::DuplicateSource,
                Some(w) => *w = src.offset,
                None => {
                    p.sources.insert(src.partition, src.offset);
                }
            }
        }
        count(&mut p.counts);
        Recorded::Counted
    }

    /// Takes all un-flushed counts out and describes the flush that makes them durable, with
    /// the topics (`identity`) its positions refer to. Partitions whose offset did not move
    /// are left out (there is nothing to protect) unless their stored positions must be
    /// rewritten.
    pub fn take_pending(
        &mut self,
        consumer_group: &str,
        topic: &str,
        identity: &TopicIdentity,
    ) -> Pending<A> {
        let mut offsets = Vec::new();
        let mut watermarks = Vec::new();
        let mut reset_watermarks = Vec::new();
        let mut per_partition = Vec::new();
        let mut lost = Vec::new();
        for (&partition, p) in &mut self.partitions {
            let unmoved =
                p.stored == Some(p.next_offset) || (p.stored.is_none() && p.counts.is_empty());
            if unmoved && !p.rebound && !p.counts.must_flush() {
                continue;
            }
            if p.reset_sources {
                reset_watermarks.push(partition);
            }
            let counts = p.counts.take();
            offsets.push(OffsetUpdate {
                partition,
                expected: p.stored,
                next: p.next_offset,
            });
            for (&source_partition, &source_offset) in &p.sources {
                if p.stored_sources.get(&source_partition) != Some(&source_offset) {
                    watermarks.push(WatermarkUpdate {
                        partition,
                        source_partition,
                        source_offset,
                    });
                }
            }
            per_partition.push((partition, counts));
            if p.lost > 0 {
                lost.push((partition, std::mem::take(&mut p.lost)));
            }
        }
        offsets.sort_by_key(|o| o.partition);
        watermarks.sort();
        reset_watermarks.sort_unstable();
        Pending {
            batch: FlushBatch {
                consumer_group: consumer_group.to_owned(),
                topic: topic.to_owned(),
                offsets,
                watermarks,
                reset_watermarks,
                identity: identity.clone(),
                lost: lost.iter().map(|l| l.1).sum(),
                clocks: Vec::new(),
                state: Vec::new(),
                data_error: None,
                results: Default::default(),
            },
            per_partition,
            lost,
        }
    }

    /// The flush committed: the stored offsets are now the flushed ones.
    pub fn committed(&mut self, pending: &Pending<A>) {
        for o in &pending.batch.offsets {
            if let Some(p) = self.partitions.get_mut(&o.partition) {
                p.stored = Some(o.next);
                p.rebound = false;
                p.reset_sources = false;
            }
        }
        for w in &pending.batch.watermarks {
            if let Some(p) = self.partitions.get_mut(&w.partition) {
                p.stored_sources.insert(w.source_partition, w.source_offset);
            }
        }
    }

    /// The flush failed without writing: put the counts back for partitions still owned.
    /// (Source watermarks were never taken out: the next flush writes them.)
    pub fn restore(&mut self, pending: Pending<A>) {
        for (partition, counts) in pending.per_partition {
            if let Some(p) = self.partitions.get_mut(&partition) {
                p.counts.merge(counts);
            }
        }
        for (partition, lost) in pending.lost {
            if let Some(p) = self.partitions.get_mut(&partition) {
                p.lost += lost;
            }
        }
    }

    /// Partitions the database says another owner moved: forget their counts and restart them
    /// from `stored` (the caller seeks the consumer there).
    #[cfg(test)]
    pub fn reset(&mut self, partition: i32, stored: Option<i64>, sources: HashMap<i32, i64>) {
        if self.partitions.contains_key(&partition) {
            self.assign(partition, stored, sources);
        }
    }

    /// Every owned partition's accumulator (state a group changes outside a message: open
    /// visits closed before a flush).
    pub fn accumulators_mut(&mut self) -> impl Iterator<Item = (i32, &mut A)> {
        self.partitions.iter_mut().map(|(&p, t)| (p, &mut t.counts))
    }

    /// Owned partitions, sorted.
    pub fn partitions(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.partitions.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::countries::CountryCode;

    /// Counts of the countries only.
    #[derive(Debug, Default)]
    struct Countries(HashMap<CountryCode, u64>);

    impl Accumulator for Countries {
        type Flush = ();
        fn empty_like(&self) -> Self {
            Countries::default()
        }
        fn is_empty(&self) -> bool {
            self.0.is_empty()
        }
        fn merge(&mut self, other: Self) {
            for (c, n) in other.0 {
                *self.0.entry(c).or_insert(0) += n;
            }
        }
    }

    fn tally() -> Tally<Countries> {
        Tally::new(Countries::default())
    }

    fn rec(
        t: &mut Tally<Countries>,
        p: i32,
        offset: i64,
        country: &str,
        source: Option<Source>,
    ) -> Recorded {
        let c = CountryCode::parse(country).unwrap();
        t.record(p, offset, source, |counts| {
            *counts.0.entry(c).or_insert(0) += 1
        })
    }

    /// The flush's visits per country, sorted.
    fn increments(p: &Pending<Countries>) -> Vec<(String, u64)> {
        let mut totals: HashMap<String, u64> = HashMap::new();
        for counts in p.counts() {
            for (c, n) in &counts.0 {
                *totals.entry(c.as_str().to_owned()).or_insert(0) += n;
            }
        }
        let mut v: Vec<_> = totals.into_iter().collect();
        v.sort();
        v
    }

    fn src(partition: i32, offset: i64) -> Option<Source> {
        Some(Source { partition, offset })
    }

    #[test]
    fn offsets_the_broker_no_longer_has_are_reported_once() {
        let mut t = tally();
        t.assign(0, Some(10), HashMap::new());
        t.assign(1, None, HashMap::new());
        // Partition 0 resumes at 25 (10..25 deleted); partition 1 starts at its log start 7.
        assert_eq!(rec(&mut t, 0, 25, "NL", None), Recorded::Counted);
        assert_eq!(rec(&mut t, 0, 26, "NL", None), Recorded::Counted);
        assert_eq!(rec(&mut t, 1, 7, "US", None), Recorded::Counted);
        let p = t.take_pending("g", "t", &TopicIdentity::default());
        assert_eq!(p.batch.lost, 15 + 7);
        // A failed flush gives them back; the next one reports them again, once.
        t.restore(p);
        let p = t.take_pending("g", "t", &TopicIdentity::default());
        assert_eq!(p.batch.lost, 22);
        t.committed(&p);
        assert_eq!(rec(&mut t, 0, 27, "NL", None), Recorded::Counted);
        let p = t.take_pending("g", "t", &TopicIdentity::default());
        assert_eq!(p.batch.lost, 0);
        // A revoked partition's loss goes with it: its next owner finds the same gap.
        assert_eq!(rec(&mut t, 1, 9, "US", None), Recorded::Counted);
        t.revoke(1);
        let p = t.take_pending("g", "t", &TopicIdentity::default());
        assert_eq!(p.batch.lost, 0);
    }

    #[test]
    fn counts_flushes_and_skips_replays() {
        let mut t = tally();
        t.assign(0, None, HashMap::new());
        t.assign(1, Some(10), HashMap::new());
        assert_eq!(rec(&mut t, 0, 0, "NL", None), Recorded::Counted);
        assert_eq!(rec(&mut t, 0, 1, "NL", None), Recorded::Counted);
        assert_eq!(rec(&mut t, 1, 10, "US", None), Recorded::Counted);
        assert_eq!(
            rec(&mut t, 1, 9, "US", None),
            Recorded::SeenOffset,
            "offset before the stored one is a replay"
        );
        assert_eq!(rec(&mut t, 2, 0, "US", None), Recorded::NotOwned);
        let p = t.take_pending("g", "t", &TopicIdentity::default());
        assert_eq!(increments(&p), vec![("NL".into(), 2), ("US".into(), 1)]);
        assert_eq!(
            p.batch.offsets,
            vec![
                OffsetUpdate {
                    partition: 0,
                    expected: None,
                    next: 2
                },
                OffsetUpdate {
                    partition: 1,
                    expected: Some(10),
                    next: 11
                }
            ]
        );
        t.committed(&p);
        let again = t.take_pending("g", "t", &TopicIdentity::default());
        assert!(again.batch.offsets.is_empty() && increments(&again).is_empty());
    }

    #[test]
    fn revoke_drops_and_restore_returns_counts() {
        let mut t = tally();
        t.assign(0, None, HashMap::new());
        t.assign(1, None, HashMap::new());
        rec(&mut t, 0, 0, "NL", None);
        rec(&mut t, 1, 0, "DE", None);
        let p = t.take_pending("g", "t", &TopicIdentity::default());
        t.revoke(1);
        t.restore(p);
        let p = t.take_pending("g", "t", &TopicIdentity::default());
        assert_eq!(increments(&p), vec![("NL".into(), 1)]);
        t.reset(0, Some(5), HashMap::new());
        assert_eq!(rec(&mut t, 0, 4, "NL", None), Recorded::SeenOffset);
        assert_eq!(rec(&mut t, 0, 5, "NL", None), Recorded::Counted);
    }

    /// A preprocessor crashed after producing raw offsets 100..=104 of raw partition 3 but
    /// committed only up to 102; a zombie copy of it still sends 105 late, interleaved with
    /// its successor, which replays from 102. Every raw line is counted exactly once.
    #[test]
    fn zombie_and_successor_replays_count_each_line_once() {
        let mut t = tally();
        t.assign(0, None, HashMap::new());
        let mut offset = 0;
        let mut feed = |t: &mut Tally<Countries>, raw: i64| {
            let r = rec(t, 0, offset, "NL", src(3, raw));
            offset += 1;
            r
        };
        for raw in 100..=104 {
            assert_eq!(feed(&mut t, raw), Recorded::Counted);
        }
        // Successor replays 102, 103; then the zombie's late 105; then the successor goes on.
        assert_eq!(feed(&mut t, 102), Recorded::DuplicateSource);
        assert_eq!(feed(&mut t, 103), Recorded::DuplicateSource);
        assert_eq!(feed(&mut t, 105), Recorded::Counted);
        for raw in [104, 105] {
            assert_eq!(feed(&mut t, raw), Recorded::DuplicateSource);
        }
        assert_eq!(feed(&mut t, 106), Recorded::Counted);
        // Another raw partition has its own watermark.
        assert_eq!(rec(&mut t, 0, offset, "DE", src(4, 0)), Recorded::Counted);

        let p = t.take_pending("g", "t", &TopicIdentity::default());
        assert_eq!(increments(&p), vec![("DE".into(), 1), ("NL".into(), 7)]);
        assert_eq!(
            p.batch.offsets[0].next,
            offset + 1,
            "duplicates still move the offset"
        );
        let wm = |source_partition, source_offset| WatermarkUpdate {
            partition: 0,
            source_partition,
            source_offset,
        };
        assert_eq!(p.batch.watermarks, vec![wm(3, 106), wm(4, 0)]);
        t.committed(&p);
        // Only watermarks that moved are written again.
        rec(&mut t, 0, offset + 1, "NL", src(3, 107));
        let p = t.take_pending("g", "t", &TopicIdentity::default());
        assert_eq!(p.batch.watermarks, vec![wm(3, 107)]);
    }

    /// A partition whose stored positions belong to a topic that was deleted and created
    /// again starts counting the new topic from its beginning; its next flush moves the
    /// stored offset from the old value (compare-and-set) and replaces the old watermarks, even
    /// when the new offset happens to equal the old one.
    #[test]
    fn a_recreated_topic_is_counted_from_its_start() {
        let mut t = tally();
        t.start(
            0,
            Start {
                expected: Some(3),
                from: 0,
                sources: HashMap::new(),
                reset_sources: true,
            },
        );
        for offset in 0..3 {
            assert_eq!(
                rec(&mut t, 0, offset, "NL", src(7, offset)),
                Recorded::Counted
            );
        }
        let ids = TopicIdentity {
            topic_id: Some("new".into()),
            source_topic_id: Some("raw".into()),
        };
        let p = t.take_pending("g", "t", &ids);
        assert_eq!(increments(&p), vec![("NL".into(), 3)]);
        assert_eq!(
            p.batch.offsets,
            vec![OffsetUpdate {
                partition: 0,
                expected: Some(3),
                next: 3
            }]
        );
        assert_eq!(p.batch.reset_watermarks, vec![0]);
        assert_eq!(p.batch.identity, ids);
        t.committed(&p);
        let again = t.take_pending("g", "t", &ids);
        assert!(again.batch.offsets.is_empty() && again.batch.reset_watermarks.is_empty());
    }

    /// A new owner starts from the stored watermarks, so a replay that spans the handover is
    /// still dropped.
    #[test]
    fn stored_watermarks_survive_reassignment() {
        let mut t = tally();
        t.assign(0, Some(50), HashMap::from([(3, 104)]));
        assert_eq!(
            rec(&mut t, 0, 50, "NL", src(3, 104)),
            Recorded::DuplicateSource
        );
        assert_eq!(rec(&mut t, 0, 51, "NL", src(3, 105)), Recorded::Counted);
        let p = t.take_pending("g", "t", &TopicIdentity::default());
        assert_eq!(increments(&p), vec![("NL".into(), 1)]);
    }
}
