"""The per-rank training process: ``python -m sdlora_dist.jobs.worker --run-dir D --mode fresh|resume|continue``.

Launchers (local, DeepSpeed runner, srun, torchrun, Kubernetes) start this on every rank; the front door
``sdlora train`` wrote the resolved config into the run directory first, so every rank reads the same one.
"""

from __future__ import annotations

import argparse
import os
import sys

from sdlora_dist.jobs.rank import global_rank


def main(argv: list[str] | None = None) -> int:
    """Run this rank's part of the training; exit 2 for bad input, 130 for Ctrl-C, 1 for a dead peer or a crash.

    Under ``sdlora train`` the rank logs to ``RUN_DIR/logs/rank_N.log`` and records how it ended for the front
    door's one-line summary (:mod:`sdlora_dist.jobs.ranklog`); run by hand it prints one ``error:`` line itself.
    """
    parser = argparse.ArgumentParser(prog="sdlora_dist.jobs.worker")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--mode", choices=("fresh", "resume", "continue"), default="fresh")
    args = parser.parse_args(argv)
    from sdlora_dist.checkpoint import load_run_config
    from sdlora_dist.jobs import distributed as dist
    from sdlora_dist.jobs.ranklog import run_rank
    from sdlora_dist.recipe import run_training

    def body() -> None:
        try:
            with dist.peer_failures():  # a lost peer is recorded as such, not as this rank's crash
                # The directory we were given, not the one saved in config.yaml: a run can be moved or copied.
                run_training(load_run_config(args.run_dir), args.mode)
        finally:
            dist.shutdown()

    return run_rank(args.run_dir, global_rank(), body)


if __name__ == "__main__":
    code = main()
    # Leave without interpreter finalisation: the work is done and every file was written atomically, while
    # finalisation can race gloo's C++ worker threads (std::terminate -> SIGABRT) and turn a finished run into a
    # failed job under load. Seen here with torchrun on a loaded 2-core machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
