//! `pageviews report -o FILE`: the statistics database as one file, like `goaccess access.log
//! -o report.html` — HTML that opens offline, or JSON or CSV ([`crate::serve::report`]);
//! with `--input`, the logs are counted first by [`crate::run`]'s pipeline (lines an earlier
//! run counted are not counted again, so a report from cron accumulates exactly).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::args::Common;
use crate::run::{Drain, PipelineArgs, Source, pipeline};
use crate::serve::report::{self, ReportFilter, ReportFormat};

#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Where to write: FILE.html, FILE.json, FILE.csv, or - for stdout.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: String,
    /// html, json or csv. Default: the output's extension (html for - and others).
    #[arg(long, value_enum)]
    pub output_format: Option<ReportFormat>,
    /// Count these logs first (files, globs, - for stdin), as `run` does: lines counted by
    /// an earlier run or report are not counted again.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    pub input: Vec<String>,
    /// Only days from this one (YYYY-MM-DD).
    #[arg(long, value_name = "DAY")]
    pub since: Option<String>,
    /// Only days up to this one (YYYY-MM-DD).
    #[arg(long, value_name = "DAY")]
    pub until: Option<String>,
    /// Only this site (virtual host).
    #[arg(long)]
    pub site: Option<String>,
    /// Only this country (two-letter code).
    #[arg(long)]
    pub country: Option<String>,
    /// all, humans or bots.
    #[arg(long)]
    pub visitors: Option<String>,
    /// Add the figures of the period of the same length just before.
    #[arg(long)]
    pub compare: bool,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

impl ReportArgs {
    fn format(&self) -> ReportFormat {
        self.output_format.unwrap_or_else(|| {
            match Path::new(&self.output)
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                Some("json") => ReportFormat::Json,
                Some("csv") => ReportFormat::Csv,
                _ => ReportFormat::Html,
            }
        })
    }
}

/// `pageviews report`.
pub async fn run(
    common: &Common,
    args: ReportArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let filter = ReportFilter {
        from: args.since.clone(),
        to: args.until.clone(),
        site: args.site.clone(),
        country: args.country.clone(),
        visitors: args.visitors.clone(),
        compare: args.compare,
    };
    let format = args.format();
    if !args.input.is_empty() {
        let source = Source::Inputs {
            inputs: args.input.clone(),
            follow: false,
            rate: None,
            checkpoints: true,
            from_start: false,
        };
        pipeline(
            common,
            source,
            args.pipeline.clone(),
            None,
            Drain::Backlog,
            true,
            shutdown.clone(),
        )
        .await?;
        if shutdown.is_cancelled() {
            anyhow::bail!("interrupted before the input was counted: no report written");
        }
    }
    let store = common.open_store().await?;
    let text = report::render(&store, &filter, format).await?;
    if args.output == "-" {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
    } else {
        write_atomically(Path::new(&args.output), text.as_bytes())
            .with_context(|| format!("writing the report to {}", args.output))?;
        eprintln!("report: {} ({} bytes)", args.output, text.len());
    }
    Ok(())
}

/// Writes a file whole or not at all (a page opened while cron rewrites it is never cut).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
