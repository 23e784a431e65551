"""Rendering on Ray: same outputs as a local run, fault tolerance, bad movies, resume, clear errors.

One private Ray instance (loopback only, 2 CPUs) serves the whole module, and after the first tests one pool of two
1-core workers: starting Ray and workers costs seconds each on a small machine. Tests run in file order.
"""

import json
import logging
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch

from movielm_fast.engine.config import ModelConfig
from movielm_fast.errors import UserError
from movielm_fast.run.cluster import RayExecutor, render_on_ray
from movielm_fast.run.config import ClusterOptions, RunConfig
from movielm_fast.run.driver import render
from tests.helpers import load_png, movie, write_plan

SMALL = {"width": 64, "height": 64, "steps": 2, "guidance": 7.5, "seed": 5}
TOKEN = "<ink-wash-style>"


@pytest.fixture(scope="module")
def ray_local():
    # Must be in the environment before Ray is imported: every server of the local instance then binds 127.0.0.1.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
             logging_level=logging.WARNING)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """10 movies in two plan files: mixed frame counts, one with its own render settings (another batch group),
    one with a learned style embedding (must reach the workers through the object store)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("plans")
    save_file({TOKEN: torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}, str(d / "ink.safetensors"))
    a = [movie(f"a{i}", 3 if i % 2 else 2) for i in range(5)]
    a[1]["style"] = {"name": "Ink", "description": "ink wash", "embedding": "ink.safetensors"}
    b = [movie(f"b{i}", 3) for i in range(5)]
    b[2]["render"] = {"steps": 3, "scheduler": "euler"}
    write_plan(d / "a.json", a, SMALL)
    write_plan(d / "b.json", b, SMALL)
    return d


def _frames(out):
    """{(movie, frame): manifest entry} for every movie folder under `out`."""
    found = {}
    for manifest in sorted(out.glob("*/manifest.json")):
        for entry in json.loads(manifest.read_text())["frames"]:
            assert (manifest.parent.name, entry["id"]) not in found
            found[manifest.parent.name, entry["id"]] = entry
    return found


@pytest.fixture(scope="module")
def reference(plans, tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    summary = render(RunConfig(out=out, batch_size=2, style_training=False), [plans], model=ModelConfig(model=str(tiny_sd)))
    assert summary.frames_rendered == 27
    return out


def _model(tiny_sd):
    return ModelConfig(model=str(tiny_sd))


def _config(out):
    return RunConfig(out=out, batch_size=2, style_training=False)


def _assert_same_as_reference(out, reference, movies=None):
    ref, got = _frames(reference), _frames(out)
    if movies is not None:
        ref = {k: v for k, v in ref.items() if k[0] in movies}
    assert set(got) == set(ref)
    for key, entry in ref.items():
        mine = got[key]
        assert mine.keys() == entry.keys()
        # Everything that determines the pixels is the same; only timings and (maybe) PNG bytes differ.
        assert {k: v for k, v in mine.items() if k not in ("seconds", "sha256")} == \
            {k: v for k, v in entry.items() if k not in ("seconds", "sha256")}
        a, b = load_png(out / key[0] / mine["file"]), load_png(reference / key[0] / entry["file"])
        assert a.shape == b.shape == (64, 64, 3)
        assert abs(a - b).max() <= 2
    for movie_id in {k[0] for k in ref}:
        m_ref = json.loads((reference / movie_id / "manifest.json").read_text())
        m_got = json.loads((out / movie_id / "manifest.json").read_text())
        assert {k: v for k, v in m_got.items() if k != "frames"} == {k: v for k, v in m_ref.items() if k != "frames"}
        assert (out / movie_id / "storyboard.png").is_file()
    assert not list(out.rglob("*.tmp"))


def test_clear_errors(ray_local, plans, tiny_sd, tmp_path):
    # First in the module: the failed start below needs a free CPU, which the shared pool holds once it exists.
    with pytest.raises(UserError, match="more than the cluster can host") as exc:
        render_on_ray(_model(tiny_sd), _config(tmp_path), [plans], ClusterOptions(workers=3))
    assert "--workers 2" in exc.value.hint
    gpu = ModelConfig(model=str(tiny_sd), device="cuda")
    with pytest.raises(UserError, match="no worker can fit the model: the Ray cluster has no GPUs"):
        render_on_ray(gpu, _config(tmp_path), [plans], ClusterOptions())
    with pytest.raises(UserError, match="no worker can fit the model: 3 cores per worker"):
        render_on_ray(_model(tiny_sd), _config(tmp_path), [plans], ClusterOptions(cpus_per_worker=3))
    with pytest.raises(UserError, match="could not load the model: model not found"):
        render_on_ray(ModelConfig(model=str(tmp_path / "nope")), _config(tmp_path), [plans],
                      ClusterOptions(workers=1))
    assert not list(tmp_path.glob("*/manifest.json"))  # nothing written by failed starts


def test_ray_not_installed(plans, tmp_path, monkeypatch):
    from movielm_fast.run import cluster

    # A None entry makes `import ray` fail as it does where Ray is not installed.
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match="needs Ray, which is not installed") as exc:
        cluster._import_ray(loopback=False)
    assert "movielm-fast[cluster]" in exc.value.hint


@pytest.fixture(scope="module")
def pool(ray_local, tiny_sd, tmp_path_factory):
    """Two 1-core workers for the rest of the module: starting workers (process, imports, model) is the slow part."""
    with RayExecutor(_model(tiny_sd), ClusterOptions(workers=2)) as p:
        yield p


def test_render_on_ray_same_output_as_local_run(ray_local, plans, reference, tiny_sd, tmp_path):
    """The CLI's entry point, end to end: start workers, render, stop them."""
    ticks = []
    summary = render_on_ray(_model(tiny_sd), _config(tmp_path), [plans], ClusterOptions(workers=2),
                            progress=lambda done, total: ticks.append((done, total)))
    _assert_same_as_reference(tmp_path, reference)
    assert summary.frames_total == summary.frames_rendered == 27 and summary.failures == []
    assert ticks[0] == (0, 27) and sum(d for d, _ in ticks) == 27 and {t for _, t in ticks} == {27}
    d = summary.as_dict()
    assert sum(w["frames"] for w in d["workers"]) == 27
    assert all(w["frames"] > 0 and w["images_per_second"] > 0 for w in d["workers"])  # both workers were used
    assert d["images_per_second"] > 0 and len(d["storyboards"]) == 10 and d["startup_seconds"] > 0
    for _ in range(100):  # its workers are stopped (ray.kill returns before their cores are free again)
        if ray_local.available_resources().get("CPU") == 2:
            break
        time.sleep(0.1)
    assert ray_local.available_resources().get("CPU") == 2


def test_bad_movie_fails_alone(pool, plans, reference, tiny_sd, tmp_path):
    bad_dir = tmp_path / "plans"
    bad_dir.mkdir()
    (bad_dir / "broken.safetensors").write_bytes(b"\x00garbage, not an embedding" * 10)
    bad = movie("broken", 3)
    bad["style"] = {"name": "Broken", "embedding": "broken.safetensors"}
    write_plan(bad_dir / "c.json", [bad], SMALL)
    out = tmp_path / "out"
    summary = render(_config(out), [plans, bad_dir], executor=pool)
    assert [f["movie"] for f in summary.failures] == ["broken"]
    assert "cannot read embedding" in summary.failures[0]["reason"]
    assert summary.failures[0]["frames_missing"] == 3 and summary.frames_failed == 3
    assert summary.frames_rendered == 27 and summary.frames_total == 30
    assert not (out / "broken").exists()
    _assert_same_as_reference(out, reference)  # every other movie complete


def test_interrupted_driver_resumes_with_missing_frames_only(pool, plans, reference, tiny_sd, tmp_path):
    def interrupt(done, total):
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        render(_config(tmp_path), [plans], interrupt, executor=pool)
    written = len(_frames(tmp_path))
    assert 2 <= written < 27  # the first batch was saved before the interrupt
    summary = render(_config(tmp_path), [plans], executor=pool)  # the rerun
    assert summary.frames_skipped == written and summary.frames_rendered == 27 - written
    _assert_same_as_reference(tmp_path, reference)


def test_killed_worker_frames_rendered_elsewhere_exactly_once(pool, plans, reference, tiny_sd, tmp_path):
    killed = []

    def kill_after_first_batch(done, total):
        if done and not killed:
            # Worker 0 still has batches queued or running: kill its process outright, as a crash would.
            killed.append(pool.worker_pids[0])
            os.kill(killed[0], signal.SIGKILL)

    summary = render(_config(tmp_path), [plans], kill_after_first_batch, executor=pool)
    assert killed
    # Every frame written once by the driver: no frame lost, none rendered twice into the results.
    assert summary.frames_rendered == 27 and sum(w["frames"] for w in summary.workers) == 27
    assert summary.resubmitted_batches >= 1 and summary.failures == []
    _assert_same_as_reference(tmp_path, reference)  # complete, decodable, same pixels
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # the kill is asynchronous; the process disappears once reaped
            os.kill(killed[0], 0)
            time.sleep(0.1)


def test_consistency_mode_on_ray_equals_the_local_run(pool, tiny_sd, tmp_path):
    """Anchors are recomputed on whichever worker needs them: the frames are those of a local run, and each anchor
    image is saved once by the driver."""
    m = movie("anchored", 4, consistency={"mode": "anchor_attention"},
              characters=[{"name": "Rosa", "appearance": "a woman in lavender"},
                          {"name": "Tom", "appearance": "a man in grey"}])
    m["frames"][0]["description"] = "an empty room"
    m["frames"][3]["description"] = "Rosa and Tom"
    plan = write_plan(tmp_path / "plan.json", [m], SMALL)
    local = render(_config(tmp_path / "local"), [plan], model=_model(tiny_sd))
    ray_run = render(_config(tmp_path / "ray"), [plan], executor=pool)
    assert local.frames_rendered == ray_run.frames_rendered == 4 and ray_run.failures == []
    for name in ("Rosa", "Tom"):  # 1-thread workers vs a 2-thread local run: float sums differ in the last bits
        a = load_png(tmp_path / "ray" / "anchored" / "anchors" / f"{name}.png")
        assert np.abs(a - load_png(tmp_path / "local" / "anchored" / "anchors" / f"{name}.png")).max() <= 2
    for i in range(4):
        a = load_png(tmp_path / "ray" / "anchored" / "frames" / f"{i:03d}.png")
        b = load_png(tmp_path / "local" / "anchored" / "frames" / f"{i:03d}.png")
        assert np.abs(a - b).max() <= 2
