//! ISO 3166-1 alpha-2 country codes: validation, names and flags for the dashboard.

use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::*;

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
