"""Check that ``train.head_align=none`` (the default) trains bit-for-bit what a commit without head_align trains.

    python bench/head_align_none_parity.py --base b7203ef [--set train.head=linear] \\
        [--out bench/results/head_align_none_parity.json]

Exports ``--base`` (a commit before issue 13) with ``git archive``, then runs the digits recipe in-process (1 rank,
random-init backbone, 5 tasks) once with the base code and once with this checkout (default config and an explicit
``head_align=none``, each with the ``--set`` values given: since issue 21 made the ridge head the default, the
paper's method is ``--set train.head=linear``), each in a fresh interpreter with its own ``sdlora_dist`` first on
``sys.path``. Compares the accuracy counts and ``adapter_checksum`` (every adapter factor, magnitude and head
tensor) after the last task. Exit code 1 when they differ. Not a test: it needs the repository's history.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys
import sdlora_dist
from sdlora_dist.checkpoint import completed_tasks, load_task_model
from sdlora_dist.config import load_config
from sdlora_dist.recipe import adapter_checksum, run_training
config, shards, run_dir, *sets = sys.argv[1:]
from pathlib import Path
if not Path(shards).is_dir():  # each code base reads the shards its own prepare writes (the format grew since)
    from sdlora_dist.data import prepare
    prepare("digits", None, shards, progress=False)
cfg = load_config(config, [f"data.shards={shards}", f"run_dir={run_dir}", "model.weights=random", *sets])
progress = run_training(cfg, "fresh")
model = load_task_model(run_dir, completed_tasks(run_dir)[-1], cfg)
print(json.dumps({"code": sdlora_dist.__file__, "correct": progress.log.correct,
                  "checksum": adapter_checksum(model)}))
"""


def run_child(code_root: Path, shards: Path, run_dir: Path, sets: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    config = str(ROOT / "configs" / "benchmarks" / "digits.yaml")
    cmd = [sys.executable, "-c", CHILD, config, str(shards), str(run_dir), *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode:
        sys.exit(f"run with {code_root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="a commit without head_align (e.g. the merge base)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="for this checkout's two runs")
    parser.add_argument("--out", default="bench/results/head_align_none_parity.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        shards = Path(tmp) / "shards"  # this checkout's; the base run writes its own beside it
        results = {
            "base": run_child(base, Path(tmp) / "base_shards", Path(tmp) / "base_run", []),
            "default": run_child(ROOT, shards, Path(tmp) / "default_run", args.sets),
            "none": run_child(ROOT, shards, Path(tmp) / "none_run", [*args.sets, "train.head_align=none"]),
        }
    same = all(r["correct"] == results["base"]["correct"] and r["checksum"] == results["base"]["checksum"]
               for r in results.values())  # fmt: skip
    out = {"base_commit": args.base, "sets": args.sets, "identical": same, **results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
