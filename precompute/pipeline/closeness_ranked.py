"""The closeness step's exploratory sets: the N most task-leaning features against the N most
control-leaning ones, by rank of `task_score` (closeness.json `ranked`, docs/cache.md).

The strict sets (`is_task`, `is_control`) need a feature to separate task from control documents
beyond chance; on a small corpus none may, and the comparison is then `not_testable`. Ranking keeps
the question askable: do the features that lean most towards the misalignment-inducing documents sit
closer to harmful features than those leaning most towards the control documents? The sets are
chosen by rank, not by significance, so the result is exploratory and says so.

Eligible: not harmful, fires at all (`frequency` > 0), and a finite `task_score` other than exactly
0.5. A feature that fires in no scored task or control window scores exactly 0.5 (all its values are
tied zeros, precompute/pipeline/auroc.py), so it has no rank to give; a feature whose task and
control values balance exactly has none either. The top set is drawn from the task-leaning features
(`task_score` > 0.5), the bottom set from the control-leaning ones (< 0.5), so the two are disjoint
and each leans its own way; when fewer than N lean one way, both sets shrink to the smaller count
(recorded). Ties at a cut are broken by feature id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SELECTION = "top/bottom N by task_score (exploratory: sets by rank, not by significance)"
ELIGIBILITY = (
    "not is_harmful, frequency > 0, task_score finite and not exactly 0.5 (a feature firing in no scored "
    "task or control window scores exactly 0.5)"
)
SENSITIVITY_N = (50, 100, 200)


@dataclass(frozen=True)
class RankedSets:
    """Two disjoint boolean masks [n_features] and how they were cut."""

    top: np.ndarray  # the n most task-leaning eligible features
    bottom: np.ndarray  # the n most control-leaning
    n: int  # per set, as used
    n_requested: int
    n_eligible: int
    n_task_leaning: int
    n_control_leaning: int

    @property
    def reduction(self) -> str:
        """Why `n` is below `n_requested` ("" when it is not)."""
        if self.n >= self.n_requested:
            return ""
        return (
            f"N reduced from {self.n_requested} to {self.n}: {self.n_task_leaning} eligible feature(s) lean "
            f"towards task (task_score > 0.5) and {self.n_control_leaning} towards control (< 0.5)"
        )


def eligible(task_score: np.ndarray, frequency: np.ndarray, harmful: np.ndarray) -> np.ndarray:
    """[n] bool: the features a ranked set may hold (module docstring)."""
    score = np.asarray(task_score, np.float64)
    freq = np.nan_to_num(np.asarray(frequency, np.float64), nan=0.0)
    return ~np.asarray(harmful, bool) & (freq > 0) & np.isfinite(score) & (score != 0.5)


def rank_sets(
    task_score: np.ndarray, frequency: np.ndarray, harmful: np.ndarray, n_requested: int
) -> RankedSets:
    """The top and bottom `n_requested` eligible features by `task_score`, each from its own side of 0.5."""
    score = np.asarray(task_score, np.float64)
    ok = eligible(score, frequency, harmful)
    ids = np.arange(score.size)
    up = ids[ok & (score > 0.5)]
    down = ids[ok & (score < 0.5)]
    n = int(min(n_requested, up.size, down.size))
    top = np.zeros(score.size, bool)
    bottom = np.zeros(score.size, bool)
    top[up[np.lexsort((up, -score[up]))][:n]] = True  # highest score first, then lowest id
    bottom[down[np.lexsort((down, score[down]))][:n]] = True
    return RankedSets(top, bottom, n, int(n_requested), int(ok.sum()), int(up.size), int(down.size))
