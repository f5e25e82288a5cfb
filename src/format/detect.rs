//! `--log-format auto`: which preset fits the first lines of an input.
//!
//! W3C files say so (`#Software:`, `#Version:`, `#Fields:` directives). Otherwise every preset
//! reads the sample and the one that parses the most lines with an IP address as the client
//! wins; among equals, the one that reads more (a vhost, a referrer, a duration), then the
//! first in [`Preset::ALL`] order.

use super::{FormatKind, FormatSpec, LogFormat, Preset, is_ip, w3c};

/// How many lines of an input auto-detection looks at.
pub const SAMPLE_LINES: usize = 50;

/// The outcome: the spec, and how many of the sample's request lines it parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub spec: FormatSpec,
    pub parsed: usize,
    pub lines: usize,
}

/// Picks a format for `sample` (the first lines of an input), or `None` when no preset parses
/// any of them.
pub fn detect(sample: &[&[u8]]) -> Option<Detected> {
    let directives: Vec<&[u8]> = sample
        .iter()
        .copied()
        .filter(|l| w3c::is_directive(l))
        .collect();
    let requests: Vec<&[u8]> = sample
        .iter()
        .copied()
        .filter(|l| !w3c::is_directive(l) && !l.iter().all(u8::is_ascii_whitespace))
        .collect();
    let w3c_fields = directives.iter().find_map(|l| w3c::fields_directive(l));
    let w3c_marked = w3c_fields.is_some()
        || directives
            .iter()
            .any(|l| l.starts_with(b"#Software:") || l.starts_with(b"#Version:"));
    let candidates: Vec<FormatSpec> = if w3c_marked {
        let mut spec = FormatSpec::preset(Preset::W3c);
        spec.w3c_fields = w3c_fields;
        vec![spec]
    } else {
        Preset::ALL
            .iter()
            .filter(|p| **p != Preset::W3c)
            .map(|p| FormatSpec::preset(*p))
            .chain(std::iter::once(FormatSpec {
                kind: FormatKind::Json { fields: Vec::new() },
                w3c_fields: None,
                client_ip: Default::default(),
            }))
            .collect()
    };
    let mut best: Option<(usize, usize, Detected)> = None;
    for spec in candidates {
        let Ok(format) = LogFormat::compile(&spec) else {
            continue;
        };
        let (mut parsed, mut richness) = (0, 0);
        for line in &requests {
            if let Ok(l) = format.parse(line)
                && is_ip(&l.host)
            {
                parsed += 1;
                richness += usize::from(l.vhost.is_some())
                    + usize::from(l.referrer.is_some())
                    + usize::from(l.user_agent.is_some())
                    + usize::from(l.request_time_us.is_some())
                    + usize::from(l.status != 0);
            }
        }
        let better = match &best {
            None => parsed > 0 || w3c_marked,
            Some((p, r, _)) => (parsed, richness) > (*p, *r),
        };
        if better {
            best = Some((
                parsed,
                richness,
                Detected {
                    spec,
                    parsed,
                    lines: requests.len(),
                },
            ));
        }
    }
    best.map(|(_, _, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(lines: &[&str]) -> Option<String> {
        let sample: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        detect(&sample).map(|d| d.spec.to_string())
    }

    #[test]
    fn picks_the_preset_that_reads_most() {
        let combined =
            r#"1.2.3.4 - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.1" 200 5 "-" "curl/8""#;
        assert_eq!(pick(&[combined]).as_deref(), Some("COMBINED"));
        assert_eq!(
            pick(&[&format!("www.example.com:443 {combined}")]).as_deref(),
            Some("VCOMBINED")
        );
        assert_eq!(
            pick(&[&format!(
                r#"{combined} 7 "router@docker" "http://10.0.0.3:80" 12ms"#
            )])
            .as_deref(),
            Some("TRAEFIKCLF")
        );
        assert_eq!(
            pick(&[r#"{"ts":1646861401.5,"request":{"remote_ip":"127.0.0.1","method":"GET","host":"h","uri":"/","headers":{}},"size":1,"status":200}"#]).as_deref(),
            Some("CADDY")
        );
        assert_eq!(
            pick(&[r#"{"remote_addr":"127.0.0.1","time_local":"10/Oct/2000:13:55:36 -0700","request":"GET / HTTP/1.1","status":200}"#]).as_deref(),
            Some("JSON")
        );
        assert_eq!(
            pick(&[
                "#Software: Microsoft Internet Information Services 10.0",
                "#Fields: date time c-ip cs-uri-stem"
            ])
            .as_deref(),
            Some("W3C")
        );
        assert_eq!(pick(&["hello", "world"]), None);
    }

    #[test]
    fn w3c_takes_the_fields_of_the_sample() {
        let lines: Vec<&[u8]> = vec![
            b"#Version: 1.0",
            b"#Fields: date time c-ip cs-uri-stem",
            b"2024-01-01 00:00:00 1.2.3.4 /",
        ];
        let d = detect(&lines).unwrap();
        assert_eq!(
            d.spec.w3c_fields.as_deref(),
            Some("date time c-ip cs-uri-stem")
        );
        assert_eq!((d.parsed, d.lines), (1, 1));
    }
}
