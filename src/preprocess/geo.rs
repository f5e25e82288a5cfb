//! IP address → country, from a MaxMind DB (`.mmdb`) file.

use std::borrow::Cow;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::countries::CountryCode;

/// The database shipped in the repository (DB-IP Lite Country, CC BY 4.0, see `data/`),
/// compiled into the binary: a copied or `cargo install`ed binary, or one deployed to another
/// machine, resolves countries without the source tree or a `--geoip` file (8 MB).
pub static BUNDLED_DB: &[u8] = include_bytes!("../../data/dbip-country.mmdb");

/// Why a GeoIP database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error(
        "cannot open GeoIP database {path}: {source} (pass --geoip with a country or city .mmdb file)"
    )]
    Open {
        path: PathBuf,
        source: maxminddb::MaxMindDbError,
    },
}

/// A loaded country database. Lookups are lock-free and safe to share between threads.
pub struct GeoDb {
    /// Borrowed for the bundled database, owned for a `--geoip` file.
    reader: maxminddb::Reader<Cow<'static, [u8]>>,
}

/// One record, in either of the two layouts in the wild: ip-location-db/DB-IP
/// (`{"country_code": "NL"}`) and MaxMind GeoLite2/GeoIP2 Country or City
/// (`{"country": {"iso_code": "NL"}, "registered_country": {...}}`).
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    country_code: Option<&'a str>,
    #[serde(borrow)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow)]
    registered_country: Option<IsoCode<'a>>,
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
}

impl GeoDb {
    /// Opens the file at `path` (read fully into memory: country databases are a few MB).
    pub fn open(path: &Path) -> Result<GeoDb, GeoError> {
        let open_err = |source| GeoError::Open {
            path: path.to_owned(),
            source,
        };
        let bytes = std::fs::read(path).map_err(|e| open_err(maxminddb::MaxMindDbError::Io(e)))?;
        maxminddb::Reader::from_source(Cow::Owned(bytes))
            .map(|reader| GeoDb { reader })
            .map_err(open_err)
    }

    /// The bundled DB-IP database.
    pub fn bundled() -> Result<GeoDb, GeoError> {
        maxminddb::Reader::from_source(Cow::Borrowed(BUNDLED_DB))
            .map(|reader| GeoDb { reader })
            .map_err(|source| GeoError::Open {
                path: PathBuf::from("<bundled DB-IP database>"),
                source,
            })
    }

    /// Country of a client address as written in the log; `ZZ` for host names, private or
    /// unassigned addresses and anything the database has no country for.
    pub fn country_of(&self, host: &str) -> CountryCode {
        host.parse::<IpAddr>()
            .ok()
            .and_then(|ip| self.lookup(ip))
            .unwrap_or(CountryCode::UNKNOWN)
    }

    fn lookup(&self, ip: IpAddr) -> Option<CountryCode> {
        let record: Record<'_> = self.reader.lookup(ip).ok()??;
        let code = record
            .country_code
            .or_else(|| record.country.and_then(|c| c.iso_code))
            .or_else(|| record.registered_country.and_then(|c| c.iso_code))?;
        CountryCode::parse(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_db_resolves_known_addresses() {
        let db = GeoDb::bundled().unwrap();
        // Registry and resolver addresses whose country is stable in DB-IP's data.
        assert_eq!(db.country_of("8.8.8.8").as_str(), "US");
        assert_eq!(db.country_of("193.0.6.139").as_str(), "NL"); // RIPE NCC
        assert_eq!(db.country_of("2001:67c:2e8::2").as_str(), "NL"); // RIPE NCC, IPv6
        assert_eq!(db.country_of("202.12.29.205").as_str(), "AU"); // APNIC
        assert_eq!(db.country_of("81.2.69.142").as_str(), "GB");
        assert_eq!(db.country_of("10.1.2.3").as_str(), "ZZ");
        assert_eq!(db.country_of("::1").as_str(), "ZZ");
        assert_eq!(db.country_of("not-an-ip.example").as_str(), "ZZ");
    }

    #[test]
    fn maxmind_layout_with_registered_country_fallback() {
        // A GeoLite2-style database written here: `country.iso_code`, and one network that
        // only has `registered_country`.
        let db = mmdb::write(&[
            ([8, 8, 8, 0], 24, mmdb::country_map("country", "US")),
            (
                [1, 1, 1, 0],
                24,
                mmdb::country_map("registered_country", "AU"),
            ),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("geolite2-layout.mmdb");
        std::fs::write(&path, db).unwrap();
        let geo = GeoDb::open(&path).unwrap();
        assert_eq!(geo.country_of("8.8.8.8").as_str(), "US");
        assert_eq!(geo.country_of("1.1.1.1").as_str(), "AU");
        assert_eq!(geo.country_of("9.9.9.9").as_str(), "ZZ");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = GeoDb::open(Path::new("/nonexistent/geo.mmdb"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/geo.mmdb"), "{err}");
    }
}

/// A minimal MaxMind DB writer (IPv4 tree, 24-bit records), for testing the GeoLite2 layout
/// without shipping a MaxMind file.
#[cfg(test)]
mod mmdb {
    /// `{ key: { "iso_code": code } }` in MaxMind DB data encoding.
    pub fn country_map(key: &str, code: &str) -> Vec<u8> {
        let mut v = vec![0xE1];
        v.extend(string(key));
        v.push(0xE1);
        v.extend(string("iso_code"));
        v.extend(string(code));
        v
    }

    fn string(s: &str) -> Vec<u8> {
        let mut v = vec![0x40 | s.len() as u8];
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn uint32(n: u32) -> Vec<u8> {
        let mut v = vec![0xC4];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }

    #[derive(Clone, Copy)]
    enum Rec {
        Empty,
        Node(usize),
        Data(usize),
    }

    pub fn write(networks: &[([u8; 4], u32, Vec<u8>)]) -> Vec<u8> {
        let mut nodes: Vec<[Rec; 2]> = vec![[Rec::Empty, Rec::Empty]];
        let mut data = Vec::new();
        for (ip, prefix, record) in networks {
            let offset = data.len();
            data.extend_from_slice(record);
            let bits = u32::from_be_bytes(*ip);
            let mut node = 0;
            for depth in 0..*prefix {
                let bit = ((bits >> (31 - depth)) & 1) as usize;
                if depth + 1 == *prefix {
                    nodes[node][bit] = Rec::Data(offset);
                } else {
                    node = match nodes[node][bit] {
                        Rec::Node(n) => n,
                        _ => {
                            nodes.push([Rec::Empty, Rec::Empty]);
                            nodes[node][bit] = Rec::Node(nodes.len() - 1);
                            nodes.len() - 1
                        }
                    };
                }
            }
        }
        let count = nodes.len();
        let mut out = Vec::new();
        for n in &nodes {
            for r in n {
                let v = match *r {
                    Rec::Empty => count,
                    Rec::Node(i) => i,
                    Rec::Data(off) => count + 16 + off,
                } as u32;
                out.extend_from_slice(&v.to_be_bytes()[1..]);
            }
        }
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&data);
        out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
        out.push(0xE9); // map of 9 entries
        for (k, v) in [
            ("binary_format_major_version", uint32(2)),
            ("binary_format_minor_version", uint32(0)),
            ("build_epoch", uint32(1_700_000_000)),
            ("ip_version", uint32(4)),
            ("node_count", uint32(count as u32)),
            ("record_size", uint32(24)),
        ] {
            out.extend(string(k));
            out.extend(v);
        }
        out.extend(string("database_type"));
        out.extend(string("GeoLite2-Country"));
        out.extend(string("description"));
        out.push(0xE0);
        out.extend(string("languages"));
        out.extend_from_slice(&[0x00, 0x04]); // empty array (extended type 11)
        out
    }
}
