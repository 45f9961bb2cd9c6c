"""Benchmark the map's clicks in a real browser: fragments (only what depends on a click reruns) against
the whole page rerunning (FEATUREGEOM_NO_FRAGMENTS=1), on the same cache and machine.

    python bench/bench_clicks.py --cache cache/demo --cache bench/out/synth262k --repeats 7

Per cache and mode, medians over `--repeats` interactions of a `streamlit run` server driven by Chromium
(/usr/bin/chromium, headless, software WebGL):
  * click: a click on a dot of the map until the side panel shows the clicked feature ("panel"), and
    until the map has redrawn with it selected ("map");
  * colour: a new "Colour by" choice until the map shows the new colouring;
  * switch: a feature id typed into the search box until the side panel shows it;
  * bytes: what the server sent over the websocket per click, and how the run ended (a fragment run or
    the whole script).
The server-side time of a switch is bench_explorer.py's AppTest *switch (map)* column (AppTest runs the
whole page: an upper bound for a fragment run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OUT = REPO / "bench" / "out"
MODES = {"fragments": {}, "full page": {"FEATUREGEOM_NO_FRAGMENTS": "1"}}
BEFORE = "before"  # --before DIR: the same measures on another checkout's explorer (e.g. an older commit)
HEADER = "Feature #{}"

# points of the map's base layer at least `gap` pixels from every other drawn point, so a click lands on
# exactly that one: [[feature, x, y], ...] in page coordinates
_ISOLATED_POINTS_JS = """([k, gap, avoid]) => {
  const BASE_PLOT = '.st-key-map_chart .js-plotly-plot';
  const gd = document.querySelector(BASE_PLOT);
  const L = gd._fullLayout, r = gd.getBoundingClientRect();
  const px = (t, i) => [r.left + L._size.l + L.xaxis.l2p(t.x[i]), r.top + L._size.t + L.yaxis.l2p(t.y[i])];
  const all = [];
  for (const t of gd._fullData) {
    if (!t.x || t.visible === false) continue;
    for (let i = 0; i < t.x.length; i++) all.push(px(t, i));
  }
  const base = gd._fullData.filter(t => t.customdata && t.mode === 'markers')
    .sort((a, b) => b.customdata.length - a.customdata.length)[0];
  const out = [];
  const n = base.customdata.length;
  for (let j = 0; j < n && out.length < k; j++) {
    const i = Math.floor((j * 7919) % n), id = base.customdata[i], p = px(base, i);
    const cd = Array.isArray(id) ? id[0] : id;
    if (avoid.includes(cd) || p[0] < r.left + L._size.l + 5 || p[1] < r.top + L._size.t + 5) continue;
    if (p[0] > r.left + L._size.l + L._size.w - 5 || p[1] > r.top + L._size.t + L._size.h - 5) continue;
    let near = 0;
    for (const q of all) if (Math.abs(q[0] - p[0]) < gap && Math.abs(q[1] - p[1]) < gap) near++;
    if (near <= 1) out.push([cd, p[0], p[1]]);
  }
  return out; }"""


class WsRecorder:
    """Bytes the server sends over Streamlit's websocket, how each script run ends (decoded
    ForwardMsg.script_finished: 0 the whole script, 3 a fragment run), the charts sent in full (their
    trace names and spec sizes) and the messages sent as a reference to one the browser has cached."""

    def __init__(self, page: Any) -> None:
        self.bytes = 0
        self.finished: list[int] = []
        self.charts: list[tuple[list[str], int]] = []
        self.refs = 0
        page.on("websocket", lambda ws: ws.on("framereceived", self._frame))

    def _frame(self, payload: Any) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        if isinstance(payload, str):
            return
        self.bytes += len(payload)
        try:
            msg = ForwardMsg.FromString(payload)
        except Exception:  # a frame that is not a ForwardMsg counts as bytes only
            return
        kind = msg.WhichOneof("type")
        if kind == "script_finished":
            self.finished.append(int(msg.script_finished))
        elif kind == "ref_hash":
            self.refs += 1
        elif kind == "delta" and msg.delta.new_element.WhichOneof("type") == "plotly_chart":
            spec = msg.delta.new_element.plotly_chart.spec
            names = [str(t.get("name", "")) for t in json.loads(spec).get("data", [])]
            self.charts.append((names, len(spec)))

    def reset(self) -> None:
        self.bytes = 0
        self.finished = []
        self.charts = []
        self.refs = 0


def map_ready(page: Any, name: str | None = None) -> None:
    """Wait until the map is drawn (and, with `name`, has a trace of that name in its base or its
    selection overlay)."""
    page.wait_for_function(
        """(name) => { const gd = document.querySelector('.st-key-map_chart .js-plotly-plot');
            return !!(gd && gd.data && gd._fullLayout && gd._fullLayout.xaxis)
                && (!name || [...document.querySelectorAll('.js-plotly-plot')]
                    .some(g => (g.data || []).some(t => t.name === name))); }""",
        arg=name,
        timeout=300000,
    )


def isolated_points(page: Any, k: int, avoid: list[int]) -> list[tuple[int, float, float]]:
    """Up to k isolated dots inside the viewport (the map is scrolled into view first)."""
    for attempt in range(3):  # the chart may be replaced by a redraw under our feet: find it again
        map_ready(page)
        try:
            page.locator(".st-key-map_chart .js-plotly-plot").scroll_into_view_if_needed(timeout=10000)
            break
        except Exception:
            if attempt == 2:
                raise
    page.wait_for_timeout(200)
    vw, vh = page.viewport_size["width"], page.viewport_size["height"]
    pts = page.evaluate(_ISOLATED_POINTS_JS, [k * 20, 7, avoid])
    inside = [(int(f), float(x), float(y)) for f, x, y in pts if 5 < x < vw - 5 and 5 < y < vh - 5]
    return inside[:k]


def click_dot(page: Any, rec: WsRecorder, seen: list[int]) -> dict[str, Any] | None:
    """Click an isolated dot not clicked before (a figure sent before is only referenced by Streamlit's
    message cache, which would flatter the map); time until the panel shows it and until the map has it
    selected."""
    from playwright.sync_api import expect

    from tests.explorer.helpers import wait_for_app

    pts = isolated_points(page, 1, seen)
    if not pts:
        return None
    f, x, y = pts[0]
    page.mouse.move(x, y)
    page.wait_for_timeout(150)
    rec.reset()
    t0 = time.perf_counter()
    page.mouse.click(x, y)
    expect(page.get_by_text(HEADER.format(f), exact=True)).to_be_visible(timeout=300000)
    t_panel = time.perf_counter() - t0
    map_ready(page, f"selected #{f}")
    t_map = time.perf_counter() - t0
    wait_for_app(page, timeout=300000)
    return {"feature": f, "panel": t_panel, "map": t_map, "bytes": rec.bytes, "runs": list(rec.finished)}


def change_colour(page: Any, mode: str, rec: WsRecorder | None = None) -> float:
    """Seconds from a new "Colour by" choice until the map shows it; `rec` (reset here) then holds its bytes."""
    from tests.explorer.helpers import wait_for_app

    if rec is not None:
        rec.reset()
    t0 = time.perf_counter()
    page.get_by_label("Colour by").click()
    page.get_by_role("option", name=mode, exact=True).click()
    map_ready(page, mode if mode != "harm category" else None)
    dt = time.perf_counter() - t0
    wait_for_app(page, timeout=300000)
    return dt


def switch_by_search(page: Any, f: int) -> float:
    from playwright.sync_api import expect

    from tests.explorer.helpers import wait_for_app

    box = page.get_by_label("Search features", exact=True)
    t0 = time.perf_counter()
    box.fill(str(f))
    box.press("Enter")
    expect(page.get_by_text(HEADER.format(f), exact=True)).to_be_visible(timeout=300000)
    dt = time.perf_counter() - t0
    wait_for_app(page, timeout=300000)
    return dt


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def bench_mode(
    cache: Path, env: dict[str, str], repeats: int, start: int, others: list[int], app: Path | None = None
) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from tests.explorer import helpers
    from tests.explorer.helpers import launch_chromium, streamlit_server, wait_for_app

    res: dict[str, Any] = {}
    if app is not None:  # streamlit_server runs helpers.APP
        helpers.APP = app
    with streamlit_server(
        cache, reviews=OUT / "bench-reviews" / "clicks.sqlite", log_dir=OUT, env=env
    ) as srv:
        with sync_playwright() as p:
            b = launch_chromium(p)
            page = b.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(300000)
            rec = WsRecorder(page)
            page.goto(srv.url + f"/?feature={start}")
            wait_for_app(page, timeout=300000)
            map_ready(page)
            clicks, seen = [], [start]
            for _ in range(repeats):
                c = click_dot(page, rec, seen)
                if c is None:
                    break
                clicks.append(c)
                seen.append(c["feature"])
            current = seen[-1]
            res["click_panel_s"] = _median([c["panel"] for c in clicks])
            res["click_map_s"] = _median([c["map"] for c in clicks])
            res["click_bytes"] = _median([float(c["bytes"]) for c in clicks])
            res["click_runs"] = [c["runs"] for c in clicks]
            res["clicks"] = clicks
            url_ok = f"feature={current}" in page.url
            res["url_follows_click"] = url_ok
            modes = ["task score", "firing rate", "harm score"]
            colours = []
            for i in range(repeats):
                colours.append((change_colour(page, modes[i % 3], rec), float(rec.bytes)))
            res["colour_s"] = _median([dt for dt, _ in colours])
            res["colour_bytes"] = _median([b for _, b in colours])
            res["switch_s"] = _median(
                [switch_by_search(page, others[i % len(others)]) for i in range(repeats)]
            )
            b.close()
    helpers.APP = helpers.REPO / "explorer" / "app.py"
    return res


def server_switch(cache: Path, feats: list[int]) -> float:
    """Median server time to show another feature on the map (search box), AppTest (no browser). AppTest
    always runs the whole page (explorer/views/map.py fragments_on), so this bounds a fragment run."""
    from streamlit.testing.v1 import AppTest

    from explorer.views import page_file

    os.environ["FEATUREGEOM_CACHE"] = str(cache)
    os.environ["FEATUREGEOM_REVIEWS"] = str(OUT / "bench-reviews")
    at = AppTest.from_file(str(REPO / "explorer" / "app.py"), default_timeout=600)
    at.query_params["feature"] = str(feats[0])
    at.switch_page(page_file("map"))
    at.run()
    times = []
    for f in feats[1:]:
        t0 = time.perf_counter()
        at.text_input(key="map_q").input(str(f)).run()
        times.append(time.perf_counter() - t0)
        if at.exception or f"Feature #{f}" not in "".join(str(h.proto.body) for h in at.html):
            raise RuntimeError(f"the map did not switch to #{f}")
    return statistics.median(times)


def server_switch_child(cache: Path, feats: list[int]) -> float:
    """server_switch() in a fresh process (AppTest and st.cache_resource state stay per cache)."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from bench.bench_clicks import server_switch; "
        f"from pathlib import Path; print('RESULT', server_switch(Path({str(cache)!r}), {feats!r}))"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=3600)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"AppTest switch failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return float(line.split()[1])


def bench_cache(cache: Path, repeats: int, before: Path | None = None) -> dict[str, Any]:
    from explorer.data import load_cache

    c = load_cache(cache, verify=False)
    ov = c.overlaps.sort_values("risk", ascending=False)
    feats = [int(f) for f in ov["task_feature"].drop_duplicates().head(repeats + 1)]
    while len(feats) < repeats + 1:
        feats.append(int((len(feats) * 7919) % c.n))
    out: dict[str, Any] = {"n_features": c.n}
    del c
    out["server_switch_s"] = server_switch_child(cache, feats)
    print(f"  server switch (AppTest) {out['server_switch_s'] * 1000:.0f} ms", flush=True)
    modes: dict[str, tuple[dict[str, str], Path | None]] = {m: (e, None) for m, e in MODES.items()}
    if before is not None:
        modes[BEFORE] = ({}, before / "explorer" / "app.py")
    for mode, (env, app) in modes.items():
        print(f"  {mode}", flush=True)
        load = os.getloadavg()[0]
        out[mode] = bench_mode(cache, env, repeats, feats[0], feats[1:], app)
        out[mode]["loadavg"] = [load, os.getloadavg()[0]]
        print("   ", json.dumps({k: v for k, v in out[mode].items() if k != "clicks"}), flush=True)
    return out


def _ms(s: float | None) -> str:
    return "–" if s is None else (f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s")


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{b / a:.1f}×"


def render_markdown(results: dict[str, Any], cmd: str, note: str = "") -> str:
    lines = [
        "## Explorer clicks",
        "",
        f"Measured {results['date']} with `{cmd}` ({os.cpu_count()} cores). Real `streamlit run` server "
        "driven by headless Chromium (software WebGL), median of the repeats. *fragments*: a click reruns "
        "only the side panel and the map (`st.fragment`); *full page*: `FEATUREGEOM_NO_FRAGMENTS=1`, "
        "every click reruns the whole page; *before*: `--before`'s checkout, same cache and browser. Bytes "
        "per click: what the websocket carried from the click until the page was idle. Goal: click → panel "
        "< 1 s at 4k features, < 2 s at 262k.",
    ]
    if note:
        lines += ["", note]
    lines += [
        "",
        "| cache | features | mode | click → panel | click → map redrawn | colour change | switch (search) | bytes per click | bytes per colour change | server switch (AppTest) | load avg |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["caches"].items():
        for mode in [*MODES, BEFORE]:
            if mode not in r:
                continue
            m = r[mode]
            la = m.get("loadavg") or [float("nan")] * 2
            kb, ckb = m.get("click_bytes"), m.get("colour_bytes")
            lines.append(
                f"| {name} | {r['n_features']:,} | {mode} | {_ms(m.get('click_panel_s'))} | "
                f"{_ms(m.get('click_map_s'))} | {_ms(m.get('colour_s'))} | {_ms(m.get('switch_s'))} | "
                f"{'–' if kb is None else f'{kb / 1024:.0f} kB'} | {'–' if ckb is None else f'{ckb / 1024:.0f} kB'} | "
                f"{_ms(r.get('server_switch_s')) if mode == 'full page' else ''} | {la[0]:.1f}–{la[1]:.1f} |"
            )
        f, g = r.get("fragments") or {}, r.get("full page") or {}
        lines.append(
            f"| {name} | | full page ÷ fragments | {_ratio(f.get('click_panel_s'), g.get('click_panel_s'))} | "
            f"{_ratio(f.get('click_map_s'), g.get('click_map_s'))} | {_ratio(f.get('colour_s'), g.get('colour_s'))} | "
            f"{_ratio(f.get('switch_s'), g.get('switch_s'))} | | | | |"
        )
        if BEFORE in r:
            o = r[BEFORE]
            lines.append(
                f"| {name} | | before ÷ fragments | {_ratio(f.get('click_panel_s'), o.get('click_panel_s'))} | "
                f"{_ratio(f.get('click_map_s'), o.get('click_map_s'))} | {_ratio(f.get('colour_s'), o.get('colour_s'))} | "
                f"{_ratio(f.get('switch_s'), o.get('switch_s'))} | | {_ratio(f.get('colour_bytes'), o.get('colour_bytes'))} | | |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", action="append", default=[], help="a cache directory (repeatable)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[], help="synthetic caches of N features")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--readme", action="store_true", help="write the '## Explorer clicks' section")
    ap.add_argument("--note", default="", help="a line under the table's caption (e.g. 'loaded machine')")
    ap.add_argument(
        "--before",
        type=Path,
        default=None,
        help="also bench this checkout's explorer as row 'before', e.g. "
        "`git archive 7f459dd | tar -x -C /tmp/before` (the code before instant clicks)",
    )
    args = ap.parse_args(argv)
    from bench.bench_explorer import synthetic, write_readme

    caches = {Path(c).name: Path(c) for c in args.cache}
    for n in args.sizes:
        p = synthetic(n)
        caches[p.name] = p
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "caches": {}}
    for name, path in caches.items():
        print(f"== {name}", flush=True)
        results["caches"][name] = bench_cache(path, args.repeats, args.before)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "clicks-bench.json").write_text(json.dumps(results, indent=2))
    cmd = "python bench/bench_clicks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = render_markdown(results, cmd.strip(), args.note)
    print(md)
    if args.readme:
        write_readme(md, "## Explorer clicks")


if __name__ == "__main__":
    main()
