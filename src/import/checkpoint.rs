//! Import checkpoints: how far each file was imported, so that importing it again after a
//! crash (or after it grew) resumes there instead of sending every line again.
//!
//! A checkpoint is written only after the broker acknowledged every line before its position
//! (the producer is flushed first), so it never points past an undelivered line. The price is
//! the other direction: lines acknowledged after the last checkpoint are sent again when the
//! importer was killed before it could write the next one (see [`CHECKPOINT_EVERY`]).
//!
//! A file is recognised by its path and a fingerprint of its first bytes; a file replaced at
//! the same path (log rotation) or cut shorter than the checkpoint starts from the beginning.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// At most this much time passes between two checkpoints of a file being imported: the most
/// that a `kill -9` of the importer can make it send twice.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Bytes at the start of a file that identify it.
const FINGERPRINT_BYTES: u64 = 4096;

/// Where one file's import stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The file, as canonical path (for people reading the checkpoint directory).
    pub path: String,
    /// SHA-256 of the file's first `fingerprint_len` bytes (as stored, before gzip decoding).
    pub fingerprint: String,
    /// How many bytes the fingerprint covers: up to 4 KiB, fewer for a file that was smaller
    /// (a small file that grows keeps its fingerprint).
    pub fingerprint_len: u64,
    /// Bytes of the (decompressed) content whose lines were acknowledged.
    pub position: u64,
    /// Lines acknowledged in total, for reports.
    pub lines: u64,
    /// Names this import of this file in the key of each line it sends (with the line's end
    /// position), so a restart after `kill -9` finds the lines sent after `position` and does
    /// not send them again ([`super::recover`]). Random, made when the file starts from 0;
    /// 0 in checkpoints of earlier versions (no recovery: at most [`CHECKPOINT_EVERY`] of lines
    /// sent twice, as before).
    #[serde(default)]
    pub stream: u64,
    /// Per raw partition, the offset from which lines after `position` may lie: every line
    /// before `position` was acknowledged below it. Where recovery starts reading.
    #[serde(default)]
    pub marks: std::collections::BTreeMap<i32, i64>,
}

/// A directory of checkpoints, one JSON file per (cluster, topic, file).
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    dir: PathBuf,
    /// Checkpoints are per cluster and topic: importing the same file into another cluster
    /// starts afresh.
    scope: String,
}

impl CheckpointDir {
    pub fn new(dir: impl Into<PathBuf>, brokers: &str, topic: &str) -> CheckpointDir {
        CheckpointDir {
            dir: dir.into(),
            scope: format!("{brokers}\n{topic}"),
        }
    }

    /// The directory, for messages.
    pub fn location(&self) -> &Path {
        &self.dir
    }

    fn file_for(&self, canonical: &Path) -> PathBuf {
        let mut h = Sha256::new();
        h.update(self.scope.as_bytes());
        h.update(b"\n");
        h.update(canonical.as_os_str().as_encoded_bytes());
        let name = hex(&h.finalize()[..12]);
        self.dir.join(format!("{name}.json"))
    }

    /// The checkpoint to resume `path` from and keep updating (position 0 when it has no
    /// valid one, or when `from_start` asks to import it all again).
    pub fn resume(&self, path: &Path, from_start: bool) -> io::Result<Checkpoint> {
        let canonical = std::fs::canonicalize(path)?;
        let (fingerprint_now, fingerprint_len) = fingerprint(&canonical, FINGERPRINT_BYTES)?;
        let fresh = Checkpoint {
            path: canonical.display().to_string(),
            fingerprint: fingerprint_now,
            fingerprint_len,
            position: 0,
            lines: 0,
            stream: new_stream(),
            marks: Default::default(),
        };
        if from_start {
            return Ok(fresh);
        }
        let stored = match std::fs::read(self.file_for(&canonical)) {
            Ok(bytes) => match serde_json::from_slice::<Checkpoint>(&bytes) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(path = %path.display(), %e, "unreadable import checkpoint; importing from the start");
                    return Ok(fresh);
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(fresh),
            Err(e) => return Err(e),
        };
        let (same_head, len) = fingerprint(&canonical, stored.fingerprint_len)?;
        if same_head != stored.fingerprint || len != stored.fingerprint_len {
            tracing::info!(path = %path.display(), "file was replaced since the last import; importing from the start");
            return Ok(fresh);
        }
        Ok(stored)
    }

    /// Saves `checkpoint` atomically (write, fsync, rename).
    pub fn save(&self, checkpoint: &Checkpoint) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let target = self.file_for(Path::new(&checkpoint.path));
        let tmp = target.with_extension("json.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(checkpoint).map_err(io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)
    }
}

/// A fresh stream id: random, never 0 (0 marks a checkpoint without one).
pub fn new_stream() -> u64 {
    rand::random::<u64>().max(1)
}

/// SHA-256 of the first `max` bytes of `path` (fewer if it is shorter), and how many it covers.
fn fingerprint(path: &Path, max: u64) -> io::Result<(String, u64)> {
    let mut head = Vec::new();
    File::open(path)?
        .take(max.min(FINGERPRINT_BYTES))
        .read_to_end(&mut head)?;
    Ok((hex(&Sha256::digest(&head)), head.len() as u64))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `BufRead` that counts the bytes its user consumed, i.e. the position after the last line
/// read (unlike the bytes read from the inner reader, which include the read-ahead buffer).
pub struct Consumed<R> {
    inner: R,
    pub position: u64,
}

impl<R> Consumed<R> {
    pub fn new(inner: R, position: u64) -> Consumed<R> {
        Consumed { inner, position }
    }
}

impl<R: io::BufRead> Read for Consumed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.position += n as u64;
        Ok(n)
    }
}

impl<R: io::BufRead> io::BufRead for Consumed<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        self.position += amt as u64;
        self.inner.consume(amt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_only_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        std::fs::write(&log, "first line\nsecond line\n").unwrap();
        let cps = CheckpointDir::new(dir.path().join("cp"), "b:9092", "raw");
        let mut cp = cps.resume(&log, false).unwrap();
        assert_eq!((cp.position, cp.lines), (0, 0));
        cp.position = 11;
        cp.lines = 1;
        cps.save(&cp).unwrap();
        assert_eq!(cps.resume(&log, false).unwrap(), cp);
        // Another cluster has its own checkpoints.
        let other = CheckpointDir::new(dir.path().join("cp"), "c:9092", "raw");
        assert_eq!(other.resume(&log, false).unwrap().position, 0);
        // The file grew: its first bytes are the same, so it resumes.
        std::fs::write(&log, "first line\nsecond line\nthird\n").unwrap();
        assert_eq!(cps.resume(&log, false).unwrap(), cp);
        assert_eq!(cps.resume(&log, true).unwrap().position, 0, "--from-start");
        // Rotation: a new file at the same path starts from the beginning.
        std::fs::write(&log, "other first line\n").unwrap();
        assert_eq!(cps.resume(&log, false).unwrap().position, 0);
    }

    #[test]
    fn consumed_counts_what_the_reader_took() {
        let data = b"ab\ncd\nef";
        let mut r = Consumed::new(io::BufReader::with_capacity(4, &data[..]), 10);
        let mut buf = Vec::new();
        super::super::read_line_bounded(&mut r, &mut buf, 100).unwrap();
        assert_eq!(r.position, 13);
        super::super::read_line_bounded(&mut r, &mut buf, 100).unwrap();
        super::super::read_line_bounded(&mut r, &mut buf, 100).unwrap();
        assert_eq!(r.position, 18);
    }
}
