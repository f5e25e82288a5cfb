//! The binary's edge, run as a user runs it: wrong input gives one `error:` line that says
//! what to fix, a non-zero exit code, and never a panic or a backtrace.

use std::process::{Command, Output};

mod common;

/// Runs the binary with a clean environment (no PAGEVIEWS_* or RUST_LOG from the caller).
fn run(args: &[&str], data_dir: &std::path::Path) -> Output {
    let mut cmd = Command::new(common::bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("PAGEVIEWS_") || k == "RUST_LOG" || k == "RUST_BACKTRACE" {
            cmd.env_remove(k);
        }
    }
    cmd.env("PAGEVIEWS_DATA_DIR", data_dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", common::bin().display()))
}

/// Asserts a failure with exit code 1 whose stderr holds exactly one line, `error: …`, and
/// returns that line.
fn one_line_error(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = run(args, dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "pageviews {args:?}: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "pageviews {args:?} should print one line, printed:\n{stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_owned()
}

/// Command-line mistakes are clap's: exit code 2, an `error:` line naming what is wrong (a
/// missing argument is named on the line after it), then the usage.
fn usage_error(args: &[&str], names: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = run(args, dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "pageviews {args:?}: {stderr}");
    let head: Vec<&str> = stderr.lines().take(2).collect();
    assert!(head[0].starts_with("error: "), "{stderr}");
    assert!(
        head.iter().any(|l| l.contains(names)),
        "{names} not named in:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_malformed_log_format_is_one_line_that_points_at_it() {
    assert_eq!(
        one_line_error(&["import", "--log-format", r#"%h %Z [%x] "%r""#, "x.log"]),
        r#"error: log format: unknown specifier %Z at column 4: %h %Z [%x] "%r""#
    );
    assert_eq!(
        one_line_error(&[
            "demo",
            "--log-format",
            "$remote_addr [${time_local] \"$request\""
        ]),
        r#"error: log format: ${ without its closing } at column 15: $remote_addr [${time_local] "$request""#
    );
    let e = one_line_error(&["import", "--log-format", "apache", "x.log"]);
    assert!(
        e.starts_with(
            r#"error: log format: unknown log format "apache": expected auto, a preset (COMBINED,"#
        ),
        "{e}"
    );
    assert_eq!(
        one_line_error(&[
            "import",
            "--json-field",
            "ip=a",
            "--log-format",
            "COMBINED",
            "x.log"
        ]),
        "error: log format: --json-field goes with --log-format JSON (or auto)"
    );
    usage_error(&["import", "--client-ip", "proxy", "x.log"], "--client-ip");
    usage_error(&["import", "--json-field", "ip", "x.log"], "--json-field");
}

#[test]
fn unknown_command_line_values_name_the_value() {
    usage_error(&["frobnicate"], "'frobnicate'");
    usage_error(&["aggregate", "--flush-interval", "soon"], "'soon'");
    usage_error(&["broker", "--broker-storage", "floppy"], "'floppy'");
    usage_error(&["serve", "--listen", "localhost"], "'localhost'");
    usage_error(&["-X", "acks", "topics"], "expected key=value");
    usage_error(&["import"], "<FILE>");
}

#[test]
fn unreachable_brokers_say_which_and_where_to_fix() {
    // Port 1 on loopback: nothing listens, the connection is refused.
    let line = one_line_error(&["--brokers", "127.0.0.1:1", "topics"]);
    assert!(
        line.starts_with("error: cannot reach Kafka at 127.0.0.1:1: "),
        "{line}"
    );
    // librdkafka's own account, not just "broker transport failure".
    assert!(line.contains("Connection refused"), "{line}");
    assert!(
        line.ends_with("(is the broker running? check --brokers / PAGEVIEWS_BROKERS)"),
        "{line}"
    );
}

#[test]
fn a_missing_geoip_file_is_named() {
    let line = one_line_error(&["preprocess", "--geoip", "/nonexistent/Country.mmdb"]);
    assert!(line.contains("/nonexistent/Country.mmdb"), "{line}");
    assert!(line.contains("No such file or directory"), "{line}");
}

#[test]
fn a_database_url_with_a_typo_is_named() {
    let line = one_line_error(&["serve", "--database", "postgress://postgres@127.0.0.1/test"]);
    assert_eq!(
        line,
        "error: unsupported database URL \"postgress://postgres@127.0.0.1/test\": \
         use sqlite://PATH or postgres://USER@HOST:PORT/DB"
    );
    // Nothing listens on port 1: the URL is right in form but wrong in place.
    let line = one_line_error(&[
        "aggregate",
        "--database",
        "postgres://postgres@127.0.0.1:1/test",
    ]);
    assert_eq!(
        line,
        "error: cannot open database postgres://postgres@127.0.0.1:1/test: error connecting to \
         server: Connection refused (os error 111) (check --database / PAGEVIEWS_DATABASE)"
    );
}

#[test]
fn a_missing_input_file_is_named() {
    let line = one_line_error(&[
        "--brokers",
        "127.0.0.1:1",
        "import",
        "/nonexistent/access.log",
    ]);
    assert!(line.contains("/nonexistent/access.log"), "{line}");
}

#[test]
fn alert_mistakes_are_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"errors\"\nkind = \"error_share\"\nabove = 2\nwindow = \"1m\"\n",
    )
    .unwrap();
    let rules = rules.to_str().unwrap();
    assert_eq!(
        one_line_error(&["alert"]),
        "error: alert needs --rules FILE and --webhook URL or --smtp URL"
    );
    assert_eq!(
        one_line_error(&["alert", "--webhook", "http://127.0.0.1:9/hook"]),
        "error: alerts need a rules file: add --rules FILE"
    );
    assert_eq!(
        one_line_error(&[
            "alert",
            "--rules",
            "/nonexistent/rules.toml",
            "--webhook",
            "http://x/"
        ]),
        "error: cannot read the rules file /nonexistent/rules.toml: No such file or directory (os error 2)"
    );
    assert_eq!(
        one_line_error(&["alert", "--rules", rules, "--webhook", "http://x/"]),
        format!("error: {rules}: rule errors: above = 2: a share, from 0 to below 1")
    );
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[rule]]\nname = \"errors\"\nkind = \"error_share\"\nabove = 0.2\nwindow = \"1m\"\n",
    )
    .unwrap();
    let good = good.to_str().unwrap();
    assert_eq!(
        one_line_error(&["alert", "--rules", good]),
        "error: alerts need somewhere to go: add --webhook URL or --smtp URL"
    );
    assert_eq!(
        one_line_error(&["alert", "--rules", good, "--webhook", "hooks.slack.com/x"]),
        "error: invalid --webhook URL \"hooks.slack.com/x\": relative URL without a base"
    );
    assert_eq!(
        one_line_error(&[
            "alert",
            "--rules",
            good,
            "--smtp",
            "smtp://127.0.0.1:25",
            "--to",
            "a@b.c"
        ]),
        "error: e-mail alerts need a sender: add --from ADDR"
    );
    assert_eq!(
        one_line_error(&[
            "alert",
            "--rules",
            good,
            "--smtp",
            "smtp://127.0.0.1:25",
            "--from",
            "me",
            "--to",
            "a@b.c"
        ]),
        "error: invalid e-mail address \"me\" for --from: Invalid input (write user@example.com or \"Name <user@example.com>\")"
    );
    // Checked before the demo starts anything.
    assert_eq!(
        one_line_error(&["demo", "--rules", good]),
        "error: alerts need somewhere to go: add --webhook URL or --smtp URL"
    );
}
