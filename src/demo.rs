//! `pageviews demo`: [`crate::run`]'s pipeline fed by the line generator (or `--input` files,
//! read whole each time), against the embedded broker (or `--brokers`).

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::args::{Common, ServeArgs};
use crate::run::{Drain, PipelineArgs, Source, pipeline};
pub use crate::run::{counted, wait_drained};

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
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
}

pub async fn run(
    common: &Common,
    args: DemoArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let source = if args.input.is_empty() {
        Source::Generator {
            rate: args.rate.unwrap_or(1000),
            lines: args.lines,
            seed: args.seed,
        }
    } else {
        Source::Inputs {
            inputs: args.input,
            follow: false,
            rate: args.rate,
            // The demo counts its inputs once per run (see wait_drained's baseline).
            checkpoints: false,
            from_start: false,
        }
    };
    let drain = if args.exit_when_drained {
        Drain::LinesRead
    } else {
        Drain::Never
    };
    pipeline(
        common,
        source,
        args.pipeline,
        Some(&args.serve),
        drain,
        args.exit_when_drained,
        shutdown,
    )
    .await
}
