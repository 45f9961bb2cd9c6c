"""Streamlit glue shared by the pages: which cache, loading it once, URL state, friendly errors.

Why here: every page must open the same cache the same way (CLI `-- --cache DIR`, then
FEATUREGEOM_CACHE; a folder of caches gives a picker and `?cache=NAME`), show a clear message
instead of a traceback when it cannot, and keep its view in the URL so a link reopens it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

import streamlit as st

from explorer.data import (
    FINETUNE_FILES,
    TRIAGE_FILES,
    CacheData,
    FinetuneRun,
    TriageRun,
    files_stamp,
    find_caches,
    find_finetune_runs,
    find_triage_runs,
    is_cache,
    load_cache,
    load_finetune_run,
    load_triage_run,
    reviews_path_for,
    spearman_of,
)
from explorer.reviews import ReviewError, ReviewStore
from explorer.views import PAGES as PAGE_NAMES
from explorer.views import page_file
from precompute import schema
from precompute.cache import read_manifest
from precompute.errors import CacheError

log = logging.getLogger("featuregeom.explorer")

PAGES = {name: page_file(name) for name in PAGE_NAMES}  # what st.page_link takes, by page name
ENV_CACHE = "FEATUREGEOM_CACHE"
ENV_REVIEWS = "FEATUREGEOM_REVIEWS"
ENV_MAX_POINTS = "FEATUREGEOM_MAX_POINTS"
USAGE = "streamlit run explorer/app.py -- --cache DIR   (or set FEATUREGEOM_CACHE=DIR)"


def md_escape(text: Any) -> str:
    """Make text literal inside Streamlit markdown (st.error, st.caption, ...)."""
    s = str(text)
    s = re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$:])", r"\\\1", s)
    return s.replace("\n", "  \n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options after `--` on the streamlit command line (unknown ones are ignored)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--reviews", default=None)
    ap.add_argument("--max-points", type=int, default=None)
    args, _ = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args


def cache_source() -> str | None:
    args = parse_args()
    return args.cache or os.environ.get(ENV_CACHE) or None


def max_points() -> int:
    args = parse_args()
    return int(args.max_points or os.environ.get(ENV_MAX_POINTS) or 20000)


def is_cache_root() -> bool:
    """--cache names a folder of caches (not a cache itself)."""
    src = cache_source()
    if not src:
        return False
    path = Path(src)
    return path.is_dir() and not is_cache(path) and bool(find_caches(path))


@st.cache_resource(max_entries=4, show_spinner="Loading the cache (once per server process)…")
def _load(path: str, updated: str) -> CacheData:
    """One CacheData per (cache path, manifest 'updated'), shared by every session."""
    cache = load_cache(path)
    # build the search's arrays and example-text index in the background, so the first search is quick
    threading.Thread(target=cache.prepare_search, name="fg-search-index", daemon=True).start()
    return cache


@st.cache_resource(max_entries=8, show_spinner=False)
def _store(path: str) -> ReviewStore:
    return ReviewStore(path)


def _resolve_dir() -> tuple[Path | None, list[Path]]:
    """(chosen cache dir, the caches of the root or []) — shows an error and returns None on failure."""
    src = cache_source()
    if not src:
        st.error(
            "**No cache given.** Start the explorer with  \n`" + USAGE + "`  \n"
            "DIR is a directory written by `featuregeom precompute` (or a folder of such caches)."
        )
        return None, []
    path = Path(src).expanduser()
    if is_cache(path) or not path.is_dir():
        return path, []  # a missing directory gets its message from read_manifest
    caches = find_caches(path)
    if not caches:
        st.error(
            f"**{md_escape(path)} is not a cache.** It has no {schema.MANIFEST} and no sub-folder that is a "
            "cache. Point --cache at a directory written by `featuregeom precompute`, or at a folder of them."
        )
        return None, []
    names = [c.name for c in caches]
    wanted = st.query_params.get("cache") or st.session_state.get("_cache_name")
    name = wanted if wanted in names else names[0]
    st.session_state["_cache_name"] = name
    if st.query_params.get("cache") != name:
        st.query_params["cache"] = name
    return path / name, caches


def current_cache(show_sidebar: bool = True) -> CacheData | None:
    """The cache this session looks at, or None after showing a clear st.error."""
    path, caches = _resolve_dir()
    st.session_state["_cache_root_names"] = [c.name for c in caches]
    if show_sidebar:
        sidebar()
    if path is None:
        return None
    try:
        manifest = read_manifest(path)
        return _load(str(path.resolve()), str(manifest.get("updated") or manifest.get("created") or ""))
    except CacheError as exc:
        st.error(f"**Cannot open the cache {md_escape(path)}.**  \n{md_escape(exc)}", icon="⚠️")
    except Exception as exc:  # never show a traceback to the user; keep it in the server log
        log.exception("unexpected error loading %s", path)
        st.error(
            f"**Cannot open the cache {md_escape(path)}**: unexpected {type(exc).__name__}: "
            f"{md_escape(exc)}.  \nThe cache may be damaged or from another version; rebuild it with "
            "`featuregeom precompute --overwrite`.",
            icon="⚠️",
        )
    return None


def require_cache(show_sidebar: bool = True) -> CacheData:
    """current_cache() or stop the page (the error is already on screen)."""
    cache = current_cache(show_sidebar)
    if cache is None:
        st.stop()
    assert cache is not None
    return cache


def review_store(cache: CacheData) -> ReviewStore | None:
    """The verdict store of this cache (beside it unless --reviews / FEATUREGEOM_REVIEWS)."""
    override = parse_args().reviews or os.environ.get(ENV_REVIEWS)
    path = reviews_path_for(cache.path)
    if override:
        o = Path(override).expanduser()
        path = o if o.suffix in (".sqlite", ".db", ".sqlite3") else o / f"{cache.name}.reviews.sqlite"
    try:
        store = _store(str(path))
    except ReviewError as exc:
        st.error(md_escape(exc), icon="⚠️")
        return None
    if store.read_only:
        _store.clear()  # open it afresh next run, so a repaired or replaced file is picked up
    return store


def reviewer_name() -> str:
    """The reviewer's name: `?reviewer=` (survives a reload and goes with a shared link), else this session's."""
    return str(st.query_params.get("reviewer") or st.session_state.get("_reviewer") or "")


def remember_reviewer(name: str) -> None:
    st.session_state["_reviewer"] = name
    set_qp(reviewer=name)


# ------------------------------------------------------------------------------------------------
# mechanism-lab results inside the cache (CACHE/finetune/<run>/, CACHE/triage/<name>/)


@st.cache_data(max_entries=64, show_spinner="Reading the fine-tune diff…")
def _finetune_run(path: str, stamp: tuple[int, ...]) -> FinetuneRun:
    """Keyed by path and the files' mtimes: a rerun of `featuregeom diff` is picked up on the next rerun."""
    return load_finetune_run(path)


@st.cache_data(max_entries=16, show_spinner="Reading the triage result…")
def _triage_run(path: str, stamp: tuple[int, ...]) -> TriageRun:
    return load_triage_run(path)


def _load_results(paths: list[Path], loader: Any, files: tuple[str, ...]) -> tuple[list[Any], list[str]]:
    """Load each result directory on its own: a broken one becomes a message, never hides the others."""
    out: list[Any] = []
    problems: list[str] = []
    for p in paths:
        try:
            out.append(loader(str(p), files_stamp(p, files)))
        except CacheError as exc:
            problems.append(f"Skipped {p.name}: {exc}")
        except Exception as exc:  # keep the page; the traceback goes to the server log
            log.exception("unexpected error reading %s", p)
            problems.append(f"Skipped {p.name}: unexpected {type(exc).__name__}: {exc}")
    return out, problems


def finetune_runs(cache: CacheData) -> tuple[list[FinetuneRun], list[str]]:
    """The readable `featuregeom diff` runs of this cache, by name, and a message per unreadable one."""
    return _load_results(find_finetune_runs(cache.path), _finetune_run, FINETUNE_FILES)


def triage_runs(cache: CacheData) -> tuple[list[TriageRun], list[str]]:
    return _load_results(find_triage_runs(cache.path), _triage_run, TRIAGE_FILES)


@st.cache_data(max_entries=256, show_spinner=False)
def _spearman(
    _run: FinetuneRun,
    path: str,
    stamp: tuple[int, ...],
    prompt_set: str,
    position: str,
    comparison: str,
    measure: str,
) -> tuple[float, float, float] | None:
    return spearman_of(_run, prompt_set, position, comparison, measure)


def run_spearman(
    run: FinetuneRun, prompt_set: str, position: str, comparison: str, measure: str
) -> tuple[float, float, float] | None:
    """spearman_of(), cached: the firing-rate one is a bootstrap (about a second), done once per run."""
    return _spearman(
        run, str(run.path), files_stamp(run.path, FINETUNE_FILES), prompt_set, position, comparison, measure
    )


# ------------------------------------------------------------------------------------------------
# URL state


def qp_int(name: str) -> int | None:
    v = st.query_params.get(name)
    try:
        return int(str(v).lstrip("#")) if v not in (None, "") else None
    except ValueError:
        return None


def set_qp(**kw: Any) -> None:
    """Write view state into the URL (None removes a key); no rerun."""
    for k, v in kw.items():
        if v is None:
            if k in st.query_params:
                del st.query_params[k]
        elif st.query_params.get(k) != str(v):
            st.query_params[k] = str(v)


def seed_widget(key: str, param: str, options: list[Any], default: Any) -> None:
    """Start widget `key` at the URL's `param` (when it is one of `options`), else at `default`; reset it
    when its value is no longer an option (another cache, another run). Call before drawing the widget
    and write the value back with set_qp() after it."""
    if st.session_state.get(key) not in options:
        v = st.query_params.get(param)
        match = [o for o in options if str(o) == v]  # the URL holds strings; options may be ints
        st.session_state[key] = match[0] if match else default


def link_params(**kw: Any) -> dict[str, str]:
    """Query parameters for a link to another page, keeping the chosen cache."""
    out = {k: str(v) for k, v in kw.items() if v is not None}
    if st.session_state.get("_cache_root_names") and st.session_state.get("_cache_name"):
        out["cache"] = st.session_state["_cache_name"]
    return out


def extra_query() -> str:
    """'&cache=NAME' for hand-built links, or ''."""
    p = link_params()
    return "".join(f"&{k}={v}" for k, v in p.items())


def selected_feature(cache: CacheData, param: str = "feature") -> int:
    """The feature in view: URL, else this session's last one, else the top-risk task feature."""
    key = f"_feature:{cache.name}"
    f = qp_int(param)
    if f is None or not cache.valid(f):
        if st.query_params.get(param) not in (None, ""):
            st.warning(
                f"Feature {md_escape(st.query_params.get(param))} is not in this cache "
                f"(0–{cache.n - 1}); showing another one."
            )
        f = st.session_state.get(key)
        if f is None or not cache.valid(f):
            f = cache.default_feature()
    st.session_state[key] = int(f)
    set_qp(**{param: int(f)})
    return int(f)


def remember_feature(cache: CacheData, feature: int) -> None:
    st.session_state[f"_feature:{cache.name}"] = int(feature)
    set_qp(feature=int(feature))


def figure_format() -> str:
    return st.session_state.get("fig_format", "png")


def chart_config(name: str) -> dict[str, Any]:
    from explorer.figures import plotly_config

    return plotly_config(figure_format(), filename=name)


def sidebar() -> None:
    """Cache picker (for a folder of caches), what the cache is, and the figure download format."""
    with st.sidebar:
        names = st.session_state.get("_cache_root_names") or []
        if names:
            cur = st.session_state.get("_cache_name", names[0])
            choice = st.selectbox(
                "Cache",
                names,
                index=names.index(cur) if cur in names else 0,
                help="The caches found in the folder given with --cache; e.g. a model before "
                "and after fine-tuning.",
            )
            if choice != cur:
                st.session_state["_cache_name"] = choice
                st.query_params["cache"] = choice
                st.rerun()
        st.radio(
            "Chart download format",
            ["png", "svg"],
            key="fig_format",
            horizontal=True,
            help="What the camera button in each chart's toolbar saves.",
        )


def cache_summary(cache: CacheData) -> str:
    """A one-line, plain-text description of the cache (for captions; escaped by the caller)."""
    m = cache.manifest
    model = (m.get("model") or {}).get("spec") or "?"
    sae = m.get("sae") or {}
    return (
        f"{cache.name}: {cache.n:,} features of {model} at {m.get('hook') or sae.get('hook_name') or '?'}"
        f" · d={m.get('d_in') or '?'} · {len(cache.overlaps):,} flagged pairs · chance cosine "
        f"{cache.null_cosine:.3g} ({cache.null_label})"
    )


def inject_css(css: str) -> None:
    """Our own stylesheet (never cache content)."""
    st.html(f"<style>{css}</style>")


BASE_CSS = """
.block-container {padding-top: 3.2rem; padding-bottom: 2rem; max-width: 1600px;}
h1 {font-weight: 700; letter-spacing: -0.01em;}
[data-testid="stMetricValue"] {font-size: 1.45rem;}
"""
