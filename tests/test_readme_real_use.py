"""README's "Your own images and weights, no YAML": every command of its block, in order, as written, against a
generated image folder and a weights file written by timm (48 px, 8 px patches; issue 24)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from weights_fixtures import NEW_CLASSES, OWN_CLASSES, write_class_folders, write_timm_weights

REPO = Path(__file__).resolve().parents[1]
SECTION = "### Your own images and weights, no YAML"
# the README's placeholder paths -> where the test wrote those files
PLACEHOLDERS = ("/data/mine", "/data/new", "/models/vit")


def readme_real_use_commands() -> list[str]:
    """The bash block of the README section, one command per line."""
    text = (REPO / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n### ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for line in block.splitlines() if line.strip()]


def run(command: str, cwd: Path, paths: dict[str, Path]) -> subprocess.CompletedProcess:
    """One README command through the installed CLI (``sdlora`` -> this interpreter), placeholders replaced."""
    for placeholder, real in paths.items():
        command = command.replace(placeholder, str(real))
    argv = shlex.split(command)
    assert argv[0] == "sdlora", command
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sdlora_dist.cli.main", *argv[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=cwd)


def test_the_block_uses_only_known_placeholders_and_every_step():
    commands = readme_real_use_commands()
    verbs = [" ".join(shlex.split(c)[1:3]) for c in commands]
    for step in ("data prepare", "train --data", "report runs/mine", "data add-task", "train --continue"):
        assert step in verbs, (step, verbs)
    assert sum(v.startswith("export") for v in verbs) == 2 and sum(v.startswith("predict") for v in verbs) == 2
    absolute = [arg for c in commands for arg in shlex.split(c) if arg.startswith("/")]
    assert absolute and all(arg.startswith(PLACEHOLDERS) for arg in absolute), absolute


@pytest.mark.slow
def test_readme_real_use_commands_run_as_written(tmp_path):
    import onnx

    paths = {"/data/mine": tmp_path / "photos", "/data/new": tmp_path / "new", "/models/vit": tmp_path / "vit"}
    write_class_folders(paths["/data/mine"], OWN_CLASSES)
    write_class_folders(paths["/data/new"], NEW_CLASSES, first_label=len(OWN_CLASSES))
    write_timm_weights(paths["/models/vit"])  # model.safetensors + timm's config.json, 48 px, patch 8
    home = tmp_path / "home"
    home.mkdir()
    outputs = []
    for command in readme_real_use_commands():
        proc = run(command, home, paths)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr and "warning: task(s)" not in proc.stderr  # 2 classes per task
        outputs.append((command, proc))
        if command.startswith("sdlora export"):  # the weights' input size, not the recipe's or timm's default
            graph = onnx.load(str(home / "model.onnx")).graph
            dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
            assert dims[1:] == [3, 48, 48], dims
    run_dir = home / "runs" / "mine"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["architecture"]["img_size"] == 48 and info["architecture"]["patch_size"] == 8
    assert info["architecture"]["depth"] == 2 and info["architecture"]["sources"]["name"].endswith("architecture")
    assert info["preprocessing"]["input_size"] == [3, 48, 48]
    train_err = next(p.stderr for c, p in outputs if c.startswith("sdlora train --data"))
    assert "architecture of " in train_err and "name vit_tiny_patch16_224 (config.json architecture)" in train_err
    # the two predictions: the first model knows the first 6 classes, the re-exported one all 8
    first, last = [json.loads(p.stdout.splitlines()[0]) for c, p in outputs if c.startswith("sdlora predict")]
    names = {c["class"] for c in first["top_k"]} | {c["class"] for c in last["top_k"]}
    assert names <= set(OWN_CLASSES) | set(NEW_CLASSES)
    props = {p.key: p.value for p in onnx.load(str(home / "model.onnx")).metadata_props}
    assert sorted(json.loads(props["sdlora.class_names"])[-2:]) == sorted(NEW_CLASSES)  # the new task, last
    assert len(json.loads((run_dir / "metrics.json").read_text())["accuracy"]["top1_curve"]) == 4
