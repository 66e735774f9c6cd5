"""Entry point of the ``sdlora`` console script: a thin Typer app; errors a user can cause exit with code 2."""

from __future__ import annotations

import sys

import typer

from sdlora_dist.errors import UserError

# Packages a command imports only when it needs them -> the extra of pyproject.toml that installs them.
OPTIONAL_PACKAGES = {
    "onnxruntime": "cpu", "onnxscript": "cpu", "tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb",
}  # fmt: skip

app = typer.Typer(
    name="sdlora",
    help="SD-LoRA class-incremental learning on ViTs: shards, DeepSpeed training, ONNX export and serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def package_version() -> str:
    """The installed distribution's version (``sdlora_dist.__version__``: pyproject.toml via package metadata)."""
    from sdlora_dist import __version__

    return __version__ if __version__ != "0+unknown" else "unknown (not installed: pip install -e .)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"sdlora {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only; no progress bars."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug messages too."),
) -> None:
    """SD-LoRA class-incremental learning on ViTs: shards, DeepSpeed training, ONNX export and serving."""
    from sdlora_dist.logs import set_verbosity

    if quiet and verbose:
        raise UserError("-q and -v contradict each other: pass one of them")
    set_verbosity(quiet, verbose)


@app.command("config-docs")
def config_docs(
    out: str = typer.Option(None, "--out", help="Write the Markdown here instead of stdout."),
) -> None:
    """Print the configuration reference generated from the config classes."""
    from pathlib import Path

    from sdlora_dist.config import config_reference

    text = config_reference() + "\n"
    if out:
        Path(out).write_text(text)
    else:
        typer.echo(text, nl=False)


def _register_commands() -> None:
    # Each command group lives in its own module and adds itself to ``app``.
    from sdlora_dist.cli import data_cmds, demo_cmds, export_cmds, lifecycle_cmds, report_cmds, train_cmds

    for module in (data_cmds, train_cmds, export_cmds, lifecycle_cmds, report_cmds, demo_cmds):
        module.register(app)


_register_commands()


def missing_package_message(exc: ModuleNotFoundError) -> str | None:
    """The one line for an optional package that is not installed, naming the extra; None for any other module."""
    package = (exc.name or "").split(".")[0]
    extra = OPTIONAL_PACKAGES.get(package)
    if extra is None:
        return None
    alternative = " (or [gpu] on a CUDA machine)" if extra == "cpu" else ""
    return (
        f"the Python package {package!r} is not installed: install the [{extra}] extra{alternative}, "
        f"e.g. pip install -e '.[{extra}]' in a checkout or pip install 'sdlora-dist[{extra}]'"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: a UserError or missing optional package is one ``error: ...`` line and
    code 2, Ctrl-C 130."""
    try:
        app(args=argv, prog_name="sdlora")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = missing_package_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training job (which reports its own line)
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except SystemExit as exc:  # typer's standalone mode always ends this way
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def entry() -> None:
    """Console-script shim."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
