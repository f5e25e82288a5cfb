//! `pageviews demo`: the whole pipeline in one process, against the embedded broker (or
//! `--brokers`), with the generator or `--input` files as the source.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::aggregate::{self, AggregateConfig, AggregateStats};
use crate::broker::{BrokerStorage, EmbeddedBroker};
use crate::cli::{Common, open_geo};
use crate::generate::LineGenerator;
use crate::import::{self, ImportConfig, LineSink};
use crate::kafka;
use crate::preprocess::enrich::Enricher;
use crate::preprocess::{self, PreprocessConfig, PreprocessStats};
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
    /// Dashboard address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Exit 0 once every input line is counted and flushed, printing a summary.
    #[arg(long)]
    pub exit_when_drained: bool,
    /// Embedded broker storage: sqlite (durable, in the data dir) or memory.
    #[arg(long, value_enum, default_value_t = BrokerStorage::Sqlite)]
    pub broker_storage: BrokerStorage,
    /// Country database (.mmdb); default: the bundled DB-IP Lite database.
    #[arg(long, env = "PAGEVIEWS_GEOIP")]
    pub geoip: Option<PathBuf>,
    /// Partitions per topic when the topics are created.
    #[arg(long, default_value_t = kafka::DEFAULT_PARTITIONS)]
    pub partitions: i32,
    /// Aggregator flush interval.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,
}

/// Visits in the database.
pub async fn counted(store: &Store) -> anyhow::Result<u64> {
    Ok(store.country_counts().await?.iter().map(|c| c.visits).sum())
}

/// Waits until `lines` lines past `baseline` visits are accounted for: counted in the database
/// or dead-lettered by this process's preprocessor. Returns (counted, dead-lettered).
///
/// Dead letters are taken from the preprocessor's own counter, not from the dead-letter
/// topic's high watermarks: tansu 0.6.0 answered ListOffsets with stale values under load.
pub async fn wait_drained(
    store: &Store,
    dead_letters: &AtomicU64,
    baseline: u64,
    lines: u64,
    shutdown: &CancellationToken,
) -> Option<(u64, u64)> {
    loop {
        match counted(store).await {
            Ok(total) => {
                let counted = total - baseline.min(total);
                let dead = dead_letters.load(Ordering::Relaxed);
                if counted + dead >= lines {
                    return Some((counted, dead));
                }
            }
            // A locked database is not the end of the run: ask again.
            Err(err) => tracing::warn!(%err, "cannot check progress yet"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

pub async fn run(
    common: &Common,
    args: DemoArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&common.data_dir)
        .with_context(|| format!("creating the data dir {}", common.data_dir.display()))?;
    let broker = match &common.brokers {
        Some(_) => None,
        None => Some(
            EmbeddedBroker::start(
                "127.0.0.1:0".parse()?,
                args.broker_storage,
                &common.data_dir,
            )
            .await?,
        ),
    };
    let bootstrap = broker
        .as_ref()
        .map_or_else(|| common.brokers_or_default(), |b| b.bootstrap());
    let kafka = common.kafka(&bootstrap);
    kafka.wait_until_reachable(Duration::from_secs(30)).await?;
    kafka.create_topics(args.partitions).await?;
    let store = common.open_store().await?;
    let enricher = Arc::new(Enricher::new(open_geo(args.geoip.as_deref())?));
    let listener = serve::bind(args.listen).await?;
    println!("dashboard: http://{}", listener.local_addr()?);

    let stages = shutdown.child_token();
    let pre_stats = Arc::new(PreprocessStats::default());
    let agg_stats = Arc::new(AggregateStats::default());
    let mut tasks = tokio::task::JoinSet::new();
    {
        let config = PreprocessConfig {
            kafka: kafka.clone(),
            enricher,
        };
        let (stats, stop) = (Arc::clone(&pre_stats), stages.clone());
        tasks.spawn(async move {
            preprocess::run(config, stats, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    {
        let config = AggregateConfig {
            kafka: kafka.clone(),
            store: store.clone(),
            flush_interval: args.flush_interval,
        };
        let (stats, stop) = (Arc::clone(&agg_stats), stages.clone());
        tasks.spawn(async move {
            aggregate::run(config, stats, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    {
        let (store, stop) = (store.clone(), stages.clone());
        tasks.spawn(async move {
            serve::run(listener, store, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }

    let baseline = counted(&store).await?;
    let started = Instant::now();
    let imported = if args.input.is_empty() {
        let (kafka, rate, seed, limit, stop) = (
            kafka.clone(),
            args.rate.unwrap_or(1000),
            args.seed,
            args.lines,
            shutdown.clone(),
        );
        tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let mut sink = LineSink::new(&kafka, Some(rate), stop)?;
            let mut generator = LineGenerator::live(seed);
            let mut n = 0u64;
            while limit.is_none_or(|l| n < l) {
                let line = generator.next_line();
                if !sink.send(line.as_bytes(), line.len()) {
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
        };
        import::run(config, shutdown.clone()).await?.lines
    };

    let mut result = Ok(());
    if args.exit_when_drained {
        if let Some((counted, dead)) = wait_drained(
            &store,
            &pre_stats.dead_letters,
            baseline,
            imported,
            &shutdown,
        )
        .await
        {
            let secs = started.elapsed().as_secs_f64();
            println!(
                "drained: lines read {imported}, counted {counted}, dead-lettered {dead}, {secs:.2} s, {:.0} lines/s",
                imported as f64 / secs.max(1e-9)
            );
        }
    } else {
        shutdown.cancelled().await;
    }
    stages.cancel();
    let deadline = tokio::time::sleep(Duration::from_secs(15));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => { tracing::warn!(%e, "stage failed"); result = Err(e); }
                Some(Err(e)) => tracing::warn!(%e, "stage panicked"),
            },
            _ = &mut deadline => { tracing::warn!("stages did not stop within 15 s"); break; }
        }
    }
    if let Some(b) = broker {
        b.stop();
    }
    result
}
