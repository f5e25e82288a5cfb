//! The command line: one enum of commands, each dispatched to its stage's `run`. The options
//! themselves are declared in [`crate::args`], shared with `demo`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::aggregate::{self, AggregateStats};
pub use crate::args::Common;
use crate::args::{
    AggregateArgs, AlertArgs, BrokerStorageArgs, PreprocessArgs, ServeArgs, TopicArgs,
    TopicRetentionArgs,
};
use crate::broker::EmbeddedBroker;
use crate::demo::{self, DemoArgs};
use crate::format::Preset;
use crate::generate::{LineGenerator, render};
use crate::import::checkpoint::CheckpointDir;
use crate::import::input_format::FormatArgs;
use crate::import::{self, ImportConfig};
use crate::kafka;
use crate::preprocess::{self, PreprocessStats};
use crate::run::RunArgs;
use crate::serve;

/// Live visitor statistics from web-server access logs, through Kafka.
#[derive(Debug, Parser)]
#[command(name = "pageviews", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The whole pipeline in one process on real logs: the durable embedded broker (or
    /// --brokers), the database, the importer (--follow: across rotation), preprocessors,
    /// the aggregator, alerters and the dashboard; resumes where it stopped.
    Run(Box<RunArgs>),
    /// The statistics as one file: -o report.html (opens offline), report.json, report.csv
    /// or - (stdout); --input counts logs first, like `goaccess access.log -o report.html`.
    Report(Box<crate::report::ReportArgs>),
    /// `run` fed by generated traffic (or --input files, read whole each time): the quick
    /// start.
    Demo(Box<DemoArgs>),
    /// The embedded Kafka-compatible broker alone, for multi-process setups.
    Broker {
        /// Address to listen on (and advertise to clients).
        #[arg(long, default_value = "127.0.0.1:9092")]
        listen: SocketAddr,
        #[command(flatten)]
        storage: BrokerStorageArgs,
    },
    /// Create the topics if missing (idempotent).
    Topics {
        #[command(flatten)]
        topics: TopicArgs,
        #[command(flatten)]
        retention: TopicRetentionArgs,
    },
    /// Send access-log lines to the raw topic, one message per line.
    Import {
        /// Files, glob patterns (quote them) or - for stdin; gzip is detected.
        #[arg(required = true, value_name = "FILE")]
        inputs: Vec<String>,
        /// Keep reading files as they grow, across rotation, until Ctrl-C.
        #[arg(long)]
        follow: bool,
        /// At most this many lines per second.
        #[arg(long)]
        rate: Option<u64>,
        /// Import files from their first line, ignoring the checkpoints of earlier imports
        /// (kept in <data-dir>/import-checkpoints).
        #[arg(long)]
        from_start: bool,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Run a preprocessor (consumer group `preprocessors`).
    Preprocess(PreprocessArgs),
    /// Run an aggregator (consumer group `aggregators`).
    Aggregate(AggregateArgs),
    /// Serve the dashboard and the JSON API.
    Serve(ServeArgs),
    /// Run an alerter (consumer group alerts-webhook or alerts-email): rules over event-time
    /// windows, alerts to a webhook or by e-mail, each delivered once.
    Alert(AlertArgs),
    /// Write N log lines to stdout, deterministic for a seed, in any preset's layout.
    Generate {
        #[arg(long)]
        lines: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The preset to write (COMBINED, W3C, CADDY, AWSALB, ...).
        #[arg(long, default_value = "COMBINED", value_parser = parse_preset)]
        log_format: Preset,
    },
}

fn parse_preset(name: &str) -> Result<Preset, String> {
    Preset::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
        format!("unknown preset {name:?} (known: {})", names.join(", "))
    })
}

/// Logs go to stderr; `RUST_LOG` overrides the default (pageviews at info, the rest at warn).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // tansu logs expected conditions (a topic that already exists, a client that hung
        // up) at ERROR; its real failures surface through the Kafka clients.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                "warn,pageviews=info,tansu_storage=off,tansu_service=off",
            )
        });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// A token cancelled on Ctrl-C or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminated => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

/// Import checkpoints of this data directory, for the cluster at `brokers`.
pub fn import_checkpoints(common: &Common, brokers: &str) -> CheckpointDir {
    CheckpointDir::new(
        common.data_dir.join("import-checkpoints"),
        brokers,
        kafka::RAW_TOPIC,
    )
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let common = cli.common;
    match cli.command {
        Command::Demo(args) => demo::run(&common, *args, shutdown_on_signal()).await,
        Command::Run(args) => crate::run::run(&common, *args, shutdown_on_signal()).await,
        Command::Report(args) => crate::report::run(&common, *args, shutdown_on_signal()).await,
        Command::Broker { listen, storage } => {
            let broker_storage = storage.broker_storage;
            let broker = EmbeddedBroker::start_with_retention(
                listen,
                broker_storage,
                &common.data_dir,
                storage.retention(),
            )
            .await?;
            println!(
                "broker listening on {} (storage: {broker_storage:?})",
                broker.bootstrap()
            );
            shutdown_on_signal().cancelled().await;
            broker.stop();
            Ok(())
        }
        Command::Topics {
            topics: TopicArgs { partitions },
            retention,
        } => {
            let kafka = common.kafka(&common.brokers_or_default());
            kafka.wait_until_reachable(Duration::from_secs(10)).await?;
            kafka
                .create_topics_with(partitions, &retention.configs())
                .await?;
            println!(
                "topics ready: {}, {}, {}",
                kafka::RAW_TOPIC,
                kafka::EVENTS_TOPIC,
                kafka::DEAD_LETTER_TOPIC
            );
            Ok(())
        }
        Command::Import {
            inputs,
            follow,
            rate,
            from_start,
            format,
        } => {
            let format = format.options()?;
            let inputs = import::expand_inputs(&inputs)?;
            let brokers = common.brokers_or_default();
            let kafka = common.kafka(&brokers);
            kafka.wait_until_reachable(Duration::from_secs(10)).await?;
            let started = std::time::Instant::now();
            let summary = import::run(
                ImportConfig {
                    kafka,
                    inputs,
                    follow,
                    rate,
                    checkpoints: Some(import_checkpoints(&common, &brokers)),
                    from_start,
                    format,
                },
                shutdown_on_signal(),
            )
            .await?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "imported {} lines ({} over {} bytes, sent truncated) in {secs:.1} s, {:.0} lines/s{}{}",
                summary.lines,
                summary.truncated,
                import::MAX_LINE_BYTES,
                summary.lines as f64 / secs.max(1e-9),
                if summary.directives > 0 {
                    format!("; read {} W3C directive lines", summary.directives)
                } else {
                    String::new()
                },
                if summary.already_imported > 0 {
                    format!(
                        "; skipped {} lines imported before (--from-start imports them again)",
                        summary.already_imported
                    )
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Command::Preprocess(args) => {
            let enricher = args.enricher(&common)?;
            let kafka = common.kafka(&common.brokers_or_default());
            kafka.wait_until_reachable(Duration::from_secs(10)).await?;
            let stats = Arc::new(PreprocessStats::default());
            preprocess::run(
                PreprocessArgs::config(&kafka, &enricher),
                stats,
                shutdown_on_signal(),
            )
            .await?;
            Ok(())
        }
        Command::Aggregate(args) => {
            let store = common.open_store().await?;
            let kafka = common.kafka(&common.brokers_or_default());
            kafka.wait_until_reachable(Duration::from_secs(10)).await?;
            let stats = Arc::new(AggregateStats::default());
            aggregate::run(
                args.config(&common, &kafka, &store, None),
                stats,
                shutdown_on_signal(),
            )
            .await?;
            Ok(())
        }
        Command::Alert(args) => {
            if !args.wanted() {
                anyhow::bail!("alert needs --rules FILE and --webhook URL or --smtp URL");
            }
            // Everything a user can get wrong is checked before anything connects.
            let alerters = args.alerters()?;
            let store = common.open_store().await?;
            let kafka = common.kafka(&common.brokers_or_default());
            kafka.wait_until_reachable(Duration::from_secs(10)).await?;
            let configs = alerters.configs(&common, &kafka, &store);
            let shutdown = shutdown_on_signal();
            let runs = configs.into_iter().map(|config| {
                let stats = Arc::new(crate::alert::AlertStats::default());
                crate::alert::run(config, stats, shutdown.clone())
            });
            futures::future::try_join_all(runs).await?;
            Ok(())
        }
        Command::Serve(args) => {
            let store = common.open_store().await?;
            let listener = serve::bind(args.listen).await?;
            println!("dashboard: http://{}", listener.local_addr()?);
            // The pipeline's health reads the brokers (default: the standalone broker's).
            let kafka = common.kafka(&common.brokers_or_default());
            serve::run(
                listener,
                store,
                Some(kafka),
                args.config(),
                shutdown_on_signal(),
            )
            .await?;
            Ok(())
        }
        Command::Generate {
            lines,
            seed,
            log_format,
        } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
            let header = match log_format {
                Preset::W3c => format!(
                    "#Software: pageviews generate\n#Version: 1.0\n#Fields: {}\n",
                    crate::format::w3c::IIS_DEFAULT_FIELDS
                ),
                _ => String::new(),
            };
            let lines = LineGenerator::new(seed)
                .take(usize::try_from(lines).unwrap_or(usize::MAX))
                .filter_map(|l| render(&l, log_format));
            for line in std::iter::once(header)
                .filter(|h| !h.is_empty())
                .chain(lines)
            {
                let line = line.trim_end_matches('\n');
                if let Err(e) = writeln!(out, "{line}") {
                    // `generate | head` closes the pipe early: that is not an error.
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(());
                    }
                    return Err(e.into());
                }
            }
            match out.flush() {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
    }
}
