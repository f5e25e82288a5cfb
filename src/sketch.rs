//! Statistics that need the data together, kept as sketches that merge: a partition's
//! sketch and the database's combine into the sketch of both, so aggregators on different
//! partitions (and flushes at different times) add up without sharing memory.
//!
//! - [`Hll`]: HyperLogLog (Flajolet et al., 2007, with linear counting for small counts) for
//!   unique visitors. A merge is a register-wise maximum, so it is idempotent: an event
//!   counted twice cannot change the estimate. 2^14 registers (16 KiB): the standard error is
//!   1.04/√16384 = 0.81 %; an estimate is within ±2.5 % of the exact count with 99.7 %
//!   probability, and exact-ish (linear counting) for small counts.
//! - [`bucket_of`]: log-linear histogram buckets (16 per power of two) for response sizes
//!   and request times. Buckets are counts, so histograms add; a percentile read from them
//!   is the bucket's midpoint, within 1/32 (3.1 %) of the true value.

/// Register index bits.
const P: u32 = 14;
/// Registers.
pub const REGISTERS: usize = 1 << P;
/// One standard error of an estimate, relative.
pub const HLL_STANDARD_ERROR: f64 = 1.04 / 128.0;

/// A HyperLogLog sketch of 64-bit hashes.
///
/// Sparse while it holds few registers: an aggregator keeps one sketch per day, country and
/// partition between two flushes, and most of them see a handful of visitors; 16 KiB each
/// would make its memory grow with the number of countries times partitions (hundreds of
/// MiB), not with what it counts.
#[derive(Clone)]
pub struct Hll {
    repr: Repr,
}

#[derive(Clone)]
enum Repr {
    /// The non-zero registers as `index << 8 | rank`, sorted by index.
    Sparse(Vec<u32>),
    /// Every register.
    Dense(Box<[u8]>),
}

/// Non-zero registers kept sparse (4 bytes each); one more and the sketch turns dense.
const SPARSE_MAX: usize = REGISTERS / 8;

/// Starts a sparse sketch's stored form ([`Hll::to_compact_bytes`]). Its length, 2 + 4n,
/// is never [`REGISTERS`], the dense form's.
const SPARSE_TAG: &[u8] = b"S1";

impl std::fmt::Debug for Hll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hll(~{:.0})", self.estimate())
    }
}

impl PartialEq for Hll {
    fn eq(&self, other: &Hll) -> bool {
        self.to_bytes() == other.to_bytes()
    }
}

impl Eq for Hll {}

impl Default for Hll {
    fn default() -> Self {
        Hll {
            repr: Repr::Sparse(Vec::new()),
        }
    }
}

impl Hll {
    /// Adds an item by its hash (which must be well mixed: [`crate::event::visitor_id`]).
    pub fn add(&mut self, hash: u64) {
        let index = (hash >> (64 - P)) as u32;
        // The remaining bits, with a guard bit so the rank is at most 64 - P + 1.
        let rest = (hash << P) | (1 << (P - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        self.raise(index, rank);
    }

    /// Register `index` becomes at least `rank`.
    fn raise(&mut self, index: u32, rank: u8) {
        match &mut self.repr {
            Repr::Dense(registers) => {
                if let Some(r) = registers.get_mut(index as usize) {
                    *r = (*r).max(rank);
                }
            }
            Repr::Sparse(entries) => {
                match entries.binary_search_by_key(&index, |e| e >> 8) {
                    Ok(i) => entries[i] = entries[i].max(index << 8 | u32::from(rank)),
                    Err(i) => entries.insert(i, index << 8 | u32::from(rank)),
                }
                if entries.len() > SPARSE_MAX {
                    self.densify();
                }
            }
        }
    }

    fn densify(&mut self) {
        if let Repr::Sparse(_) = self.repr {
            self.repr = Repr::Dense(self.to_bytes().into_boxed_slice());
        }
    }

    /// The union with `other`.
    pub fn merge(&mut self, other: &Hll) {
        match (&mut self.repr, &other.repr) {
            (Repr::Sparse(a), Repr::Sparse(b)) => {
                // Two sorted lists: one pass, the larger rank of a shared index kept.
                let mut merged = Vec::with_capacity(a.len() + b.len());
                let (mut i, mut j) = (0, 0);
                while i < a.len() && j < b.len() {
                    let (x, y) = (a[i], b[j]);
                    match (x >> 8).cmp(&(y >> 8)) {
                        std::cmp::Ordering::Less => (merged.push(x), i += 1),
                        std::cmp::Ordering::Greater => (merged.push(y), j += 1),
                        std::cmp::Ordering::Equal => {
                            (merged.push(x.max(y)), (i, j) = (i + 1, j + 1))
                        }
                    };
                }
                merged.extend_from_slice(&a[i..]);
                merged.extend_from_slice(&b[j..]);
                *a = merged;
                if a.len() > SPARSE_MAX {
                    self.densify();
                }
            }
            (_, Repr::Sparse(b)) => {
                for &e in b {
                    self.raise(e >> 8, e as u8);
                }
            }
            (_, Repr::Dense(b)) => {
                self.densify();
                if let Repr::Dense(a) = &mut self.repr {
                    for (a, b) in a.iter_mut().zip(b.iter()) {
                        *a = (*a).max(*b);
                    }
                }
            }
        }
    }

    /// The estimated number of distinct items added.
    pub fn estimate(&self) -> f64 {
        let m = REGISTERS as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let (sum, zeros) = match &self.repr {
            Repr::Dense(registers) => {
                let (mut sum, mut zeros) = (0.0f64, 0usize);
                for &r in registers.iter() {
                    sum += (-f64::from(r)).exp2();
                    zeros += usize::from(r == 0);
                }
                (sum, zeros)
            }
            Repr::Sparse(entries) => {
                let zeros = REGISTERS - entries.len();
                let set: f64 = entries.iter().map(|&e| (-f64::from(e as u8)).exp2()).sum();
                (zeros as f64 + set, zeros)
            }
        };
        let raw = alpha * m * m / sum;
        if raw <= 2.5 * m && zeros > 0 {
            // Linear counting: accurate while many registers are still empty.
            m * (m / zeros as f64).ln()
        } else {
            raw
        }
    }

    /// Every register, for the database.
    pub fn to_bytes(&self) -> Vec<u8> {
        match &self.repr {
            Repr::Dense(registers) => registers.to_vec(),
            Repr::Sparse(entries) => {
                let mut registers = vec![0; REGISTERS];
                for &e in entries {
                    registers[(e >> 8) as usize] = e as u8;
                }
                registers
            }
        }
    }

    /// The sketch for the database in its smaller form: a sparse sketch as [`SPARSE_TAG`]
    /// and its entries (4 bytes each, little-endian), a dense one as every register. The
    /// per-slice sketches (day × site × country × visitor type) are mostly a handful of
    /// visitors: 16 KiB each would make the filterable rollups gigabytes a day.
    pub fn to_compact_bytes(&self) -> Vec<u8> {
        match &self.repr {
            Repr::Dense(_) => self.to_bytes(),
            Repr::Sparse(entries) => {
                let mut out = Vec::with_capacity(SPARSE_TAG.len() + 4 * entries.len());
                out.extend_from_slice(SPARSE_TAG);
                for e in entries {
                    out.extend_from_slice(&e.to_le_bytes());
                }
                out
            }
        }
    }

    /// A sketch read back from [`Hll::to_bytes`] or [`Hll::to_compact_bytes`]; `None` when
    /// the bytes are not one of ours.
    pub fn from_bytes(bytes: &[u8]) -> Option<Hll> {
        if bytes.len() == REGISTERS {
            return Some(Hll {
                repr: Repr::Dense(bytes.into()),
            });
        }
        let entries = bytes.strip_prefix(SPARSE_TAG)?;
        if entries.len() % 4 != 0 {
            return None;
        }
        let mut h = Hll::default();
        for e in entries.chunks_exact(4) {
            let e = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            if (e >> 8) as usize >= REGISTERS {
                return None;
            }
            h.raise(e >> 8, e as u8);
        }
        Some(h)
    }

    /// Bytes held (for tests of the sparse form).
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::Dense(r) => r.len(),
            Repr::Sparse(e) => e.capacity() * 4,
        }
    }
}

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 4;

/// The histogram bucket of `v`: exact below 16, then 16 buckets per power of two.
pub fn bucket_of(v: u64) -> i32 {
    if v < (1 << SUB_BITS) {
        return v as i32;
    }
    let e = 63 - v.leading_zeros(); // ≥ SUB_BITS
    let sub = (v >> (e - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    ((e - SUB_BITS + 1) << SUB_BITS) as i32 + sub as i32
}

/// The smallest and largest value of bucket `b`.
pub fn bucket_range(b: i32) -> (u64, u64) {
    let b = b.max(0) as u64;
    if b < (1 << SUB_BITS) {
        return (b, b);
    }
    let e = (b >> SUB_BITS) + u64::from(SUB_BITS) - 1;
    let sub = b & ((1 << SUB_BITS) - 1);
    let low = (1u64 << e) | (sub << (e - u64::from(SUB_BITS)));
    let width = 1u64 << (e - u64::from(SUB_BITS));
    (low, low + (width - 1))
}

/// The `q`-quantile (0..=1) of a histogram given as (bucket, count), buckets in any order:
/// the midpoint of the bucket holding it.
pub fn quantile(buckets: &[(i32, u64)], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().map(|b| b.1).sum();
    if total == 0 {
        return None;
    }
    let mut sorted = buckets.to_vec();
    sorted.sort_unstable();
    // The smallest value with at least q of the data at or below it.
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (b, n) in sorted {
        seen += n;
        if seen >= rank {
            let (low, high) = bucket_range(b);
            return Some(low + (high - low) / 2);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::visitor_id as visitor_hash;

    #[test]
    fn hll_estimates_within_its_error_and_merges_idempotently() {
        for exact in [0u64, 1, 10, 1000, 20_000, 200_000] {
            let mut h = Hll::default();
            for i in 0..exact {
                h.add(visitor_hash(
                    &format!("10.0.{}.{}", i / 256, i % 256),
                    "2026-01-01",
                    "ua",
                ));
            }
            let e = h.estimate();
            let bound = 3.0 * HLL_STANDARD_ERROR * exact as f64 + 1.0;
            assert!((e - exact as f64).abs() <= bound, "{exact}: estimated {e}");
            // Adding the same items again, or merging a copy, changes nothing.
            let copy = h.clone();
            h.merge(&copy);
            assert_eq!(h, copy);
            assert_eq!(Hll::from_bytes(&h.to_bytes()), Some(copy));
        }
        let (mut a, mut b) = (Hll::default(), Hll::default());
        for i in 0..5000u32 {
            let item = visitor_hash(&i.to_string(), "d", "u");
            if i < 3000 {
                a.add(item);
            }
            if i >= 2000 {
                b.add(item);
            }
        }
        a.merge(&b);
        assert!((a.estimate() - 5000.0).abs() < 5000.0 * 3.0 * HLL_STANDARD_ERROR);
        assert_eq!(Hll::from_bytes(&[0; 10]), None);
    }

    #[test]
    fn a_sparse_sketch_is_small_and_equals_its_dense_form() {
        // The same items added to a sketch and to one forced dense from the start.
        let items: Vec<u64> = (0..5000u32)
            .map(|i| visitor_hash(&i.to_string(), "d", "u"))
            .collect();
        let (mut sparse, mut dense) = (Hll::default(), Hll::from_bytes(&[0; REGISTERS]).unwrap());
        for (n, &item) in items.iter().enumerate() {
            sparse.add(item);
            dense.add(item);
            if n == 100 {
                assert!(sparse.heap_bytes() < 1024, "{} bytes", sparse.heap_bytes());
                // The compact stored form: the tag and 4 bytes per register set, read back
                // equal.
                let compact = sparse.to_compact_bytes();
                assert!(compact.len() <= 2 + 4 * 101, "{} bytes", compact.len());
                assert_eq!(Hll::from_bytes(&compact).as_ref(), Some(&sparse));
                assert_eq!(sparse.estimate(), dense.estimate());
                assert_eq!(sparse.to_bytes(), dense.to_bytes());
            }
        }
        assert_eq!(
            sparse.heap_bytes(),
            REGISTERS,
            "dense past {SPARSE_MAX} registers"
        );
        assert_eq!(sparse.estimate(), dense.estimate());
        assert_eq!(sparse, dense);
        assert_eq!(sparse.to_compact_bytes(), dense.to_bytes());
        // Not ours: a torn entry, a register out of range.
        assert_eq!(Hll::from_bytes(b"S1\x01\x02\x03"), None);
        assert_eq!(Hll::from_bytes(b"S1\x01\x00\x00\x01"), None);
        // Merges of every combination of forms give the dense merge's registers.
        let sketch = |range: std::ops::Range<usize>| {
            let mut h = Hll::default();
            items[range].iter().for_each(|&i| h.add(i));
            h
        };
        for (a, b) in [
            (0..50, 30..90),
            (0..50, 0..4000),
            (0..4000, 10..60),
            (0..3000, 2000..5000),
        ] {
            let (x, y) = (sketch(a.clone()), sketch(b.clone()));
            let mut expected = Hll::from_bytes(&x.to_bytes()).unwrap();
            expected.merge(&Hll::from_bytes(&y.to_bytes()).unwrap());
            let mut merged = x.clone();
            merged.merge(&y);
            assert_eq!(merged.to_bytes(), expected.to_bytes(), "{a:?} + {b:?}");
            assert_eq!(merged.estimate(), expected.estimate());
            let mut other_way = y.clone();
            other_way.merge(&x);
            assert_eq!(other_way, merged);
        }
    }

    #[test]
    fn buckets_cover_every_value_within_their_error() {
        let mut last = -1;
        for v in (0..5000u64).chain([1 << 20, (1 << 40) + 12345, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b >= last, "buckets grow with the value");
            last = b;
            let (low, high) = bucket_range(b);
            assert!(
                low <= v && v <= high,
                "{v} not in bucket {b} = {low}..={high}"
            );
            let mid = low + (high - low) / 2;
            assert!(mid.abs_diff(v) as f64 <= v as f64 / 16.0, "{v}: {mid}");
        }
        for v in 0..16 {
            assert_eq!(bucket_range(bucket_of(v)), (v, v), "exact below 16");
        }
    }

    #[test]
    fn quantiles_from_buckets() {
        let values: Vec<u64> = (1..=1000).collect();
        let mut h: std::collections::HashMap<i32, u64> = Default::default();
        for v in &values {
            *h.entry(bucket_of(*v)).or_default() += 1;
        }
        let buckets: Vec<(i32, u64)> = h.into_iter().collect();
        for (q, exact) in [(0.5, 500u64), (0.95, 950), (0.99, 990), (1.0, 1000)] {
            let got = quantile(&buckets, q).unwrap();
            assert!(
                got.abs_diff(exact) as f64 <= exact as f64 / 32.0 + 1.0,
                "p{q}: {got}"
            );
        }
        assert_eq!(quantile(&[], 0.5), None);
    }
}
