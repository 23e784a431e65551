"""Time to first frame: the start-up phase report, loading straight into the target dtype, and the batch policy
(a first batch of one frame, `--batch-size auto` capped at the throughput knee). No timings are asserted."""

import pytest
import torch

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.models import load_model
from movielm_fast.run.batching import first_frame_alone, ramp_first_batch, shape_cost, throughput_batch
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import render
from movielm_fast.run.executors import LocalExecutor
from movielm_fast.run.renderer import Renderer
from movielm_fast.run.startup import StartupClock
from tests.helpers import cli_json, load_png, movie, write_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"width": 64, "height": 64, "steps": 2, "guidance": 7.5, "seed": 3}
LOAD_PHASES = {"model_load", "model_weights", "model_tokenizers", "content_hash", "backend_setup"}
RUN_PHASES = {"plan", "styles", "tasks", "first_batch", "first_prompt_encode", "first_write"}


def test_summary_reports_every_phase_and_the_first_image(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("s", 2)], TINY)
    summary = render(RunConfig(out=tmp_path / "out", style_training=False), [plan], model=ModelConfig(model="demo"))  # loads the model itself
    startup = summary.as_dict()["startup"]
    assert LOAD_PHASES | RUN_PHASES <= set(startup["phases"])
    assert all(v >= 0 for v in startup["phases"].values())
    # The first image is on disk after the first batch came back, and within the run.
    assert startup["phases"]["first_batch"] <= startup["time_to_first_image"] <= summary.seconds
    assert (tmp_path / "out" / "s" / "frames" / "000.png").is_file()


def test_a_resident_executor_charges_its_model_load_to_the_first_job_only(tmp_path):
    executor = LocalExecutor(ModelConfig(model="demo"))
    plan = write_plan(tmp_path / "plan.json", [movie("r", 1)], TINY)
    first = render(RunConfig(out=tmp_path / "a", style_training=False), [plan], executor=executor)
    second = render(RunConfig(out=tmp_path / "b", style_training=False), [plan], executor=executor)
    assert LOAD_PHASES <= set(first.startup["phases"])
    assert not LOAD_PHASES & set(second.startup["phases"])
    assert second.startup["time_to_first_image"] is not None


def test_nothing_rendered_means_no_first_image(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("d", 1)], TINY)
    executor = LocalExecutor(ModelConfig(model="demo"))
    render(RunConfig(out=tmp_path / "out", style_training=False), [plan], executor=executor)
    again = render(RunConfig(out=tmp_path / "out", style_training=False), [plan], executor=executor)
    assert again.frames_skipped == 1 and again.startup["time_to_first_image"] is None
    assert "first_batch" not in again.startup["phases"]


def test_cli_json_counts_from_the_process_start(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("c", 1)], TINY)
    d = cli_json(["render", str(plan), "--out", str(tmp_path / "out"), "--no-style-training", "--quiet", "--json"])
    phases = d["startup"]["phases"]
    assert phases["imports"] > 0  # this process started before the command ran
    assert d["startup"]["time_to_first_image"] >= phases["imports"]


def test_clock_keeps_the_first_image_time():
    clock = StartupClock(origin=0.0)
    clock.image_written()
    first = clock.first_image
    clock.image_written()
    assert clock.first_image == first and clock.time_to_first_image == pytest.approx(first)
    with clock.phase("x"):
        pass
    with clock.phase("x"):
        pass
    assert set(clock.as_dict()["phases"]) == {"x"}


def test_loading_in_the_target_dtype_equals_casting_afterwards():
    direct = load_model("demo", target=(torch.float16, torch.device("cpu")))
    cast = load_model("demo")
    assert direct.content_hash == cast.content_hash and "model_weights" in direct.load_seconds
    assert all(p.dtype == torch.float16 for p in direct.unet.parameters())
    assert all(p.dtype == torch.float16 for p in direct.text_encoders[0].parameters())
    for a, b in zip(direct.unet.state_dict().values(), cast.unet.half().state_dict().values()):
        assert torch.equal(a, b)
    upcast = bool(getattr(cast.vae.config, "force_upcast", False))
    assert next(direct.vae.parameters()).dtype == (torch.float32 if upcast else torch.float16)


def test_a_force_upcast_vae_stays_float32(tiny_sd):
    bundle = load_model(tiny_sd, target=(torch.float16, torch.device("cpu")))
    assert bundle.vae.config.force_upcast  # diffusers' AutoencoderKL default, as the tiny model keeps it
    assert next(bundle.vae.parameters()).dtype == torch.float32
    assert next(bundle.unet.parameters()).dtype == torch.float16


def test_renderer_loads_for_the_torch_backend_only_in_its_dtype():
    r = Renderer(ModelConfig(model="demo", dtype="bf16"))
    assert next(r.model.unet.parameters()).dtype == torch.bfloat16
    null = Renderer(ModelConfig(model="demo", dtype="bf16", backend="null"))
    assert next(null.model.unet.parameters()).dtype == torch.float32  # exporters and null: as the files say


@pytest.mark.parametrize("kind,size,fits,expected", [
    ("sd", 512, 64, 8), ("sd", 512, 5, 5), ("sd", 256, 64, 32), ("sd", 1024, 64, 2), ("sd", 2048, 64, 1),
    ("sdxl", 1024, 64, 4), ("sdxl", 512, 64, 16), ("sdxl", 1024, 2, 2), ("unknown", 512, 64, 8),
    ("sd", 64, 1000, 64),
])
def test_auto_batch_is_capped_at_the_throughput_knee(kind, size, fits, expected):
    assert throughput_batch(kind, size, size, fits) == expected


def test_first_batch_ramp_policy():
    assert first_frame_alone([[1, 2, 3, 4], [5, 6]]) == [[1], [2, 3, 4], [5, 6]]
    assert first_frame_alone([[1], [2, 3]]) == [[1], [2, 3]]
    assert first_frame_alone([]) == []
    assert ramp_first_batch("auto", shape_cost(ModelConfig()))
    assert not ramp_first_batch(4, shape_cost(ModelConfig()))  # a size the user chose is kept
    assert shape_cost(ModelConfig(cuda_graphs=True))  # a new size would cost a graph capture
    assert shape_cost(ModelConfig(device="cuda"))  # graphs are the torch backend's default on CUDA
    assert not shape_cost(ModelConfig(device="cuda", cuda_graphs=False))
    assert shape_cost(ModelConfig(compile_unet=True))
    assert shape_cost(ModelConfig(dtype="bf16"))  # the CPU's bf16 path compiles per shape
    assert not ramp_first_batch("auto", True)


def test_auto_renders_one_frame_first_and_the_same_pixels(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("p", 5)], TINY)
    executor = LocalExecutor(ModelConfig(model="demo"))
    sizes: dict[str, list[int]] = {"auto": [], "4": []}
    for name, bs in (("auto", "auto"), ("4", 4)):
        render(RunConfig(out=tmp_path / name, batch_size=bs, style_training=False), [plan], executor=executor,
               progress=lambda n, total, name=name: sizes[name].append(n))
    assert sizes == {"auto": [0, 1, 3, 1], "4": [0, 4, 1]}
    for i in range(5):
        a, b = (load_png(tmp_path / d / "p" / "frames" / f"{i:03d}.png") for d in ("auto", "4"))
        assert abs(a.astype(int) - b.astype(int)).max() <= 2  # batch invariance, as test_render checks it
