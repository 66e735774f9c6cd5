"""``sdlora data``: prepare shards from a benchmark's layout, add a task of new classes, inspect a shard set."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for a command ended by Ctrl-C

data_app = typer.Typer(
    name="data",
    help="Benchmark layouts -> WebDataset shards grouped by class (each run picks its own task split).",
    no_args_is_help=True,
)


@contextmanager
def _interrupt_exits_130(what: str) -> Iterator[None]:
    """Ctrl-C -> one ``interrupted: ...`` line on stderr and exit code 130, no traceback (click would print
    ``Aborted!`` and exit 1)."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted: {what}", file=sys.stderr, flush=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


@data_app.command("prepare")
def prepare_cmd(
    benchmark: str = typer.Option(
        ..., "--benchmark", help="imagenet-r, imagenet-a, domainnet, cifar100, cub200, imagefolder or digits."
    ),
    out: str = typer.Option(..., "--out", help="Shard directory to create (refused if it holds another dataset)."),
    root: str = typer.Option(None, "--root", help="Dataset folder in the benchmark's own layout (not for digits)."),
    tasks: int = typer.Option(
        None, "--tasks", help="Default number of tasks (runs choose with data.tasks; default: the paper's)."
    ),
    seed: int = typer.Option(
        None, "--seed", help="Default class-order seed (runs choose with data.class_order_seed; default: the paper's)."
    ),
    resize: int = typer.Option(256, "--resize", help="Downscale short sides above this once (0 = keep size)."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per shard."),
    workers: int = typer.Option(None, "--workers", help="Encoding processes (default: all cores)."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: when a terminal)."),
    max_missing: int = typer.Option(
        0, "--max-missing", help="Listed images allowed to be absent (skipped, counted in the manifest)."
    ),
    subset: bool = typer.Option(False, "--subset", help="Allow fewer classes than the benchmark defines."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the 80/20 split where there is no official one."),
) -> None:
    """Write a benchmark as class-grouped train/test shards plus manifest.json (resumes an interrupted run).

    On an existing shard set of the same input it verifies every checksum and rewrites damaged or missing shards.
    """
    from sdlora_dist.data.prepare import prepare

    with _interrupt_exits_130(f"data prepare stopped; run the same command again to resume into {out}"):
        manifest = prepare(
            benchmark, root, out, tasks=tasks, seed=seed, resize=resize, shard_size=shard_size, workers=workers,
            progress=sys.stderr.isatty() if progress is None else progress, max_missing=max_missing, subset=subset,
            split_seed=split_seed,
        )  # fmt: skip
    n_train = sum(manifest.num_samples("train", t) for t in range(manifest.num_tasks()))
    n_test = sum(manifest.num_samples("test", t) for t in range(manifest.num_tasks()))
    typer.echo(
        f"{out}: {manifest.benchmark}, {len(manifest.class_names)} classes in {manifest.num_tasks()} tasks, "
        f"{n_train} train / {n_test} test samples, {len(manifest.skipped)} unreadable source images skipped"
    )


@data_app.command("add-task")
def add_task_cmd(
    out: str = typer.Option(..., "--out", help="Existing shard directory to extend."),
    root: str = typer.Option(..., "--root", help="Folder of new classes: train/<class>/* and test/<class>/*."),
    workers: int = typer.Option(None, "--workers", help="Encoding processes (default: all cores)."),
) -> None:
    """Append one task made of new classes to an existing shard set."""
    from sdlora_dist.data.prepare import add_task

    with _interrupt_exits_130(f"data add-task stopped; {out} is as it was, run the same command again to resume"):
        task = add_task(out, root, workers=workers, progress=sys.stderr.isatty())
    typer.echo(f"{out}: added task {task}")


@data_app.command("inspect")
def inspect_cmd(
    shards_dir: str = typer.Argument(
        ..., help="Shard set written by 'sdlora data prepare': folder or URL (http(s)://, s3://, gs://, hf://, pipe:)."
    ),
    verify: bool = typer.Option(False, "--verify", help="Check every shard's size and sha256 against the manifest."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout instead of the table."),
) -> None:
    """Print the tasks, their classes and sample counts; --verify checks checksums first."""
    if as_json:
        import json

        from sdlora_dist.data.prepare import inspect_record

        typer.echo(json.dumps(inspect_record(shards_dir, verify=verify)))
        return
    from sdlora_dist.data.prepare import inspect_table

    typer.echo(inspect_table(shards_dir, verify=verify))


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to the app."""
    app.add_typer(data_app, name="data")
