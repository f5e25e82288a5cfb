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
//!
//! Layout: [`lines`] reads lines (bounded, gzip, followed files), [`format`] picks each
//! input's log format, [`checkpoint`] remembers how far each file was sent, `sink` produces
//! the lines; this module expands the inputs and runs the import loop.

pub mod checkpoint;
pub mod input_format;
pub mod lines;
mod sink;

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, IsTerminal, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

pub use crate::format::MAX_LINE_BYTES;
use crate::kafka::KafkaSettings;
use checkpoint::{CHECKPOINT_EVERY, Checkpoint, CheckpointDir, Consumed};
use input_format::{FormatOptions, InputFormat};
use lines::open_maybe_gzip;
pub use lines::{LineAssembler, follow_file, read_line_bounded};
pub use sink::LineSink;

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
    #[error(
        "the topic {0} is not on the brokers, or they do not answer: create it with `pageviews topics`"
    )]
    NoPartitions(&'static str),
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
    let mut followed = Vec::new();
    for input in &config.inputs {
        let read_err = |source| ImportError::Read {
            path: input.name(),
            source,
        };
        // Followed: plain files; a gzip file (an already rotated log) is read whole first.
        if config.follow
            && let Input::File(path) = input
            && !lines::is_gzip(path).map_err(read_err)?
        {
            followed.push(path.clone());
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
                let sample = input_format::sample_file(path).map_err(read_err)?;
                let fmt = InputFormat::resolve(&config.format, &sample, &input.name());
                (fmt, Vec::new())
            }
            Input::Stdin => {
                let held = input_format::sample(&mut reader).map_err(read_err)?;
                let sample: Vec<Vec<u8>> = held.iter().map(|(l, _)| l.clone()).collect();
                let fmt = InputFormat::resolve(&config.format, &sample, &input.name());
                (fmt, held)
            }
        };
        let mut progress = FileProgress::new(Instant::now());
        if let (Input::File(path), Some(dir)) = (input, &config.checkpoints) {
            let cp = dir.resume(path, config.from_start).map_err(read_err)?;
            if cp.position > 0 {
                // Skip what an earlier import delivered (through the decoder for gzip),
                // reading the W3C directives on the way: they set the field list.
                let mut skip = (&mut reader).take(cp.position);
                skip_directives(&mut skip, &mut buf, &mut fmt).map_err(read_err)?;
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
            progress.start(dir, cp, &mut sink, &config.kafka, &shutdown, input)?;
        }
        let start = progress.sent_position;
        let mut reader = Consumed::new(reader, start);
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
            } else if !progress.send(&mut sink, &buf, len, fmt.header(), reader.position) {
                break;
            }
            progress.sent_position = reader.position;
            if progress.last_saved.elapsed() >= CHECKPOINT_EVERY {
                progress.save(&sink, input)?;
            }
        }
        progress.save(&sink, input)?;
        already_imported += progress.recovered;
    }
    bar.finish_and_clear();
    if !followed.is_empty() && !shutdown.is_cancelled() {
        let (d, recovered) = follow_files(config, &mut sink, &followed, &shutdown)?;
        directives += d;
        already_imported += recovered;
    }
    let mut summary = sink.finish()?;
    summary.already_imported = already_imported;
    summary.directives = directives;
    Ok(summary)
}

/// Reads the lines of `reader` only for their W3C directives (the part of a file an earlier
/// import sent).
fn skip_directives(
    reader: &mut impl io::BufRead,
    buf: &mut Vec<u8>,
    fmt: &mut InputFormat,
) -> io::Result<()> {
    while read_line_bounded(reader, buf, MAX_LINE_BYTES + 1)?.is_some() {
        fmt.directive(buf);
    }
    Ok(())
}

/// One followed file.
struct Followed<'a> {
    input: Input,
    file: File,
    inode: u64,
    /// Bytes read from `file`.
    read: u64,
    lines: LineAssembler,
    fmt: InputFormat,
    progress: FileProgress<'a>,
}

impl Followed<'_> {
    /// Sends the lines `data` (the next bytes of the file) completes; false once the sink
    /// stops taking lines.
    fn feed(&mut self, data: &[u8], sink: &mut LineSink, directives: &mut u64) -> bool {
        let base = self.read;
        self.read += data.len() as u64;
        let (fmt, progress) = (&mut self.fmt, &mut self.progress);
        self.lines.push_at(data, base, &mut |line, len, end| {
            send_line(fmt, progress, sink, directives, line, len, end)
        })
    }

    /// Sends the file's last line if it has no newline (the file was rotated away).
    fn finish(&mut self, sink: &mut LineSink, directives: &mut u64) -> bool {
        let end = self.read;
        let (fmt, progress) = (&mut self.fmt, &mut self.progress);
        self.lines
            .finish(&mut |line, len| send_line(fmt, progress, sink, directives, line, len, end))
    }
}

/// One line of a followed file: a W3C directive sets the format, any other line is sent.
fn send_line(
    fmt: &mut InputFormat,
    progress: &mut FileProgress<'_>,
    sink: &mut LineSink,
    directives: &mut u64,
    line: &[u8],
    len: usize,
    end: u64,
) -> bool {
    if fmt.directive(line) {
        *directives += 1;
    } else if !progress.send(sink, line, len, fmt.header(), end) {
        return false;
    }
    progress.sent_position = end;
    true
}

/// How long a followed file's reader waits when no file grew.
const FOLLOW_IDLE: Duration = Duration::from_millis(200);

/// `tail -F` of every followed file, in one thread, until shutdown: each file is read as it
/// grows; a file replaced at its path (rotation by create: a new inode) has the rest of the
/// old one read first, and a truncated file (copytruncate) starts again from its beginning.
/// With checkpoints, a file resumes where the last run stopped (exactly, see
/// [`FileProgress::start`]), and a rotated one starts a fresh checkpoint.
/// Returns (directive lines, lines found already delivered).
fn follow_files(
    config: &ImportConfig,
    sink: &mut LineSink,
    paths: &[PathBuf],
    shutdown: &CancellationToken,
) -> Result<(u64, u64), ImportError> {
    use std::os::unix::fs::MetadataExt;
    let mut directives = 0;
    let mut recovered = 0;
    let mut files = Vec::with_capacity(paths.len());
    let mut buf = Vec::new();
    for path in paths {
        let input = Input::File(path.clone());
        let read_err = |source| ImportError::Read {
            path: input.name(),
            source,
        };
        let sample = input_format::sample_file(path).map_err(read_err)?;
        let mut fmt = InputFormat::resolve(&config.format, &sample, &input.name());
        let mut file = File::open(path).map_err(read_err)?;
        let inode = file.metadata().map_err(read_err)?.ino();
        let mut progress = FileProgress::new(Instant::now());
        if let Some(dir) = &config.checkpoints {
            let mut cp = dir.resume(path, config.from_start).map_err(read_err)?;
            if cp.position > file.metadata().map_err(read_err)?.len() {
                tracing::info!(file = %input.name(), "the file is shorter than its checkpoint (truncated): following it from the start");
                cp = dir.resume(path, true).map_err(read_err)?;
            }
            if cp.position > 0 {
                let head = File::open(path).map_err(read_err)?.take(cp.position);
                skip_directives(&mut BufReader::new(head), &mut buf, &mut fmt).map_err(read_err)?;
                tracing::info!(file = %input.name(), lines = cp.lines, bytes = cp.position, "resuming after lines already imported");
            }
            progress.start(dir, cp, sink, &config.kafka, shutdown, &input)?;
        }
        file.seek(SeekFrom::Start(progress.sent_position))
            .map_err(read_err)?;
        files.push(Followed {
            read: progress.sent_position,
            input,
            file,
            inode,
            lines: LineAssembler::new(MAX_LINE_BYTES + 1),
            fmt,
            progress,
        });
    }
    let mut chunk = vec![0u8; 64 * 1024];
    'follow: loop {
        if shutdown.is_cancelled() {
            break;
        }
        let mut grew = false;
        for f in &mut files {
            let n = f
                .file
                .read(&mut chunk)
                .map_err(|source| ImportError::Read {
                    path: f.input.name(),
                    source,
                })?;
            if n == 0 {
                continue;
            }
            grew = true;
            if !f.feed(&chunk[..n], sink, &mut directives) {
                break 'follow;
            }
        }
        for f in &mut files {
            if f.progress.last_saved.elapsed() >= CHECKPOINT_EVERY {
                f.progress.save(sink, &f.input)?;
            }
        }
        if grew {
            continue;
        }
        std::thread::sleep(FOLLOW_IDLE);
        for f in &mut files {
            let Input::File(path) = &f.input else {
                continue;
            };
            let path = path.clone();
            let replaced = match std::fs::metadata(&path) {
                Ok(meta) => meta.ino() != f.inode || meta.len() < f.read,
                // Between the rename and the creation of the new file: look again later.
                Err(_) => false,
            };
            if !replaced {
                continue;
            }
            let name = f.input.name();
            let read_err = |source| ImportError::Read {
                path: name.clone(),
                source,
            };
            // Finish the old file (a last line without a newline too), then switch.
            loop {
                let n = f.file.read(&mut chunk).map_err(read_err)?;
                if n == 0 || shutdown.is_cancelled() {
                    break;
                }
                if !f.feed(&chunk[..n], sink, &mut directives) {
                    break 'follow;
                }
            }
            if !f.finish(sink, &mut directives) {
                break 'follow;
            }
            f.progress.save(sink, &f.input)?;
            recovered += f.progress.recovered;
            tracing::info!(path = %path.display(), "file rotated or truncated; reopening");
            f.file = File::open(&path).map_err(read_err)?;
            f.inode = f.file.metadata().map_err(read_err)?.ino();
            f.read = 0;
            f.lines = LineAssembler::new(MAX_LINE_BYTES + 1);
            let mut progress = FileProgress::new(Instant::now());
            if let Some(dir) = &config.checkpoints {
                let cp = dir.resume(&path, true).map_err(read_err)?;
                progress.start(dir, cp, sink, &config.kafka, shutdown, &f.input)?;
            }
            f.progress = progress;
        }
    }
    // A line still without its newline is being written: the next run reads it whole.
    for f in &mut files {
        f.progress.save(sink, &f.input)?;
        recovered += f.progress.recovered;
    }
    Ok((directives, recovered))
}

/// How far the lines of one file were sent, and its checkpoint (if checkpointing).
struct FileProgress<'a> {
    checkpoint: Option<(&'a CheckpointDir, Checkpoint)>,
    /// Position after the last line handed to the producer.
    sent_position: u64,
    /// Lines handed to the producer since the checkpoint was saved.
    sent_lines: u64,
    last_saved: Instant,
    /// Ends of the lines after the checkpoint that the last run delivered before it was
    /// killed: not sent again. At most the lines of one checkpoint interval plus the
    /// producer's queue.
    delivered: HashSet<u64>,
    /// Lines found in `delivered` so far.
    recovered: u64,
}

impl<'a> FileProgress<'a> {
    fn new(now: Instant) -> FileProgress<'a> {
        FileProgress {
            checkpoint: None,
            sent_position: 0,
            sent_lines: 0,
            last_saved: now,
            delivered: HashSet::new(),
            recovered: 0,
        }
    }

    /// Takes a file's checkpoint: a fresh one is saved with the raw topic's high watermarks
    /// before any line is sent (so a kill before the next save knows where its lines can be);
    /// a stored one has the lines delivered after it looked up ([`recover`]).
    fn start(
        &mut self,
        dir: &'a CheckpointDir,
        mut cp: Checkpoint,
        sink: &mut LineSink,
        kafka: &KafkaSettings,
        shutdown: &CancellationToken,
        input: &Input,
    ) -> Result<(), ImportError> {
        if cp.stream == 0 || cp.marks.is_empty() {
            // Fresh, or written by a version without keys: nothing to look up.
            cp.stream = checkpoint::new_stream();
            cp.marks = sink.high_watermarks()?;
            dir.save(&cp).map_err(|source| ImportError::Checkpoint {
                path: input.name(),
                source,
            })?;
        } else {
            self.delivered = recover(kafka, &cp, shutdown)?;
            if !self.delivered.is_empty() {
                tracing::info!(file = %input.name(), lines = self.delivered.len(), "lines delivered after the last checkpoint are not sent again");
            }
        }
        self.sent_position = cp.position;
        self.checkpoint = Some((dir, cp));
        Ok(())
    }

    /// Sends one line ending at `end` (keyed when checkpointing), unless the last run
    /// delivered it. False once shutdown was requested.
    fn send(
        &mut self,
        sink: &mut LineSink,
        line: &[u8],
        len: usize,
        format: Option<&[u8]>,
        end: u64,
    ) -> bool {
        let Some((_, cp)) = &self.checkpoint else {
            return sink.send(line, len, format);
        };
        if !self.delivered.is_empty() && self.delivered.remove(&end) {
            self.recovered += 1;
            self.sent_lines += 1;
            return true;
        }
        let key = sink::line_key(cp.stream, end);
        if sink.send_keyed(line, len, format, Some(&key)) {
            self.sent_lines += 1;
            true
        } else {
            false
        }
    }

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
        for (partition, next) in sink.next_offsets() {
            let mark = cp.marks.entry(partition).or_insert(next);
            *mark = (*mark).max(next);
        }
        dir.save(cp).map_err(|source| ImportError::Checkpoint {
            path: input.name(),
            source,
        })
    }
}

/// The ends of the lines of `cp`'s stream that lie in the raw topic past its position: sent
/// and acknowledged after the checkpoint was saved, by a run killed before the next save.
/// Reads each raw partition from the checkpoint's mark to its high watermark.
pub fn recover(
    kafka: &KafkaSettings,
    cp: &Checkpoint,
    shutdown: &CancellationToken,
) -> Result<HashSet<u64>, ImportError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = kafka
        .client_config(
            crate::kafka::ClientRole::Consumer,
            &[
                ("group.id", "pageviews-import-recovery"),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "false"),
            ],
        )
        .create()?;
    let timeout = Duration::from_secs(30);
    let mut todo = std::collections::BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for (&partition, &mark) in &cp.marks {
        let (_, high) = consumer.fetch_watermarks(crate::kafka::RAW_TOPIC, partition, timeout)?;
        if high > mark {
            todo.insert(partition, high);
            assignment.add_partition_offset(
                crate::kafka::RAW_TOPIC,
                partition,
                Offset::Offset(mark),
            )?;
        }
    }
    let mut found = HashSet::new();
    if todo.is_empty() {
        return Ok(found);
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !todo.is_empty() {
        if shutdown.is_cancelled() {
            break;
        }
        if Instant::now() > deadline {
            return Err(ImportError::Read {
                path: cp.path.clone(),
                source: io::Error::other(
                    "could not read back the lines sent after the last checkpoint within 120 s",
                ),
            });
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        if let Some((stream, end)) = message.key().and_then(sink::parse_line_key)
            && stream == cp.stream
            && end > cp.position
        {
            found.insert(end);
        }
        if todo
            .get(&message.partition())
            .is_some_and(|high| message.offset() + 1 >= *high)
        {
            todo.remove(&message.partition());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

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
