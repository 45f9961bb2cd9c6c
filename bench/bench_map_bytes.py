"""What a colour change on the map sends: the base chart's spec as Streamlit sends it, per colouring.

A click sends a reference to the base (its spec is the same for every selection, bench_clicks.py); a new
"Colour by" choice changes the spec, so Streamlit sends all of it: `plotly.io.to_json(figure,
validate=False)`, as streamlit/elements/plotly_chart.py writes it into the chart's message. This measures
that string for each colouring, with the bytes of its largest fields, on the explorer's default map budget
(20,000 drawn points), without a server or a browser: bytes do not depend on the machine's load.

    python bench/bench_map_bytes.py --cache cache/demo --cache bench/out/synth262k
    python bench/bench_map_bytes.py --cache ... --before /tmp/before   # also another checkout's explorer

`--before DIR` measures DIR's explorer on the same caches in a subprocess (e.g. `git archive 9d936b3 | tar -x -C
/tmp/before`) and prints both, with the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENV_EXPLORER = "FEATUREGEOM_BENCH_EXPLORER"  # the checkout whose explorer is measured (--before's subprocess)
sys.path.insert(0, os.environ.get(ENV_EXPLORER) or str(REPO))

MAX_POINTS = 20000  # explorer/state.py max_points()'s default


def measure(cache: Path, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """{colouring: {"bytes": spec length, "fields": {field: bytes, largest first}}} for `cache`'s base map."""
    import plotly.io as pio
    from plotly.io.json import to_json_plotly

    from explorer import figures as F
    from explorer.data import load_cache

    c = load_cache(cache, verify=False)
    f = c.default_feature()
    nb = c.neighbours_of(f)
    sel = F.Selection(
        f, nb["feature"].tolist(), nb["cosine"].tolist(), nb["is_harmful"].tolist(), c.null_cosine
    )
    out: dict[str, Any] = {"n_features": c.n, "modes": {}}
    for mode in F.COLOR_MODES:
        layers = F.map_layers(c.features, mode, sel, max_points=max_points)
        # the chart a colour change sends in full besides the overlay: the base (two layers: base and
        # overlay), or the colours (three: colours, points, overlay; the points are sent with the page only)
        spec = pio.to_json(layers[0], validate=False)
        once = len(pio.to_json(layers[1], validate=False)) if len(layers) == 3 else None
        fields: dict[str, int] = {}
        for t in json.loads(spec)["data"]:
            for k, v in t.items():
                for name, part in v.items() if k == "marker" else [(None, v)]:
                    key = f"marker.{name}" if name else k
                    fields[key] = fields.get(key, 0) + len(to_json_plotly(part))
        top = dict(sorted(fields.items(), key=lambda kv: -kv[1])[:6])
        out["modes"][mode] = {"bytes": len(spec), "fields": top, "points_layer": once}
    return out


def _kb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e3:,.0f} kB"


def render(now: dict[str, Any], before: dict[str, Any] | None) -> str:
    lines = [
        "| cache | features | colour by | colour change now | before | before ÷ now | largest fields now | "
        "points layer (with the page) |",
        "|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for name, r in now.items():
        for mode, m in r["modes"].items():
            b = ((before or {}).get(name) or {}).get("modes", {}).get(mode, {}).get("bytes")
            fields = ", ".join(f"{k} {v / 1e3:.0f}" for k, v in m["fields"].items() if v >= 500)
            n = m["bytes"]
            was, ratio = ("–", "–") if b is None else (f"{b / 1e3:,.0f} kB", f"{b / n:.2f}×")
            lines.append(
                f"| {name} | {r['n_features']:,} | {mode} | {n / 1e3:,.0f} kB | {was} | {ratio} | {fields} | "
                f"{_kb(m.get('points_layer'))} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", action="append", default=[], type=Path, help="a cache directory (repeatable)")
    ap.add_argument("--before", type=Path, default=None, help="also measure this checkout's explorer")
    ap.add_argument("--json", action="store_true", help="print the measures as JSON (what --before reads)")
    args = ap.parse_args(argv)
    now = {p.name: measure(p) for p in args.cache}
    if args.json:
        print(json.dumps(now))
        return
    before = None
    if args.before is not None:
        cmd = [sys.executable, __file__, "--json", *[a for p in args.cache for a in ("--cache", str(p))]]
        env = {**os.environ, ENV_EXPLORER: str(args.before.resolve())}
        before = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    print(render(now, before))


if __name__ == "__main__":
    main()
