"""What the explainer and the scorer read (delphi-style, Paulo et al. 2024): excerpts around the
activation peak with the activating tokens marked, and one yes/no question per scored excerpt.

Corpus text is untrusted but here it is only model input, never markup; the explanation that comes
back is stored raw and escaped by the explorer like any other label.
"""

from __future__ import annotations

from collections.abc import Sequence

MARK_FRACTION = 0.3  # a token is marked when its activation is at least this share of the example's peak
WINDOW = 12  # tokens kept on each side of the peak
MAX_EXPLANATION_CHARS = 160

EXPLAINER_SYSTEM = (
    "You are an interpretability researcher. You look at text excerpts on which one feature of a "
    "language model activates and say, in a short phrase, what the feature detects."
)
SCORER_SYSTEM = (
    "You judge whether a description of a language-model feature applies to a text. Answer Yes or No."
)


def excerpt(tokens: Sequence[str], activations: Sequence[float] | None, peak: int | None, mark: bool) -> str:
    """The tokens around `peak` joined as text; with `mark`, activating tokens are wrapped in << >>."""
    n = len(tokens)
    center = peak if peak is not None and 0 <= peak < n else n // 2
    lo, hi = max(0, center - WINDOW), min(n, center + WINDOW + 1)
    top = max((float(a) for a in (activations or [])), default=0.0)
    out = []
    for i in range(lo, hi):
        tok = str(tokens[i])
        active = mark and activations is not None and top > 0 and float(activations[i]) >= MARK_FRACTION * top
        out.append(f"<<{tok}>>" if active else tok)
    return "".join(out).strip()


def explainer_messages(excerpts: Sequence[str]) -> list[dict[str, str]]:
    body = "\n".join(f"Excerpt {i + 1}: {text}" for i, text in enumerate(excerpts))
    return [
        {"role": "system", "content": EXPLAINER_SYSTEM},
        {
            "role": "user",
            "content": "The feature activates on the tokens marked << >> in these excerpts:\n"
            f"{body}\n\nIn at most ten words, what does the feature detect? Reply with the phrase only.",
        },
    ]


def scorer_messages(explanation: str, text: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SCORER_SYSTEM},
        {
            "role": "user",
            "content": f"Feature description: {explanation}\nText: {text}\n\n"
            "Does the feature described activate somewhere in this text? Answer Yes or No.",
        },
    ]


def clean_explanation(reply: str) -> str:
    """The first non-empty line of the reply, without quotes or a leading 'Explanation:'."""
    line = next((ln.strip() for ln in reply.splitlines() if ln.strip()), "")
    for prefix in ("explanation:", "the feature detects", "answer:"):
        if line.lower().startswith(prefix):
            line = line[len(prefix) :].strip()
    line = line.strip(" \"'`*")
    return line[: MAX_EXPLANATION_CHARS - 1] + "…" if len(line) > MAX_EXPLANATION_CHARS else line
