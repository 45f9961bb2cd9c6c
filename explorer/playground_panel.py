"""The steering playground section (pair view and feature page): a prompt, a feature, a strength; the
unsteered and the steered greedy completion side by side on the cache's own model, each generated token
shaded by a chosen feature's SAE activation.

It is a fragment: generating or switching the highlighted feature reruns this section only. The model
runs in `precompute.lab.playground_worker` (see explorer/playground.py), started on the first Generate.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from explorer import figures as F
from explorer import state
from explorer.data import CacheData
from explorer.pair_status import feature_kind
from explorer.playground import PlaygroundError, SteeringWorker, WorkerSpec, worker_spec

DEFAULT_PROMPT = "Write a short Python function that saves a file a user uploads to the server."
KIND_WORDS = {
    "task": "task",
    "harmful": "harmful",
    "both": "task and harmful",
    "neither": "neither task nor harmful",
}


@st.cache_resource(max_entries=2, show_spinner=False, validate=lambda w: w.alive)
def _worker(spec: WorkerSpec) -> SteeringWorker:
    """One model process per (model, SAE) for the whole server; restarted if it died."""
    return SteeringWorker(spec)


def completion_html(side: dict[str, Any], feature: int, scale: float, color: str) -> str:
    """Generated tokens shaded by `feature`'s activation (escaped by tokens_html); a note when empty."""
    tokens = side.get("tokens") or []
    if not tokens:
        return '<div style="color:#6b7280;font-style:italic">(the model ended its turn at once)</div>'
    acts = side.get("activations", {}).get(str(feature), [])
    return F.tokens_html(tokens, acts, scale, color=color)


def describe(cache: CacheData, feature: int) -> str:
    return f"#{feature} ({KIND_WORDS[feature_kind(cache.row(feature))]})"


def summary_rows(result: dict[str, Any], names: dict[int, str]) -> list[dict[str, Any]]:
    """Per watched feature: max and mean activation over the generated tokens, unsteered vs steered."""
    rows = []
    for f in result["watch"]:
        row: dict[str, Any] = {"feature": names.get(int(f), f"#{f}")}
        for side in ("unsteered", "steered"):
            acts = result[side]["activations"].get(str(f), [])
            row[f"{side} max"] = max(acts) if acts else 0.0
            row[f"{side} firing tokens"] = f"{sum(a > 0 for a in acts)}/{len(acts)}"
        rows.append(row)
    return rows


def _show(cache: CacheData, result: dict[str, Any], key: str) -> None:
    steered_f = int(result["feature"])
    st.caption(
        f"Steered along #{steered_f}'s decoder direction with strength {result['strength']:g} "
        f"(α = {result['alpha']:.1f}, {result['strength']:g} × this prompt's median residual norm "
        f"{result['norm']:.1f} at {state.md_escape(str(cache.manifest.get('hook')))}), added at every position. "
        f"Greedy decoding; {len(result['steered']['tokens'])} tokens in {result['steered']['seconds']:.1f} s "
        f"(unsteered {result['unsteered']['seconds']:.1f} s{', reused' if result['timings'].get('unsteered_reused') else ''}). "
        f"#{steered_f}'s own activation rises by construction (the vector is added where the SAE reads it); "
        "the other watched features' change is what steering shows. One prompt, one strength: an "
        "illustration, not a measurement (`featuregeom steer` and the lab measure)."
    )
    watch = [int(f) for f in result["watch"]]
    names = {f: describe(cache, f) for f in watch}
    shade = st.radio(
        "Shade the generated tokens by the activation of",
        watch,
        format_func=names.__getitem__,
        horizontal=True,
        key=f"{key}:shade",
    )
    both = [
        *result["unsteered"]["activations"].get(str(shade), []),
        *result["steered"]["activations"].get(str(shade), []),
    ]
    scale = max(both, default=0.0) or 1.0
    color = F.role_color(cache.row(int(shade)))
    a, b = st.columns(2, gap="large")
    with a:
        st.markdown("**Unsteered**")
        st.html(completion_html(result["unsteered"], int(shade), scale, color))
    with b:
        st.markdown(f"**Steered** (#{steered_f}, strength {result['strength']:g})")
        st.html(completion_html(result["steered"], int(shade), scale, color))
    st.dataframe(summary_rows(result, names), hide_index=True, key=f"{key}:table")


@st.fragment
def playground_section(cache: CacheData, features: list[int], key: str) -> None:
    """`features`: the ids the reader may steer along; all of them are watched."""
    features = list(dict.fromkeys(int(f) for f in features))
    st.subheader("Steering playground")
    spec = worker_spec(cache.manifest, cache.path)
    if isinstance(spec, str):
        st.info(state.md_escape(f"The playground runs the cache's own model and SAE, and {spec}."))
        return
    with st.form(f"{key}:form", border=False):
        prompt = st.text_area(
            "Prompt (sent as one user turn through the model's chat template)",
            DEFAULT_PROMPT,
            max_chars=4000,
            key=f"{key}:prompt",
        )
        c1, c2, c3 = st.columns([2, 2, 1])
        feature = c1.radio(
            "Steer along",
            features,
            format_func=lambda f: describe(cache, f),
            horizontal=True,
            key=f"{key}:feature",
        )
        strength = c2.slider(
            "Strength (× the prompt's median residual norm)",
            -1.0,
            1.0,
            0.25,
            0.05,
            help="0 is the unsteered model; ±1 adds a vector as long as a typical residual, which usually breaks the text",
            key=f"{key}:strength",
        )
        new_tokens = c3.number_input("New tokens", 1, 200, 40, key=f"{key}:tokens")
        go = st.form_submit_button("Generate", type="primary")
    if go:
        request = {
            "prompt": prompt,
            "feature": int(feature),
            "strength": float(strength),
            "new_tokens": int(new_tokens),
            "watch": features,
        }
        try:
            with st.spinner("Starting the model (first time) and generating…"):
                st.session_state[f"{key}:result"] = _worker(spec).ask(request)
        except PlaygroundError as exc:
            st.error(state.md_escape(f"The playground could not run: {exc}"))
            return
    result = st.session_state.get(f"{key}:result")
    if result is not None:
        _show(cache, result, key)
