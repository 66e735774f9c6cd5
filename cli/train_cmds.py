"""``sdlora train``: the front door of a (multi-node) DeepSpeed run."""

from __future__ import annotations

import typer

from sdlora_dist.jobs.launch import LaunchSpec


def default_gpus_per_node() -> tuple[int, str]:
    """Ranks per node when --gpus-per-node is not given: every visible GPU (torchrun's ``gpu``), else 1."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (visible, "every visible GPU") if visible else (1, "no GPU visible: one CPU process")


def train(
    benchmark: str | None = typer.Option(None, "--benchmark", "-b", help="Shipped recipe (configs/benchmarks)."),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML merged over the recipe."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.lr=0.01 (repeatable)."),
    data: str | None = typer.Option(None, "--data", help="Shard set from 'sdlora data prepare': folder or URL."),
    run_dir: str | None = typer.Option(
        None, "--run-dir", help="Run directory (default $SDLORA_RUNS_ROOT/<benchmark>-<time>, runs/ when unset)."
    ),
    resume: str | None = typer.Option(None, "--resume", help="Continue an interrupted run from its newest state."),
    continue_run: str | None = typer.Option(
        None, "--continue", help="Learn the tasks added (data add-task) after a finished run."
    ),
    resume_or_start: bool = typer.Option(
        False, "--resume-or-start", help="Resume --run-dir when it holds a run, else start it (requeued jobs)."
    ),
    nodes: int = typer.Option(1, "--nodes", help="Number of nodes."),
    gpus_per_node: int | None = typer.Option(
        None, "--gpus-per-node", help="Ranks per node: default every visible GPU on a GPU node, 1 on CPU."
    ),
    hostfile: str | None = typer.Option(None, "--hostfile", help="DeepSpeed hostfile ('host slots=N' lines)."),
    master_addr: str | None = typer.Option(None, "--master-addr", help="Address of node 0."),
    master_port: int | None = typer.Option(None, "--master-port", help="Rendezvous port."),
    node_rank: int | None = typer.Option(None, "--node-rank", help="This node's index (with --no-ssh)."),
    no_ssh: bool = typer.Option(False, "--no-ssh", help="Start each node yourself (DeepSpeed runner --no_ssh)."),
    launcher: str = typer.Option(
        "auto", "--launcher", envvar="SDLORA_LAUNCHER", help="auto, local, deepspeed, slurm or env."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the launch command and exit."),
) -> None:
    """Train SD-LoRA over every task of a shard set (one DeepSpeed engine per task)."""
    from sdlora_dist.jobs.frontdoor import load_or_resolve, start_training

    cfg, mode = load_or_resolve(
        benchmark=benchmark, config=config, sets=set_, data=data, run_dir=run_dir, resume=resume,
        continue_run=continue_run, resume_or_start=resume_or_start,
    )  # fmt: skip
    if gpus_per_node is None:
        gpus_per_node, why = default_gpus_per_node()
        if dry_run:
            typer.echo(f"# --gpus-per-node {gpus_per_node} ({why})")
    spec = LaunchSpec(
        nodes=nodes, procs_per_node=gpus_per_node, launcher=launcher, hostfile=hostfile, master_addr=master_addr,
        master_port=master_port, node_rank=node_rank, no_ssh=no_ssh,
    )  # fmt: skip
    code = start_training(cfg, mode, spec, dry_run=dry_run)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``train`` to the app."""
    app.command("train")(train)
