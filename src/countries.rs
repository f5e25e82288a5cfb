//! ISO 3166-1 alpha-2 country codes: validation, names and flags for the dashboard.

use std::fmt;

/// The subject, scope or key that stands for all countries together (beside one per country):
/// unique-visitor and histogram rows, alert windows and rules.
pub const ALL: &str = "*";

/// A two-letter upper-case country code. `ZZ` ("unknown or unspecified", reserved by ISO
/// for user assignment) stands for every address the GeoIP database cannot place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountryCode([u8; 2]);

impl CountryCode {
    /// The code for addresses without a country (private ranges, unknown, invalid).
    pub const UNKNOWN: CountryCode = CountryCode(*b"ZZ");

    /// Accepts any two ASCII letters (case-folded); anything else is `None`.
    pub fn parse(s: &str) -> Option<CountryCode> {
        match s.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => Some(CountryCode([
                a.to_ascii_uppercase(),
                b.to_ascii_uppercase(),
            ])),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        // Both bytes are ASCII letters by construction.
        std::str::from_utf8(&self.0).unwrap_or("ZZ")
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Common English names where ISO's formal name is long or awkward in a table
/// ("United Kingdom of Great Britain and Northern Ireland"), plus codes ISO does not assign
/// but GeoIP databases use.
const SHORT_NAMES: &[(&str, &str)] = &[
    ("ZZ", "Unknown"),
    ("XK", "Kosovo"),
    ("EU", "European Union"),
    ("AP", "Asia/Pacific Region"),
    ("BO", "Bolivia"),
    ("CD", "DR Congo"),
    ("FK", "Falkland Islands"),
    ("FM", "Micronesia"),
    ("GB", "United Kingdom"),
    ("IR", "Iran"),
    ("KP", "North Korea"),
    ("KR", "South Korea"),
    ("LA", "Laos"),
    ("MD", "Moldova"),
    ("MK", "North Macedonia"),
    ("PS", "Palestine"),
    ("RU", "Russia"),
    ("SY", "Syria"),
    ("TW", "Taiwan"),
    ("TZ", "Tanzania"),
    ("US", "United States"),
    ("VE", "Venezuela"),
    ("VN", "Vietnam"),
];

/// English short name of a country, for display. Codes nobody assigns get a descriptive
/// placeholder rather than an error: the code is still shown beside it.
pub fn country_name(code: &str) -> String {
    if let Some((_, name)) = SHORT_NAMES.iter().find(|(c, _)| *c == code) {
        return (*name).to_owned();
    }
    isocountry::CountryCode::for_alpha2(code)
        .map(|c| c.name().to_owned())
        .unwrap_or_else(|_| format!("Unknown ({code})"))
}

/// Continents by country code, as GeoNames (and so MaxMind's GeoIP2) assigns them.
const CONTINENTS: &[(&str, &str)] = &[
    (
        "Africa",
        "AO BF BI BJ BW CD CF CG CI CM CV DJ DZ EG EH ER ET GA GH GM GN GQ GW KE KM LR LS LY MA MG ML MR MU MW MZ NA NE NG RE RW SC SD SH SL SN SO SS ST SZ TD TG TN TZ UG YT ZA ZM ZW",
    ),
    ("Antarctica", "AQ BV GS HM TF"),
    (
        "Asia",
        "AE AF AM AP AZ BD BH BN BT CC CN CX GE HK ID IL IN IO IQ IR JO JP KG KH KP KR KW KZ LA LB LK MM MN MO MV MY NP OM PH PK PS QA SA SG SY TH TJ TL TM TR TW UZ VN YE",
    ),
    (
        "Europe",
        "AD AL AT AX BA BE BG BY CH CY CZ DE DK EE ES EU FI FO FR GB GG GI GR HR HU IE IM IS IT JE LI LT LU LV MC MD ME MK MT NL NO PL PT RO RS RU SE SI SJ SK SM UA VA XK",
    ),
    (
        "North America",
        "AG AI AW BB BL BM BQ BS BZ CA CR CU CW DM DO GD GL GP GT HN HT JM KN KY LC MF MQ MS MX NI PA PM PR SV SX TC TT US VC VG VI",
    ),
    (
        "Oceania",
        "AS AU CK FJ FM GU KI MH MP NC NF NR NU NZ PF PG PN PW SB TK TO TV UM VU WF WS",
    ),
    ("South America", "AR BO BR CL CO EC FK GF GY PE PY SR UY VE"),
];

/// The continent of a country code (`Unknown` for `ZZ` and codes without one).
/// Looked up for every event by the aggregator: a table by code, built once.
pub fn continent_of(code: &str) -> &'static str {
    static TABLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let slot = |c: &[u8]| usize::from(c[0] - b'A') * 26 + usize::from(c[1] - b'A');
    let table = TABLE.get_or_init(|| {
        let mut t = vec![u8::MAX; 26 * 26];
        for (i, (_, codes)) in CONTINENTS.iter().enumerate() {
            for c in codes.split(' ') {
                t[slot(c.as_bytes())] = i as u8;
            }
        }
        t
    });
    match code.as_bytes() {
        c @ [a, b] if a.is_ascii_uppercase() && b.is_ascii_uppercase() => table
            .get(slot(c))
            .and_then(|&i| CONTINENTS.get(usize::from(i)))
            .map_or("Unknown", |(name, _)| name),
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continents() {
        assert_eq!(continent_of("NL"), "Europe");
        assert_eq!(continent_of("US"), "North America");
        assert_eq!(continent_of("BR"), "South America");
        assert_eq!(continent_of("AU"), "Oceania");
        assert_eq!(continent_of("JP"), "Asia");
        assert_eq!(continent_of("ZA"), "Africa");
        assert_eq!(continent_of("AQ"), "Antarctica");
        assert_eq!(continent_of("ZZ"), "Unknown");
        assert_eq!(continent_of("nl"), "Unknown");
        // Every code is in one continent at most.
        let mut seen = std::collections::HashSet::new();
        for (_, codes) in CONTINENTS {
            for c in codes.split(' ') {
                assert!(c.len() == 2 && seen.insert(c), "{c}");
            }
        }
    }

    #[test]
    fn parse_and_names() {
        assert_eq!(
            CountryCode::parse("nl").map(|c| c.to_string()),
            Some("NL".into())
        );
        assert_eq!(CountryCode::parse("N1"), None);
        assert_eq!(CountryCode::parse("NLD"), None);
        assert_eq!(country_name("NL"), "Netherlands");
        assert_eq!(country_name("ZZ"), "Unknown");
        assert_eq!(country_name("GB"), "United Kingdom");
        assert_eq!(country_name("CH"), "Switzerland");
        assert_eq!(country_name("QQ"), "Unknown (QQ)");
    }
}
