//! Import stage: access-log lines (files, globs, gzip, stdin, followed files, or the
//! generator) → `raw-page-views`, one line per message.
//!
//! Lines are bytes: invalid UTF-8 is passed on for the preprocessor to dead-letter with a
//! reason. A line longer than [`MAX_LINE_BYTES`] is cut to that size plus one byte and marked
//! with a header giving its real length, so no message can exceed the broker's size limit and
//! the line is still dead-lettered and counted downstream.
//!
//! Files (not stdin, not `--follow`) are checkpointed ([`checkpoint`]): importing a file again
//! resumes after the last acknowledged line.

pub mod checkpoint;
pub mod format;

use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use crate::event::headers;
pub use crate::format::MAX_LINE_BYTES;
use crate::kafka::{ClientRole, KafkaSettings, RAW_TOPIC};
use checkpoint::{CHECKPOINT_EVERY, Checkpoint, CheckpointDir, Consumed};
use format::{FormatOptions, InputFormat};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("no file matches {0:?}")]
    NoMatch(String),
    #[error("invalid glob pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("Kafka producer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("{count} lines could not be delivered to Kafka: {reason}")]
    Undelivered { count: u64, reason: String },
    #[error("cannot save the import checkpoint of {path}: {source}")]
    Checkpoint { path: String, source: io::Error },
    #[error("import task failed: {0}")]
    Join(String),
}

/// One input named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Stdin,
    File(PathBuf),
}

impl Input {
    fn name(&self) -> String {
        match self {
            Input::Stdin => "-".to_owned(),
            Input::File(p) => p.display().to_string(),
        }
    }
}

/// Expands `-`, plain paths and glob patterns (sorted, so rotated logs import in order).
pub fn expand_inputs(patterns: &[String]) -> Result<Vec<Input>, ImportError> {
    let mut inputs = Vec::new();
    for pattern in patterns {
        if pattern == "-" {
            inputs.push(Input::Stdin);
            continue;
        }
        if Path::new(pattern).exists() {
            inputs.push(Input::File(PathBuf::from(pattern)));
            continue;
        }
        let mut matched: Vec<PathBuf> = glob::glob(pattern)
            .map_err(|e| ImportError::BadPattern {
                pattern: pattern.clone(),
                reason: e.to_string(),
            })?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect();
        if matched.is_empty() {
            return Err(ImportError::NoMatch(pattern.clone()));
        }
        matched.sort();
        inputs.extend(matched.into_iter().map(Input::File));
    }
    Ok(inputs)
}

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Lines acknowledged by the broker.
    pub lines: u64,
    /// W3C directive lines read (not sent: they set the format of the lines after them).
    pub directives: u64,
    /// Of those, lines cut because they were longer than [`MAX_LINE_BYTES`].
    pub truncated: u64,
    /// Lines skipped because an earlier import had sent them (checkpoints).
    pub already_imported: u64,
}

/// Counts acknowledgements from librdkafka's delivery callbacks.
#[derive(Default)]
struct DeliveryCounter {
    delivered: AtomicU64,
    failed: AtomicU64,
    /// Why the first failed delivery failed (librdkafka's words), for the error message.
    first_failure: std::sync::Mutex<Option<String>>,
}

impl DeliveryCounter {
    /// `Ok` when no delivery failed, else the count and the first reason.
    fn outcome(&self) -> Result<(), ImportError> {
        match self.failed.load(Ordering::Relaxed) {
            0 => Ok(()),
            count => Err(ImportError::Undelivered {
                count,
                reason: self
                    .first_failure
                    .lock()
                    .ok()
                    .and_then(|r| r.clone())
                    .unwrap_or_else(|| "unknown reason".to_owned()),
            }),
        }
    }
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err((e, _)) => {
                if let Ok(mut first) = self.first_failure.lock()
                    && first.is_none()
                {
                    tracing::error!(%e, "a line could not be delivered to Kafka");
                    *first = Some(e.to_string());
                }
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Where lines are produced, with an optional rate limit; runs on a blocking thread.
pub struct LineSink {
    producer: ThreadedProducer<DeliveryCounter>,
    rate: Option<u64>,
    started: Instant,
    sent: u64,
    truncated: u64,
    shutdown: CancellationToken,
    /// Shared counter of acknowledged lines, for progress reports.
    pub acked: Arc<AtomicU64>,
}

impl LineSink {
    pub fn new(
        kafka: &KafkaSettings,
        rate: Option<u64>,
        shutdown: CancellationToken,
    ) -> Result<LineSink, ImportError> {
        let producer = kafka
            .client_config(
                ClientRole::Producer,
                &[
                    ("enable.idempotence", "true"),
                    ("linger.ms", "5"),
                    ("batch.num.messages", "10000"),
                    ("queue.buffering.max.messages", "200000"),
                ],
            )
            .create_with_context(DeliveryCounter::default())?;
        Ok(LineSink {
            producer,
            rate: rate.filter(|r| *r > 0),
            started: Instant::now(),
            sent: 0,
            truncated: 0,
            shutdown,
            acked: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Produces one line (already cut to size; `original_len` is its real length) of the
    /// format whose header value is `format` (`None`: unmarked, COMBINED). Returns false once
    /// shutdown was requested.
    pub fn send(&mut self, line: &[u8], original_len: usize, format: Option<&[u8]>) -> bool {
        if self.shutdown.is_cancelled() {
            return false;
        }
        if let Some(rate) = self.rate {
            let due = self.started + Duration::from_secs_f64(self.sent as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let len_text = original_len.to_string();
        let mut record = BaseRecord::<(), [u8]>::to(RAW_TOPIC).payload(line);
        let truncated = original_len > line.len();
        if format.is_some() || truncated {
            let mut marks = OwnedHeaders::new_with_capacity(2);
            if let Some(format) = format {
                marks = marks.insert(Header {
                    key: headers::FORMAT,
                    value: Some(format),
                });
            }
            if truncated {
                self.truncated += 1;
                marks = marks.insert(Header {
                    key: headers::TRUNCATED,
                    value: Some(&len_text),
                });
            }
            record = record.headers(marks);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((e, r)) => {
                    tracing::warn!(%e, "produce failed; retrying");
                    record = r;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        self.sent += 1;
        if self.sent.is_multiple_of(1024) {
            self.acked.store(
                self.producer.context().delivered.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        true
    }

    /// Waits until every line sent so far is acknowledged; an error if any was not.
    pub fn wait_delivered(&self) -> Result<(), ImportError> {
        let _ = self.producer.flush(Timeout::Never);
        self.producer.context().outcome()
    }

    /// Waits for every acknowledgement.
    pub fn finish(self) -> Result<ImportSummary, ImportError> {
        let _ = self.producer.flush(Timeout::Never);
        let ctx = self.producer.context();
        let lines = ctx.delivered.load(Ordering::Relaxed);
        self.acked.store(lines, Ordering::Relaxed);
        ctx.outcome()?;
        Ok(ImportSummary {
            lines,
            truncated: self.truncated,
            already_imported: 0,
            directives: 0,
        })
    }
}

/// Settings of an import.
#[derive(Clone)]
pub struct ImportConfig {
    pub kafka: KafkaSettings,
    pub inputs: Vec<Input>,
    /// Keep reading files as they grow (and across rotation) until shutdown.
    pub follow: bool,
    /// Lines per second at most.
    pub rate: Option<u64>,
    /// Where file checkpoints live; `None`: always import whole files.
    pub checkpoints: Option<CheckpointDir>,
    /// Import files from their first line even if checkpoints say they were imported.
    pub from_start: bool,
    /// The log format of the inputs (default: detected per input).
    pub format: FormatOptions,
}

/// Imports every input, then returns once all lines are acknowledged.
pub async fn run(
    config: ImportConfig,
    shutdown: CancellationToken,
) -> Result<ImportSummary, ImportError> {
    tokio::task::spawn_blocking(move || import_blocking(&config, shutdown))
        .await
        .map_err(|e| ImportError::Join(e.to_string()))?
}

fn import_blocking(
    config: &ImportConfig,
    shutdown: CancellationToken,
) -> Result<ImportSummary, ImportError> {
    let mut sink = LineSink::new(&config.kafka, config.rate, shutdown.clone())?;
    let total_bytes: u64 = config
        .inputs
        .iter()
        .map(|i| match i {
            Input::File(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            Input::Stdin => 0,
        })
        .sum();
    let show =
        !config.follow && io::stderr().is_terminal() && !config.inputs.contains(&Input::Stdin);
    let bar = if show {
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
        {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut buf = Vec::with_capacity(1024);
    let mut already_imported = 0;
    let mut directives = 0;
    for input in &config.inputs {
        let read_err = |source| ImportError::Read {
            path: input.name(),
            source,
        };
        if config.follow
            && let Input::File(path) = input
        {
            let sample = format::sample_file(path).map_err(read_err)?;
            let mut fmt = InputFormat::resolve(&config.format, &sample, &input.name());
            follow_file(path, &shutdown, |line, len| {
                if fmt.directive(line) {
                    directives += 1;
                    return true;
                }
                sink.send(line, len, fmt.header())
            })
            .map_err(read_err)?;
            continue;
        }
        let reader: Box<dyn Read> = match input {
            Input::Stdin => Box::new(io::stdin().lock()),
            Input::File(path) => open_maybe_gzip(path, &bar).map_err(read_err)?,
        };
        let mut reader = BufReader::with_capacity(256 * 1024, reader);
        // The first lines decide the format; stdin's are read here and sent first.
        let (mut fmt, mut held) = match input {
            Input::File(path) => {
                let sample = format::sample_file(path).map_err(read_err)?;
                let fmt = InputFormat::resolve(&config.format, &sample, &input.name());
                (fmt, Vec::new())
            }
            Input::Stdin => {
                let held = format::sample(&mut reader).map_err(read_err)?;
                let sample: Vec<Vec<u8>> = held.iter().map(|(l, _)| l.clone()).collect();
                let fmt = InputFormat::resolve(&config.format, &sample, &input.name());
                (fmt, held)
            }
        };
        let checkpoint = match (input, &config.checkpoints) {
            (Input::File(path), Some(dir)) => {
                let cp = dir.resume(path, config.from_start).map_err(read_err)?;
                if cp.position > 0 {
                    // Skip what an earlier import delivered (through the decoder for gzip),
                    // reading the W3C directives on the way: they set the field list.
                    let mut skip = (&mut reader).take(cp.position);
                    while read_line_bounded(&mut skip, &mut buf, MAX_LINE_BYTES + 1)
                        .map_err(read_err)?
                        .is_some()
                    {
                        fmt.directive(&buf);
                    }
                    let skipped = cp.position - skip.limit();
                    if skipped < cp.position {
                        return Err(ImportError::Read {
                            path: input.name(),
                            source: io::Error::other(format!(
                                "the file is shorter ({skipped} bytes) than its import checkpoint ({} bytes); delete {} to import it again",
                                cp.position,
                                dir.location().display()
                            )),
                        });
                    }
                    tracing::info!(file = %input.name(), lines = cp.lines, bytes = cp.position, "resuming after lines already imported");
                    already_imported += cp.lines;
                }
                Some((dir, cp))
            }
            _ => None,
        };
        let start = checkpoint.as_ref().map_or(0, |(_, cp)| cp.position);
        let mut reader = Consumed::new(reader, start);
        let mut progress = FileProgress {
            checkpoint,
            sent_position: start,
            sent_lines: 0,
            last_saved: Instant::now(),
        };
        for (line, len) in held.drain(..) {
            if fmt.directive(&line) {
                directives += 1;
            } else if !sink.send(&line, len, fmt.header()) {
                break;
            }
        }
        while let Some(len) =
            read_line_bounded(&mut reader, &mut buf, MAX_LINE_BYTES + 1).map_err(read_err)?
        {
            if fmt.directive(&buf) {
                // Not a request: moves the position, not the count of lines imported.
                directives += 1;
            } else if sink.send(&buf, len, fmt.header()) {
                progress.sent_lines += 1;
            } else {
                break;
            }
            progress.sent_position = reader.position;
            if progress.last_saved.elapsed() >= CHECKPOINT_EVERY {
                progress.save(&sink, input)?;
            }
        }
        progress.save(&sink, input)?;
    }
    bar.finish_and_clear();
    let mut summary = sink.finish()?;
    summary.already_imported = already_imported;
    summary.directives = directives;
    Ok(summary)
}

/// How far the lines of one file were sent, and its checkpoint (if checkpointing).
struct FileProgress<'a> {
    checkpoint: Option<(&'a CheckpointDir, Checkpoint)>,
    /// Position after the last line handed to the producer.
    sent_position: u64,
    /// Lines handed to the producer since the checkpoint was loaded.
    sent_lines: u64,
    last_saved: Instant,
}

impl FileProgress<'_> {
    /// Waits for the acknowledgement of every line sent, then records the position. A failed
    /// delivery is the error (never moves the checkpoint past a line the broker may not have).
    fn save(&mut self, sink: &LineSink, input: &Input) -> Result<(), ImportError> {
        self.last_saved = Instant::now();
        let Some((dir, cp)) = &mut self.checkpoint else {
            return Ok(());
        };
        if cp.position == self.sent_position {
            return Ok(());
        }
        sink.wait_delivered()?;
        cp.lines += self.sent_lines;
        self.sent_lines = 0;
        cp.position = self.sent_position;
        dir.save(cp).map_err(|source| ImportError::Checkpoint {
            path: input.name(),
            source,
        })
    }
}

/// Opens a file, decompressing it if it starts with the gzip magic bytes.
fn open_maybe_gzip(path: &Path, bar: &ProgressBar) -> io::Result<Box<dyn Read>> {
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
    pub fn push(&mut self, mut data: &[u8], emit: &mut impl FnMut(&[u8], usize) -> bool) -> bool {
        while let Some(i) = memchr::memchr(b'\n', data) {
            self.append(&data[..i]);
            if !self.emit_line(emit) {
                return false;
            }
            data = &data[i + 1..];
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

    #[test]
    fn globs_expand_sorted_and_missing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.log", "a.log", "c.txt"] {
            std::fs::write(dir.path().join(name), "x\n").unwrap();
        }
        let pattern = format!("{}/*.log", dir.path().display());
        let inputs = expand_inputs(&[pattern, "-".into()]).unwrap();
        assert_eq!(
            inputs,
            vec![
                Input::File(dir.path().join("a.log")),
                Input::File(dir.path().join("b.log")),
                Input::Stdin
            ]
        );
        let missing = format!("{}/*.gz", dir.path().display());
        assert!(matches!(
            expand_inputs(&[missing]),
            Err(ImportError::NoMatch(_))
        ));
    }
}
