"""Untrusted input, round 2 (issue 37): each numbered case of the issue, reproduced as written. Servers bind to
127.0.0.1, LLMs are fake servers, and no real device node is touched (a FIFO, a symlink and a file in a temporary
folder stand in for them)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from movielm_fast.cli.main import cli
from movielm_fast.engine.config import ModelConfig
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import render
from movielm_fast.run.executors import LocalExecutor
from movielm_fast.run.renderer import Renderer
from tests.helpers import movie, write_plan

SMALL = {"width": 64, "height": 64, "steps": 2, "guidance": 7.5, "seed": 4}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def null_renderer():
    return Renderer(ModelConfig(model="demo", backend="null"))


@pytest.fixture
def rendered(tmp_path, null_renderer):
    out = tmp_path / "out"
    plan = write_plan(tmp_path / "plan.json", [movie("one", 2), movie("two", 2)], SMALL)
    render(RunConfig(out=out, style_training=False), [plan], executor=LocalExecutor(renderer=null_renderer))
    return out


# --- 1. an atomic write never replaces what is not a regular file -------------------------------------------------

def test_a_symlink_destination_is_refused_and_its_target_kept(rendered, tmp_path):
    target = tmp_path / "real.json"
    target.write_text("mine")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    res = CliRunner().invoke(cli, ["dataset", str(rendered), "--dest", str(link)])
    assert res.exit_code == 2 and "symbolic link" in res.output and str(target) in res.output, res.output
    assert link.is_symlink() and target.read_text() == "mine"
    plan = write_plan(tmp_path / "p.json", [movie("q", 2)])
    res = CliRunner().invoke(cli, ["qa", str(plan), "--source", "derived", "--out", str(link)])
    assert res.exit_code == 2 and "symbolic link" in res.output, res.output
    assert link.is_symlink() and target.read_text() == "mine"


def test_a_fifo_destination_is_refused_not_replaced(rendered, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    res = CliRunner().invoke(cli, ["dataset", str(rendered), "--dest", str(fifo)])
    assert res.exit_code == 2 and "named pipe" in res.output, res.output
    assert fifo.is_fifo()


def test_a_regular_file_destination_is_still_replaced(rendered, tmp_path):
    dest = tmp_path / "old.json"
    dest.write_text("old")
    res = CliRunner().invoke(cli, ["dataset", str(rendered), "--dest", str(dest)])
    assert res.exit_code == 0, res.output
    assert len(json.loads(dest.read_text())) > 0


# --- 2. the dataset file never lands in a movie folder ------------------------------------------------------------

@pytest.mark.parametrize("inside", ["one/manifest.json", "one/frames/000.png", "two/new.json"])
def test_dataset_refuses_a_destination_inside_a_movie_folder(rendered, inside):
    before = {p: p.read_bytes() for p in rendered.rglob("*") if p.is_file()}
    res = CliRunner().invoke(cli, ["dataset", str(rendered), "--dest", str(rendered / inside)])
    assert res.exit_code == 2 and "inside the rendered movie folder" in res.output, res.output
    assert {p: p.read_bytes() for p in rendered.rglob("*") if p.is_file()} == before
