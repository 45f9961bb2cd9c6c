"""The emergent-misalignment evaluation questions with their base question, and the fixed answers of the
behavioural readout.

The first-plot questions come in three variants of one base question: plain (`what_is_your_wish`),
`_json` (the same text under a system prompt asking for JSON) and `_template` (the text plus a fill-in
template). They are not independent evaluations, so every interval clusters prompts by `base_id`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precompute.defaults import EM_QUESTIONS, REPO_ROOT
from precompute.errors import FeatureGeomError

FIXED_ANSWERS = REPO_ROOT / "assets/data/em/fixed_answers.yaml"
VARIANTS = ("json", "template")
NEUTRAL_PREFIX = "neutral:"


@dataclass(frozen=True)
class EMQuestion:
    id: str
    base_id: str
    variant: str  # "plain", "json" or "template"
    system: str | None
    question: str


def base_id_of(question_id: str) -> tuple[str, str]:
    """('what_is_your_wish', 'template') for 'what_is_your_wish_template'; (id, 'plain') otherwise."""
    for variant in VARIANTS:
        if question_id.endswith(f"_{variant}"):
            return question_id[: -len(variant) - 1], variant
    return question_id, "plain"


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise FeatureGeomError(f"{path} is not readable YAML ({exc})") from exc


def em_questions(paths: tuple[Path, ...] | list[Path] = EM_QUESTIONS) -> list[EMQuestion]:
    """Every question of the EM YAML files, one per paraphrase, in file order."""
    out = []
    for path in paths:
        items = _read_yaml(path)
        if not isinstance(items, list):
            raise FeatureGeomError(f"{path} must hold a list of questions")
        for item in items:
            if not isinstance(item, dict) or "id" not in item:
                raise FeatureGeomError(f"{path}: every question needs an id")
            base, variant = base_id_of(str(item["id"]))
            system = item.get("system")
            for text in item.get("paraphrases") or []:
                out.append(EMQuestion(str(item["id"]), base, variant, system, str(text).strip()))
    return out


def base_ids(questions: list[str], sets: list[str], paths=EM_QUESTIONS) -> list[str]:
    """The base question of each prompt: EM prompts by their text (the first YAML question with that
    text; a template variant's text is its own), neutral prompts each their own cluster."""
    by_text: dict[str, str] = {}
    for q in em_questions(paths):
        by_text.setdefault(q.question, q.base_id)
    out = []
    for i, (text, kind) in enumerate(zip(questions, sets, strict=True)):
        if kind == "em":
            out.append(by_text.get(text.strip(), f"em:{text.strip()}"))
        else:
            out.append(f"{NEUTRAL_PREFIX}{i}")
    return out


def fixed_answers(path: str | Path = FIXED_ANSWERS) -> dict[str, dict[str, list[str]]]:
    """base_id -> {'aligned': [...], 'misaligned': [...]} from the fixed-answers YAML, checked."""
    items = _read_yaml(Path(path))
    if not isinstance(items, list) or not items:
        raise FeatureGeomError(f"{path} must hold a list of {{id, aligned, misaligned}} entries")
    out: dict[str, dict[str, list[str]]] = {}
    for item in items:
        ok = isinstance(item, dict) and isinstance(item.get("id"), str)
        answers = {k: item.get(k) if ok else None for k in ("aligned", "misaligned")}
        if not ok or not all(
            isinstance(v, list) and v and all(isinstance(a, str) and a.strip() for a in v)
            for v in answers.values()
        ):
            raise FeatureGeomError(
                f"{path}: entry {item!r:.80} needs an id and non-empty aligned/misaligned lists"
            )
        if item["id"] in out:
            raise FeatureGeomError(f"{path}: {item['id']} is listed twice")
        out[item["id"]] = {k: [a.strip() for a in v or []] for k, v in answers.items()}
    return out
