"""Benchmark the explorer: first render per page, feature-switch time, server memory with 1 and 10 sessions.

    python bench/bench_explorer.py                       # synthetic 2k, 16k and 262k caches
    python bench/bench_explorer.py --cache cache/demo    # add a real cache (e.g. the demo)
    python bench/bench_explorer.py --sizes 2000 --no-browser --no-readme

Measures, per cache:
  * load: one-time cache load (checksums + arrays) in a fresh process;
  * AppTest first render of each page (cold = first page in a fresh process, includes the load; warm =
    cache already loaded) and server-side time to switch features (search box on the map; id box on
    the feature page), median of N;
  * a real `streamlit run` server driven by Chromium: time until each page has finished rendering,
    browser-measured time to switch features, and the server's RSS idle, with 1 session and with 10
    concurrent sessions (arrays are loaded once per process and shared, so 10 sessions should cost
    little more than 1).
Results go to bench/out/explorer-bench.json and the `## Explorer` section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from explorer.views import page_file  # noqa: E402
from precompute import schema  # noqa: E402

OUT = REPO / "bench" / "out"
APP = str(REPO / "explorer" / "app.py")
TIMED_PAGES = ("map", "feature", "overlaps", "story")  # the cache-heavy pages (explorer/views)


def synthetic(n: int) -> Path:
    from bench.synthetic_cache import write_synthetic_cache

    path = OUT / (f"synth{round(n / 1000)}k" if n >= 10000 else f"synth{n}")
    if not (path / schema.MANIFEST).is_file():
        t = time.perf_counter()
        write_synthetic_cache(path, n_features=n, d=64, seed=0)
        print(f"  generated {path} in {time.perf_counter() - t:.1f} s", flush=True)
    return path


# ---------------------------------------------------------------------------------------------------
# AppTest (runs in a child process per cache so 'cold' really is cold)


def _apptest_child(cache: str, repeats: int) -> dict[str, Any]:
    os.environ["FEATUREGEOM_CACHE"] = cache
    os.environ["FEATUREGEOM_REVIEWS"] = str(OUT / "bench-reviews")
    from streamlit.testing.v1 import AppTest

    from explorer.data import load_cache

    res: dict[str, Any] = {}
    t = time.perf_counter()
    load_cache(cache)  # what st.cache_resource does once per server process
    res["load_s"] = time.perf_counter() - t

    def page_run(page: str, **qp: str) -> tuple[float, AppTest]:
        at = AppTest.from_file(APP, default_timeout=300)
        for k, v in qp.items():
            at.query_params[k] = v
        at.switch_page(page)
        t0 = time.perf_counter()
        at.run()
        dt = time.perf_counter() - t0
        if at.exception:
            raise RuntimeError(f"{page}: {at.exception[0].value}")
        return dt, at

    # cold: the first page in this process pays the cache load inside st.cache_resource
    res["cold_first_render_s"], _ = page_run(page_file("map"))
    c = load_cache(cache)
    ov = c.overlaps.sort_values("risk", ascending=False)
    feats = [int(f) for f in ov["task_feature"].drop_duplicates().head(repeats + 1)]
    while len(feats) < repeats + 1:
        feats.append(int(len(feats) * 7919 % c.n))
    warm: dict[str, float] = {}
    for name in TIMED_PAGES:
        times = [page_run(page_file(name), feature=str(feats[0]))[0] for _ in range(3)]
        warm[name] = statistics.median(times)
    res["warm_first_render_s"] = warm

    # switching features: the map's search box, and the feature page's id box
    _, at = page_run(page_file("map"), feature=str(feats[0]))
    sw = []
    for f in feats[1:]:
        t0 = time.perf_counter()
        at.text_input(key="map_q").input(str(f)).run()
        sw.append(time.perf_counter() - t0)
        assert f"Feature #{f}" in "".join(str(h.proto.body) for h in at.html), f
    res["switch_map_s"] = {"median": statistics.median(sw), "max": max(sw), "n": len(sw)}
    _, at = page_run(page_file("feature"), feature=str(feats[0]))
    sw = []
    cur = feats[0]
    for f in feats[1:]:
        t0 = time.perf_counter()
        at.number_input(key=f"feat_jump:{cur}").set_value(f).run()
        sw.append(time.perf_counter() - t0)
        cur = f
    res["switch_feature_page_s"] = {"median": statistics.median(sw), "max": max(sw), "n": len(sw)}
    return res


def apptest(cache: Path, repeats: int) -> dict[str, Any]:
    code = (
        f"import json,sys; sys.path.insert(0, {str(REPO)!r}); from bench.bench_explorer import _apptest_child;"
        f"print('RESULT' + json.dumps(_apptest_child({str(cache)!r}, {repeats})))"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=3600)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"AppTest bench failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[6:])


# ---------------------------------------------------------------------------------------------------
# real server + Chromium


def browser(cache: Path, sessions: int) -> dict[str, Any]:
    import psutil
    from playwright.sync_api import sync_playwright

    from explorer.data import load_cache
    from tests.explorer.helpers import launch_chromium, streamlit_server, wait_for_app

    c = load_cache(cache, verify=False)
    ov = c.overlaps.sort_values("risk", ascending=False)
    feats = [int(f) for f in ov["task_feature"].drop_duplicates().head(12)] or [0, 1, 2]
    t, h = c.default_pair() or (feats[0], feats[0] + 1)
    del c
    res: dict[str, Any] = {}
    with streamlit_server(cache, reviews=OUT / "bench-reviews" / "browser.sqlite", log_dir=OUT) as srv:
        proc = psutil.Process(srv.pid)
        time.sleep(1.0)
        res["rss_idle_mib"] = proc.memory_info().rss / 2**20
        with sync_playwright() as p:
            b = launch_chromium(p)
            ctx = b.new_context(viewport={"width": 1500, "height": 1100})
            page = ctx.new_page()
            page.set_default_timeout(300000)
            first: dict[str, float] = {}
            urls = {
                "map": f"/?feature={t}",
                "feature": f"/feature?feature={t}",
                "overlaps": f"/overlaps?task={t}&harmful={h}",
                "story": f"/story?task={t}&harmful={h}&step=2",
            }
            for name, url in urls.items():
                t0 = time.perf_counter()
                page.goto(srv.url + url)
                wait_for_app(page, timeout=300000)
                if name in ("map", "story"):
                    page.wait_for_function("() => document.querySelector('.js-plotly-plot .main-svg')")
                first[name] = time.perf_counter() - t0
            res["browser_first_render_s"] = first  # the map's includes loading the cache
            again = {}
            for name, url in urls.items():
                t0 = time.perf_counter()
                page.goto(srv.url + url)
                wait_for_app(page, timeout=300000)
                again[name] = time.perf_counter() - t0
            res["browser_reload_s"] = again
            res["rss_1_session_mib"] = proc.memory_info().rss / 2**20
            # switch features with the search box, timed in the browser until the new header shows
            page.goto(srv.url + f"/?feature={feats[0]}")
            wait_for_app(page, timeout=300000)
            sw = []
            box = page.get_by_label("Search features", exact=True)
            for f in feats[1:8]:
                t0 = time.perf_counter()
                box.fill(str(f))
                box.press("Enter")
                page.get_by_text(f"Feature #{f}", exact=True).wait_for()
                wait_for_app(page, timeout=300000)
                sw.append(time.perf_counter() - t0)
            res["browser_switch_s"] = {"median": statistics.median(sw), "max": max(sw), "n": len(sw)}
            # 10 concurrent sessions, each on the map with its own feature, then the feature page
            pages = []
            for _ in range(sessions):
                cx = b.new_context(viewport={"width": 1400, "height": 1000})
                pg = cx.new_page()
                pg.set_default_timeout(600000)
                pages.append((cx, pg))
            t0 = time.perf_counter()
            for i, (_, pg) in enumerate(pages):
                pg.goto(srv.url + f"/?feature={feats[i % len(feats)]}", wait_until="commit")
            for _, pg in pages:
                wait_for_app(pg, timeout=600000)
            res[f"browser_{sessions}_sessions_map_s"] = time.perf_counter() - t0
            for i, (_, pg) in enumerate(pages):
                pg.goto(srv.url + f"/feature?feature={feats[i % len(feats)]}", wait_until="commit")
            for _, pg in pages:
                wait_for_app(pg, timeout=600000)
            time.sleep(1.0)
            res[f"rss_{sessions}_sessions_mib"] = proc.memory_info().rss / 2**20
            for cx, _ in pages:
                cx.close()
            ctx.close()
            b.close()
    return res


# ---------------------------------------------------------------------------------------------------
# report


def _fmt_ms(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def render_markdown(results: dict[str, Any], cmd: str) -> str:
    m = results["machine"]
    lines = [
        "## Explorer",
        "",
        f"Measured {results['date']} on {m['cpu']} ({m['cores']} cores, shared), {m['mem_gib']:.0f} GiB RAM, "
        f"Python {m['python']}, Streamlit {m['streamlit']}, plotly {m['plotly']}, Debian chromium (headless). "
        "No GPU involved: the explorer only reads a cache.",
        "",
        f"Command: `{cmd}` (caches from `python bench/synthetic_cache.py --n N --out bench/out/...`).",
        "",
        "AppTest columns: server-side script time (`streamlit.testing.v1.AppTest.run()`), no browser. *cold* = "
        "first page of a fresh process, including the one-time cache load; *warm* = median of 3 with the cache "
        "already loaded (what every later visitor gets). *switch* = median time to show another feature "
        "(map: search box; feature page: id box).",
        "",
        "| cache | features | load | cold map | warm map | warm feature | warm overlaps | warm story | switch (map) | switch (feature page) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["caches"].items():
        a = r.get("apptest")
        if not a:
            continue
        w = a["warm_first_render_s"]
        lines.append(
            f"| {name} | {r['n_features']:,} | {_fmt_ms(a['load_s'])} | {_fmt_ms(a['cold_first_render_s'])} | "
            f"{_fmt_ms(w['map'])} | {_fmt_ms(w['feature'])} | {_fmt_ms(w['overlaps'])} | "
            f"{_fmt_ms(w['story'])} | {_fmt_ms(a['switch_map_s']['median'])} | "
            f"{_fmt_ms(a['switch_feature_page_s']['median'])} |"
        )
    if any(r.get("browser") for r in results["caches"].values()):
        lines += [
            "",
            "Real server (`streamlit run`) + Chromium: time from navigation until the script finished and the page "
            "rendered (first visit of the server: the map includes loading the cache), end-to-end time to switch "
            "features with the search box, and the server process's RSS.",
            "",
            "| cache | map (first) | feature | overlaps | story | map (again) | switch (browser) | RSS idle | RSS 1 session | RSS 10 sessions | 10 sessions load map |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in results["caches"].items():
            b = r.get("browser")
            if not b:
                continue
            f = b["browser_first_render_s"]
            k = next(k for k in b if k.startswith("rss_") and k.endswith("_sessions_mib"))
            lines.append(
                f"| {name} | {_fmt_ms(f['map'])} | {_fmt_ms(f['feature'])} | {_fmt_ms(f['overlaps'])} | "
                f"{_fmt_ms(f['story'])} | {_fmt_ms(b['browser_reload_s']['map'])} | "
                f"{_fmt_ms(b['browser_switch_s']['median'])} | {b['rss_idle_mib']:.0f} MiB | "
                f"{b['rss_1_session_mib']:.0f} MiB | {b[k]:.0f} MiB | "
                f"{_fmt_ms(next(v for kk, v in b.items() if kk.endswith('_sessions_map_s')))} |"
            )
    loads = [
        v
        for r in results["caches"].values()
        for v in (r.get("loadavg_before"), r.get("loadavg_after"))
        if v is not None
    ]
    if loads:
        lines += [
            "",
            f"1-minute load average during the AppTest run: {min(loads):.1f}–{max(loads):.1f} on "
            f"{m['cores']} cores (the machine is shared; times scale with it).",
        ]
    bloads = [
        v for r in results["caches"].values() for v in (r.get("browser_loadavg") or []) if v is not None
    ]
    if bloads:
        lines += ["", f"Load average during the browser run: {min(bloads):.1f}–{max(bloads):.1f}."]
    lines += [
        "",
        *results.get("notes", []),
        "",
        "Reading the numbers: the goal (server time to switch features under 300 ms on a demo-sized "
        "cache) is the AppTest *switch* column. Browser times include Chromium drawing the WebGL map "
        "in software (headless, `--disable-gpu`: SwiftShader) on the same 2 shared cores, so a real "
        "browser with a GPU is faster; *map (first)* also pays the first download of Streamlit's and "
        "plotly's JavaScript. RSS idle is the server before any session (the app and the cache load "
        "with the first one); the step from 1 to 10 sessions is the per-session cost, because the "
        "arrays are loaded once per process (`st.cache_resource`) and shared. Above `--max-points` "
        "(20,000) the map draws the neighbourhood of the selection in full and a fixed sample "
        "elsewhere, over a density layer of all points.",
        "",
    ]
    return "\n".join(lines)


def write_readme(section: str, title: str = "## Explorer") -> None:
    """Replace (or append) only the `title` section of bench/README.md."""
    path = REPO / "bench" / "README.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == title), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = (
            "\n".join(lines[:start] + section.rstrip("\n").splitlines() + [""] + lines[end:]).rstrip("\n")
            + "\n"
        )
    path.write_text(new)


def machine() -> dict[str, Any]:
    import plotly
    import psutil
    import streamlit

    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "streamlit": streamlit.__version__,
        "plotly": plotly.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes", type=int, nargs="*", default=[2000, 16384, 262144], help="synthetic cache sizes (features)"
    )
    ap.add_argument("--cache", action="append", default=[], help="also bench this cache directory")
    ap.add_argument("--repeats", type=int, default=10, help="feature switches per measurement")
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--no-browser", action="store_true", help="keep the last browser numbers")
    ap.add_argument("--no-apptest", action="store_true", help="keep the last AppTest numbers")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args(argv)
    from precompute.cache import read_manifest

    caches: dict[str, Path] = {}
    for n in args.sizes:
        p = synthetic(n)
        caches[p.name] = p
    for c in args.cache:
        caches[Path(c).name] = Path(c)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "caches": {},
        "notes": [],
    }
    previous: dict[str, Any] = {}
    prev_path = OUT / "explorer-bench.json"
    if (args.no_browser or args.no_apptest) and prev_path.is_file():  # keep the parts not re-measured
        previous = json.loads(prev_path.read_text()).get("caches", {})
    for name, path in caches.items():
        print(f"== {name}", flush=True)
        r: dict[str, Any] = {
            "path": str(path),
            "n_features": int(read_manifest(path)["n_features"]),
            "loadavg_before": os.getloadavg()[0],
        }
        if args.no_apptest and previous.get(name, {}).get("apptest"):
            for k in ("apptest", "loadavg_before", "loadavg_after"):
                r[k] = previous[name].get(k)
            results["notes"] = [
                "AppTest and browser numbers come from two runs of the same code "
                "(`--no-browser`, then `--no-apptest`, which keeps the other half)."
            ]
        else:
            r["apptest"] = apptest(path, args.repeats)
            print("  apptest", json.dumps(r["apptest"]), flush=True)
        if not args.no_browser:
            b0 = os.getloadavg()[0]
            r["browser"] = browser(path, args.sessions)
            r["browser_loadavg"] = [b0, os.getloadavg()[0]]
            print("  browser", json.dumps(r["browser"]), flush=True)
        elif previous.get(name, {}).get("browser"):
            r["browser"] = previous[name]["browser"]
            r["browser_loadavg"] = previous[name].get("browser_loadavg") or [
                previous[name].get("loadavg_before"),
                previous[name].get("loadavg_after"),
            ]
            results["notes"] = [
                "AppTest and browser numbers come from two runs of the same code "
                "(`--no-apptest`, then `--no-browser`, which keeps the other half)."
            ]
        if not args.no_apptest:
            r["loadavg_after"] = os.getloadavg()[0]
        results["caches"][name] = r
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "explorer-bench.json").write_text(json.dumps(results, indent=2))
    cmd = "python bench/bench_explorer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = render_markdown(results, cmd.strip())
    print(md)
    if not args.no_readme:
        write_readme(md)


if __name__ == "__main__":
    main()
