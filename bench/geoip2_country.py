#!/usr/bin/env python3
"""Writes a GeoIP2-Country-layout copy of the bundled country database, for GoAccess.

GoAccess (--geoip-database) reads MaxMind's layout, `{"country": {"iso_code": …, "names":
{"en": …}}, "continent": {"code": …}}`; the bundled db-ip database (data/dbip-country.mmdb, CC
BY 4.0, see data/DBIP-LICENSE) has `{"country_code": …}`. So that GoAccess does the same
lookup work as pageviews in the benchmark, every network of the bundled database is written
again in MaxMind's layout. Needs `pip install mmdb-writer maxminddb netaddr`.

Usage: bench/geoip2_country.py OUT.mmdb
"""

import sys
from pathlib import Path

import maxminddb
from mmdb_writer import MMDBWriter
from netaddr import IPSet

ROOT = Path(__file__).resolve().parent.parent


def main(out):
    reader = maxminddb.open_database(str(ROOT / "data" / "dbip-country.mmdb"))
    by_country = {}
    for network, record in reader:
        code = (record or {}).get("country_code")
        if code:
            by_country.setdefault(code, []).append(str(network))
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-Country",
                        languages=["en"], description="pageviews bench: db-ip country, CC BY 4.0")
    for code, networks in by_country.items():
        writer.insert_network(IPSet(networks), {"country": {"iso_code": code, "names": {"en": code}},
                                                "continent": {"code": "--"}})
    writer.to_db_file(out)


if __name__ == "__main__":
    main(sys.argv[1])
