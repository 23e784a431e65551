"""The shape of the code where it matters to the people who change it: how deep the call from the CLI to the UNet
is, and that each setting is declared once (its flag, its serve rule and its default come from one place)."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import movielm_fast
from movielm_fast.cli.main import cli
from tests.helpers import movie, write_plan

PACKAGE = str(Path(movielm_fast.__file__).parent)
MAX_FRAMES = 11
"""Project frames on the stack at the UNet's forward, from the `movielm-fast` group's invoke down (11 when this was
written: the review that set the bound counted 16, 5 of them CLI wrapping)."""


def test_cli_to_unet_is_at_most_eleven_project_frames(tmp_path):
    from diffusers import UNet2DConditionModel

    stacks: list[list[str]] = []

    def probe(module, args):
        if isinstance(module, UNet2DConditionModel):
            frames = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
            stacks.append([f"{Path(f.filename).relative_to(PACKAGE)}:{f.name}" for f in frames])

    plan = write_plan(tmp_path / "plan.json", [movie("d", 1)], {"width": 64, "height": 64, "steps": 1, "seed": 1})
    handle = torch.nn.modules.module.register_module_forward_pre_hook(probe)  # torch's global hook API
    try:
        res = CliRunner().invoke(cli, ["render", str(plan), "--out", str(tmp_path / "out"), "--no-style-training",
                                       "--quiet"])
    finally:
        handle.remove()
    assert res.exit_code == 0, res.output
    assert stacks, "the UNet never ran"
    stack = stacks[0]
    assert stack[0].startswith("cli/") and stack[-1].startswith("export/graphs.py"), stack
    assert len(stack) <= MAX_FRAMES, "\n".join(stack)


def test_every_flag_of_render_is_a_declared_setting():
    """The flags' names, types, defaults and help are those of the settings (movielm_fast.settings): none is declared
    in a table of the CLI's own."""
    from movielm_fast.cli.main import render_cmd
    from movielm_fast.cli.options import RENDER_SETTINGS, setting_flags

    params = {p.name: p for p in render_cmd.params}
    for model, name in setting_flags(*RENDER_SETTINGS):
        field = model.model_fields[name]
        assert params[name].help == field.description, name
        if params[name].multiple:
            assert field.default == ()
        elif not params[name].is_flag:
            assert params[name].default == field.default, name


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "--batch-size: must be a positive integer or 'auto'"),
    (["--quality", "101"], "--quality: Input should be less than or equal to 100"),
    (["--steps", "0"], "--steps: Input should be greater than or equal to 1"),
    (["--workers", "2"], "--workers is a Ray setting"),
    (["--step-cache", "0"], "--step-cache: Input should be greater than or equal to 1"),
])
def test_a_bad_flag_value_is_one_line_naming_the_flag(tmp_path, args, message):
    plan = write_plan(tmp_path / "plan.json", [movie("d", 1)])
    res = CliRunner().invoke(cli, ["render", str(plan), "--out", str(tmp_path / "out"), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "out" / "d").exists()
