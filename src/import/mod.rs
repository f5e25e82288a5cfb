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

use std::io::{self, BufReader, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    for input in &config.inputs {
        let read_err = |source| ImportError::Read {
            path: input.name(),
            source,
        };
        if config.follow
            && let Input::File(path) = input
        {
            let sample = input_format::sample_file(path).map_err(read_err)?;
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
