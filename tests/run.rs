//! `pageviews run --follow`, the one-process deployment on a real server, through the real
//! binary: a log that grows while it runs (a line written in two pieces too), is rotated by
//! create (renamed, the old file written to once more, a new one created) and by copytruncate,
//! and a process SIGKILLed while it imports at a capped rate and started again. Every line
//! must be counted exactly once, per country against the `.mmdb`; Ctrl-C exits 0. The
//! importer's recovery of lines sent after its last checkpoint is also tested on its own,
//! deterministically (a checkpoint put back as a kill would have left it).

mod common;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The `run` process, killed on drop (a failed test leaves nothing behind).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_run(data: &Path, log: &Path, port: u16, extra: &[&str], name: &str) -> Running {
    let mut cmd = command(&bin(), data);
    cmd.args(["run", "--input"])
        .arg(log)
        .args(["--follow", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--flush-interval", "300ms"])
        .args(extra)
        .stdout(Stdio::from(
            std::fs::File::create(data.join(format!("{name}.out"))).unwrap(),
        ))
        .stderr(Stdio::from(
            std::fs::File::create(data.join(format!("{name}.err"))).unwrap(),
        ));
    Running(cmd.spawn().expect("the pageviews binary"))
}

fn append(path: &Path, lines: &[Vec<u8>]) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    for l in lines {
        f.write_all(l).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
}

/// Per-country counts from `/api/countries`, or `None` while the server does not answer.
fn served(addr: SocketAddr) -> Option<BTreeMap<String, u64>> {
    std::panic::catch_unwind(|| http_get(addr, "/api/countries"))
        .ok()
        .filter(|(status, _, _)| status.contains(" 200 "))
        .and_then(|(_, _, body)| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .map(|v| {
            v["countries"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    (
                        c["country_code"].as_str().unwrap_or("").to_owned(),
                        c["visits"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
}

/// Waits until the served counts equal `want` exactly (and fails if they pass them).
fn wait_exact(addr: SocketAddr, want: &BTreeMap<String, u64>, data: &Path, what: &str) {
    let total: u64 = want.values().sum();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = None;
    while Instant::now() < deadline {
        if let Some(now) = served(addr) {
            let counted: u64 = now.values().sum();
            assert!(
                counted <= total,
                "{what}: {counted} lines counted, more than the {total} written:\n{}",
                logs(data)
            );
            if &now == want {
                return;
            }
            seen = Some(now);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "{what}: counts never matched.\nwant {want:?}\nsaw  {seen:?}\n{}",
        logs(data)
    );
}

fn logs(data: &Path) -> String {
    let mut out = String::new();
    for name in ["first.out", "first.err", "second.out", "second.err"] {
        if let Ok(text) = std::fs::read_to_string(data.join(name)) {
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out += &format!(
                "--- {name} (last lines)\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    out
}

fn expected(lines: &[Vec<u8>]) -> BTreeMap<String, u64> {
    expected_counts(lines.iter().map(Vec::as_slice))
}

#[test]
fn run_follows_a_live_log_across_rotation_and_a_kill_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let log: PathBuf = dir.path().join("access.log");
    let lines = generated_by_binary(24_000, 24);
    let mut chunks = lines.chunks(2_000);
    let mut written: Vec<Vec<u8>> = Vec::new();
    let mut take = |written: &mut Vec<Vec<u8>>| -> Vec<Vec<u8>> {
        let c = chunks.next().unwrap().to_vec();
        written.extend(c.iter().cloned());
        c
    };

    // 1. A log that exists before the first start.
    append(&log, &take(&mut written));
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut first = start_run(&data, &log, port, &[], "first");
    wait_exact(addr, &expected(&written), &data, "the first lines");

    // 2. Growth, one line arriving in two writes.
    let grown = take(&mut written);
    let (head, tail) = grown.split_at(1_000);
    append(&log, head);
    {
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        let (a, b) = tail[0].split_at(tail[0].len() / 2);
        f.write_all(a).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(600));
        f.write_all(b).unwrap();
        f.write_all(b"\n").unwrap();
    }
    append(&log, &tail[1..]);
    wait_exact(addr, &expected(&written), &data, "appended lines");

    // 3. Rotation by create: the server writes to the renamed file once more before it
    // reopens the log at its path.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    append(&rotated, &take(&mut written));
    std::thread::sleep(Duration::from_millis(500));
    append(&log, &take(&mut written));
    wait_exact(addr, &expected(&written), &data, "rotation by create");

    // 4. kill -9 while a burst is imported at 2,000 lines/s, then the same command again.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    drop(first);
    let mut second_pass = Vec::new();
    for _ in 0..3 {
        second_pass.extend(take(&mut written));
    }
    append(&log, &second_pass);
    let capped = start_run(&data, &log, port, &["--rate", "2000"], "capped");
    std::thread::sleep(Duration::from_millis(2_500));
    let mut killed = capped;
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    drop(killed);
    let mut second = start_run(&data, &log, port, &[], "second");
    wait_exact(
        addr,
        &expected(&written),
        &data,
        "after kill -9 and restart",
    );

    // 5. Rotation by copytruncate: the content is copied away and the log emptied in place.
    std::fs::copy(&log, dir.path().join("access.log.2")).unwrap();
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&log)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1_000));
    append(&log, &take(&mut written));
    wait_exact(addr, &expected(&written), &data, "copytruncate");

    // 6. Ctrl-C: exit 0 within a few seconds.
    assert!(signal(child_pid(&second.0), libc::SIGINT));
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = second.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "run did not stop within 15 s of Ctrl-C\n{}",
            logs(&data)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "run exited with {status}\n{}",
        logs(&data)
    );
    let err = std::fs::read_to_string(data.join("second.err")).unwrap();
    assert!(
        !err.contains("panicked"),
        "a panic in the second run:\n{err}"
    );
}

/// The systemd unit of docs/deployment.md, with the binary under test as its ExecStart:
/// `systemd-analyze verify` accepts it without a warning (where the machine has it), it runs
/// `run --follow`, and every option its command line gives is one `run` takes.
#[test]
fn the_systemd_unit_example_verifies() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/deployment.md"))
        .unwrap();
    let start = doc
        .find("```ini\n")
        .expect("the unit in docs/deployment.md")
        + 7;
    let unit = &doc[start..start + doc[start..].find("```").unwrap()];
    for field in [
        "[Unit]",
        "[Service]",
        "[Install]",
        "ExecStart=/usr/local/bin/pageviews run ",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "StateDirectory=pageviews",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.contains(field), "the unit lacks {field}");
    }
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
    assert_eq!(args[0], "run");
    assert!(args.contains(&"--follow"));
    let dir = tempfile::tempdir().unwrap();
    let help = run_within(
        {
            let mut c = command(&bin(), dir.path());
            c.args(["run", "--help"]);
            c
        },
        Duration::from_secs(30),
    );
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    for option in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(&format!("{option} ")) || help.contains(&format!("{option}\n")),
            "`run` has no {option}"
        );
    }
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze not found: checked the unit's fields only");
        return;
    };
    let path = dir.path().join("pageviews.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/pageviews", bin().to_str().unwrap()),
    )
    .unwrap();
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("Unknown") && !stderr.contains("ignoring"),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}

/// The importer's exactly-once step on its own: a checkpoint put back to an earlier save (as a
/// `kill -9` before the next save leaves it) makes the next import find the lines sent since
/// in the raw topic and send none of them again, then only what is new. Followed files too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_sent_after_the_last_checkpoint_are_not_sent_again() {
    use pageviews::import::checkpoint::CheckpointDir;
    use pageviews::import::{self, ImportConfig, Input};
    use tokio_util::sync::CancellationToken;

    let c = cluster(4).await;
    let log = c.dir.path().join("access.log");
    let cp_dir = c.dir.path().join("checkpoints");
    let cps = CheckpointDir::new(&cp_dir, "test-cluster", pageviews::kafka::RAW_TOPIC);
    let config = |follow: bool| ImportConfig {
        kafka: c.kafka.clone(),
        inputs: vec![Input::File(log.clone())],
        follow,
        rate: None,
        checkpoints: Some(cps.clone()),
        from_start: false,
        format: Default::default(),
    };
    let lines = generated_by_binary(9_000, 41);
    let checkpoint = || {
        let files: Vec<_> = std::fs::read_dir(&cp_dir).unwrap().collect();
        assert_eq!(files.len(), 1);
        let path = files[0].as_ref().unwrap().path();
        (path.clone(), std::fs::read(path).unwrap())
    };

    write_lines(&log, &lines[..2_000]);
    let first = import::run(config(false), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(first.lines, 2_000);
    let (cp_path, stale) = checkpoint();

    append(&log, &lines[2_000..5_000]);
    let second = import::run(config(false), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(second.lines, 3_000);

    // As if killed after the broker took those 3,000 lines, before their checkpoint.
    std::fs::write(&cp_path, &stale).unwrap();
    let again = import::run(config(false), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(again.lines, 0, "lines sent twice");
    assert_eq!(again.already_imported, 5_000);

    // Put back again, with 1,000 new lines: exactly those are sent.
    std::fs::write(&cp_path, &stale).unwrap();
    append(&log, &lines[5_000..6_000]);
    let grown = import::run(config(false), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(grown.lines, 1_000);

    // Followed: the same from a put-back checkpoint, then what is appended while following.
    std::fs::write(&cp_path, &stale).unwrap();
    let stop = CancellationToken::new();
    let follower = tokio::spawn(import::run(config(true), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    append(&log, &lines[6_000..9_000]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let followed = follower.await.unwrap().unwrap();
    assert_eq!(followed.lines, 3_000, "only the appended lines");

    // The raw topic holds each line once.
    let raw = tokio::task::spawn_blocking({
        let kafka = c.kafka.clone();
        move || {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let consumer: BaseConsumer = kafka
                .client_config(
                    pageviews::kafka::ClientRole::Consumer,
                    &[("group.id", "test-raw-count")],
                )
                .create()
                .unwrap();
            (0..4)
                .map(|p| {
                    consumer
                        .fetch_watermarks(pageviews::kafka::RAW_TOPIC, p, Duration::from_secs(10))
                        .unwrap()
                        .1
                })
                .sum::<i64>()
        }
    })
    .await
    .unwrap();
    assert_eq!(raw, 9_000);
}
