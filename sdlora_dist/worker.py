"""The per-rank training process: ``python -m sdlora_dist.worker --run-dir D --mode fresh|resume|continue``.

Launchers (local, DeepSpeed runner, srun, torchrun, Kubernetes) start this on every rank; the front door
``sdlora train`` wrote the resolved config into the run directory first, so every rank reads the same one.
"""

from __future__ import annotations

import argparse
import os
import sys

from sdlora_dist.errors import UserError


def main(argv: list[str] | None = None) -> int:
    """Run this rank's part of the training; one ``error:`` line and exit 2 for bad input, 1 for a dead peer."""
    parser = argparse.ArgumentParser(prog="sdlora_dist.worker")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--mode", choices=("fresh", "resume", "continue"), default="fresh")
    args = parser.parse_args(argv)
    from sdlora_dist import distributed as dist
    from sdlora_dist.checkpoint import load_run_config
    from sdlora_dist.recipe import run_training

    try:
        cfg = load_run_config(args.run_dir)
        run_training(cfg, args.mode)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except dist.RankFailure as exc:
        print(f"error: rank {dist.rank()}: {exc}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without interpreter finalisation: the work is done and every file was written atomically, while
    # finalisation can race gloo's C++ worker threads (std::terminate -> SIGABRT) and turn a finished run into a
    # failed job under load. Seen here with torchrun on a loaded 2-core machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
