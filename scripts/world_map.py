#!/usr/bin/env python3
"""Builds data/world-110m.json, the dashboard's world map, from the Natural Earth 1:110m
country outlines as TopoJSON (world-atlas's countries-110m.json, Natural Earth 5.1.2, public
domain): one SVG path per country (ISO 3166-1 alpha-2), in the Equal Earth projection,
rounded to 0.1 unit of a 1000-unit-wide view box. Antarctica is left out (no one browses
from it, and it takes a fifth of the height).

Usage: scripts/world_map.py countries-110m.json > data/world-110m.json
"""
import json
import math
import sys

A1, A2, A3, A4 = 1.340264, -0.081106, 0.000893, 0.003796
M = math.sqrt(3) / 2


def equal_earth(lon, lat):
    lam, phi = math.radians(lon), math.radians(lat)
    t = math.asin(M * math.sin(phi))
    t2 = t * t
    t6 = t2 * t2 * t2
    x = lam * math.cos(t) / (M * (A1 + 3 * A2 * t2 + t6 * (7 * A3 + 9 * A4 * t2)))
    y = t * (A1 + A2 * t2 + t6 * (A3 + A4 * t2))
    return x, y


def main():
    topo = json.load(open(sys.argv[1]))
    sx, sy = topo["transform"]["scale"]
    tx, ty = topo["transform"]["translate"]
    arcs = []
    for arc in topo["arcs"]:
        x = y = 0
        pts = []
        for dx, dy in arc:
            x += dx
            y += dy
            pts.append((x * sx + tx, y * sy + ty))
        arcs.append(pts)

    def ring(indices):
        out = []
        for i in indices:
            pts = arcs[i] if i >= 0 else arcs[~i][::-1]
            out.extend(pts if not out else pts[1:])
        return out

    xmax, ymax = equal_earth(180, 0)[0], equal_earth(0, 90)[1]
    width = 1000.0
    scale = width / (2 * xmax)
    ymin_lat = -60  # Antarctica left out: the map ends at 60 degrees south
    top = ymax * scale
    bottom = -equal_earth(0, ymin_lat)[1] * scale
    # Natural Earth has no ISO code for a few countries (France, Norway: -99) and writes
    # Taiwan as CN-TW: those take the alpha-2 of their ISO alpha-3 or numeric code, from
    # Debian's iso-codes (the list the GeoIP databases use).
    iso = json.load(open("/usr/share/iso-codes/json/iso_3166-1.json"))["3166-1"]
    by_a3 = {c["alpha_3"]: c["alpha_2"] for c in iso}
    by_n3 = {c["numeric"]: c["alpha_2"] for c in iso}
    countries = []
    for g in topo["objects"]["countries"]["geometries"]:
        props = g.get("properties", {})
        code = props.get("isoA2") or ""
        if not (len(code) == 2 and code.isalpha()):
            code = by_a3.get(props.get("isoA3") or props.get("adm0A3") or "") or by_n3.get(
                props.get("isoN3") or g.get("id") or "", "")
        if not code or code == "AQ" or "arcs" not in g:
            continue
        polygons = g["arcs"] if g["type"] == "MultiPolygon" else [g["arcs"]]
        d = []
        for polygon in polygons:
            for r in polygon:
                pts = ring(r)
                # A ring across the antimeridian (Fiji) would be drawn across the whole map:
                # its western longitudes are moved past 180 and held at the edge.
                if any(abs(a[0] - b[0]) > 180 for a, b in zip(pts, pts[1:])):
                    pts = [(min(180.0, lon + 360 if lon < 0 else lon), lat) for lon, lat in pts]
                cmds = []
                prev = None
                for lon, lat in pts:
                    x, y = equal_earth(lon, lat)
                    p = (round(x * scale + width / 2, 1), round(top - y * scale, 1))
                    if p != prev:
                        cmds.append(p)
                        prev = p
                if len(cmds) < 3:
                    continue
                d.append("M" + "L".join(f"{x:g},{y:g}" for x, y in cmds) + "Z")
        if d:
            countries.append({"code": code, "name": props.get("name", code), "d": "".join(d)})
    countries.sort(key=lambda c: c["code"])
    out = {
        "source": "Natural Earth 1:110m Admin 0 countries, version 5.1.2 (public domain), via world-atlas countries-110m.json; Equal Earth projection",
        "view_box": f"0 0 {width:g} {round(top + bottom, 1):g}",
        "countries": countries,
    }
    json.dump(out, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
