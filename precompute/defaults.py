"""Assets shipped in the repository that commands fall back on when an option is left unset.

Paths are absolute (from the repository root), so a default works from any working directory."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# The SAE trained on the packaged SmolLM2-135M-Instruct (configs/train-sae.toml).
DEFAULT_SAE = REPO_ROOT / "assets/sae/smollm2-135m-instruct-blocks.15.hook_resid_post-topk"
# Neutral instructions (Self-Instruct seed tasks, field `instruction`): steering and eval prompts.
NEUTRAL_PROMPTS = REPO_ROOT / "assets/data/benign/self_instruct_seed_tasks.jsonl"
# Betley et al.'s emergent-misalignment evaluation questions (field `paraphrases`).
EM_QUESTIONS = (
    REPO_ROOT / "assets/data/em/first_plot_questions.yaml",
    REPO_ROOT / "assets/data/em/preregistered_evals.yaml",
)


def relative(path: Path) -> str:
    """`path` as written from the repository root, for help texts."""
    return str(path.relative_to(REPO_ROOT))
