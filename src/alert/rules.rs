//! The rules file (TOML): what an alerter watches. Pure: text in, rules or one error out.
//!
//! ```toml
//! [[rule]]
//! name = "server-errors"
//! kind = "error_share"      # share of responses with status >= 500
//! above = 0.2
//! min_requests = 50
//! window = "1m"
//!
//! [[rule]]
//! name = "traffic-spike"
//! kind = "spike"            # visits in a window vs the mean of the previous `baseline` windows
//! factor = 3.0
//! baseline = 10
//! window = "1m"
//!
//! [[rule]]
//! name = "country-visits"
//! kind = "country_visits"   # visits from one country in a window (every country without `country`)
//! country = "CN"
//! above = 1000
//! window = "1m"
//! ```

use serde::Deserialize;

use crate::countries::CountryCode;

/// What a rule watches, with its thresholds.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleKind {
    /// Share of requests answered with a status of 500 or more, above `above` (0..1), in
    /// windows with at least `min_requests` requests.
    ErrorShare { above: f64, min_requests: u64 },
    /// Visits in a window above `factor` times the mean of the previous `baseline` windows
    /// (windows without visits count as 0; none before the group's first event), in windows
    /// with at least `min_requests` visits.
    Spike {
        factor: f64,
        baseline: u32,
        min_requests: u64,
    },
    /// Visits from `country` (every country when `None`, one alert each) above `above`.
    CountryVisits {
        country: Option<CountryCode>,
        above: u64,
    },
}

impl RuleKind {
    /// The name the rules file and the alerts use.
    pub fn name(&self) -> &'static str {
        match self {
            RuleKind::ErrorShare { .. } => "error_share",
            RuleKind::Spike { .. } => "spike",
            RuleKind::CountryVisits { .. } => "country_visits",
        }
    }
}

/// One rule: a name (part of every alert's id), a tumbling window and what it watches.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    /// Window length in seconds; windows are aligned to it in UTC.
    pub window: i64,
    pub kind: RuleKind,
}

impl Rule {
    /// How far back before a window its evaluation looks (a spike's baseline), in seconds.
    pub fn history(&self) -> i64 {
        match self.kind {
            RuleKind::Spike { baseline, .. } => i64::from(baseline) * self.window,
            _ => 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RulesError {
    #[error("the rules file is not valid TOML: {0}")]
    Toml(String),
    #[error("the rules file has no [[rule]]")]
    Empty,
    #[error("rule {rule}: {problem}")]
    Rule { rule: String, problem: String },
}

/// A `[[rule]]` as written; checked into a [`Rule`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    kind: String,
    window: String,
    above: Option<f64>,
    min_requests: Option<u64>,
    factor: Option<f64>,
    baseline: Option<u32>,
    country: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

/// Parses and checks a rules file.
pub fn parse_rules(text: &str) -> Result<Vec<Rule>, RulesError> {
    let file: RulesFile = toml::from_str(text).map_err(|e| RulesError::Toml(e.to_string()))?;
    if file.rule.is_empty() {
        return Err(RulesError::Empty);
    }
    let mut rules: Vec<Rule> = Vec::new();
    for spec in file.rule {
        let fail = |problem: String| RulesError::Rule {
            rule: spec.name.clone(),
            problem,
        };
        if spec.name.is_empty()
            || !spec
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(fail(
                "a name is letters, digits, '-', '_' or '.' (it is part of each alert's id)".into(),
            ));
        }
        if rules.iter().any(|r| r.name == spec.name) {
            return Err(fail("two rules have this name".into()));
        }
        let window = humantime::parse_duration(&spec.window)
            .map_err(|e| fail(format!("window {:?}: {e}", spec.window)))?;
        if window.as_secs() == 0 || window.subsec_nanos() != 0 {
            return Err(fail(format!(
                "window {:?}: a whole number of seconds, at least 1s",
                spec.window
            )));
        }
        let window = i64::try_from(window.as_secs()).map_err(|_| fail("window too long".into()))?;
        let need = |field: &str, v: Option<f64>| {
            v.ok_or_else(|| fail(format!("kind {} needs `{field}`", spec.kind)))
        };
        let unused = |fields: &[(&str, bool)]| match fields.iter().find(|(_, set)| *set) {
            Some((f, _)) => Err(fail(format!("kind {} has no `{f}`", spec.kind))),
            None => Ok(()),
        };
        let kind = match spec.kind.as_str() {
            "error_share" => {
                unused(&[
                    ("factor", spec.factor.is_some()),
                    ("baseline", spec.baseline.is_some()),
                    ("country", spec.country.is_some()),
                ])?;
                let above = need("above", spec.above)?;
                if !(0.0..1.0).contains(&above) {
                    return Err(fail(format!("above = {above}: a share, from 0 to below 1")));
                }
                RuleKind::ErrorShare {
                    above,
                    min_requests: spec.min_requests.unwrap_or(1),
                }
            }
            "spike" => {
                unused(&[
                    ("above", spec.above.is_some()),
                    ("country", spec.country.is_some()),
                ])?;
                let factor = need("factor", spec.factor)?;
                if factor.is_nan() || factor <= 0.0 {
                    return Err(fail(format!("factor = {factor}: above 0")));
                }
                let baseline = spec
                    .baseline
                    .ok_or_else(|| fail("kind spike needs `baseline`".into()))?;
                if baseline == 0 {
                    return Err(fail("baseline = 0: at least one window".into()));
                }
                RuleKind::Spike {
                    factor,
                    baseline,
                    min_requests: spec.min_requests.unwrap_or(1),
                }
            }
            "country_visits" => {
                unused(&[
                    ("factor", spec.factor.is_some()),
                    ("baseline", spec.baseline.is_some()),
                    ("min_requests", spec.min_requests.is_some()),
                ])?;
                let above = need("above", spec.above)?;
                if above.is_nan() || above < 0.0 || above.fract() != 0.0 {
                    return Err(fail(format!("above = {above}: a whole number of visits")));
                }
                let country = match spec.country.as_deref() {
                    None => None,
                    Some(c) if c == crate::countries::ALL => None,
                    Some(c) => {
                        Some(CountryCode::parse(&c.to_ascii_uppercase()).ok_or_else(|| {
                            fail(format!("country {c:?}: a two-letter ISO 3166 code"))
                        })?)
                    }
                };
                RuleKind::CountryVisits {
                    country,
                    above: above as u64,
                }
            }
            other => {
                return Err(fail(format!(
                    "unknown kind {other:?}; known: error_share, spike, country_visits"
                )));
            }
        };
        rules.push(Rule {
            name: spec.name,
            window,
            kind,
        });
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[rule]]
name = "server-errors"
kind = "error_share"
above = 0.2
min_requests = 50
window = "1m"

[[rule]]
name = "traffic-spike"
kind = "spike"
factor = 3.0
baseline = 10
window = "1m"

[[rule]]
name = "country-visits"
kind = "country_visits"
country = "CN"
above = 1000
window = "5m"
"#;

    #[test]
    fn the_documented_example_parses() {
        let rules = parse_rules(EXAMPLE).unwrap();
        assert_eq!(
            rules,
            vec![
                Rule {
                    name: "server-errors".into(),
                    window: 60,
                    kind: RuleKind::ErrorShare {
                        above: 0.2,
                        min_requests: 50
                    }
                },
                Rule {
                    name: "traffic-spike".into(),
                    window: 60,
                    kind: RuleKind::Spike {
                        factor: 3.0,
                        baseline: 10,
                        min_requests: 1
                    }
                },
                Rule {
                    name: "country-visits".into(),
                    window: 300,
                    kind: RuleKind::CountryVisits {
                        country: CountryCode::parse("CN"),
                        above: 1000
                    }
                },
            ]
        );
        assert_eq!(rules[1].history(), 600);
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("", RulesError::Empty.to_string()),
            (
                "[[rule]]\nname = \"a\"\nkind = \"error_share\"\nwindow = \"1m\"\n",
                "rule a: kind error_share needs `above`".to_owned(),
            ),
            (
                "[[rule]]\nname = \"a\"\nkind = \"nope\"\nwindow = \"1m\"\n",
                "rule a: unknown kind \"nope\"; known: error_share, spike, country_visits"
                    .to_owned(),
            ),
            (
                "[[rule]]\nname = \"a\"\nkind = \"spike\"\nfactor = 2.0\nbaseline = 3\nwindow = \"0s\"\n",
                "rule a: window \"0s\": a whole number of seconds, at least 1s".to_owned(),
            ),
            (
                "[[rule]]\nname = \"a b\"\nkind = \"spike\"\nfactor = 2.0\nbaseline = 3\nwindow = \"1m\"\n",
                "rule a b: a name is letters, digits, '-', '_' or '.' (it is part of each alert's id)".to_owned(),
            ),
            (
                "[[rule]]\nname = \"a\"\nkind = \"country_visits\"\ncountry = \"China\"\nabove = 5\nwindow = \"1m\"\n",
                "rule a: country \"China\": a two-letter ISO 3166 code".to_owned(),
            ),
            (
                "[[rule]]\nname = \"a\"\nkind = \"error_share\"\nabove = 0.5\nfactor = 2.0\nwindow = \"1m\"\n",
                "rule a: kind error_share has no `factor`".to_owned(),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_rules(text).unwrap_err().to_string(), want, "{text}");
        }
        let one = "[[rule]]\nname = \"server-errors\"\nkind = \"error_share\"\nabove = 0.2\nwindow = \"1m\"\n";
        let dup = format!("{one}{one}");
        assert_eq!(
            parse_rules(&dup).unwrap_err().to_string(),
            "rule server-errors: two rules have this name"
        );
        assert!(matches!(
            parse_rules("[[rule]]\nname = 1\n"),
            Err(RulesError::Toml(_))
        ));
    }
}
