"""CPU threads counted from the cores this process may use, set before torch loads, a user's values kept;
and a start-up that does only what the run needs."""

from __future__ import annotations

import os
import subprocess
import sys

from sd35 import cpu_threads
from tests.helpers import subprocess_env


def test_usable_cores_follow_the_affinity_mask_and_the_cgroup_quota(tmp_path):
    mask = len(os.sched_getaffinity(0))
    assert cpu_threads.usable_cores(tmp_path / "none") == mask  # no cgroup files: the mask alone
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_threads.usable_cores(v2) == mask
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a core: one thread, never zero
    assert cpu_threads.usable_cores(v2) == 1
    (v2 / "cpu.max").write_text(f"{150000 * mask} 100000\n")  # more quota than cores: the mask wins
    assert cpu_threads.usable_cores(v2) == mask
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_threads.usable_cores(v1.parent) == mask
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    assert cpu_threads.usable_cores(v1.parent) == 1


def test_settings_keep_what_the_user_set():
    assert cpu_threads.thread_settings({}, 3) == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu_threads.thread_settings({"OMP_NUM_THREADS": "1"}, 3) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu_threads.thread_settings({"OMP_WAIT_POLICY": "active", "OMP_NUM_THREADS": "4"}, 3) == {}
    env = {"OMP_NUM_THREADS": ""}  # set but empty counts as unset
    assert cpu_threads.configure(env) == {
        "OMP_NUM_THREADS": str(cpu_threads.usable_cores()),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    assert env["OMP_NUM_THREADS"] == str(cpu_threads.usable_cores())


_PROBE = """
import os, sys
sys.argv = ["sd35", "--version"]
from sd35.cli import main
assert "torch" not in sys.modules, "the command line imported torch before setting its threads"
try:
    main()
except SystemExit:
    pass
import torch
print(os.environ["OMP_NUM_THREADS"], os.environ["OMP_WAIT_POLICY"], torch.get_num_threads())
"""


def _probe(**env: str) -> list[str]:
    base = {k: v for k, v in subprocess_env().items() if not k.startswith("OMP_")}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**base, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-3:]  # after the version line


def test_the_command_line_sets_threads_before_torch_loads():
    cores = str(cpu_threads.usable_cores())
    assert _probe() == [cores, "PASSIVE", cores]
    assert _probe(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE") == ["1", "ACTIVE", "1"]


def test_main_with_arguments_leaves_the_environment_alone(monkeypatch, capsys):
    from sd35.cli import main

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["--version"]) == 0
    assert "OMP_WAIT_POLICY" not in os.environ


def test_building_a_pipeline_does_not_load_the_compiler():
    """Meta-device construction used to run nn.Embedding's normal_ through torch's Python references,
    importing torch._dynamo: ~2 s of every start-up, more than a demo image's sampling."""
    code = (
        "import sys, torch\nfrom sd35.demo import load_demo_pipeline\nload_demo_pipeline()\n"
        "print('torch._dynamo' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
