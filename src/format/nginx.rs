//! nginx `log_format` strings (`$remote_addr - $remote_user [$time_local] "$request" …`),
//! translated into a GoAccess pattern: each variable becomes the specifier that reads it, the
//! text between them stays literal. Variables pageviews does not use become `%^` (skipped).

use super::FormatError;
use super::pattern::DEFAULT_DATETIME;

/// True when `text` reads as an nginx format (a `$name` variable) rather than a GoAccess one.
pub fn looks_like_nginx(text: &str) -> bool {
    let b = text.as_bytes();
    b.windows(2)
        .any(|w| w[0] == b'$' && (w[1].is_ascii_alphabetic() || w[1] == b'_' || w[1] == b'{'))
}

/// The specifier for an nginx variable, and the date-time format it implies.
fn specifier(var: &str) -> (&'static str, Option<&'static str>) {
    match var {
        "remote_addr" | "realip_remote_addr" => ("%h", None),
        "http_x_forwarded_for" | "proxy_add_x_forwarded_for" => ("~h{, }", None),
        "time_local" => ("%x", Some(DEFAULT_DATETIME)),
        "time_iso8601" => ("%x", Some("%Y-%m-%dT%H:%M:%S%:z")),
        "msec" => ("%x", Some("%s")),
        "request" => ("%r", None),
        "request_method" => ("%m", None),
        "request_uri" | "uri" | "document_uri" => ("%U", None),
        "args" | "query_string" => ("%q", None),
        "status" => ("%s", None),
        "body_bytes_sent" | "bytes_sent" => ("%b", None),
        "http_referer" => ("%R", None),
        "http_user_agent" => ("%u", None),
        "request_time" => ("%T", None),
        "host" | "http_host" | "server_name" => ("%v", None),
        _ => ("%^", None),
    }
}

/// Translates an nginx format into (GoAccess pattern, date-time format).
pub fn translate(text: &str) -> Result<(String, String), FormatError> {
    let at = |what: String, column: usize| FormatError::At {
        what,
        column,
        text: text.to_owned(),
    };
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    let mut datetime: Option<&str> = None;
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '$' => {
                let (name, next) = if chars.get(i + 1) == Some(&'{') {
                    let close = chars[i + 2..]
                        .iter()
                        .position(|c| *c == '}')
                        .ok_or_else(|| at("${ without its closing }".to_owned(), i + 1))?;
                    (
                        chars[i + 2..i + 2 + close].iter().collect::<String>(),
                        i + 3 + close,
                    )
                } else {
                    let len = chars[i + 1..]
                        .iter()
                        .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                        .count();
                    (
                        chars[i + 1..i + 1 + len].iter().collect::<String>(),
                        i + 1 + len,
                    )
                };
                if name.is_empty() {
                    return Err(at("a $ without a variable name".to_owned(), i + 1));
                }
                let (spec, implied) = specifier(&name);
                // One timestamp: a second time variable is skipped.
                if spec == "%x" && datetime.is_some() {
                    out.push_str("%^");
                } else {
                    out.push_str(spec);
                    if let Some(d) = implied {
                        datetime = Some(d);
                    }
                }
                i = next;
            }
            '%' => {
                out.push_str("%%");
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok((out, datetime.unwrap_or(DEFAULT_DATETIME).to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pattern::Pattern;

    #[test]
    fn nginx_combined_with_extras() {
        let f = r#"$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" "$http_x_forwarded_for" rt=$request_time ${host}"#;
        assert!(looks_like_nginx(f));
        let (pattern, datetime) = translate(f).unwrap();
        assert_eq!(
            pattern,
            r#"%h - %^ [%x] "%r" %s %b "%R" "%u" "~h{, }" rt=%T %v"#
        );
        let p = Pattern::compile_datetime(&pattern, &datetime).unwrap();
        let l = p
            .parse(r#"10.0.0.2 - - [10/Oct/2000:13:55:36 -0700] "GET /x HTTP/1.1" 200 5 "-" "curl/8" "203.0.113.5, 10.0.0.1" rt=0.250 example.org"#)
            .unwrap();
        assert_eq!(l.host, "10.0.0.2");
        assert_eq!(l.forwarded_for.as_deref(), Some("203.0.113.5, 10.0.0.1"));
        assert_eq!(l.request_time_us, Some(250_000));
        assert_eq!(l.vhost.as_deref(), Some("example.org"));
        assert_eq!(l.time.to_rfc3339(), "2000-10-10T20:55:36+00:00");
    }

    #[test]
    fn iso_time_and_errors() {
        let (p, d) =
            translate("$time_iso8601 $remote_addr $request_method $uri?$args $status").unwrap();
        assert_eq!(
            (p.as_str(), d.as_str()),
            ("%x %h %m %U?%q %s", "%Y-%m-%dT%H:%M:%S%:z")
        );
        assert_eq!(
            translate("$remote_addr ${time_local")
                .unwrap_err()
                .to_string(),
            "log format: ${ without its closing } at column 14: $remote_addr ${time_local"
        );
        assert!(!looks_like_nginx("%h %^[%d:%t %^] \"%r\" %s %b"));
    }
}
