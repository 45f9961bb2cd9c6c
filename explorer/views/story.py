"""Story (presenter mode): a guided walk through one flagged pair, or through what a cache without one
found; large type, next/back, one URL per step."""

from __future__ import annotations

import html

import streamlit as st

from explorer import state
from explorer.data import FINETUNE_FILES, CacheData, files_stamp, find_finetune_runs
from explorer.story import Step, is_flagged, story_html, story_steps, story_title
from explorer.views import Page

PAGE = Page(title="Story", icon=":material/slideshow:")

STORY_CSS = """
[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"], [data-testid="stExpandSidebarButton"]
  {display: none !important;}
.block-container {max-width: 1200px !important;}
.story-step {color:#6b7280;font-size:16px;letter-spacing:.05em;text-transform:uppercase;margin-bottom:4px}
.story-title {font-size:44px;font-weight:750;line-height:1.15;margin:0 0 14px;color:#111827}
.story-lead {font-size:23px;line-height:1.55;color:#1f2937;max-width:62em;margin-bottom:10px}
.story-dots span {display:inline-block;width:11px;height:11px;border-radius:50%;margin-right:7px;background:#e5e7eb}
.story-dots span.on {background:#1d4ed8}
.stButton button {min-height: 3rem;}
.stButton button p {font-size: 20px !important;}
.st-key-story_keys {display: none !important;}
"""
# The presenter's clicker keys besides the arrows (which Back/Next carry): key, step change.
KEY_TWINS = (("PageUp", -1), ("PageDown", 1), ("Space", 1))


@st.cache_resource(max_entries=32, show_spinner=False)
def _steps(
    _cache: CacheData,
    path: str,
    updated: str,
    pair: tuple[int, int] | None,
    max_points: int,
    finetune: tuple[tuple[str, tuple[int, ...]], ...],
) -> list[Step]:
    """Built once per pair (or once for the cache's result story) and shared: switching steps is then only
    layout. `finetune` (each run's name and file mtimes) is in the key so that a fine-tune diff added to the
    cache later shows up in the story."""
    return story_steps(_cache, pair, max_points=max_points)


def story_pair(cache: CacheData) -> tuple[int, int] | None:
    """The flagged pair in the URL, else the cache's top flagged pair, else None (the cache's result story).
    A pair in the URL that the cache does not flag is said to be so and not presented."""
    t, h = state.qp_int("task"), state.qp_int("harmful")
    if t is not None and h is not None:
        if is_flagged(cache, t, h):
            return t, h
        st.info(
            f"#{t} ↔ #{h} is not a flagged pair of this cache (overlaps.parquet), so the story does not present "
            "it as one.",
            icon="ℹ️",
        )
    return cache.default_pair()


def show_step(steps: list[Step], step: int) -> None:
    """The step's dots, title, lead, figure and body, then back / next."""
    n = len(steps)
    s = steps[step - 1]
    dots = "".join(f'<span class="{"on" if i == step else ""}"></span>' for i in range(1, n + 1))
    st.html(
        f'<div class="story-dots">{dots}</div><div class="story-step">Step {step} of {n}</div>'
        f'<div class="story-title">{html.escape(s.title)}</div>'
        f'<div class="story-lead">{s.lead}</div>'
    )
    if s.figure is not None:
        st.plotly_chart(s.figure, config=state.chart_config(s.figure_name), key=f"story_fig:{step}")
    if s.body:
        st.html(f'<div style="font-size:17px">{s.body}</div>')

    back, _, nxt = st.columns([1, 4, 1])
    # Streamlit's own `shortcut=` (it ignores keys typed into inputs); one key per button, so the clicker's
    # PageUp/PageDown and Space get hidden twins of Back/Next. Streamlit draws the shortcut inside the button
    # (Left as "←", Right as "→"), so the labels carry no arrow of their own: "← Back" read "← Back ←".
    go_back = back.button("Back", disabled=step <= 1, width="stretch", key="story_back", shortcut="Left")
    go_next = nxt.button(
        "Next", disabled=step >= n, width="stretch", type="primary", key="story_next", shortcut="Right"
    )
    with st.container(key="story_keys"):
        for key, delta in KEY_TWINS:
            clicked = st.button(
                key, key=f"story_key_{key}", shortcut=key, disabled=not 1 <= step + delta <= n
            )
            go_back, go_next = go_back or (clicked and delta < 0), go_next or (clicked and delta > 0)
    if go_back or go_next:
        state.set_qp(step=step + (1 if go_next else -1))
        st.rerun()


def presenter_settings(cache: CacheData, steps: list[Step], pair: tuple[int, int] | None) -> None:
    """Another flagged pair, the figure download format, and the whole story as one offline HTML file."""
    with st.expander("Presenter settings: pair, figure format, export"):
        c1, c2 = st.columns([2, 1])
        ov = cache.overlaps.head(50)
        options = list(zip(ov["task_feature"].astype(int), ov["harmful_feature"].astype(int), strict=False))
        if pair is not None and pair not in options:
            options.insert(0, pair)
        if pair is not None:
            t, h = pair
            pick = c1.selectbox(
                "Flagged pair",
                options,
                index=options.index(pair),
                key=f"story_pair:{t}:{h}",
                format_func=lambda p: f"task #{p[0]} ↔ harmful #{p[1]}",
            )
            if pick != pair:
                state.set_qp(task=pick[0], harmful=pick[1], step=1)
                st.rerun()
        else:
            c1.caption("This cache flags no (task, harmful) pair: the story tells what it found instead.")
        c2.radio(
            "Chart download format",
            ["png", "svg"],
            key="fig_format",
            horizontal=True,
            help="What the camera button in each chart's toolbar saves.",
        )
        title = story_title(cache, pair)
        suffix = f"-{pair[0]}-{pair[1]}" if pair is not None else "-result"
        st.download_button(
            "Download the whole story as one HTML file (opens offline)",
            data=lambda: story_html(steps, title, state.cache_summary(cache)),
            file_name=f"story-{cache.name}{suffix}.html",
            mime="text/html",
            icon=":material/download:",
        )
        st.caption("Each step has its own URL — copy it from the address bar to link a slide.")


def render() -> None:
    state.inject_css(STORY_CSS)
    cache = state.require_cache(show_sidebar=False)
    pair = story_pair(cache)
    ft_stamp = tuple((p.name, files_stamp(p, FINETUNE_FILES)) for p in find_finetune_runs(cache.path))
    steps = _steps(
        cache,
        str(cache.path),
        str(cache.manifest.get("updated")),
        pair,
        min(state.max_points(), 12000),
        ft_stamp,
    )
    step = min(max(1, state.qp_int("step") or 1), len(steps))
    if pair is not None:
        state.set_qp(task=pair[0], harmful=pair[1], step=step)
    else:
        state.set_qp(task=None, harmful=None, step=step)
    show_step(steps, step)
    presenter_settings(cache, steps, pair)


if __name__ == "__main__":
    render()
