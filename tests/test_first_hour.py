"""A new user's first hour (issue 9): README == CI, extras, own images and weights with no YAML, the preprocessing of
the weights actually loaded, readable files, runs that can be moved and retried, the multi-GPU default."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import save_image

REPO = Path(__file__).resolve().parents[1]
TINY_KWARGS = "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}"
TINY = [
    "model.name=vit_tiny_patch16_224",
    TINY_KWARGS,
    "adapter.rank=4",
    "data.batch_size=4",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "train.timeout_s=60",
]
# what a timm / Hugging Face config.json beside the weights says (deliberately not timm's defaults)
WEIGHTS_CFG = {"mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear", "crop_pct": 0.95}


def sdlora(*args: str, cwd: Path | None = None, timeout: int = 400, block: str | None = None):
    """The CLI in a fresh interpreter; ``block`` makes one importable package missing (as if not installed)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    code = "import sys\n"
    if block:
        code += f"sys.modules[{block!r}] = None\n"
    code += "from sdlora_dist.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    cmd = [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def with_sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# ---------------------------------------------------------------------------------------------------------------------
# README == CI


def readme_setup_commands() -> list[str]:
    """The one-line bash blocks of README's "## Set up" section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [b.strip() for b in blocks]


def ci_commands() -> list[str]:
    """The commands ``.ci/run`` runs, printed by its dry mode through the same function that runs them."""
    env = {**os.environ, "SDLORA_CI_DRY_RUN": "1"}
    proc = subprocess.run(
        ["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr
    return [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("README command")]


@pytest.mark.slow
def test_ci_runs_the_readme_commands_verbatim():
    readme = readme_setup_commands()
    assert len(readme) == 2 and all("\n" not in c for c in readme)
    assert readme[0].startswith("pip install -e '.[cpu]'") and "sdlora demo" in readme[0]
    assert "[dev]" not in readme[0] and "pytest" in readme[1]
    assert ci_commands() == readme
    # the script holds each string once, and a change on one side only breaks the equality above
    script = (REPO / ".ci" / "run").read_text()
    assigned = dict(
        shlex.split(line)[0].split("=", 1) for line in script.splitlines() if line.startswith(("DEMO_", "TEST_"))
    )
    assert list(assigned.values()) == readme


# A stand-in ``python3`` for .ci/run: ``python3 -m venv DIR`` makes a fake virtual environment whose ``pip`` does
# nothing, whose ``sdlora demo --out demo`` writes the two demo outputs unless FAKE_DEMO_OUTPUTS=0, and whose
# ``python -m pytest`` exits with FAKE_PYTEST_RC. Each stand-in logs its arguments, $CI and its stdin to FAKE_LOG.
FAKE_PYTHON3 = r"""#!/usr/bin/env bash
[ "$1 $2" = "-m venv" ] || { echo "fake python3: unexpected $*" >&2; exit 3; }
mkdir -p "$3/bin"
printf 'export PATH="%s/bin:$PATH"\n' "$3" > "$3/bin/activate"
log='echo "$(basename "$0") $* CI=$CI stdin=$(readlink /proc/self/fd/0)" >> "$FAKE_LOG"'
printf '#!/usr/bin/env bash\n%s\n' "$log" > "$3/bin/pip"
demo='[ "$FAKE_DEMO_OUTPUTS" = 0 ] || { mkdir -p demo; echo x > demo/model.onnx; echo x > demo/predictions.jsonl; }'
printf '#!/usr/bin/env bash\n%s\n%s\n' "$log" "$demo" > "$3/bin/sdlora"
printf '#!/usr/bin/env bash\n%s\nexit "$FAKE_PYTEST_RC"\n' "$log" > "$3/bin/python"
chmod +x "$3/bin/pip" "$3/bin/sdlora" "$3/bin/python"
"""


def run_ci_with_stubs(tmp_path: Path, pytest_rc: int, demo_outputs: bool) -> tuple[subprocess.CompletedProcess, str]:
    """``.ci/run`` for real, with the stand-in ``python3`` first on PATH: (its result, the stand-ins' log)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    (stubs / "python3").write_text(FAKE_PYTHON3)
    (stubs / "python3").chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    work = tmp_path / "tmp"
    work.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "TMPDIR": str(work), "FAKE_LOG": str(log),
           "FAKE_PYTEST_RC": str(pytest_rc), "FAKE_DEMO_OUTPUTS": "1" if demo_outputs else "0"}  # fmt: skip
    env.pop("CI", None)
    env.pop("SDLORA_CI_DRY_RUN", None)
    proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip
    assert not list(work.iterdir()), "the CI work folder was left behind"
    return proc, log.read_text()


@pytest.mark.slow
def test_ci_fails_when_pytest_collects_nothing(tmp_path):
    proc, log = run_ci_with_stubs(tmp_path, pytest_rc=5, demo_outputs=True)
    assert proc.returncode != 0 and "pytest collected no tests" in proc.stderr, proc.stdout + proc.stderr
    calls = log.splitlines()
    assert [c.split(" CI=")[0] for c in calls] == [
        "pip install -e .[cpu]", "sdlora demo --out demo", "pip install -e .[cpu,tensorboard,dev]",
        "python -m pytest -q",
    ]  # fmt: skip
    assert all(c.endswith("CI=true stdin=/dev/null") for c in calls), log  # no stdin, CI=true


@pytest.mark.slow
def test_ci_fails_when_the_demo_writes_no_outputs(tmp_path):
    proc, log = run_ci_with_stubs(tmp_path, pytest_rc=0, demo_outputs=False)
    assert proc.returncode != 0 and "the demo did not write demo/model.onnx" in proc.stderr, proc.stderr
    assert "python -m pytest" not in log  # stopped before the tests


@pytest.mark.slow
def test_ci_passes_when_both_commands_succeed(tmp_path):
    """The control for the two failures above: the same stand-ins with outputs and exit 0 pass."""
    proc, log = run_ci_with_stubs(tmp_path, pytest_rc=0, demo_outputs=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "README command (tests): exit 0" in proc.stdout and "python -m pytest -q" in log


def test_runtime_extras_install_what_commands_import():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {k: {re.split(r"[<>=]", d)[0] for d in v} for k, v in extras.items()}
    assert {"onnxruntime", "onnxscript"} <= names["cpu"] and {"onnxruntime-gpu", "onnxscript"} <= names["gpu"]
    # test and lint tools only: boto3 and moto's server serve s3:// shards to the tests ([s3] is the run-time extra);
    # mlflow, wandb and tritonclient are what the tracking, registry and Triton tests read back with
    assert names["dev"] == {"pytest", "ruff", "boto3", "moto[server]", "mlflow", "wandb", "tritonclient[grpc]"}
    assert "boto3" in names["s3"]


@pytest.mark.slow
@pytest.mark.parametrize("package", ["onnxruntime", "onnxscript"])
def test_missing_optional_package_is_one_line_naming_the_extra(tmp_path, package):
    from sdlora_dist.cli.main import missing_package_message

    if package == "onnxruntime":  # predict imports it first thing
        proc = sdlora("predict", str(tmp_path / "m.onnx"), str(tmp_path / "a.png"), block=package)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "'onnxruntime'" in lines[0] and "[cpu]" in lines[0] and "Traceback" not in lines[0]
    message = missing_package_message(ModuleNotFoundError(f"No module named '{package}'", name=package))
    assert message is not None and "[cpu] extra" in message and "[gpu]" in message
    assert missing_package_message(ModuleNotFoundError("x", name="numpy")) is None


# ---------------------------------------------------------------------------------------------------------------------
# Readable files


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    from sdlora_dist.fileio import atomic_dir, atomic_path, atomic_write_json

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
        atomic_dir(tmp_path / "folder", lambda d: (d / "c.txt").write_text("c"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "folder" / "c.txt").stat().st_mode) == file_mode
    assert not list(tmp_path.glob(".*"))


def unreadable(root: Path) -> list[str]:
    """Paths under ``root`` that others cannot read (files) or enter (folders)."""
    bad = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = 0o755 if path.is_dir() else 0o644
        if mode & want != want:
            bad.append(f"{path.relative_to(root)} {oct(mode)}")
    return bad


@pytest.mark.slow
def test_demo_output_is_readable_by_others_under_umask_022(tmp_path):
    from sdlora_dist.demo import run_demo

    out = tmp_path / "demo"
    old = os.umask(0o022)
    try:
        run_demo(out, ranks=2, overrides=["train.epochs=1", "train.max_steps_per_epoch=2", "train.timeout_s=60"],
                 backbone_steps=5)  # fmt: skip
    finally:
        os.umask(old)
    names = {p.name for p in out.rglob("*")}
    assert {"manifest.json", "metrics.json", "config.yaml", "backbone.safetensors", "model.onnx", "report"} <= names
    assert {"adapters.safetensors", "predictions.jsonl", "run.json"} <= names
    assert unreadable(out) == []


# ---------------------------------------------------------------------------------------------------------------------
# Own images and weights, no YAML


def make_own_images(root: Path) -> None:
    """6 classes (2 tasks x 3), PNG and JPEG mixed, train/ and test/ class folders."""
    for label, name in enumerate(["ant", "bee", "cat", "dog", "eel", "fox"]):
        for i in range(6):
            save_image(root / "train" / name / f"{i:02d}.{'png' if i % 2 else 'jpg'}", label, i, size=(40, 36))
        for i in range(2):
            save_image(root / "test" / name / f"{i:02d}.{'jpg' if i % 2 else 'png'}", label, 50 + i, size=(40, 36))


def write_own_weights(folder: Path) -> Path:
    """A tiny timm ViT's weights as safetensors, with a timm-style config.json beside them."""
    import timm
    import torch
    from safetensors.torch import save_file

    import sdlora_dist  # noqa: F401  (torchvision compat before timm builds a model)

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2
    )
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    cfg = {"architecture": "vit_tiny_patch16_224", "num_features": 32, "pretrained_cfg": WEIGHTS_CFG}
    (folder / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.slow
def test_own_images_and_weights_without_yaml(tmp_path):
    import onnx

    make_own_images(tmp_path / "photos")
    weights = write_own_weights(tmp_path / "weights")
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir(), elsewhere.mkdir()

    prep = sdlora("data", "prepare", "--benchmark", "imagefolder", "--root", str(tmp_path / "photos"),
                  "--out", "shards/mine", "--tasks", "2", cwd=home)  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    # no -b, no YAML, relative paths
    train = sdlora("train", "--data", "shards/mine", "--run-dir", "runs/mine",
                   *with_sets(f"model.weights={weights}", *TINY), cwd=home)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = home / "runs" / "mine"
    out = train.stdout + train.stderr
    assert f"{weights.absolute()} (" in out and "tensors, sha256 " in out and "mean (0.3, 0.4, 0.5)" in out
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["shards"] == str(home / "shards" / "mine") and config["data"]["benchmark"] == "imagefolder"
    assert config["train"]["optimizer"] == "sgd" and config["adapter"]["preset"] == "paper"  # generic recipe
    assert config["model"]["mean"] == WEIGHTS_CFG["mean"] and config["model"]["crop_pct"] == WEIGHTS_CFG["crop_pct"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["preprocessing"]["mean"] == WEIGHTS_CFG["mean"] and info["preprocessing"]["std"] == WEIGHTS_CFG["std"]
    assert info["preprocessing"]["interpolation"] == "bilinear" and info["preprocessing"]["crop_pct"] == 0.95
    assert info["weights"]["path"] == str(weights.absolute()) and len(info["weights"]["sha256"]) == 16
    assert info["weights"]["tensors"] > 10

    # a killed run resumed from another working directory (shards were given relative to `home`)
    import shutil

    shutil.rmtree(run_dir / "tasks" / "task_01")
    resumed = sdlora("train", "--resume", str(run_dir), cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "tasks" / "task_01").is_dir() and not (elsewhere / "runs").exists()

    report = sdlora("report", "runs/mine", cwd=home)
    assert report.returncode == 0 and (run_dir / "report" / "report.md").is_file(), report.stderr

    # export without onnxscript: one line naming the extra, no file; then with it
    missing = sdlora("export", "model.onnx", "--run", "runs/mine", cwd=home, block="onnxscript")
    assert missing.returncode == 2 and "'onnxscript'" in missing.stderr and "[cpu]" in missing.stderr
    assert "Traceback" not in missing.stderr and not (home / "model.onnx").exists()
    export = sdlora("export", "model.onnx", "--run", "runs/mine", cwd=home)
    assert export.returncode == 0, export.stderr[-3000:]
    props = {p.key: p.value for p in onnx.load(str(home / "model.onnx")).metadata_props}
    assert json.loads(props["sdlora.mean"]) == WEIGHTS_CFG["mean"]
    assert json.loads(props["sdlora.std"]) == WEIGHTS_CFG["std"]
    assert props["sdlora.interpolation"] == "bilinear" and json.loads(props["sdlora.crop_pct"]) == 0.95
    assert info["weights"]["sha256"] in props["sdlora.weights"]

    images = [
        str(tmp_path / "photos" / "test" / "cat" / "00.png"),
        str(tmp_path / "photos" / "test" / "fox" / "01.jpg"),
    ]
    predict = sdlora("predict", "model.onnx", *images, "--top-k", "2", cwd=home)
    assert predict.returncode == 0, predict.stderr
    lines = [json.loads(line) for line in predict.stdout.splitlines()]
    classes = {"ant", "bee", "cat", "dog", "eel", "fox"}
    assert len(lines) == 2 and all(len(x["top_k"]) == 2 and x["top_k"][0]["class"] in classes for x in lines)


def test_explicit_preprocessing_wins_over_the_weights_file(tmp_path):
    from sdlora_dist.jobs.frontdoor import resolve_config

    weights = write_own_weights(tmp_path / "weights")
    cfg = resolve_config(
        "digits", None, [f"model.weights={weights}", "model.std=[0.5, 0.5, 0.5]"], None, str(tmp_path / "r")
    )
    assert cfg.model.mean == WEIGHTS_CFG["mean"] and cfg.model.std == [0.5, 0.5, 0.5]
    assert cfg.model.interpolation == "bilinear" and cfg.model.crop_pct == 0.95
    (tmp_path / "weights" / "config.json").write_text(json.dumps({"mean": [0.1, 0.2, 0.3]}))  # HF top-level keys
    cfg = resolve_config("digits", None, [f"model.weights={weights}"], None, str(tmp_path / "r"))
    assert cfg.model.mean == [0.1, 0.2, 0.3] and cfg.model.std is None
    (tmp_path / "weights" / "config.json").write_text(json.dumps({"mean": [0.1, 0.2]}))
    with pytest.raises(Exception, match="model.mean"):
        resolve_config("digits", None, [f"model.weights={weights}"], None, str(tmp_path / "r"))


def test_safetensors_metadata_preprocessing(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sdlora_dist.model import weights_preprocessing

    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"mean": "[0.1, 0.2, 0.3]", "interpolation": "bicubic"})
    found, source = weights_preprocessing(path)
    assert found == {"mean": [0.1, 0.2, 0.3], "interpolation": "bicubic"} and source == f"{path} metadata"


# ---------------------------------------------------------------------------------------------------------------------
# Failed starts leave nothing behind


@pytest.mark.slow
def test_failed_start_leaves_no_run_directory(digits_shards, tmp_path):
    import torch

    run_dir = tmp_path / "runs" / "r"
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state": Path("a")}, unsafe)  # a pickled class: weights_only loading must refuse it
    for setting, fragment in (
        (f"model.weights={tmp_path / 'missing.safetensors'}", "does not exist"),
        (f"model.weights={unsafe}", "refused unread"),
    ):
        proc = sdlora("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(run_dir),
                      "--set", setting)  # fmt: skip
        assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not run_dir.exists()
    proc = sdlora("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(run_dir), "--nodes", "2",
                  "--hostfile", str(tmp_path / "no-hostfile"), "--set", "model.weights=random")  # fmt: skip
    assert proc.returncode == 2 and not run_dir.exists(), proc.stderr
    # an existing empty folder given as --run-dir is kept, emptied of what the failed start wrote
    run_dir.mkdir(parents=True)
    proc = sdlora("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(run_dir),
                  "--set", f"model.weights={unsafe}")  # fmt: skip
    assert proc.returncode == 2 and run_dir.is_dir() and not any(run_dir.iterdir())


@pytest.mark.slow
def test_rerun_after_failed_start_trains(digits_shards, tmp_path):
    run_dir = tmp_path / "r"
    bad = sdlora("train", "--data", str(digits_shards), "--run-dir", str(run_dir), "--set", "model.weights=/nope.pth")
    assert bad.returncode == 2 and not run_dir.exists()
    good = sdlora("train", "--data", str(digits_shards), "--run-dir", str(run_dir),
                  *with_sets("model.weights=random", "train.tasks=1", "train.epochs=1",
                             "train.max_steps_per_epoch=2", "data.num_workers=0"))  # fmt: skip
    assert good.returncode == 0, good.stderr[-3000:]
    assert (run_dir / "tasks" / "task_00").is_dir()


# ---------------------------------------------------------------------------------------------------------------------
# --gpus-per-node default


def dry_run(digits_shards: Path, monkeypatch, gpus: int) -> str:
    import torch

    from sdlora_dist.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", "--data", str(digits_shards), "--set", "model.weights=random", "--dry-run"])
    assert code == 0
    return out.getvalue()


def test_gpus_per_node_defaults_to_every_visible_gpu(digits_shards, monkeypatch):
    four = dry_run(digits_shards, monkeypatch, 4)
    assert "--gpus-per-node 4 (every visible GPU)" in four and "--nproc-per-node=4" in four
    cpu = dry_run(digits_shards, monkeypatch, 0)
    assert "--gpus-per-node 1 (no GPU visible" in cpu and "--nproc-per-node=4" not in cpu
