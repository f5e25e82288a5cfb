//! How lines are read: bounded (a line longer than the limit is cut, never held whole), from
//! plain or gzip files, and from followed files across rotation. Both readers keep the same
//! rules: `\n` or `\r\n` ends a line, a final line without a newline counts, and a line's
//! real length is reported with its kept part.

use std::fs::File;
use std::io::{self, BufRead, Read};
use std::path::Path;
use std::time::Duration;

use indicatif::ProgressBar;

use crate::format::MAX_LINE_BYTES;
use tokio_util::sync::CancellationToken;

/// Opens a file, decompressing it if it starts with the gzip magic bytes.
pub(crate) fn open_maybe_gzip(path: &Path, bar: &ProgressBar) -> io::Result<Box<dyn Read>> {
    let mut file = File::open(path)?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic)?;
    let file = io::Cursor::new(magic[..n].to_vec()).chain(file);
    let file = bar.wrap_read(file);
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(file)))
    } else {
        Ok(Box::new(file))
    }
}

/// Whether `path` is gzip-compressed (its first two bytes): such a file is finished (a rotated
/// log), so `--follow` reads it whole instead of following its bytes.
pub(crate) fn is_gzip(path: &Path) -> io::Result<bool> {
    let mut magic = [0u8; 2];
    let n = File::open(path)?.read(&mut magic)?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

/// Reads one line into `buf` (without `\n` or `\r\n`), keeping at most `limit` bytes and
/// skipping the rest. Returns the line's full length, or `None` at end of input. A final line
/// without a newline still counts.
pub fn read_line_bounded<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<Option<usize>> {
    buf.clear();
    let mut total = 0usize;
    let mut saw_any = false;
    loop {
        let chunk = match reader.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            break;
        }
        saw_any = true;
        let (piece, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        let room = limit.saturating_sub(buf.len());
        buf.extend_from_slice(&piece[..piece.len().min(room)]);
        total += piece.len();
        let consumed = done.unwrap_or(chunk.len());
        reader.consume(consumed);
        if done.is_some() {
            break;
        }
    }
    if !saw_any {
        return Ok(None);
    }
    if buf.last() == Some(&b'\r') && total == buf.len() {
        buf.pop();
        total -= 1;
    }
    Ok(Some(total))
}

/// `tail -F`: reads a growing file until shutdown; when the file is replaced (rotation: a
/// new inode) or truncated, finishes the old one and starts the new one from its beginning.
/// Each line goes to `emit(line cut to size, real length)`; `emit` returning false stops.
///
/// Memory is constant and time linear in the input, whatever it holds: a line without a
/// newline keeps only its first `MAX_LINE_BYTES + 1` bytes (see [`LineAssembler`]).
pub fn follow_file(
    path: &Path,
    shutdown: &CancellationToken,
    mut emit: impl FnMut(&[u8], usize) -> bool,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut file = File::open(path)?;
    let mut inode = file.metadata()?.ino();
    let mut pos: u64 = 0;
    let mut lines = LineAssembler::new(MAX_LINE_BYTES + 1);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let n = file.read(&mut chunk)?;
        if n > 0 {
            pos += n as u64;
            if !lines.push(&chunk[..n], &mut emit) {
                return Ok(());
            }
            continue;
        }
        std::thread::sleep(Duration::from_millis(200));
        match std::fs::metadata(path) {
            Ok(meta) if meta.ino() != inode || meta.len() < pos => {
                // Drain whatever the old file still had (a last line without newline too),
                // then switch.
                loop {
                    let n = file.read(&mut chunk)?;
                    if n == 0 || shutdown.is_cancelled() {
                        break;
                    }
                    if !lines.push(&chunk[..n], &mut emit) {
                        return Ok(());
                    }
                }
                if !lines.finish(&mut emit) {
                    return Ok(());
                }
                tracing::info!(path = %path.display(), "file rotated or truncated; reopening");
                file = File::open(path)?;
                inode = file.metadata()?.ino();
                pos = 0;
            }
            _ => {}
        }
    }
}

/// Cuts a byte stream that arrives in arbitrary chunks into lines, in constant memory and
/// linear time: each byte is scanned once, and of a line only its first `limit` bytes are
/// kept (its real length is counted), exactly as [`read_line_bounded`] does for whole files.
/// `\n` ends a line; a `\r` before it is dropped.
#[derive(Debug)]
pub struct LineAssembler {
    /// The kept head of the line being assembled (at most `limit` bytes).
    head: Vec<u8>,
    /// Its real length so far.
    len: usize,
    /// Whether the last byte seen of this line was `\r` (it may lie beyond `head`).
    ends_with_cr: bool,
    limit: usize,
}

impl LineAssembler {
    pub fn new(limit: usize) -> LineAssembler {
        LineAssembler {
            head: Vec::new(),
            len: 0,
            ends_with_cr: false,
            limit,
        }
    }

    /// Feeds bytes; every line they complete goes to `emit(head, real length)`. Returns false
    /// as soon as `emit` does.
    pub fn push(&mut self, data: &[u8], emit: &mut impl FnMut(&[u8], usize) -> bool) -> bool {
        self.push_at(data, 0, &mut |line, len, _| emit(line, len))
    }

    /// [`LineAssembler::push`] for bytes that start at `base` in their file: each line also
    /// comes with the position just after its newline (an import checkpoint's unit).
    pub fn push_at(
        &mut self,
        mut data: &[u8],
        mut base: u64,
        emit: &mut impl FnMut(&[u8], usize, u64) -> bool,
    ) -> bool {
        while let Some(i) = memchr::memchr(b'\n', data) {
            self.append(&data[..i]);
            let end = base + i as u64 + 1;
            if !self.emit_line(&mut |line, len| emit(line, len, end)) {
                return false;
            }
            data = &data[i + 1..];
            base = end;
        }
        self.append(data);
        true
    }

    /// Emits the unterminated rest, if any (the end of a file that did not end with a newline).
    pub fn finish(&mut self, emit: &mut impl FnMut(&[u8], usize) -> bool) -> bool {
        if self.len == 0 {
            return true;
        }
        self.emit_line(emit)
    }

    /// Bytes held for the line being assembled (bounded by the limit).
    pub fn held(&self) -> usize {
        self.head.capacity()
    }

    fn append(&mut self, piece: &[u8]) {
        if piece.is_empty() {
            return;
        }
        let room = self.limit.saturating_sub(self.head.len());
        self.head.extend_from_slice(&piece[..piece.len().min(room)]);
        self.len += piece.len();
        self.ends_with_cr = piece.last() == Some(&b'\r');
    }

    fn emit_line(&mut self, emit: &mut impl FnMut(&[u8], usize) -> bool) -> bool {
        let mut len = self.len;
        let mut kept = self.head.len();
        if self.ends_with_cr {
            len -= 1;
            kept = kept.min(len);
        }
        let go_on = emit(&self.head[..kept], len);
        self.head.clear();
        if self.head.capacity() > 64 * 1024 {
            // One long line must not pin its buffer for the rest of the run.
            self.head.shrink_to(64 * 1024);
        }
        self.len = 0;
        self.ends_with_cr = false;
        go_on
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    /// Each line's end position is where the next one starts, across chunks and `\r\n`:
    /// what an import checkpoint and a line's key record.
    #[test]
    fn lines_come_with_their_end_positions() {
        let data = b"ab\r\ncde\n\nf";
        let mut lines = LineAssembler::new(100);
        let mut out = Vec::new();
        for (i, chunk) in data.chunks(3).enumerate() {
            lines.push_at(chunk, 100 + 3 * i as u64, &mut |l, len, end| {
                out.push((l.to_vec(), len, end));
                true
            });
        }
        assert_eq!(
            out,
            vec![
                (b"ab".to_vec(), 2, 104),
                (b"cde".to_vec(), 3, 108),
                (Vec::new(), 0, 109)
            ]
        );
    }

    #[test]
    fn bounded_lines() {
        let data = b"a\r\nbb\n\nlong-line-here\nlast";
        let mut r = BufReader::with_capacity(4, &data[..]);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Some(len) = read_line_bounded(&mut r, &mut buf, 5).unwrap() {
            out.push((String::from_utf8(buf.clone()).unwrap(), len));
        }
        assert_eq!(
            out,
            vec![
                ("a".into(), 1),
                ("bb".into(), 2),
                ("".into(), 0),
                ("long-".into(), 14),
                ("last".into(), 4)
            ]
        );
    }

    #[test]
    fn follow_reads_growth_and_survives_rotation() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        std::fs::write(&path, "one\ntw").unwrap();
        let stop = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let follower = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                follow_file(&path, &stop, |l, _| {
                    tx.send(String::from_utf8_lossy(l).into_owned()).is_ok()
                })
            })
        };
        let next = || rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(next(), "one");
        // The partial line completes when the writer finishes it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"o\nthree\n")
            .unwrap();
        assert_eq!(next(), "two");
        assert_eq!(next(), "three");
        // logrotate: the file is renamed, a new one appears at the same path.
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("access.log.1"))
            .unwrap()
            .write_all(b"late\n")
            .unwrap();
        std::fs::write(&path, "fresh\n").unwrap();
        assert_eq!(next(), "late");
        assert_eq!(next(), "fresh");
        stop.cancel();
        follower.join().unwrap().unwrap();
    }

    /// Lines of a stream cut at every possible chunk boundary come out the same.
    #[test]
    fn assembler_cuts_lines_in_any_chunking() {
        let data = b"a\r\nbb\n\nlong-line-here\r\nx\ry\nlast";
        for chunk in 1..data.len() {
            let mut out = Vec::new();
            let mut emit = |l: &[u8], len: usize| {
                out.push((String::from_utf8(l.to_vec()).unwrap(), len));
                true
            };
            let mut asm = LineAssembler::new(5);
            for piece in data.chunks(chunk) {
                assert!(asm.push(piece, &mut emit));
            }
            assert!(asm.finish(&mut emit));
            assert_eq!(
                out,
                vec![
                    ("a".into(), 1),
                    ("bb".into(), 2),
                    ("".into(), 0),
                    ("long-".into(), 14),
                    ("x\ry".into(), 3),
                    ("last".into(), 4)
                ],
                "chunks of {chunk}"
            );
        }
    }

    /// 400 MB appended to a followed file without a newline: the follower keeps reading at
    /// disk speed in constant memory, then emits the line cut to the limit with its real
    /// length (the preprocessor dead-letters it), and goes on with the next lines.
    #[test]
    fn follow_cuts_a_400_mb_line_in_constant_memory() {
        use std::io::Write;
        const HUGE: usize = 400 * 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        std::fs::write(&path, "first\n").unwrap();
        let stop = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel::<(Vec<u8>, usize)>();
        let follower = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                follow_file(&path, &stop, |l, len| tx.send((l.to_vec(), len)).is_ok())
            })
        };
        let next = || rx.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(next(), (b"first".to_vec(), 5));
        let rss_before = resident_bytes();
        {
            let mut f = std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .unwrap(),
            );
            let block = vec![b'x'; 1024 * 1024];
            for _ in 0..HUGE / block.len() {
                f.write_all(&block).unwrap();
            }
            f.write_all(b"\nnext\n").unwrap();
            f.flush().unwrap();
        }
        let (head, len) = next();
        assert_eq!(len, HUGE);
        assert_eq!(head.len(), MAX_LINE_BYTES + 1);
        assert!(head.iter().all(|&b| b == b'x'));
        assert_eq!(next(), (b"next".to_vec(), 4));
        let grown = resident_bytes().saturating_sub(rss_before);
        // The old follower held the whole line (400 MB) and re-scanned it on every read.
        assert!(
            grown < 64 * 1024 * 1024,
            "resident memory grew by {grown} bytes"
        );
        stop.cancel();
        follower.join().unwrap().unwrap();
    }

    /// This process's resident set size.
    fn resident_bytes() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb: usize = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    }

    #[test]
    fn gzip_is_detected() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"a\nb\n").unwrap();
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        let mut r = BufReader::new(open_maybe_gzip(&path, &ProgressBar::hidden()).unwrap());
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        while read_line_bounded(&mut r, &mut buf, 100).unwrap().is_some() {
            lines.push(buf.clone());
        }
        assert_eq!(lines, vec![b"a".to_vec(), b"b".to_vec()]);
    }
}
