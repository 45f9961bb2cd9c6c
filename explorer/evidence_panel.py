"""The feature page's evidence by group: the 'Documents' and 'Harm category' pickers, a feature's
examples on one group (its top there, then its quantile bands there), each group's peak, and an
example's whole document."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import numpy as np
import streamlit as st

from explorer import figures as F
from explorer import state
from explorer.data import CacheData
from explorer.data import evidence as E
from explorer.figures import evidence as EF


def finite(x: Any) -> bool:
    """A number that is not NaN (None, pd.NA and strings are not)."""
    try:
        return bool(np.isfinite(x))
    except (TypeError, ValueError):
        return False


def merged_caption(n_merged: int, what: str) -> None:
    """Say how many examples were not shown again because a stronger one shows the same passage."""
    if n_merged:
        verb, them = ("show", "them") if n_merged != 1 else ("shows", "it")
        st.caption(
            f"Merged: {n_merged} of the {what} {verb} the same tokens around the peak, in the same document, as a "
            f"stronger example: each passage is shown once, under the stronger example, and the ranks skip {them}."
        )


GROUP_ALL = "all"
GROUP_NAMES = {GROUP_ALL: "all documents (top overall)", "harmful": "harmful documents only"}


def _group_name(g: str) -> str:
    return GROUP_NAMES.get(g, f"{g} documents only")


def doc_href(feature: int) -> Any:
    """Link of an example to its whole document: this page with `doc` (and the context, to mark it)."""

    def href(e: dict[str, Any]) -> str | None:
        if e.get("doc_id") is None:
            return None
        params = state.link_params(feature=feature, doc=int(e["doc_id"]), ctx=e.get("context_id"))
        return "?" + urlencode(params)

    return href


def evidence_filters(
    cache: CacheData, feature: int, examples: list[dict[str, Any]]
) -> tuple[str, str | None]:
    """The 'Documents' and 'Harm category' pickers (URL `group`, `category`): which examples to show."""
    groups = [GROUP_ALL, *cache.groups]
    c1, c2 = st.columns(2)
    state.seed_widget("feat_group", "group", groups, GROUP_ALL)
    group = c1.selectbox("Documents", groups, format_func=_group_name, key="feat_group")
    state.set_qp(group=None if group == GROUP_ALL else group)
    category: str | None = None
    if group == "harmful":
        cats = [GROUP_ALL, *E.harm_categories(cache, feature, examples)]
        state.seed_widget("feat_category", "category", cats, GROUP_ALL)
        pick = c2.selectbox(
            "Harm category",
            cats,
            format_func=lambda c: "all categories" if c == GROUP_ALL else c,
            key="feat_category",
        )
        category = None if pick == GROUP_ALL else pick
    state.set_qp(category=category)
    return group, category


def group_examples_block(
    cache: CacheData,
    feature: int,
    group: str,
    category: str | None,
    n_top: int,
    window: int | None,
    color: str,
) -> None:
    """The feature's stored examples on one group (and category), or a plain statement that it never
    fires there."""
    rate = cache.group_rates(feature).get(group, float("nan"))
    where = f"{group} · {category}" if category else group
    if finite(rate) and rate == 0:
        st.info(f"#{feature} never fires on the {group} documents of this cache (0% of their tokens).")
        return
    crate = E.category_rate(cache, feature, group, category) if category else float("nan")
    if category and finite(crate) and crate == 0:
        st.info(f"#{feature} never fires on the {where} documents of this cache (0% of their tokens).")
        return
    examples = cache.examples_of(feature)  # read once: the group's top and its bands both come from it
    found = E.group_examples(examples, group, category)
    merged = E.merge_repeats(found.examples, window)
    rows = merged.examples
    fires = f"It fires on {(crate if category else rate) * 100:.3g}% of the {where} tokens. "
    if found.exact_category and category:
        how = (
            f"The first are its top {found.per_category} contexts within {where} documents, ranked on those "
            f"documents' tokens only; then every other stored example whose peak is on a {where} document, "
            "strongest first."
        )
    elif found.exact and category:
        how = (
            f"Every stored example whose peak is on a {where} document, strongest first; “#k on {group}” ranks "
            f"it among all {group} documents. This cache keeps a top per group, not per category (rebuild it "
            "for one), so this lists what the group's top, the global top and the quantile samples hold of it."
        )
    elif found.exact:
        how = (
            f"The first are its top {found.per_group} contexts within {group} documents, ranked on {group} tokens "
            f"only; then every other stored example whose peak is on a {where} document, strongest first."
        )
    else:
        how = (
            "This cache was harvested before per-group examples: these are only the stored top examples and "
            f"quantile samples whose peak is on a {where} document, not the group's own top (rebuild the cache)."
        )
    st.caption(fires + how)
    if not rows:
        st.info(f"None of #{feature}'s stored examples comes from {where} documents.")
        return
    scale = max((float(e.get("max_activation") or 0) for e in rows), default=1.0)

    def show(examples: list[dict[str, Any]], ranks: str = "rank") -> None:
        html = F.examples_html(
            examples[:n_top],
            scale=scale,
            color=color,
            window=window,
            documents=cache.documents,
            doc_href=doc_href(feature),
            ranks=ranks,
        )
        st.html(html)

    show(rows, ranks="overall")
    merged_caption(merged.n_merged, f"{where} examples")
    if len(rows) > n_top:
        st.caption(f"{len(rows) - n_top} more — raise “examples shown”.")
    bands = E.group_quantiles(examples, group, category)
    if bands:
        st.markdown(f"**Weaker activations on {where} documents**")
        st.caption(
            f"Contexts drawn at random from each interval of the feature's activation (“quantile q”: from "
            f"q × its maximum up), peak taken on {group} tokens only: what it does on {where} text below "
            "its top there."
        )
        show(bands)


def peaks_caption(cache: CacheData, feature: int) -> None:
    """'Strongest on each group: control 35.6 · task 34.7 · harmful 13.7 · general: never fires' — so a
    global top from one group does not hide how the feature does on the others."""
    peaks = E.group_peaks(cache.examples_of(feature), cache.groups)
    if not peaks:
        return
    rates = cache.group_rates(feature)
    parts = []
    for g, v in sorted(peaks.items(), key=lambda kv: -(kv[1] if kv[1] is not None else -1.0)):
        if v is not None:
            parts.append(f"{g} {v:.1f}")
        elif finite(rates.get(g)) and rates[g] == 0:
            parts.append(f"{g}: never fires")
        else:
            parts.append(f"{g}: no stored example")
    st.caption(
        "Strongest activation on each group: "
        + " · ".join(parts)
        + " (pick a group under “Documents” to see them)."
    )


def document_panel(cache: CacheData, feature: int) -> None:
    """The whole document of an example (URL `doc`, `ctx`), escaped, its context marked; a button closes it."""
    doc_id = state.qp_int("doc")
    if doc_id is None:
        return
    doc = E.document(cache, doc_id)
    if doc is None:
        st.warning(f"Document {doc_id} is not in this cache's documents.parquet.")
        state.set_qp(doc=None, ctx=None)
        return
    ctx = state.qp_int("ctx")
    example = next(
        (e for e in cache.examples_of(feature) if e.get("context_id") == ctx and e.get("doc_id") == doc_id),
        None,
    )
    span = None
    if example is not None and doc.text is not None:
        span = E.locate(doc.text, list(example.get("tokens") or []), example.get("max_position"))
    st.html(EF.document_html(doc, span, color=F.HARM if doc.group == "harmful" else F.TASK))
    if example is not None and doc.text is not None:
        st.caption(
            "The marked stretch is the example's context where its text occurs verbatim in the document."
            if span
            else "The example's context could not be placed in the text (chat-template tokens are not in it)."
        )
    if st.button("Close the document", key=f"doc_close:{doc_id}"):
        state.set_qp(doc=None, ctx=None)
        st.rerun()
