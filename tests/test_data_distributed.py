"""Two gloo processes x two DataLoader workers over uneven shards served by HTTP on 127.0.0.1: equal step counts,
exactly-once evaluation."""

from __future__ import annotations

import json
import multiprocessing
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from data_fixtures import read_shard_set, train_loader
from shard_servers import http_server

from sdlora_dist.data import TransformSpec, load_manifest, make_eval_loader

SPEC = TransformSpec(img_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, shards: str, out_dir: str) -> None:
    # mp.spawn children default to 'spawn' for their own children; ranks started by torchrun/deepspeed (subprocess)
    # fork their DataLoader workers, so do the same here (spawned workers re-import torch: ~5 s each on 2 cores)
    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30)
    )
    result: dict = {"steps": {}, "train_keys": {}}
    for task, epoch in ((0, 0), (0, 1), (3, 0)):
        loader = train_loader(shards, task, spec=SPEC, batch_size=8, epoch=epoch, seed=3, rank=rank, world_size=WORLD,
                              num_workers=2, with_keys=True)  # fmt: skip
        steps, keys = 0, []
        for images, labels, batch_keys in loader:
            assert images.shape[0] == 8 == labels.shape[0]
            total = torch.tensor([float(labels.sum())])
            dist.all_reduce(total)  # one collective per step, as in training: unequal counts would hang here
            steps += 1
            keys += batch_keys
        result["steps"][f"{task}/{epoch}"] = steps
        result["train_keys"][f"{task}/{epoch}"] = keys
    loader = make_eval_loader(shards, [0, 1, 4], spec=SPEC, batch_size=7, rank=rank, world_size=WORLD,
                              num_workers=2, with_keys=True)  # fmt: skip
    eval_keys, eval_labels = [], []
    for _, labels, keys in loader:
        eval_keys += keys
        eval_labels += labels.tolist()
    count = torch.tensor([len(eval_keys)])
    dist.all_reduce(count)  # how the recipe sums evaluation counts
    result |= {"eval_keys": eval_keys, "eval_labels": eval_labels, "eval_total": int(count.item())}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_two_workers(digits_shards: Path, tmp_path: Path) -> None:
    shards = digits_shards  # 287 = 7 x 37 + 28 train samples per task: uneven shards
    manifest = load_manifest(shards)
    assert len({s.count for s in manifest.task_shards("train", 0)}) > 1
    with http_server(shards.parent) as server:  # the ranks and their workers stream every shard over HTTP
        mp.spawn(_rank_main, args=(_free_port(), f"{server.url}/digits", str(tmp_path)), nprocs=WORLD, join=True)
        assert any(p.endswith(".tar") for p in server.requests)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    for key in ("0/0", "0/1", "3/0"):
        task = int(key[0])
        expected = -(-manifest.num_samples("train", task) // (8 * WORLD))
        assert ranks[0]["steps"][key] == ranks[1]["steps"][key] == expected
        both = ranks[0]["train_keys"][key] + ranks[1]["train_keys"][key]
        task_keys = {s["key"] for s in read_shard_set(shards)["train"] if s["task"] == task}
        assert set(both) == task_keys  # the two ranks together cover the task (plus wrap-around fill)
    assert ranks[0]["train_keys"]["0/0"] != ranks[0]["train_keys"]["0/1"]

    test = {s["key"]: s["label"] for s in read_shard_set(shards)["test"] if s["task"] in (0, 1, 4)}
    seen = ranks[0]["eval_keys"] + ranks[1]["eval_keys"]
    assert len(seen) == len(set(seen)) == len(test) == ranks[0]["eval_total"] == ranks[1]["eval_total"]
    assert set(seen) == set(test)
    for r in ranks:
        assert [test[k] for k in r["eval_keys"]] == r["eval_labels"]
