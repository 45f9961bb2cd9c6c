"""Feature Geometry Explorer — Streamlit entry point.

    streamlit run explorer/app.py -- --cache DIR [--reviews PATH] [--max-points N]
    FEATUREGEOM_CACHE=DIR streamlit run explorer/app.py

DIR is one cache, or a folder of caches (then a picker and `?cache=NAME`). Pages: Map (default),
Feature, Overlaps review, Story, Fine-tune diff, Dataset triage; each keeps its view in the URL (?feature=,
?task=&harmful=, ?step=, ?run=&set=&pos=&measure=, ?triage=&sample=).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `streamlit run explorer/app.py` puts explorer/ on the path, not the repo
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from explorer import state  # noqa: E402

# the sidebar only holds the cache picker: open it when --cache names a folder of caches
st.set_page_config(page_title="Feature Geometry Explorer", page_icon="🧭", layout="wide",
                   initial_sidebar_state="expanded" if state.is_cache_root() else "collapsed")

pages = [
    st.Page(state.PAGES["map"], title="Map", icon=":material/scatter_plot:", url_path="map", default=True),
    st.Page(state.PAGES["feature"], title="Feature", icon=":material/text_snippet:", url_path="feature"),
    st.Page(state.PAGES["overlaps"], title="Overlaps review", icon=":material/fact_check:", url_path="overlaps"),
    st.Page(state.PAGES["story"], title="Story", icon=":material/slideshow:", url_path="story"),
    st.Page(state.PAGES["finetune"], title="Fine-tune diff", icon=":material/difference:", url_path="finetune"),
    st.Page(state.PAGES["triage"], title="Dataset triage", icon=":material/filter_alt:", url_path="triage"),
]
page = st.navigation(pages, position="top")
state.inject_css(state.BASE_CSS)
page.run()
