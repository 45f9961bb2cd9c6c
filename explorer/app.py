"""Feature Geometry Explorer — Streamlit entry point.

    streamlit run explorer/app.py -- --cache DIR [--reviews PATH] [--max-points N]
    FEATUREGEOM_CACHE=DIR streamlit run explorer/app.py

It listens on 127.0.0.1 only, from any directory (explorer/.streamlit/config.toml, read beside this
file); serving other machines takes `python -m explorer.serve --address HOST` (see serve.py).

DIR is one cache, or a folder of caches (then a picker and `?cache=NAME`). Pages: Map (default),
Feature, Overlaps review, Closeness, Story, Fine-tune diff, Dataset triage; each keeps its view in the
URL (?feature=, ?task=&harmful=, ?step=, ?run=&set=&pos=&measure=, ?triage=&sample=).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `streamlit run explorer/app.py` puts explorer/ on the path, not the repo
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from explorer import state  # noqa: E402
from explorer.serve import exposure_problem  # noqa: E402
from explorer.views import PAGES, page_file, page_info  # noqa: E402

# the sidebar only holds the cache picker: open it when --cache names a folder of caches
st.set_page_config(
    page_title="Feature Geometry Explorer",
    page_icon="🧭",
    layout="wide",
    initial_sidebar_state="expanded" if state.is_cache_root() else "collapsed",
)


@st.cache_resource(show_spinner=False)
def _exposure(configured_address: str | None) -> str | None:
    """Checked once per server process: its listening sockets do not change."""
    return exposure_problem(configured_address)


# explorer/.streamlit/config.toml binds 127.0.0.1 wherever streamlit is started; an explicit flag or
# STREAMLIT_SERVER_ADDRESS can still widen it, and then nothing is shown without the opt-in
problem = _exposure(st.get_option("server.address"))
if problem:
    st.error(problem, icon="🔒")
    st.stop()

pages = []
for name in PAGES:  # navigation order; each page's title and icon come from its module
    info = page_info(name)
    pages.append(
        st.Page(page_file(name), title=info.title, icon=info.icon, url_path=name, default=info.default)
    )
page = st.navigation(pages, position="top")
state.inject_css(state.BASE_CSS)
page.run()
