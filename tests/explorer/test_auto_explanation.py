"""The feature header's model explanation: shown escaped, with its detection score worded by its own
95% interval (precompute's Hanley-McNeil), absent where explain never ran."""

from __future__ import annotations

from explorer.figures.feature import feature_header_html

ROW = {"feature": 7, "label": "x", "is_task": False, "is_harmful": False}


def test_header_words_the_score_by_its_interval_and_escapes_the_text() -> None:
    hostile = '<img src=x onerror="alert(1)">'
    row = {
        **ROW,
        "auto_explanation": hostile,
        "auto_explanation_model": "local:tiny",
        "auto_explanation_scored": 20,
    }
    strong = feature_header_html({**row, "auto_explanation_detection": 0.95})
    assert "<img" not in strong and "&lt;img" in strong
    assert "detection AUROC 0.95 on 20 held-out contexts: tells the feature" in strong
    weak = feature_header_html({**row, "auto_explanation_detection": 0.62})  # lower bound < 0.5 at n = 20
    assert "not shown to tell the feature" in weak
    unscored = feature_header_html({**row, "auto_explanation_detection": float("nan")})
    assert "not scored" in unscored
    assert "Model explanation" not in feature_header_html({**ROW, "auto_explanation": None})
