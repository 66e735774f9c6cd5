"""Advice that runs as printed: every command an error line names works when pasted, lists say how many were cut,
and a refused weights file or a missing run directory is one line."""

from __future__ import annotations

import pickle
import shlex
import shutil

import pytest
from cli_helpers import error_line, run_main, sdlora
from cli_helpers import sets as tiny_sets
from data_fixtures import make_image_folder, train_loader

from sdlora_dist.data import TransformSpec, load_manifest
from sdlora_dist.errors import UserError

SPEC = TransformSpec(img_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def pasted(line: str, after: str) -> list[str]:
    """The argv of the ``sdlora ...`` command printed in ``line`` after ``after`` (up to the end or ' (full log')."""
    command = line.split(after, 1)[1].split(" (full log: ")[0]
    argv = shlex.split(command)
    assert argv[0] == "sdlora", line
    return argv[1:]


@pytest.mark.slow  # runs prepare twice: over 3 s
def test_truncated_shard_advice_runs_as_printed(digits_shards, tmp_path, capsys):
    shards = tmp_path / "digits"
    shutil.copytree(digits_shards, shards)
    victim = load_manifest(shards).task_shards("train", 0)[1]
    (shards / victim.path).write_bytes((shards / victim.path).read_bytes()[: victim.bytes // 2])
    with pytest.raises(UserError) as info:
        train_loader(shards, 0, spec=SPEC, batch_size=16, epoch=0, seed=1)
    line = str(info.value)
    assert "--set data.bad_shard=skip" in line and "bad_shard='skip'" not in line, line
    argv = pasted(line, "repair it in place with: ")
    assert argv[:4] == ["data", "prepare", "--benchmark", "digits"] and str(shards) in argv
    rc, _, err = run_main(capsys, *argv)
    assert rc == 0, err
    rc, out, err = run_main(capsys, "data", "inspect", str(shards), "--verify")
    assert rc == 0 and "verified" in out, err
    # leaving it out, as the line says, trains
    (shards / victim.path).write_bytes((shards / victim.path).read_bytes()[: victim.bytes // 2])
    proc = sdlora("train", "-b", "digits", "--data", str(shards), "--run-dir", str(tmp_path / "run"),
                  *tiny_sets("train.tasks=1", "train.max_steps_per_epoch=2", "data.bad_shard=skip"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping shard {victim.path}" in proc.stderr


def test_class_order_message_says_how_many_were_cut(digits_shards, tiny_cfg):
    from sdlora_dist.data.classes import resolve_split

    cfg = tiny_cfg("data.class_order=[0, 1, 2, 11, 12, 13, 14, 15, 16, 17]")
    with pytest.raises(UserError) as info:
        resolve_split(load_manifest(digits_shards), cfg.data)
    message = str(info.value)
    assert "missing: 3, 4, 5, 6, 7 and 2 more" in message and "11, 12, 13, 14, 15 and 2 more" in message, message


@pytest.mark.slow
def test_plain_pickle_as_weights_is_only_the_one_line(digits_shards, tmp_path):
    weights = tmp_path / "weights.pkl"
    weights.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))  # not torch.save: torch warns first
    run_dir = tmp_path / "run"
    proc = sdlora("train", "-b", "digits", "--data", str(digits_shards), "--run-dir", str(run_dir),
                  *tiny_sets(f"model.weights={weights}"))  # fmt: skip
    assert proc.returncode == 2
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "model.weights" in error_line(proc.stderr) and not run_dir.exists()


def test_inspect_of_an_interrupted_prepare_names_the_partial_folder_and_the_command(tmp_path, capsys, monkeypatch):
    import importlib

    prepare_module = importlib.import_module("sdlora_dist.data.prepare")  # the module, not the function

    make_image_folder(tmp_path / "src", {"a": 3, "b": 3}, {"a": 1, "b": 1})
    out = tmp_path / "shards"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the shards were written, before the manifest

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "_class_manifest", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare_module.prepare("imagefolder", tmp_path / "src", out, tasks=2, progress=False, workers=1)
    assert (tmp_path / "shards.partial").is_dir() and not out.exists()
    for target in (out, tmp_path / "shards.partial"):
        rc, _, err = run_main(capsys, "data", "inspect", str(target))
        line = error_line(err)
        assert rc == 2 and f"{out}.partial" in line, line
    argv = pasted(line, "finish it with: ")
    rc, _, err = run_main(capsys, *argv)
    assert rc == 0, err
    rc, out_text, err = run_main(capsys, "data", "inspect", str(out))
    assert rc == 0 and "imagefolder: 2 classes, 2 tasks" in out_text, err


def test_resume_of_a_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    rc, _, err = run_main(capsys, "train", "--resume", str(tmp_path / "nope"))
    assert rc == 2
    assert error_line(err) == f"error: --resume {tmp_path / 'nope'}: the folder does not exist; pass the run " + (
        "directory 'sdlora train' wrote"
    )

