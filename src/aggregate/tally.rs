//! The pure core of the aggregate stage: per-partition in-memory counts and offsets.
//!
//! Counts are kept per source partition so that a revoked partition's un-flushed counts can
//! be dropped exactly (its new owner re-reads them from the stored offset).

use std::collections::HashMap;

use crate::countries::CountryCode;
use crate::store::{FlushBatch, OffsetUpdate};

/// What this aggregator knows about one partition it owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionTally {
    /// Visits counted since the last flush.
    pub counts: HashMap<CountryCode, u64>,
    /// Next offset to read: one past the last counted message.
    pub next_offset: i64,
    /// The offset stored in the database, as this owner last read or wrote it.
    pub stored: Option<i64>,
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
    /// Takes ownership of `partition`, starting at the stored offset (`None`: from the start).
    pub fn assign(&mut self, partition: i32, stored: Option<i64>) {
        self.partitions.insert(
            partition,
            PartitionTally {
                counts: HashMap::new(),
                next_offset: stored.unwrap_or(0),
                stored,
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

    /// Counts one visit at `offset` of `partition`. Returns false (and counts nothing) for a
    /// partition not owned or an offset already counted (a replay after a seek).
    pub fn record(&mut self, partition: i32, offset: i64, country: CountryCode) -> bool {
        match self.partitions.get_mut(&partition) {
            Some(p) if offset >= p.next_offset => {
                *p.counts.entry(country).or_insert(0) += 1;
                p.next_offset = offset + 1;
                true
            }
            _ => false,
        }
    }

    /// Takes all un-flushed counts out and describes the flush that makes them durable.
    /// Partitions whose offset did not move are left out: there is nothing to protect.
    pub fn take_pending(&mut self, consumer_group: &str, topic: &str) -> Pending {
        let mut totals: HashMap<CountryCode, u64> = HashMap::new();
        let mut offsets = Vec::new();
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
            per_partition.push((partition, counts));
        }
        offsets.sort_by_key(|o| o.partition);
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
    }

    /// The flush failed without writing: put the counts back for partitions still owned.
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
    pub fn reset(&mut self, partition: i32, stored: Option<i64>) {
        if self.partitions.contains_key(&partition) {
            self.assign(partition, stored);
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

    #[test]
    fn counts_flushes_and_skips_replays() {
        let mut t = Tally::default();
        t.assign(0, None);
        t.assign(1, Some(10));
        assert!(t.record(0, 0, cc("NL")));
        assert!(t.record(0, 1, cc("NL")));
        assert!(t.record(1, 10, cc("US")));
        assert!(
            !t.record(1, 9, cc("US")),
            "offset before the stored one is a replay"
        );
        assert!(!t.record(2, 0, cc("US")), "not owned");
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
        t.assign(0, None);
        t.assign(1, None);
        t.record(0, 0, cc("NL"));
        t.record(1, 0, cc("DE"));
        let p = t.take_pending("g", "t");
        t.revoke(1);
        t.restore(p);
        let p = t.take_pending("g", "t");
        assert_eq!(p.batch.increments, vec![("NL".into(), 1)]);
        t.reset(0, Some(5));
        assert!(!t.record(0, 4, cc("NL")));
        assert!(t.record(0, 5, cc("NL")));
    }
}
