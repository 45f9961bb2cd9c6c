"""`featuregeom synth`: planted ground truth for the whole geometry pipeline (docs/science.md section 4).

A known dictionary is built in which every *task* feature has *planted harmful* neighbours at chosen
cosines, *co-firing partners* that fire with it but are exactly orthogonal to it, and random *decoys*
(`dictionary`). The project's TopK SAE is trained on activations drawn from it (`fit`), learned and
true directions are matched (`matching`), and the same geometry code the pipeline uses is run on the
learned decoder and scored against the truth (`evaluate`). The checks:

* recovery: Hungarian matching of true to learned directions, mean matched |cos| (MCC) and mean
  max |cos| (MMCS), both should reach 0.9;
* ordering: each task feature's learned neighbour list holds its planted neighbours in descending
  rho, and the recovered cosines track rho;
* false positives: co-firing partners and decoys must not be flagged above the null more often
  than the null's false-positive rate (a task feature's list holds a false flag with probability
  at most ``fpr``);
* co-activation vs geometry: partners co-fire (high Jaccard, cosine ~ 0), planted neighbours do
  not (low Jaccard, high cosine).

Everything is seeded: the same config gives the same numbers.

    featuregeom synth --out runs/synth            # d=64, ~60 true features, ~1 min on 2 cores

This module holds only the command; the work is imported when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from precompute.lab.synth.config import DICTIONARY_FILE, PLOT_FILE, REPORT_FILE, SAE_DIR, SynthConfig
from precompute.options import Command, option


@dataclass
class SynthOptions(SynthConfig):
    out: str | None = option(
        None,
        metavar="DIR",
        help=f"write {REPORT_FILE}, {PLOT_FILE}, {DICTIONARY_FILE} and the SAE (SAELens, {SAE_DIR}/) here",
    )
    progress: bool = option(True, help="no progress bar")


def run_synth_command(opts: SynthOptions) -> int:
    """Run the planted-ground-truth check; exit status 0 when every bar is met, 1 otherwise."""
    from precompute.lab.synth.report import summary_lines, write_outputs
    from precompute.lab.synth.run import run_synth

    result = run_synth(opts, progress=opts.progress)
    for line in summary_lines(result.report):
        print(line)
    if opts.out:
        files = write_outputs(result, opts.out)
        print("wrote " + ", ".join(f"{k}: {v}" for k, v in files.items()))
    return 0 if result.report["all_bars_met"] else 1


COMMANDS = (
    Command(
        "synth",
        "planted ground truth: known dictionary -> SAE -> geometry, scored",
        SynthOptions,
        run_synth_command,
        description="Build a dictionary with planted harmful neighbours at known cosines, co-firing orthogonal "
        "partners and decoys; train the project's TopK SAE on activations drawn from it; run the pipeline's "
        "geometry on the learned decoder and score recovery, neighbour order, false flags above the null and "
        "co-activation against geometry. Exit status 1 when a bar is missed.",
        flags=tuple(
            name
            for name in SynthOptions.__dataclass_fields__
            if name not in ("magnitude", "magnitude_range")  # TOML-only, as before
        ),
    ),
)
