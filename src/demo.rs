//! `pageviews demo`: the whole pipeline in one process, against the embedded broker (or
//! `--brokers`), with the generator or `--input` files as the source.

use std::sync::Arc;
use std::sync::atomic::Ordering;
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
use crate::import::input_format::FormatArgs;
use crate::import::{self, ImportConfig, LineSink};
use crate::preprocess::{self, PreprocessStats};
use crate::serve;
use crate::store::Store;

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Import these files (globs, gzip, - for stdin) instead of generating lines.
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub input: Vec<String>,
    /// Lines per second: the generator's pace (default 1000); with --input, a cap (default none).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Stop the generator after this many lines.
    #[arg(long)]
    pub lines: Option<u64>,
    /// Generator seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Exit 0 once every input line is counted and flushed, printing a summary.
    #[arg(long)]
    pub exit_when_drained: bool,
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
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Alerters (`--rules` with `--webhook` and/or `--smtp`): each in its own group.
    #[command(flatten)]
    pub alert: AlertArgs,
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

/// The input ended: closes every open visit (the aggregator's next flush) and waits until the
/// database holds none.
async fn close_open_visits(
    store: &Store,
    close: &std::sync::atomic::AtomicBool,
    flush_now: &Notify,
    shutdown: &CancellationToken,
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
    println!("visits: every open visit closed at the end of the input");
}

pub async fn run(
    common: &Common,
    args: DemoArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
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
    let listener = serve::bind(args.serve.listen).await?;
    println!("dashboard: http://{}", listener.local_addr()?);

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
    let close_visits = Arc::new(std::sync::atomic::AtomicBool::new(false));
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
        println!("alerts: group {}", config.group);
        stages.spawn("alert", async move {
            crate::alert::run(config, stats, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    {
        let (store, stop, kafka) = (store.clone(), stop_stages.clone(), kafka.clone());
        let config = args.serve.config();
        stages.spawn("serve", async move {
            serve::run(listener, store, Some(kafka), config, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }

    let baseline = counted(&store).await?;
    let started = Instant::now();
    let work = async {
        let imported = if args.input.is_empty() {
            let (kafka, rate, seed, limit, stop) = (
                kafka.clone(),
                args.rate.unwrap_or(1000),
                args.seed,
                args.lines,
                stop_input.clone(),
            );
            tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                let mut sink = LineSink::new(&kafka, Some(rate), stop)?;
                let mut generator = LineGenerator::live(seed);
                let mut n = 0u64;
                while limit.is_none_or(|l| n < l) {
                    let line = generator.next_line();
                    if !sink.send(line.as_bytes(), line.len(), None) {
                        break;
                    }
                    n += 1;
                }
                Ok(sink.finish()?.lines)
            })
            .await??
        } else {
            let inputs = import::expand_inputs(&args.input)?;
            let config = ImportConfig {
                kafka: kafka.clone(),
                inputs,
                follow: false,
                rate: args.rate,
                // The demo counts its inputs once per run (see wait_drained's baseline).
                checkpoints: None,
                from_start: false,
                format,
            };
            import::run(config, stop_input.clone()).await?.lines
        };
        if args.exit_when_drained {
            if let Some((counted, dead)) = wait_drained(
                &store,
                &pre_stats,
                baseline,
                imported,
                &shutdown,
                Some(&flush_now),
            )
            .await
            {
                let secs = started.elapsed().as_secs_f64();
                println!(
                    "drained: lines read {imported}, counted {counted}, dead-lettered {dead}, {secs:.2} s, {:.0} lines/s",
                    imported as f64 / secs.max(1e-9)
                );
                if args.aggregate.session_gap > Duration::ZERO {
                    close_open_visits(&store, &close_visits, &flush_now, &shutdown).await;
                }
            }
        } else {
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

/// The stages a demo runs, watched: a stage that ends before it is asked to (an error, a
/// panic, or a plain return) ends the demo with that error, instead of leaving a demo that
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
