"""What a newcomer meets (issue 28): model-aware defaults, progress stages and steps, messages right for the case,
A1111 `parameters` in every frame format, the AMX hint once, make's defaults, plan checks in one pass, fp16 on the
CPU, --version and hub ids. CPU, the demo model at 64x64 and tiny random-weight models."""

from __future__ import annotations

import json
import logging
import re
import shutil
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from movielm_fast.cli.main import cli
from movielm_fast.engine import cpu
from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.models import DEFAULTS_FILE, content_hash, model_defaults, size_warning
from movielm_fast.errors import UserError
from movielm_fast.plan import RenderSettings, parse_plan
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import STAGES, render
from movielm_fast.run.executors import LocalExecutor
from movielm_fast.run.renderer import Renderer
from tests.helpers import movie, write_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"width": 64, "height": 64, "steps": 2, "guidance": 4.0, "seed": 5}


@pytest.fixture(scope="module")
def demo():
    return Renderer(ModelConfig(model="demo"))


def _cli(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def _render(renderer, tmp_path, movies, defaults=None, progress=None, **cfg):
    plan = write_plan(tmp_path / "plan.json", movies, defaults)
    out = tmp_path / "out"
    summary = render(RunConfig(out=out, **{"style_training": False, **cfg}), [plan], progress=progress,
                     executor=LocalExecutor(renderer=renderer))
    return summary, out


# --- an A1111 "parameters" parser of our own (A1111's format: prompt lines, "Negative prompt: ...", then the
# "Key: value, Key: value" line; values with a comma or colon are JSON-quoted) --------------------------------------

_PAIR = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict[str, str]:
    *head, last = text.strip().split("\n")
    pairs = {k: json.loads(v) if v.startswith('"') else v for k, v in _PAIR.findall(last)}
    assert len(pairs) >= 3, f"no parameter line in {text!r}"
    prompt, negative, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), **pairs}


def user_comment(path: Path) -> str:
    """The "parameters" text A1111 finds in a JPEG/WebP, read the way its read_info_from_image reads it: Pillow's
    raw `info["exif"]`, piexif.load, the Exif IFD's UserComment, piexif's UserComment.load (and on a ValueError the
    comment's bytes decoded as UTF-8: a UserComment of the wrong EXIF type fails there, as it does in A1111)."""
    import piexif
    import piexif.helper

    with Image.open(path) as im:
        comment = piexif.load(im.info["exif"])["Exif"].get(piexif.ExifIFD.UserComment, b"")
        raw = im.getexif().get_ifd(0x8769)[0x9286]
    assert raw[:8] == b"UNICODE\0", raw[:8]  # as A1111 writes it: UTF-16 text with its character code
    try:
        return piexif.helper.UserComment.load(comment)
    except ValueError:
        return comment.decode("utf8", errors="ignore")


# --- 1. defaults from the model -------------------------------------------------------------------------------

def test_unset_settings_come_from_the_model(demo, tmp_path):
    plain = movie("m", 1, style={"name": "Neon", "description": ""},
                  characters=[{"name": "Rosa", "appearance": "a big red circle"}])
    plain["frames"][0]["description"] = "Rosa on the left, at night"
    summary, out = _render(demo, tmp_path, [plain])
    assert summary.frames_rendered == 1
    manifest = json.loads((out / "m" / "manifest.json").read_text())
    entry = manifest["frames"][0]
    # The demo model's own defaults (its movielm_defaults.json), not 512x512 / 25 steps / 7.5.
    assert (entry["width"], entry["height"], entry["steps"], entry["guidance"]) == (64, 64, 20, 4.0)
    with Image.open(out / "m" / entry["file"]) as im:
        assert im.size == (64, 64)


def test_cascade_flags_plan_model_builtin(tiny_sd, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd, folder)
    before = content_hash(folder)
    (folder / DEFAULTS_FILE).write_text(json.dumps({"steps": 9, "guidance": 3.0}))
    assert content_hash(folder) == before, "the defaults file must not change resume keys"
    bundle = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=32)), vae_scale_factor=8,
                             path=folder)
    model = RenderSettings(**model_defaults(bundle))
    assert (model.width, model.height, model.steps, model.guidance) == (256, 256, 9, 3.0)
    [lm] = parse_plan({"version": 1, "defaults": {"guidance": 6.0},
                       "movies": [{**movie("m", 1), "render": {"width": 128}}]})
    s = lm.resolved(RenderSettings(height=192), model)
    assert (s.width, s.height, s.steps, s.guidance, s.scheduler) == (128, 192, 9, 6.0, "dpmpp")
    assert lm.resolved(None, RenderSettings()).steps == 25  # nothing from the model: the built-in default
    assert lm.resolved().width == 128 and lm.resolved().height == 512  # without a model: as before


def test_explicit_size_far_from_native_warns_once(demo, tmp_path, caplog):
    assert size_warning(64, 64, 64) is None and size_warning(96, 128, 64) is None
    assert "native 64x64" in size_warning(256, 256, 64)
    with caplog.at_level(logging.WARNING, logger="movielm_fast"):
        _render(demo, tmp_path, [movie("a", 2), movie("b", 1)], {**SMALL, "width": 256, "height": 256, "steps": 1})
    far = [r.message for r in caplog.records if "far from this model's native 64x64" in r.message]
    assert len(far) == 1 and "256x256" in far[0]


def test_explicit_settings_keep_their_resume_keys(demo, tmp_path):
    s1, out = _render(demo, tmp_path, [movie("k", 2)], SMALL)
    s2, _ = _render(demo, tmp_path, [movie("k", 2)], SMALL)
    assert (s1.frames_rendered, s2.frames_skipped, s2.frames_rendered) == (2, 2, 0)


# --- 2. progress -------------------------------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.events: list[tuple] = []

    def __call__(self, done, total):
        self.events.append(("frames", done, total))

    def stage(self, name):
        self.events.append(("stage", name))

    def step(self, done, total):
        self.events.append(("step", done, total))


def test_progress_reports_stages_and_steps(tmp_path):
    rec = Recorder()
    plan = write_plan(tmp_path / "plan.json", [movie("p", 2)], {**SMALL, "steps": 3})
    render(RunConfig(out=tmp_path / "out", batch_size=2, style_training=False), [plan], progress=rec, model=ModelConfig(model="demo"))
    stages = [e[1] for e in rec.events if e[0] == "stage"]
    assert stages == list(STAGES) == ["validate", "load", "styles", "render", "write"]
    steps = [e[1:] for e in rec.events if e[0] == "step"]
    assert steps == [(1, 3), (2, 3), (3, 3)], "each step of the one batch, before the batch is done"
    first_frames = next(i for i, e in enumerate(rec.events) if e[0] == "frames" and e[1] > 0)
    assert max(i for i, e in enumerate(rec.events) if e[0] == "step") < first_frames


def test_cli_shows_stages_unless_quiet_or_json(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("q", 1)], SMALL)
    shown = _cli("render", plan, "--out", tmp_path / "a", "--no-style-training")
    assert shown.exit_code == 0, shown.output
    for label in ("checking the plans: done", "loading the model: done", "rendering: done", "writing files: done"):
        assert label in shown.output, shown.output
    quiet = _cli("render", plan, "--out", tmp_path / "b", "--no-style-training", "--quiet")
    assert quiet.exit_code == 0 and "loading the model" not in quiet.output and "rendered" in quiet.output
    as_json = _cli("render", plan, "--out", tmp_path / "c", "--no-style-training", "--json")
    assert as_json.exit_code == 0 and len(as_json.output.strip().splitlines()) == 1
    assert json.loads(as_json.output)["rendered"] == 1


# --- 3. messages ----------------------------------------------------------------------------------------------

def test_render_help_describes_the_trained_demo_model():
    res = _cli("render", "--help")
    assert res.exit_code == 0 and "RANDOM" not in res.output and "trained on this project's toy" in res.output


class _StubClient:
    """What complete_json needs of an LLM client, answering `replies` in turn."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.usage = SimpleNamespace(count=lambda what: None)

    def chat(self, messages, **kw):
        return SimpleNamespace(content=self.replies.pop(0), cache_key=str(len(self.replies)), finish_reason="stop",
                               max_tokens=None)

    def forget(self, key):
        pass


def _strict_check(data):
    if data != {"ok": True}:
        raise ValueError("- $: not ok")
    return data


def test_llm_failure_hint_names_the_llm_flag_and_stale_replies_go(tmp_path):
    from movielm_fast.data.llm.client import complete_json

    raw = tmp_path / "failed" / "m.raw.txt"
    with pytest.raises(UserError) as err:
        complete_json(_StubClient('{"a": 1}', '{"b": 2}'), [{"role": "user", "content": "q"}], _strict_check, None,
                      raw, "QA", max_tries=2)
    assert "--llm-model" in err.value.hint and "stronger --model" not in err.value.hint
    assert raw.is_file()
    # 6. A rerun that succeeds removes the earlier failure's raw replies.
    assert complete_json(_StubClient('{"ok": true}'), [{"role": "user", "content": "q"}], _strict_check, None, raw,
                         "QA") == {"ok": True}
    assert not raw.exists()


def test_missing_python_package_is_not_called_a_corrupt_folder(tmp_path):
    from movielm_fast.engine.models import _load

    class NeedsPackage:
        @staticmethod
        def from_pretrained(*a, **kw):
            raise ImportError("this model needs xformers", name="xformers")

    with pytest.raises(UserError) as err:
        _load(NeedsPackage, tmp_path, "unet", None)
    assert "pip install xformers" in err.value.hint and "corrupt" not in err.value.hint


def test_damaged_safetensors_and_missing_lora_messages(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    plan = write_plan(tmp_path / "plan.json", [movie("e", 1)], SMALL)
    res = _cli("render", plan, "--model", bad, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "truncated or damaged" in res.output and "download it again" in res.output
    assert "convert it" not in res.output and "Traceback" not in res.output
    res = _cli("render", plan, "--lora", tmp_path / "missing.safetensors", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "relative to the working directory" in res.output
    assert "relative to the plan file" not in res.output


def test_gallery_leaves_out_an_empty_style_description():
    from movielm_fast.data.gallery import movie_section

    [lm] = parse_plan(movie("g", 1, style={"name": "Pastel", "description": ""}))
    assert "<b>Style</b>: Pastel</p>" in movie_section(lm.movie, {}, {})
    [lm] = parse_plan(movie("g", 1, style={"name": "Pastel", "description": "soft"}))
    assert "<b>Style</b>: Pastel: soft</p>" in movie_section(lm.movie, {}, {})


# --- 4. A1111 parameters ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_frames_carry_a1111_parameters(demo, tmp_path, fmt):
    m = movie("a", 1)
    m["render"] = {"negative_prompt": "blurry, dark: low quality"}
    _, out = _render(demo, tmp_path, [m], SMALL, image_format=fmt)
    entry = json.loads((out / "a" / "manifest.json").read_text())["frames"][0]
    path = out / "a" / entry["file"]
    if fmt == "png":
        with Image.open(path) as im:
            text = im.text
        assert text["prompt"] == entry["prompt"] and text["seed"] == str(entry["seed"])  # ours stay
        params = parse_a1111(text["parameters"])
    else:
        with Image.open(path) as im:
            assert json.loads(im.getexif()[0x010E])["prompt"] == entry["prompt"]  # our JSON stays
        params = parse_a1111(user_comment(path))
    assert params["prompt"] == entry["prompt"]
    assert params["negative_prompt"] == "blurry, dark: low quality"
    assert params["Steps"] == "2" and params["CFG scale"] == "4.0" and params["Seed"] == str(entry["seed"])
    assert params["Sampler"] == "DPM++ 2M" and params["Size"] == "64x64" and params["Model"] == "demo"


# --- 5. the AMX hint ------------------------------------------------------------------------------------------

AMX_CPUINFO = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"


def test_amx_hint_once_per_machine_never_quiet(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MOVIELM_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu, "host_cpu", lambda: cpu.detect(text=AMX_CPUINFO, torch_capability=None))
    on_cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="movielm_fast"):
        cpu._warn_once.cache_clear()
        cpu.print_auto_dtype_hint("auto", on_cpu, quiet=True)
        assert not caplog.records and not cpu.hints_file().exists()
        cpu.print_auto_dtype_hint("auto", on_cpu)
        cpu._warn_once.cache_clear()  # as a new process: only the cache remembers
        cpu.print_auto_dtype_hint("auto", on_cpu)
    hints = [r.message for r in caplog.records if "has AMX" in r.message]
    assert len(hints) == 1 and "movielm-fast bench --cpu-bf16" in hints[0]
    # The command it offers exists after the README's set-up (no openvino needed).
    res = _cli("bench", "--help")
    assert res.exit_code == 0 and "--cpu-bf16" in res.output


def test_cpu_bf16_measurement_refuses_without_native_bf16():
    from movielm_fast.bench.cpu_bf16 import measure

    avx2 = cpu.detect(text="model name\t: AMD EPYC\nflags\t\t: avx2\n", torch_capability=None)
    with pytest.raises(UserError, match="no native bf16"):
        measure("tiny-sd", features=avx2)


# --- 6. make's defaults ---------------------------------------------------------------------------------------

def _qa(plot: int) -> dict:
    pair = {"question": "Q?", "answer": "A."}
    return {"overview_qa": [pair], "plot_qa": [pair] * plot, "temporal_qa": [pair]}


def test_qa_counts_get_the_slack_plans_get():
    from movielm_fast.data.llm.qa import check_llm_qa

    assert len(check_llm_qa(_qa(4), 5)["plot_qa"]) == 4  # within 25% (at least 2) of 5
    assert len(check_llm_qa(_qa(3), 5)["plot_qa"]) == 3
    with pytest.raises(ValueError, match="at least 3 are accepted"):
        check_llm_qa(_qa(2), 5)
    with pytest.raises(ValueError, match="exactly 5 are required"):
        check_llm_qa(_qa(4), 5, strict=True)


def test_style_training_is_skipped_on_the_demo_model_with_the_reason(demo, tmp_path, caplog):
    neon = movie("s", 1, style={"name": "Neon", "description": ""})
    with caplog.at_level(logging.WARNING, logger="movielm_fast"):
        summary, out = _render(demo, tmp_path, [neon], SMALL, style_training=True)
    assert summary.failures == [] and summary.frames_rendered == 1
    entry = json.loads((out / "s" / "manifest.json").read_text())["frames"][0]
    assert entry["prompt"].startswith("Neon style")  # the style by name, not a learned token
    assert any("style training skipped" in r.getMessage() and "demo model" in r.getMessage() for r in caplog.records)


# --- 7. plan checks in one pass ----------------------------------------------------------------------------------

def test_every_plan_problem_at_once(tmp_path):
    m = movie("p", 2)
    m["frames"][0]["dialouge"] = "hi"
    m["frames"][1].update(speaker="Rossa")
    other = movie("q", 1)
    other["stlye"] = other.pop("style")
    write_plan(tmp_path / "a.json", [m])
    write_plan(tmp_path / "b.json", [other])
    res = _cli("render", tmp_path, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "$.movies[0].frames[0].dialouge: unknown key 'dialouge': did you mean 'dialogue'?" in res.output
    assert "$.movies[0].frames[1].speaker: unknown character 'Rossa' as speaker: did you mean 'Rosa'?" in res.output
    assert "b.json" in res.output and "unknown key 'stlye'" in res.output


# --- 8. fp16 on the CPU -------------------------------------------------------------------------------------

def test_fp16_on_the_cpu_warns_with_the_fix(tiny_sd, caplog):
    with caplog.at_level(logging.WARNING, logger="movielm_fast"):
        Renderer(ModelConfig(model=str(tiny_sd), dtype="fp16"))
    assert any("--dtype fp16 on the CPU" in r.message and "--dtype fp32" in r.message for r in caplog.records)


# --- 9. --version, 11. hub ids ----------------------------------------------------------------------------------

def test_version():
    res = _cli("--version")
    assert res.exit_code == 0 and res.output.strip() == f"movielm-fast {version('movielm-fast')}"


def test_hub_id_says_how_to_get_a_local_folder(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("h", 1)], SMALL)
    res = _cli("render", plan, "--model", "stabilityai/sdxl-turbo", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "huggingface-cli download stabilityai/sdxl-turbo --local-dir models/sdxl-turbo" in res.output
    assert "hf download" in res.output and "then pass --model" in res.output
    # A repository removed upstream (issue 33) is answered with where its weights are now.
    res = _cli("render", plan, "--model", "runwayml/stable-diffusion-v1-5", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "was removed from the hub" in res.output
    assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir" in res.output


# --- issue 33: -v anywhere, flags checked before the heavy imports, defaults shown -----------------------------------

def test_verbose_before_or_after_the_command(tmp_path, monkeypatch):
    from movielm_fast.cli import main

    seen = []
    monkeypatch.setattr(main, "configure_logging", seen.append)
    for args in (["-v", "style", "list"], ["style", "list", "-v"], ["style", "-v", "list"], ["style", "list"]):
        res = _cli(*args, "--out", tmp_path)
        assert res.exit_code == 0, res.output
    assert seen == [True, True, True, False]


def test_bad_choices_fail_before_torch_is_imported(tmp_path):
    import subprocess
    import sys

    plan = write_plan(tmp_path / "plan.json", [movie("c", 1)], SMALL)
    code = ("import sys; from movielm_fast.cli.main import cli\n"
            "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('torch' in sys.modules, e.code)")
    for flags, message in ((["--device", "gpu"], "unknown device 'gpu'"), (["--backend", "onnx"], "'onnx' is not one"),
                           (["--dtype", "fp64"], "'fp64' is not one"), (["--threads", "0"], "positive integer")):
        res = subprocess.run([sys.executable, "-c", code, "render", str(plan), *flags], capture_output=True, text=True)
        assert res.stdout.split() == ["False", "2"] and message in res.stderr, (flags, res.stdout, res.stderr)


def test_render_settings_show_how_their_default_is_found():
    res = _cli("render", "--help")
    text = " ".join(res.output.split())
    assert "Denoising steps. [default: (the plan's, else the model's, else 25)]" in text
    assert "Negative prompt of every frame. [default: (the plan's, else none)]" in text
    assert "--threads N|auto" in text and "--out PATH Output folder" in text


def test_a_failed_stage_says_so_and_leaves_no_bar(tmp_path):
    m = movie("f", 1)
    m["frames"][0]["dialouge"] = "hi"
    plan = write_plan(tmp_path / "plan.json", [m], SMALL)
    res = _cli("render", plan, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "checking the plans: failed after" in res.output
    assert "checking the plans: done" not in res.output and "0/?" not in res.output and "━" not in res.output
