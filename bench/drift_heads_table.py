"""Markdown tables of bench_drift_heads.py's JSON files (as pasted into BENCHMARKS.md).

    python bench/drift_heads_table.py bench/results/drift_heads_animals.json bench/results/drift_heads_digits.json ...

Per data set and setting: mean +- std over the seeds of Acc, AAA, forgetting and task 0's final accuracy, the
per-seed Acc, and the seconds per task of each added pass against the task's training time. The last column is
the gain in mean Acc over the setting it adds to (``none`` for ``gaussian`` and ``ridge``, ``gaussian`` for
``gaussian+X``, ``ridge`` for ``ridge+X``) in units of the standard error of the difference of means
(sqrt(std_a^2/n + std_b^2/n)), on how many seeds (same seed = same class order) it is higher, and the mean per-seed
difference in units of its own standard error (paired by seed: the class order's effect cancels).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _ms(entry: dict, key: str) -> str:
    s = entry["summary"][key]
    return f"{s['mean']:.1f} ± {s['std']:.1f}"


def _se_gain(entry: dict, base: dict) -> str:
    a, b = entry["summary"]["acc"], base["summary"]["acc"]
    n = len(entry["per_run"])
    se = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / n) or 1e-9
    return f"{(a['mean'] - b['mean']) / se:+.1f}"


def _wins(entry: dict, base: dict) -> str:
    """Seeds won, and the mean per-seed difference in units of its standard error (paired by seed)."""
    diffs = [a["acc"] - b["acc"] for a, b in zip(entry["per_run"], base["per_run"], strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    paired = f"{mean / (sd / math.sqrt(n)):+.1f}" if sd > 0 else "n/a"
    return f"{sum(d > 0 for d in diffs)}/{n} seeds, paired {paired} SE"


def rows(name: str, runs: dict) -> list[str]:
    out = []
    for setting, e in runs.items():
        seeds = " / ".join(f"{r['acc']:.1f}" for r in e["per_run"])
        passes = ", ".join(f"{k} {v:.2f}" for k, v in e["pass_s_per_task"].items()) or "-"
        ref = "none" if "+" not in setting else setting.split("+")[0]
        base = runs.get(ref)
        gain = f"{_se_gain(e, base)} SE ({_wins(e, base)}) vs {ref}" if base and setting != "none" else "-"
        out.append(f"| {name} | {setting} | {_ms(e, 'acc')} | {seeds} | {_ms(e, 'aaa')} | {_ms(e, 'forgetting')} | "
                   f"{_ms(e, 'task0_final')} | {passes} | {e['train_s_per_task']:.1f} | {gain} |")  # fmt: skip
    return out


def main() -> None:
    merged: dict[str, dict] = {}
    for path in sys.argv[1:]:
        for name, runs in json.loads(Path(path).read_text())["runs"].items():
            merged.setdefault(name, {}).update(runs)
    print("| data | setting | Acc | Acc per seed | AAA | forgetting | task 0 at the end | added passes s/task | "
          "train s/task | Acc gain (SE, seeds won) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in merged.items():
        print("\n".join(rows(name, runs)))


if __name__ == "__main__":
    main()
