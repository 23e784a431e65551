"""CPU threads that fit the machine (issue 33): --threads N|auto on every command that computes, auto capped at the
cores this process may use, ONNX Runtime's intra-op threads following the same setting, and the CLI's passive
OpenMP wait policy, set before torch loads unless the user set one. Speeds are measured by `bench --threads-load`
(bench/threads.py), never here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from movielm_fast.cli.main import cli
from movielm_fast.engine import cpu
from movielm_fast.engine.backends.base import create_backend
from movielm_fast.engine.config import BackendConfig, ModelConfig
from movielm_fast.engine.models import load_model
from movielm_fast.errors import UserError


@pytest.fixture
def torch_threads(monkeypatch):
    """torch's count restored after the test, and no memory of a count an earlier test's `auto` lowered (which a
    later `auto` would otherwise go back up from)."""
    monkeypatch.setattr(cpu, "_lowered", None)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_keeps_torchs_count_within_the_usable_cores(monkeypatch, torch_threads):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 1)
    torch.set_num_threads(2)
    assert cpu.cpu_threads("auto") == 1 and cpu.cpu_threads(3) == 3
    monkeypatch.setattr(cpu, "usable_cores", lambda: 8)
    torch.set_num_threads(1)  # what this process chose (OMP_NUM_THREADS=1, a test's fixture) stays
    assert cpu.cpu_threads("auto") == 1


@pytest.mark.parametrize("busy,expected", [(0.0, 2), (0.9, 2), (1.2, 2), (1.6, 1), (2.0, 1)])
def test_auto_takes_one_thread_when_other_work_holds_every_core(monkeypatch, torch_threads, busy, expected):
    """On 2 cores, one kept busy by other work: two threads still (they beat one, as measured); both busy: one."""
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu, "busy_cores", lambda: busy)
    torch.set_num_threads(2)
    assert cpu.cpu_threads("auto") == expected and cpu.cpu_threads(2) == 2


def test_auto_runs_a_small_denoiser_on_one_thread(monkeypatch, torch_threads):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 4)
    monkeypatch.setattr(cpu, "busy_cores", lambda: 0.0)
    torch.set_num_threads(4)
    assert cpu.cpu_threads("auto", 2_000_000) == 1  # the demo models' size
    assert cpu.cpu_threads("auto", 860_000_000) == 4  # SD 1.5's UNet
    assert cpu.cpu_threads(3, 2_000_000) == 3  # a count the user gives is kept


def test_a_count_lowered_for_load_goes_back_up_when_the_load_is_gone(monkeypatch, torch_threads):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 4)
    torch.set_num_threads(4)
    monkeypatch.setattr(cpu, "busy_cores", lambda: 4.0)
    assert cpu.use_threads("auto") == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(cpu, "busy_cores", lambda: 1.0)
    assert cpu.use_threads("auto") == 4  # back to torch's own count, not stuck at the lowered one
    torch.set_num_threads(2)  # the process's own choice from here on
    monkeypatch.setattr(cpu, "busy_cores", lambda: 0.0)
    assert cpu.use_threads("auto") == 2


def test_busy_cores_reads_this_machines_load():
    busy = cpu.busy_cores()
    assert 0.0 <= busy <= cpu.usable_cores() + 1e-6


def test_usable_cores_follow_the_affinity_mask():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no affinity masks on this OS")
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " \
           "from movielm_fast.engine.cpu import usable_cores; print(usable_cores())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_every_backend_sets_torchs_threads(tiny_sd, torch_threads):
    model = load_model(tiny_sd)
    create_backend("null", model, BackendConfig(threads=1))
    assert torch.get_num_threads() == 1
    with pytest.raises(UserError, match="--threads: must be a positive integer or 'auto'"):
        BackendConfig(threads="many")


def test_onnx_runtime_intra_op_threads_follow_the_setting(tiny_sd, torch_threads):
    pytest.importorskip("onnxruntime")
    from movielm_fast.run.renderer import Renderer

    r = Renderer(ModelConfig(model=str(tiny_sd), backend="onnxruntime", threads=1))
    assert {g.session.get_session_options().intra_op_num_threads for g in r.backend.graphs.values()} == {1}


@pytest.mark.parametrize("command", [["render"], ["make"], ["serve"], ["style", "train"], ["bench"], ["export"]])
def test_every_command_that_computes_takes_threads(command):
    res = CliRunner().invoke(cli, [*command, "--help"])
    assert res.exit_code == 0 and "--threads" in res.output, res.output


@pytest.mark.parametrize("preset,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_cli_makes_idle_threads_sleep_unless_told_otherwise(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import os, sys; from movielm_fast.cli.main import cli\n"
            "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[-2:] == [expected, "False"]  # set before anything imported torch
