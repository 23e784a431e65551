"""A base install (no extras): every command either works or stops with one line naming the extra to install.

Each case runs the real CLI in a subprocess where the optional packages cannot be found: their import finders are
filtered, so ``import openai`` raises ModuleNotFoundError, ``importlib.util.find_spec("openai")`` is None and
``"openai" in sys.modules`` is False -- exactly as when the package is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plan.json"

# package -> the extra that brings it (pyproject.toml [project.optional-dependencies])
OPTIONAL = {"openai": "llm", "av": "video", "onnx": "onnx", "onnxruntime": "onnx", "ray": "cluster",
            "tensorrt": "tensorrt", "polygraphy": "tensorrt", "matplotlib": "bench"}

HIDE_AND_RUN = """
import sys
hidden = set(sys.argv[1].split(","))

class Hidden:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
sys.argv = ["movielm-fast", *sys.argv[2:]]
from movielm_fast.cli.main import cli
cli()
"""


def run_cli(hidden, *args, cwd=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run([sys.executable, "-c", HIDE_AND_RUN, ",".join(hidden), *map(str, args)], cwd=cwd or ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def assert_names_the_extra(result, extra):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert f"pip install 'movielm-fast[{extra}]'" in result.stderr, result.stderr


def test_the_shim_hides_packages_like_an_uninstalled_one():
    code = ("import importlib.util, sys\n"
            "try:\n    import openai\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
            "print(importlib.util.find_spec('openai') is None, 'openai' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", HIDE_AND_RUN.replace("from movielm_fast.cli.main import cli\ncli()",
                                                                         code), "openai"],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["missing", "openai", "True", "False"], result.stderr


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """What `render` leaves behind, made by hand (no model): one movie, two frames."""
    from movielm_fast.paths import sha256_file
    from movielm_fast.run.manifest import MANIFEST_FORMAT

    out = tmp_path_factory.mktemp("rendered")
    movie = {"id": "m", "style": {"name": "Flat"}, "characters": [{"name": "Ada", "appearance": "a woman"}],
             "frames": [{"id": "001", "description": "Ada waves.", "dialogue": "Hi.", "speaker": "Ada"},
                        {"id": "002", "description": "Ada sits.", "shot": "wide"}]}
    (out / "m" / "frames").mkdir(parents=True)
    entries = []
    for frame in movie["frames"]:
        path = out / "m" / "frames" / f"{frame['id']}.png"
        Image.new("RGB", (32, 32), (200, 10, 10)).save(path)
        entries.append({"id": frame["id"], "file": f"frames/{frame['id']}.png", "sha256": sha256_file(path)})
    (out / "m" / "manifest.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "movie": movie,
                                                         "frames": entries}))
    return out


# --- commands that need one optional package --------------------------------------------------------------------


def test_plan_without_openai(tmp_path):
    result = run_cli(["openai"], "plan", "a heist", "--base-url", "http://127.0.0.1:9/v1", "--out", tmp_path)
    assert_names_the_extra(result, "llm")
    assert not list(tmp_path.iterdir())


def test_qa_from_the_llm_without_openai(tmp_path):
    result = run_cli(["openai"], "qa", EXAMPLE, "--base-url", "http://127.0.0.1:9/v1", "--out", tmp_path / "qa.json")
    assert_names_the_extra(result, "llm")


def test_dataset_video_without_av(rendered, tmp_path):
    result = run_cli(["av"], "dataset", rendered, "--video", "--dest", tmp_path / "d.json")
    assert_names_the_extra(result, "video")
    assert not (rendered / "m" / "movie.mp4").exists() and not (tmp_path / "d.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("hidden, extra, args", [
    pytest.param(["onnxruntime"], "onnx", ["render", EXAMPLE, "--backend", "onnxruntime"], id="render-onnxruntime"),
    pytest.param(["ray"], "cluster", ["render", EXAMPLE, "--cluster", "ray", "--address", "local"], id="render-ray"),
    pytest.param(["onnxruntime"], "onnx", ["export", "--backend", "onnxruntime"], id="export-onnxruntime"),
    pytest.param(["onnx"], "onnx", ["render", EXAMPLE, "--backend", "onnxruntime"], id="render-onnx"),
    pytest.param(["tensorrt", "polygraphy"], "tensorrt", ["render", EXAMPLE, "--backend", "tensorrt"],
                 id="render-tensorrt"),
])
def test_render_and_export_without_their_extra(hidden, extra, args, tmp_path):
    more = ["--steps", "1", "--out", tmp_path / "out"] if args[0] == "render" else []
    assert_names_the_extra(run_cli(hidden, *args, *more, cwd=tmp_path), extra)


@pytest.mark.slow
def test_bench_without_matplotlib_runs_and_says_which_extra_plots(tmp_path):
    result = run_cli(["matplotlib"], "bench", "--model", "demo", "--backend", "torch", "--sizes", "64x64",
                     "--batch-sizes", "1", "--steps", "1", "--repeats", "1", "--warmup", "0", "--no-baseline",
                     "--out", tmp_path / "results", cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "matplotlib is not installed" in result.stdout + result.stderr
    assert list((tmp_path / "results").glob("*.json")) and not list((tmp_path / "results").glob("*.png"))


# --- a base install: everything that needs no extra works with all of them missing ------------------------------


ALL = sorted(OPTIONAL)


def test_every_command_starts_without_any_extra():
    for command in (["--help"], ["plan", "--help"], ["qa", "--help"], ["dataset", "--help"], ["render", "--help"],
                    ["export", "--help"], ["style", "--help"], ["bench", "--help"], ["style", "list"]):
        result = run_cli(ALL, *command)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr)


def test_derived_qa_and_frame_dataset_without_any_extra(rendered, tmp_path):
    result = run_cli(ALL, "qa", EXAMPLE, "--source", "derived", "--out", tmp_path / "qa.json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads((tmp_path / "qa.json").read_text())) == 2
    result = run_cli(ALL, "dataset", rendered, "--dest", tmp_path / "d.json")
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "d.json").read_text())
    assert records and records[0]["dialogue"] == [{"frame": "001", "speaker": "Ada", "text": "Hi."}]


@pytest.mark.slow
def test_render_with_the_torch_backend_without_any_extra(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"id": "m", "style": {"name": "Flat"},
                                "characters": [{"name": "Ada", "appearance": "a woman"}],
                                "frames": [{"id": "001", "description": "Ada waves.", "shot": "wide"}]}))
    result = run_cli(ALL, "render", plan, "--steps", "1", "--width", "64", "--height", "64", "--quiet",
                     "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert len(list((tmp_path / "out").rglob("frames/*"))) == 1
