//! `pageviews run`: the whole pipeline in one process for one real server — the durable
//! embedded broker (or `--brokers`), the default database, the importer following the logs
//! across rotation, preprocessors, the aggregator, the alerters and the dashboard. After a
//! restart or a `kill -9` it resumes where it stopped, each line counted once: the importer's
//! checkpoints name every line it sent ([`crate::import::checkpoint`]), the preprocessors'
//! events carry their raw offsets, and the aggregator's offsets live in its flush transaction.
//!
//! [`pipeline`] is shared with `demo` (the same stages fed by the generator) and `report
//! --input` (which runs it to the end of the files first).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::aggregate::{self, AggregateStats};
use crate::args::{
    AggregateArgs, AlertArgs, BrokerStorageArgs, Common, PreprocessArgs, ServeArgs, TopicArgs,
};
use crate::broker::EmbeddedBroker;
use crate::generate::LineGenerator;
use crate::import::checkpoint::CheckpointDir;
use crate::import::input_format::FormatArgs;
use crate::import::{self, ImportConfig, LineSink};
use crate::kafka;
use crate::preprocess::{self, PreprocessStats};
use crate::serve;
use crate::store::Store;

/// Every stage's options, shared by `run` and `demo`.
#[derive(Debug, Clone, Args)]
pub struct PipelineArgs {
    /// Preprocessors in this process: members of one consumer group that share the raw
    /// partitions, for machines with cores to spare (on 2 cores a second one measured no
    /// faster, and its joining the group costs a rebalance at start).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub preprocessors: u16,
    #[command(flatten)]
    pub format: FormatArgs,
    #[command(flatten)]
    pub broker: BrokerStorageArgs,
    #[command(flatten)]
    pub topics: TopicArgs,
    #[command(flatten)]
    pub preprocess: PreprocessArgs,
    #[command(flatten)]
    pub aggregate: AggregateArgs,
    /// Alerters (`--rules` with `--webhook` and/or `--smtp`): each in its own group.
    #[command(flatten)]
    pub alert: AlertArgs,
}

/// `pageviews run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Access logs: files, glob patterns (quote them) or - for stdin; gzip is detected.
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    pub input: Vec<String>,
    /// Keep reading the files as they grow, across rotation (create or copytruncate), until
    /// Ctrl-C or SIGTERM.
    #[arg(long)]
    pub follow: bool,
    /// Read the files from their first line, ignoring where earlier runs stopped (their
    /// lines are then counted again).
    #[arg(long)]
    pub from_start: bool,
    /// Lines per second at most.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Without --follow: exit 0 once every line is counted (and every visit closed),
    /// printing a summary, instead of serving the page until Ctrl-C.
    #[arg(long, conflicts_with = "follow")]
    pub exit_when_drained: bool,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Where a pipeline's lines come from.
pub enum Source {
    /// The generator: `rate` lines per second, `lines` at most.
    Generator {
        rate: u64,
        lines: Option<u64>,
        seed: u64,
    },
    /// Files (or stdin).
    Inputs {
        inputs: Vec<String>,
        follow: bool,
        rate: Option<u64>,
        /// Remember how far each file was read, and resume there (`run`); `demo` reads its
        /// inputs whole every time.
        checkpoints: bool,
        from_start: bool,
    },
}

/// When a pipeline ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// At Ctrl-C only.
    Never,
    /// Once the lines this run read are counted or dead-lettered (`demo`, which reads its
    /// inputs whole each time).
    LinesRead,
    /// Once nothing is left for the preprocessors and aggregators (their lag is 0): also the
    /// lines an earlier, killed run left behind (`run`, `report --input`).
    Backlog,
}

/// Visits in the database.
pub async fn counted(store: &Store) -> anyhow::Result<u64> {
    Ok(store.country_counts().await?.iter().map(|c| c.visits).sum())
}

/// Waits until `lines` lines past `baseline` visits are accounted for: counted in the database
/// or dead-lettered by this process's preprocessors (each line once, see
/// [`PreprocessStats::dead_letter`]). Returns (counted, dead-lettered).
///
/// Dead letters are taken from the preprocessor's own counter, not from the dead-letter
/// topic's high watermarks: tansu 0.6.0 answered ListOffsets with stale values under load.
pub async fn wait_drained(
    store: &Store,
    preprocessed: &PreprocessStats,
    baseline: u64,
    lines: u64,
    shutdown: &CancellationToken,
    flush_now: Option<&Notify>,
) -> Option<(u64, u64)> {
    loop {
        let dead = preprocessed.dead_letters.load(Ordering::Relaxed);
        match counted(store).await {
            Ok(total) => {
                let counted = total - baseline.min(total);
                if counted + dead >= lines {
                    return Some((counted, dead));
                }
            }
            // A locked database is not the end of the run: ask again.
            Err(err) => tracing::warn!(%err, "cannot check progress yet"),
        }
        // Every line has been through the preprocessor: what is left is counted in memory or
        // on its way to the aggregator, so write it now rather than at the next interval.
        if preprocessed.lines.load(Ordering::Relaxed) >= lines
            && let Some(flush_now) = flush_now
        {
            flush_now.notify_one();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Waits until the preprocessors and aggregators have nothing left to read (lag 0 on both
/// groups, read from the brokers and the database), asking for a flush meanwhile. `false` at
/// shutdown.
async fn wait_no_backlog(
    kafka: &kafka::KafkaSettings,
    store: &Store,
    shutdown: &CancellationToken,
    flush_now: &Notify,
) -> bool {
    loop {
        match serve::pipeline::backlog(kafka, store).await {
            Ok(0) => return true,
            Ok(_) => flush_now.notify_one(),
            Err(err) => tracing::warn!(%err, "cannot read the backlog yet"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// The input ended: closes every open visit (the aggregator's next flush) and waits until the
/// database holds none.
async fn close_open_visits(
    store: &Store,
    close: &AtomicBool,
    flush_now: &Notify,
    shutdown: &CancellationToken,
    say: impl Fn(&str),
) {
    loop {
        match store.open_visitors().await {
            Ok(0) => break,
            Ok(_) => {
                close.store(true, Ordering::SeqCst);
                flush_now.notify_one();
            }
            Err(err) => tracing::warn!(%err, "cannot check the open visits yet"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    say("visits: every open visit closed at the end of the input");
}

/// `pageviews run`.
pub async fn run(
    common: &Common,
    args: RunArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // A finite input is counted to its end and its visits closed; the page stays up unless
    // --exit-when-drained.
    let drain = if args.follow {
        Drain::Never
    } else {
        Drain::Backlog
    };
    let exit = args.exit_when_drained;
    let source = Source::Inputs {
        inputs: args.input,
        follow: args.follow,
        rate: args.rate,
        checkpoints: true,
        from_start: args.from_start,
    };
    pipeline(
        common,
        source,
        args.pipeline,
        Some(&args.serve),
        drain,
        exit,
        shutdown,
    )
    .await
}

/// Runs every stage in this process on `source` (and the page, with `page`) until `drain`
/// says the work is done, then (unless `exit`) until Ctrl-C; the first stage to fail ends it
/// with that stage's error.
pub async fn pipeline(
    common: &Common,
    source: Source,
    args: PipelineArgs,
    page: Option<&ServeArgs>,
    drain: Drain,
    exit: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // What it tells the user goes to stdout, or to stderr without a page (`report -o -`
    // writes the report to stdout).
    let to_stderr = page.is_none();
    let say = move |text: &str| {
        if to_stderr {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    };
    // A malformed format or alert option is reported before anything starts.
    let format = args.format.options()?;
    let alerters = args.alert.alerters()?;
    std::fs::create_dir_all(&common.data_dir)
        .with_context(|| format!("creating the data dir {}", common.data_dir.display()))?;
    let broker = match &common.brokers {
        Some(_) => None,
        None => Some(
            EmbeddedBroker::start_with_retention(
                "127.0.0.1:0".parse()?,
                args.broker.broker_storage,
                &common.data_dir,
                args.broker.retention(),
            )
            .await?,
        ),
    };
    let bootstrap = broker
        .as_ref()
        .map_or_else(|| common.brokers_or_default(), |b| b.bootstrap());
    let kafka = common.kafka(&bootstrap);
    kafka.wait_until_reachable(Duration::from_secs(30)).await?;
    kafka.create_topics(args.topics.partitions).await?;
    let store = common.open_store().await?;
    let enricher = args.preprocess.enricher(common)?;
    let listener = match page {
        Some(serve_args) => {
            let listener = serve::bind(serve_args.listen).await?;
            println!("dashboard: http://{}", listener.local_addr()?);
            Some((listener, serve_args.config()))
        }
        None => None,
    };

    // The stages stop once the work below is done, which Ctrl-C ends through the input. Not a
    // child of `shutdown`: a stage that stopped at Ctrl-C before the work noticed would look to
    // the watch below like one that stopped on its own, and Ctrl-C would exit with an error.
    let stop_stages = CancellationToken::new();
    // The input stops at Ctrl-C, or when a stage dies (nothing would count its lines).
    let stop_input = shutdown.child_token();
    let pre_stats = Arc::new(PreprocessStats::default());
    let agg_stats = Arc::new(AggregateStats::default());
    let flush_now = Arc::new(Notify::new());
    let mut stages = Stages::default();
    for _ in 0..args.preprocessors {
        let config = PreprocessArgs::config(&kafka, &enricher);
        let (stats, stop) = (Arc::clone(&pre_stats), stop_stages.clone());
        stages.spawn("preprocess", async move {
            preprocess::run(config, stats, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    let close_visits = Arc::new(AtomicBool::new(false));
    {
        let mut config =
            args.aggregate
                .config(common, &kafka, &store, Some(Arc::clone(&flush_now)));
        config.close_visits = Some(Arc::clone(&close_visits));
        let (stats, stop) = (Arc::clone(&agg_stats), stop_stages.clone());
        stages.spawn("aggregate", async move {
            aggregate::run(config, stats, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    for config in alerters.configs(common, &kafka, &store) {
        let stats = Arc::new(crate::alert::AlertStats::default());
        let stop = stop_stages.clone();
        say(&format!("alerts: group {}", config.group));
        stages.spawn("alert", async move {
            crate::alert::run(config, stats, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    if let Some((listener, config)) = listener {
        let (store, stop, kafka) = (store.clone(), stop_stages.clone(), kafka.clone());
        stages.spawn("serve", async move {
            serve::run(listener, store, Some(kafka), config, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }

    let baseline = counted(&store).await?;
    let started = Instant::now();
    let work = async {
        let imported = match source {
            Source::Generator { rate, lines, seed } => {
                let (kafka, stop) = (kafka.clone(), stop_input.clone());
                tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                    let mut sink = LineSink::new(&kafka, Some(rate), stop)?;
                    let mut generator = LineGenerator::live(seed);
                    let mut n = 0u64;
                    while lines.is_none_or(|l| n < l) {
                        let line = generator.next_line();
                        if !sink.send(line.as_bytes(), line.len(), None) {
                            break;
                        }
                        n += 1;
                    }
                    Ok(sink.finish()?.lines)
                })
                .await??
            }
            Source::Inputs {
                inputs,
                follow,
                rate,
                checkpoints,
                from_start,
            } => {
                let inputs = import::expand_inputs(&inputs)?;
                // The embedded broker listens on a new port each start: its checkpoints are
                // the data directory's, whatever the port.
                let scope = if broker.is_some() {
                    "embedded".to_owned()
                } else {
                    bootstrap.clone()
                };
                let config = ImportConfig {
                    kafka: kafka.clone(),
                    inputs,
                    follow,
                    rate,
                    checkpoints: checkpoints.then(|| {
                        CheckpointDir::new(
                            common.data_dir.join("import-checkpoints"),
                            &scope,
                            kafka::RAW_TOPIC,
                        )
                    }),
                    from_start,
                    format,
                };
                let summary = import::run(config, stop_input.clone()).await?;
                if summary.already_imported > 0 {
                    say(&format!(
                        "input: {} lines were read by an earlier run and are not read again (--from-start reads them again)",
                        summary.already_imported
                    ));
                }
                summary.lines
            }
        };
        let drained = match drain {
            Drain::Never => {
                shutdown.cancelled().await;
                return anyhow::Ok(());
            }
            Drain::LinesRead => wait_drained(
                &store,
                &pre_stats,
                baseline,
                imported,
                &shutdown,
                Some(&flush_now),
            )
            .await
            .map(|(counted, dead)| format!("counted {counted}, dead-lettered {dead}")),
            Drain::Backlog => wait_no_backlog(&kafka, &store, &shutdown, &flush_now)
                .await
                .then(|| {
                    format!(
                        "counted {}, dead-lettered {}",
                        agg_stats.flushed_visits.load(Ordering::Relaxed),
                        pre_stats.dead_letters.load(Ordering::Relaxed)
                    )
                }),
        };
        if let Some(counts) = drained {
            let secs = started.elapsed().as_secs_f64();
            say(&format!(
                "drained: lines read {imported}, {counts}, {secs:.2} s, {:.0} lines/s",
                imported as f64 / secs.max(1e-9)
            ));
            if args.aggregate.session_gap > Duration::ZERO {
                close_open_visits(&store, &close_visits, &flush_now, &shutdown, say).await;
            }
        }
        if !exit {
            shutdown.cancelled().await;
        }
        anyhow::Ok(())
    };
    let result = tokio::select! {
        done = work => done,
        died = stages.failure() => {
            stop_input.cancel();
            Err(died)
        }
    };
    stop_stages.cancel();
    let stopped = stages.stop(Duration::from_secs(15)).await;
    if let Some(b) = broker {
        b.stop();
    }
    result.and(stopped)
}

/// The stages a pipeline runs, watched: a stage that ends before it is asked to (an error, a
/// panic, or a plain return) ends the run with that error, instead of leaving a process that
/// looks alive and counts nothing.
#[derive(Default)]
pub struct Stages {
    set: tokio::task::JoinSet<anyhow::Result<()>>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl Stages {
    pub fn spawn(
        &mut self,
        name: &'static str,
        stage: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        let handle = self.set.spawn(stage);
        self.names.insert(handle.id(), name);
    }

    /// Waits for the first stage to end and says how it ended; never resolves while every
    /// stage runs (or when there are none).
    pub async fn failure(&mut self) -> anyhow::Error {
        match self.set.join_next_with_id().await {
            None => std::future::pending().await,
            Some(ended) => self
                .describe(ended)
                .unwrap_or_else(|| anyhow::anyhow!("a stage stopped on its own")),
        }
    }

    /// The error of a stage that ended, `None` if it ended cleanly... which, before it was
    /// asked to stop, is itself a failure (see `failure`).
    fn describe(
        &self,
        ended: Result<(tokio::task::Id, anyhow::Result<()>), tokio::task::JoinError>,
    ) -> Option<anyhow::Error> {
        let name = |id| self.names.get(&id).copied().unwrap_or("unknown");
        match ended {
            Ok((id, Ok(()))) => Some(anyhow::anyhow!("the {} stage stopped on its own", name(id))),
            Ok((id, Err(e))) => Some(e.context(format!("the {} stage failed", name(id)))),
            Err(join) if join.is_panic() => {
                let id = join.id();
                let payload = join.into_panic();
                let text = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                Some(anyhow::anyhow!("the {} stage panicked: {text}", name(id)))
            }
            Err(join) => Some(anyhow::anyhow!(
                "the {} stage was cancelled",
                name(join.id())
            )),
        }
    }

    /// Waits up to `patience` for every stage to end after it was asked to stop; the first
    /// error, if any.
    pub async fn stop(mut self, patience: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::sleep(patience);
        tokio::pin!(deadline);
        let mut first = Ok(());
        loop {
            tokio::select! {
                joined = self.set.join_next_with_id() => match joined {
                    None => break,
                    Some(Ok((_, Ok(())))) => {}
                    Some(ended) => {
                        if let Some(e) = self.describe(ended) {
                            tracing::warn!("{e:#}");
                            if first.is_ok() {
                                first = Err(e);
                            }
                        }
                    }
                },
                _ = &mut deadline => {
                    tracing::warn!("stages did not stop within {patience:?}");
                    self.set.abort_all();
                    break;
                }
            }
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage that panics or fails ends the demo with its name and reason; the others keep
    /// running until asked to stop. (Before, the demo kept running without it, and
    /// `--exit-when-drained` waited forever.)
    #[tokio::test]
    async fn a_dead_stage_is_reported() {
        let stop = CancellationToken::new();
        let mut stages = Stages::default();
        let s = stop.clone();
        stages.spawn("serve", async move {
            s.cancelled().await;
            Ok(())
        });
        stages.spawn("aggregate", async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            panic!("boom")
        });
        let err = tokio::time::timeout(Duration::from_secs(5), stages.failure())
            .await
            .expect("a dead stage must be noticed");
        assert_eq!(err.to_string(), "the aggregate stage panicked: boom");
        stop.cancel();
        stages.stop(Duration::from_secs(5)).await.unwrap();

        let mut stages = Stages::default();
        stages.spawn("preprocess", async {
            Err(anyhow::anyhow!("Kafka consumer: gone"))
        });
        let err = stages.failure().await;
        assert_eq!(
            format!("{err:#}"),
            "the preprocess stage failed: Kafka consumer: gone"
        );
        let mut stages = Stages::default();
        stages.spawn("serve", async { Ok(()) });
        assert_eq!(
            stages.failure().await.to_string(),
            "the serve stage stopped on its own"
        );
    }
}
