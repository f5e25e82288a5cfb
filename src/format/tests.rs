//! Fixture files per format (`tests/fixtures/formats/NAME.log`, lines written from each
//! format's documentation) against the exact fields expected of each line
//! (`NAME.expected`: one JSON object per line that is not a directive, or its error).
//! `PAGEVIEWS_BLESS=1` rewrites the expectations from the current parser, for review.

use serde_json::{Value, json};

use super::*;
use crate::import::input_format::InputFormat;

fn fixtures() -> Vec<(&'static str, FormatSpec)> {
    let mut list: Vec<(&'static str, FormatSpec)> = Preset::ALL
        .iter()
        .map(|p| (p.name(), FormatSpec::preset(*p)))
        .collect();
    list.push((
        "JSON",
        FormatSpec {
            kind: FormatKind::Json { fields: Vec::new() },
            w3c_fields: None,
            client_ip: ClientIp::Host,
        },
    ));
    let mut nginx = FormatSpec::from_option(
        r#"$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" "$http_x_forwarded_for" $request_time $host"#,
        None,
        None,
        None,
        &[],
    )
    .unwrap();
    nginx.client_ip = ClientIp::Forwarded(1);
    list.push(("NGINX", nginx));
    list.push((
        "GOACCESS",
        FormatSpec::from_option(
            r#"%h %^[%d:%t %^] "%r" %s %b "%R" "%u" %T"#,
            Some("%d/%b/%Y"),
            Some("%H:%M:%S"),
            None,
            &[],
        )
        .unwrap(),
    ));
    list
}

fn as_json(format: &LogFormat, result: Result<LogLine<'_>, ParseError>) -> Value {
    match result {
        Err(e) => json!({ "error": format!("{}: {e}", format.name()) }),
        Ok(l) => json!({
            "client": format.client_ip(&l.host, l.forwarded_for.as_deref()),
            "host": l.host,
            "time": l.time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            "method": l.method,
            "path": l.path,
            "status": l.status,
            "bytes": l.bytes,
            "referrer": l.referrer,
            "user_agent": l.user_agent,
            "vhost": l.vhost,
            "forwarded_for": l.forwarded_for,
            "request_time_us": l.request_time_us,
        }),
    }
}

#[test]
fn every_fixture_gives_its_expected_events() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats");
    let bless = std::env::var_os("PAGEVIEWS_BLESS").is_some();
    for (name, spec) in fixtures() {
        let input = std::fs::read(dir.join(format!("{name}.log"))).unwrap();
        // As the importer reads a file: directives change the format of the lines after them.
        let mut current = InputFormat::new(spec);
        let mut got = Vec::new();
        for line in input.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if current.directive(line) {
                continue;
            }
            let format = LogFormat::compile(current.spec()).unwrap();
            got.push(as_json(&format, format.parse(line)).to_string());
        }
        let expected_path = dir.join(format!("{name}.expected"));
        if bless {
            std::fs::write(&expected_path, got.join("\n") + "\n").unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        let expected: Vec<&str> = expected.lines().collect();
        assert_eq!(got.len(), expected.len(), "{name}: number of lines");
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            let (g, e): (Value, Value) = (
                serde_json::from_str(g).unwrap(),
                serde_json::from_str(e).unwrap(),
            );
            assert_eq!(g, e, "{name}.log, request line {}", i + 1);
        }
    }
}

#[test]
fn header_round_trip() {
    for (name, spec) in fixtures() {
        let back = FormatSpec::from_header(&spec.header()).unwrap();
        assert_eq!(back, spec, "{name}");
    }
    assert_eq!(FormatSpec::preset(Preset::Awss3).header(), b"AWSS3");
    // The README's example of a header another producer can set.
    let spec = FormatSpec::from_header(
        br#"{"kind":{"nginx":"$remote_addr [$time_local] \"$request\" $status"}}"#,
    )
    .unwrap();
    let line = LogFormat::compile(&spec)
        .unwrap()
        .parse(br#"192.0.2.1 [10/Oct/2000:13:55:36 -0700] "GET /x HTTP/1.1" 200"#)
        .unwrap();
    assert_eq!((line.path.as_ref(), line.status), ("/x", 200));
    assert_eq!(
        FormatSpec::from_header(b"NOPE").unwrap_err(),
        "unknown format \"NOPE\" in the format header"
    );
    assert!(
        FormatSpec::from_header(b"{\"kind\":1}")
            .unwrap_err()
            .starts_with("invalid format header: ")
    );
}

#[test]
fn a_format_cache_compiles_each_header_once_and_bounds_itself() {
    let mut cache =
        FormatCache::new(LogFormat::compile(&FormatSpec::preset(Preset::Common)).unwrap());
    assert_eq!(cache.get(None).unwrap().name(), "COMMON");
    let a = cache.get(Some(b"W3C")).unwrap();
    let b = cache.get(Some(b"W3C")).unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!(
        cache.get(Some(b"{}")).err().unwrap(),
        "invalid format header: missing field `kind` at line 1 column 2"
    );
    for i in 0..(FormatCache::MAX * 2) {
        let _ = cache.get(Some(format!("bogus{i}").as_bytes()));
    }
    assert!(cache.known.len() <= FormatCache::MAX);
}

#[test]
fn option_values() {
    let opt = |t: &str| FormatSpec::from_option(t, None, None, None, &[]).map(|s| s.to_string());
    assert_eq!(opt("vcombined").unwrap(), "VCOMBINED");
    assert_eq!(opt("json").unwrap(), "JSON");
    assert_eq!(
        opt("$remote_addr [$time_local] \"$request\"").unwrap(),
        "nginx log_format"
    );
    assert_eq!(opt("%h [%x] \"%r\"").unwrap(), "GoAccess format");
    assert!(opt("apache").unwrap_err().to_string().starts_with(
        "log format: unknown log format \"apache\": expected auto, a preset (COMBINED, VCOMBINED,"
    ));
    assert_eq!(
        opt("%h %Y").unwrap_err().to_string(),
        "log format: unknown specifier %Y at column 4: %h %Y"
    );
    assert_eq!(
        FormatSpec::from_option("COMBINED", None, None, None, &[("ip".into(), "a".into())])
            .unwrap_err()
            .to_string(),
        "log format: --json-field goes with --log-format JSON (or auto)"
    );
    assert_eq!(ClientIp::parse("xff:-2").unwrap(), ClientIp::Forwarded(-2));
    assert!(ClientIp::parse("xff:0").is_err());
    assert!(ClientIp::parse("proxy").is_err());
}

#[test]
fn client_ip_from_forwarded_for() {
    let f = |c: ClientIp| {
        let mut spec = FormatSpec::preset(Preset::Combined);
        spec.client_ip = c;
        LogFormat::compile(&spec).unwrap()
    };
    let list = Some("203.0.113.1, 10.0.0.7,10.0.0.8");
    assert_eq!(f(ClientIp::Host).client_ip("10.0.0.9", list), "10.0.0.9");
    assert_eq!(
        f(ClientIp::Forwarded(1)).client_ip("10.0.0.9", list),
        "203.0.113.1"
    );
    assert_eq!(
        f(ClientIp::Forwarded(2)).client_ip("10.0.0.9", list),
        "10.0.0.7"
    );
    assert_eq!(
        f(ClientIp::Forwarded(-1)).client_ip("10.0.0.9", list),
        "10.0.0.8"
    );
    assert_eq!(
        f(ClientIp::Forwarded(-3)).client_ip("10.0.0.9", list),
        "203.0.113.1"
    );
    assert_eq!(
        f(ClientIp::Forwarded(-4)).client_ip("10.0.0.9", list),
        "10.0.0.9"
    );
    assert_eq!(
        f(ClientIp::Forwarded(1)).client_ip("10.0.0.9", None),
        "10.0.0.9"
    );
}

#[test]
fn absolute_urls_become_paths() {
    let f = LogFormat::combined();
    let line = |req: &str| {
        format!(r#"1.2.3.4 - - [01/Jan/2024:00:00:00 +0000] "GET {req} HTTP/1.1" 200 1"#)
    };
    let l = line("https://user@www.example.com:8443?x=1");
    let p = f.parse(l.as_bytes()).unwrap();
    assert_eq!(
        (p.path.as_ref(), p.vhost.as_deref()),
        ("/?x=1", Some("www.example.com"))
    );
    let l = line("http://a.example/b/c");
    let p = f.parse(l.as_bytes()).unwrap();
    assert_eq!(
        (p.path.as_ref(), p.vhost.as_deref()),
        ("/b/c", Some("a.example"))
    );
}

proptest::proptest! {
    /// No format panics on any bytes, or on lines that look nearly right.
    #[test]
    fn no_format_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300), cut in 0usize..400) {
        for (name, spec) in fixtures() {
            let format = LogFormat::compile(&spec).unwrap();
            let _ = format.parse(&bytes);
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats");
            let sample = std::fs::read(dir.join(format!("{name}.log"))).unwrap();
            let first = sample.split(|b| *b == b'\n').find(|l| !l.starts_with(b"#")).unwrap_or(&[]);
            let mut near = first[..cut.min(first.len())].to_vec();
            near.extend_from_slice(&bytes[..bytes.len().min(12)]);
            let _ = format.parse(&near);
        }
    }
}
