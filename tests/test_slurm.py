"""SLURM's compressed host list grammar: the rendezvous host of a multi-node job (no process started)."""

from __future__ import annotations

import pytest

from sdlora_dist.errors import UserError
from sdlora_dist.jobs.slurm import expand_hostlist, first_slurm_host, slurm_to_torch_env


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("a1,b2", ["a1", "b2"]),
        ("node[7]-ib", ["node7-ib"]),
        ("gpu[003-005,020]", ["gpu003", "gpu004", "gpu005", "gpu020"]),
        ("gpu[003-004],cpu1", ["gpu003", "gpu004", "cpu1"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no leading zero: the width grows
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # the lower bound's width is kept
        ("a[1,3]b[2],c[01-02]", ["a1b2", "a3b2", "c01", "c02"]),
        ("x-[1-2].cluster", ["x-1.cluster", "x-2.cluster"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts
    assert first_slurm_host(nodelist) == hosts[0]


def test_first_host_of_two_bracket_groups_is_a_host_name():
    assert first_slurm_host("rack[1-2]-node[01-04]") == "rack1-node01"
    assert len(expand_hostlist("rack[1-2]-node[01-04]")) == 8


@pytest.mark.parametrize("nodelist", ["node[1-2", "node1-2]", "node[a-b]", "node[3-1]", "node[1-]", ""])
def test_malformed_hostlist_is_one_line_with_the_fix(nodelist):
    with pytest.raises(UserError, match=r"--master-addr ADDR") as info:
        first_slurm_host(nodelist)
    assert "\n" not in str(info.value)


def test_torch_env_takes_the_first_host_of_the_step():
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NODELIST": "rack[1-2]-node[01-04]",
           "SLURM_JOB_ID": "1234", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}  # fmt: skip
    got = slurm_to_torch_env(env)
    assert got["MASTER_ADDR"] == "rack1-node01" and got["RANK"] == "3" and got["WORLD_SIZE"] == "8"
    assert got["MASTER_PORT"] == str(20000 + 1234)
