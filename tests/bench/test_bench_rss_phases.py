"""The phase sampler of bench/bench_rss_phases.py: readings go to the phase running when they are taken."""

from __future__ import annotations

import types

import pytest

from bench.bench_rss_phases import OTHER, PHASES, PhasePeaks, table


def test_readings_are_charged_to_the_running_phase_and_nested_phases_restore_the_outer_one() -> None:
    readings = iter([10.0, 50.0, 20.0, 30.0, 5.0, 40.0, 7.0])
    peaks = PhasePeaks(read=lambda: next(readings))
    peaks.sample()  # 10 -> other
    with peaks.phase("write_shards"):  # 50 on entry
        peaks.sample()  # 20
        with peaks.phase("aggregate"):  # 30 on entry, 5 on exit
            pass
        peaks.sample()  # 40: back in write_shards
    # 7 on leaving write_shards
    assert peaks.current == OTHER
    assert peaks.peaks == {OTHER: 10.0, "write_shards": 50.0, "aggregate": 30.0}


def test_wrap_marks_a_module_function_and_keeps_its_result_and_errors() -> None:
    module = types.SimpleNamespace()
    seen: list[str] = []
    peaks = PhasePeaks(read=lambda: 1.0)

    def aggregate(x: int) -> int:
        seen.append(peaks.current)
        if x < 0:
            raise ValueError("negative")
        return 2 * x

    module.aggregate = aggregate
    peaks.wrap(module, "aggregate")
    assert module.aggregate(3) == 6
    with pytest.raises(ValueError, match="negative"):
        module.aggregate(-1)
    assert seen == ["aggregate", "aggregate"]
    assert peaks.current == OTHER  # restored after the error too


def test_table_has_one_row_per_run_and_a_dash_for_a_phase_a_run_did_not_reach() -> None:
    runs = [
        {
            "tokens": 1000,
            "mmap_threshold": 0,
            "phase_peak_mib": {PHASES[0]: 900.4, OTHER: 700.0},
            "peak_rss_mib": 901.0,
            "user_s": 1.0,
            "sys_s": 0.5,
            "wall_s": 2.0,
        },
        {
            "tokens": 2000,
            "mmap_threshold": 1048576,
            "phase_peak_mib": {PHASES[0]: 800.0, "aggregate": 750.0},
            "peak_rss_mib": 810.0,
            "user_s": 2.0,
            "sys_s": 1.0,
            "wall_s": 3.0,
        },
    ]
    lines = table(runs).splitlines()
    assert lines[0].split(" | ")[2:5] == [PHASES[0], "aggregate", OTHER]
    assert lines[2] == "| 1,000 | glibc default | 900 | - | 700 | 901 | 1.0 | 0.5 | 2.0 |"
    assert lines[3] == "| 2,000 | 1,048,576 | 800 | 750 | - | 810 | 2.0 | 1.0 | 3.0 |"
