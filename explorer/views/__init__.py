"""The explorer's pages, one module each, in navigation order.

A page module declares `PAGE = Page(title, icon)` and a `render()` that draws it, and ends with
`if __name__ == "__main__": render()`: Streamlit runs the page's file as `__main__` (st.Page takes
the file), while importing it (navigation, tests) draws nothing. Its URL is `/<module name>`; the
default page is also `/`. A new page is one new module here plus its name in PAGES.
Not named `pages/`: Streamlit would serve a sub-page URL opened first without the navigation.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

PAGES = ("map", "feature", "overlaps", "closeness", "story", "finetune", "triage")


@dataclass(frozen=True)
class Page:
    """What the navigation shows for a page."""

    title: str
    icon: str  # a Streamlit icon, e.g. ":material/scatter_plot:"
    default: bool = False  # the page at `/`


def page_file(name: str) -> str:
    """The page's script relative to explorer/app.py: what st.Page, st.page_link and AppTest take."""
    return f"views/{name}.py"


def page_info(name: str) -> Page:
    """The PAGE a page module declares (importing it draws nothing)."""
    info = importlib.import_module(f"explorer.views.{name}").PAGE
    assert isinstance(info, Page), f"explorer/views/{name}.py must declare PAGE = Page(...)"
    return info
