//! The pure core of the aggregate stage: per-partition in-memory counts and offsets.
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

use crate::countries::CountryCode;
use crate::store::{FlushBatch, OffsetUpdate, WatermarkUpdate};

/// Where an event's line came from: partition and offset on the raw topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub partition: i32,
    pub offset: i64,
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

/// What this aggregator knows about one partition it owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionTally {
    /// Visits counted since the last flush.
    pub counts: HashMap<CountryCode, u64>,
    /// Next offset to read: one past the last counted message.
    pub next_offset: i64,
    /// The offset stored in the database, as this owner last read or wrote it.
    pub stored: Option<i64>,
    /// Raw partition → highest raw offset counted into this partition.
    pub sources: HashMap<i32, i64>,
    /// The same, as stored in the database.
    pub stored_sources: HashMap<i32, i64>,
}

/// All partitions this aggregator owns.
#[derive(Debug, Default)]
pub struct Tally {
    partitions: HashMap<i32, PartitionTally>,
}

/// Counts taken out for a flush; give them back with [`Tally::restore`] if it fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub batch: FlushBatch,
    per_partition: Vec<(i32, HashMap<CountryCode, u64>)>,
}

impl Tally {
    /// Takes ownership of `partition`, starting at the stored offset (`None`: from the start)
    /// with the stored source watermarks.
    pub fn assign(&mut self, partition: i32, stored: Option<i64>, sources: HashMap<i32, i64>) {
        self.partitions.insert(
            partition,
            PartitionTally {
                counts: HashMap::new(),
                next_offset: stored.unwrap_or(0),
                stored,
                stored_sources: sources.clone(),
                sources,
            },
        );
    }

    /// Gives `partition` up, dropping what was counted and not flushed.
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    pub fn owns(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// Counts one visit at `offset` of `partition`, unless its raw line was counted already
    /// (see the module docs). Events without a source are always counted.
    pub fn record(
        &mut self,
        partition: i32,
        offset: i64,
        country: CountryCode,
        source: Option<Source>,
    ) -> Recorded {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return Recorded::NotOwned;
        };
        if offset < p.next_offset {
            return Recorded::SeenOffset;
        }
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
        *p.counts.entry(country).or_insert(0) += 1;
        Recorded::Counted
    }

    /// Takes all un-flushed counts out and describes the flush that makes them durable.
    /// Partitions whose offset did not move are left out: there is nothing to protect.
    pub fn take_pending(&mut self, consumer_group: &str, topic: &str) -> Pending {
        let mut totals: HashMap<CountryCode, u64> = HashMap::new();
        let mut offsets = Vec::new();
        let mut watermarks = Vec::new();
        let mut per_partition = Vec::new();
        for (&partition, p) in &mut self.partitions {
            if p.stored == Some(p.next_offset) || (p.stored.is_none() && p.counts.is_empty()) {
                continue;
            }
            let counts = std::mem::take(&mut p.counts);
            for (&c, &n) in &counts {
                *totals.entry(c).or_insert(0) += n;
            }
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
        }
        offsets.sort_by_key(|o| o.partition);
        watermarks.sort();
        let mut increments: Vec<(String, u64)> = totals
            .into_iter()
            .map(|(c, n)| (c.as_str().to_owned(), n))
            .collect();
        increments.sort();
        Pending {
            batch: FlushBatch {
                consumer_group: consumer_group.to_owned(),
                topic: topic.to_owned(),
                increments,
                offsets,
                watermarks,
            },
            per_partition,
        }
    }

    /// The flush committed: the stored offsets are now the flushed ones.
    pub fn committed(&mut self, pending: &Pending) {
        for o in &pending.batch.offsets {
            if let Some(p) = self.partitions.get_mut(&o.partition) {
                p.stored = Some(o.next);
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
    pub fn restore(&mut self, pending: Pending) {
        for (partition, counts) in pending.per_partition {
            if let Some(p) = self.partitions.get_mut(&partition) {
                for (c, n) in counts {
                    *p.counts.entry(c).or_insert(0) += n;
                }
            }
        }
    }

    /// Partitions the database says another owner moved: forget their counts and restart them
    /// from `stored` (the caller seeks the consumer there).
    pub fn reset(&mut self, partition: i32, stored: Option<i64>, sources: HashMap<i32, i64>) {
        if self.partitions.contains_key(&partition) {
            self.assign(partition, stored, sources);
        }
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

    fn cc(s: &str) -> CountryCode {
        CountryCode::parse(s).unwrap()
    }

    fn src(partition: i32, offset: i64) -> Option<Source> {
        Some(Source { partition, offset })
    }

    #[test]
    fn counts_flushes_and_skips_replays() {
        let mut t = Tally::default();
        t.assign(0, None, HashMap::new());
        t.assign(1, Some(10), HashMap::new());
        assert_eq!(t.record(0, 0, cc("NL"), None), Recorded::Counted);
        assert_eq!(t.record(0, 1, cc("NL"), None), Recorded::Counted);
        assert_eq!(t.record(1, 10, cc("US"), None), Recorded::Counted);
        assert_eq!(
            t.record(1, 9, cc("US"), None),
            Recorded::SeenOffset,
            "offset before the stored one is a replay"
        );
        assert_eq!(t.record(2, 0, cc("US"), None), Recorded::NotOwned);
        let p = t.take_pending("g", "t");
        assert_eq!(p.batch.increments, vec![("NL".into(), 2), ("US".into(), 1)]);
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
        let again = t.take_pending("g", "t");
        assert!(again.batch.offsets.is_empty() && again.batch.increments.is_empty());
    }

    #[test]
    fn revoke_drops_and_restore_returns_counts() {
        let mut t = Tally::default();
        t.assign(0, None, HashMap::new());
        t.assign(1, None, HashMap::new());
        t.record(0, 0, cc("NL"), None);
        t.record(1, 0, cc("DE"), None);
        let p = t.take_pending("g", "t");
        t.revoke(1);
        t.restore(p);
        let p = t.take_pending("g", "t");
        assert_eq!(p.batch.increments, vec![("NL".into(), 1)]);
        t.reset(0, Some(5), HashMap::new());
        assert_eq!(t.record(0, 4, cc("NL"), None), Recorded::SeenOffset);
        assert_eq!(t.record(0, 5, cc("NL"), None), Recorded::Counted);
    }

    /// A preprocessor crashed after producing raw offsets 100..=104 of raw partition 3 but
    /// committed only up to 102; a zombie copy of it still sends 105 late, interleaved with
    /// its successor, which replays from 102. Every raw line is counted exactly once.
    #[test]
    fn zombie_and_successor_replays_count_each_line_once() {
        let mut t = Tally::default();
        t.assign(0, None, HashMap::new());
        let mut offset = 0;
        let mut feed = |t: &mut Tally, raw: i64| {
            let r = t.record(0, offset, cc("NL"), src(3, raw));
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
        assert_eq!(t.record(0, offset, cc("DE"), src(4, 0)), Recorded::Counted);

        let p = t.take_pending("g", "t");
        assert_eq!(p.batch.increments, vec![("DE".into(), 1), ("NL".into(), 7)]);
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
        t.record(0, offset + 1, cc("NL"), src(3, 107));
        let p = t.take_pending("g", "t");
        assert_eq!(p.batch.watermarks, vec![wm(3, 107)]);
    }

    /// A new owner starts from the stored watermarks, so a replay that spans the handover is
    /// still dropped.
    #[test]
    fn stored_watermarks_survive_reassignment() {
        let mut t = Tally::default();
        t.assign(0, Some(50), HashMap::from([(3, 104)]));
        assert_eq!(
            t.record(0, 50, cc("NL"), src(3, 104)),
            Recorded::DuplicateSource
        );
        assert_eq!(t.record(0, 51, cc("NL"), src(3, 105)), Recorded::Counted);
        let p = t.take_pending("g", "t");
        assert_eq!(p.batch.increments, vec![("NL".into(), 1)]);
    }
}
