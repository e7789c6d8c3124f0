"""The demo's and the comparison's report tables (the runs themselves are `make demo` and
benchmarks/compare_tgrpo_grpo.py; the pipeline pieces they call have their own tests)."""

import importlib.util
import os


from videor1.demo import results_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _summary(overall, by_source):
    return {"overall": overall, "n": sum(n for n, _ in by_source.values()), "by_source": by_source}


def test_results_table_rows_per_task_and_gaps():
    evals = {
        "SFT": {"ordered": _summary(0.6, {"synthetic/motion_direction": (4, 0.75), "synthetic/color_first": (6, 0.5)}),
                "shuffled": _summary(0.3, {"synthetic/motion_direction": (4, 0.25), "synthetic/color_first": (6, 1 / 3)})},
        "T-GRPO": {"ordered": _summary(0.9, {"synthetic/motion_direction": (4, 1.0), "synthetic/color_first": (6, 5 / 6)}),
                   "shuffled": _summary(0.2, {"synthetic/motion_direction": (4, 0.0), "synthetic/color_first": (6, 1 / 3)})},
    }
    lines = results_table(evals).splitlines()
    assert lines[0] == ("| task | SFT ordered | SFT shuffled | SFT gap | T-GRPO ordered | T-GRPO shuffled | "
                        "T-GRPO gap |")
    assert lines[2] == "| color_first (n=6) | 0.500 | 0.333 | +0.167 | 0.833 | 0.333 | +0.500 |"
    assert lines[3] == "| motion_direction (n=4) | 0.750 | 0.250 | +0.500 | 1.000 | 0.000 | +1.000 |"
    assert lines[4] == "| **all (n=10)** | 0.600 | 0.300 | +0.300 | 0.900 | 0.200 | +0.700 |"


def test_comparison_table_mean_and_sample_std():
    spec = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, "benchmarks", "compare_tgrpo_grpo.py"))
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)

    def res(o, s):
        return {"ordered": o, "shuffled": s, "gap": o - s}

    per_seed = {0: {"SFT": res(0.5, 0.3), "GRPO": res(0.6, 0.4), "T-GRPO": res(0.7, 0.2)},
                1: {"SFT": res(0.7, 0.3), "GRPO": res(0.8, 0.4), "T-GRPO": res(0.9, 0.4)}}
    lines = compare.table(per_seed).splitlines()
    assert "| 1 | T-GRPO | 0.900 | 0.400 | +0.500 |" in lines
    # T-GRPO gaps 0.5 and 0.5: mean 0.5, std 0; ordered 0.7 and 0.9: mean 0.8, sample std 0.1414
    assert lines[-1] == "| **mean ± std (2 seeds)** | **T-GRPO** | 0.800 ± 0.141 | 0.300 ± 0.141 | 0.500 ± 0.000 |"
    assert lines[-3].startswith("| **mean ± std (2 seeds)** | **SFT** | 0.600 ± 0.141 | 0.300 ± 0.000 |")
