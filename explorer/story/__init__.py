"""The presenter's story, and its standalone HTML export.

Why a package of its own: the Streamlit story page and the offline HTML file must tell exactly the
same story, so the steps (text, figures, example HTML) are built here once, from the cache, and both
renderers only lay them out. Every cache string in the text is escaped here.

Which story: a cache with a flagged (task, harmful) pair tells that pair's (`pair.py`); a cache with
none tells what it found instead (`result.py`): the story never calls a feature a task feature unless
it passes the task test, nor a pair flagged unless overlaps.parquet holds it. `finetune.py` is the
measured fine-tune's optional last step; `base.py` the Step, shared helpers and the HTML export.
"""

from __future__ import annotations

from explorer.data import CacheData
from explorer.story.base import Step, story_html
from explorer.story.finetune import finetune_result_step, finetune_summaries, finetune_withheld
from explorer.story.pair import build_story, is_flagged, typical_neighbour_cosine
from explorer.story.result import build_result_story, example_feature


def story_steps(cache: CacheData, pair: tuple[int, int] | None, max_points: int = 12000) -> list[Step]:
    """The pair's story when `pair` is a flagged pair, else the cache's result story."""
    if pair is not None and is_flagged(cache, *pair):
        return build_story(cache, pair[0], pair[1], max_points=max_points)
    return build_result_story(cache, max_points=max_points)


def story_title(cache: CacheData, pair: tuple[int, int] | None) -> str:
    """The exported file's title: the pair it presents, or the cache's result."""
    if pair is not None and is_flagged(cache, *pair):
        return f"Feature geometry: task feature #{pair[0]} and harmful feature #{pair[1]}"
    return f"Feature geometry: what the cache {cache.name} shows"


__all__ = [
    "Step",
    "build_result_story",
    "build_story",
    "example_feature",
    "finetune_result_step",
    "finetune_summaries",
    "finetune_withheld",
    "is_flagged",
    "story_html",
    "story_steps",
    "story_title",
    "typical_neighbour_cosine",
]
