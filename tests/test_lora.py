"""LoRA: formats, parity with diffusers' load_lora_weights + fuse_lora, switching sets exactly, plans and CLI,
errors, ONNX Runtime without re-export, the TensorRT refit plan."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from movielm_fast.cli.main import cli
from movielm_fast.engine import lora
from movielm_fast.engine.config import ModelConfig, parse_lora
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.models import load_model
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.engine.schedulers import make_scheduler
from movielm_fast.errors import UserError
from movielm_fast.plan import RenderSettings
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import collect_plans, make_batches, render
from movielm_fast.run.executors import LocalExecutor
from movielm_fast.run.manifest import read_manifest
from movielm_fast.run.renderer import Renderer
from movielm_fast.testing import build_tiny_pipeline
from tests.helpers import load_png, movie, write_plan
from tests.lora_files import make_lora

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry"
SMALL = {"width": 64, "height": 64, "steps": 3, "guidance": 7.5, "seed": 11}


@pytest.fixture(scope="module")
def pipes():
    return {kind: build_tiny_pipeline(kind) for kind in ("sd", "sdxl")}


@pytest.fixture(scope="module")
def demo_renderer(tiny_sd):
    # The tiny random SD model: the same weights as pipes["sd"], so diffusers is the oracle (not the toy demo model).
    return Renderer(ModelConfig(model=str(tiny_sd)))


def _ours(renderer, loras=(), seed=42, steps=4, guidance=7.5, scheduler="dpmpp", prompt=PROMPT):
    s = BatchSettings(64, 64, steps, guidance, scheduler, loras=loras)
    return render_batch(renderer.model, renderer.backend, renderer.encoder, [FrameJob("m", "f", prompt, NEGATIVE,
                                                                                      seed)], s,
                        library=renderer.loras)[0].astype(np.int16)


# --- formats ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_kohya_and_diffusers_names_give_the_same_layers(tmp_path, pipes, tiny_sd, tiny_sdxl, kind):
    model = load_model(tiny_sd if kind == "sd" else tiny_sdxl)
    # Same random factors; kohya with alpha == rank means scale 1, the PEFT convention for files without alphas.
    kohya = lora.resolve(model, make_lora(tmp_path / "k.safetensors", pipes[kind], "kohya", alpha=4.0))
    peft = lora.resolve(model, make_lora(tmp_path / "d.safetensors", pipes[kind], "diffusers"))
    assert {(x.component, x.param) for x in kohya} == {(x.component, x.param) for x in peft}
    comps = {x.component for x in kohya}
    assert comps == ({"unet", "text_encoder"} if kind == "sd" else {"unet", "text_encoder", "text_encoder_2"})
    assert any(len(x.shape) == 4 and x.shape[2:] == (3, 3) for x in kohya)  # conv LoRA, 3x3
    assert any(len(x.shape) == 4 and x.shape[2:] == (1, 1) for x in kohya)  # conv LoRA, 1x1
    by_key = {(x.component, x.param): x for x in peft}
    for x in kohya:
        assert torch.equal(x.delta(), by_key[x.component, x.param].delta())
    # alpha/r as written: alpha 2 at rank 4 halves each product
    half = lora.resolve(model, make_lora(tmp_path / "h.safetensors", pipes[kind], "kohya", alpha=2.0))
    assert all(x.factor == 0.5 for x in half)


def test_combine_adds_scales_of_the_same_file_and_drops_zero(tmp_path, pipes):
    a = make_lora(tmp_path / "a.safetensors", pipes["sd"], seed=1)
    b = make_lora(tmp_path / "b.safetensors", pipes["sd"], seed=2)
    copy = tmp_path / "a-copy.safetensors"
    copy.write_bytes(a.read_bytes())
    s = lora.combine([(a, 0.5), (b, 1.0), (copy, 0.25)])
    assert [(r.path, r.scale) for r in s] == [(str(a), 0.75), (str(b), 1.0)]
    assert lora.combine([(a, 0.5), (a, -0.5)]) == ()


def test_cli_lora_argument_parsing():
    assert parse_lora("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora("face.safetensors") == ("face.safetensors", 1.0)
    assert parse_lora(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    assert parse_lora(r"C:\loras\x.safetensors:-0.5") == (r"C:\loras\x.safetensors", -0.5)
    assert parse_lora("dir:with:colons/x.safetensors") == ("dir:with:colons/x.safetensors", 1.0)


# --- parity with diffusers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,fmt", [("sd", "kohya"), ("sd", "diffusers"), ("sdxl", "kohya"), ("sdxl", "diffusers")])
def test_torch_render_with_lora_matches_diffusers_fuse_lora(tmp_path, tiny_sd, tiny_sdxl, pipes, kind, fmt):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = tiny_sd if kind == "sd" else tiny_sdxl
    f = make_lora(tmp_path / "l.safetensors", pipes[kind], fmt, seed=3)
    r = Renderer(ModelConfig(model=str(folder)))
    plain = _ours(r)
    ours = _ours(r, lora.combine([(f, 0.8)]))

    pipe = (StableDiffusionPipeline if kind == "sd" else StableDiffusionXLPipeline).from_pretrained(
        folder, local_files_only=True)
    pipe.scheduler = make_scheduler("dpmpp", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(f))
    pipe.fuse_lora(lora_scale=0.8)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, num_inference_steps=4, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(42), output_type="np").images[0]
    ref = (ref * 255).round().astype(np.int16)
    assert np.abs(ours - ref).max() <= 2
    assert np.abs(ours - plain).max() > 10  # the LoRA really changes the image


def test_text_encoder_only_lora_changes_the_prompt_encoding(tmp_path, tiny_sd, pipes):
    """A text-encoder LoRA reaches the image: encoded prompts are cached per LoRA set, not once per prompt."""
    f = make_lora(tmp_path / "te.safetensors", pipes["sd"], unet=False)
    r = Renderer(ModelConfig(model=str(tiny_sd)))
    plain = _ours(r)
    with_te = _ours(r, lora.combine([(f, 1.0)]))
    assert np.abs(with_te - plain).max() > 5
    assert np.array_equal(_ours(r), plain)


# --- switching sets without reloading ---------------------------------------------------------------------------------

def test_switching_sets_restores_the_plain_model_bit_for_bit(tmp_path, pipes, demo_renderer):
    r = demo_renderer
    a = lora.combine([(make_lora(tmp_path / "a.safetensors", pipes["sd"], seed=1), 1.0)])
    b = lora.combine([(make_lora(tmp_path / "b.safetensors", pipes["sd"], seed=2), 0.7)])
    before = {k: v.clone() for k, v in r.model.unet.state_dict().items()}
    plain = _ours(r)
    img_a = _ours(r, a)
    img_b = _ours(r, b)
    assert np.abs(img_a - plain).max() > 10 and np.abs(img_a - img_b).max() > 10
    assert np.array_equal(_ours(r, a), img_a)  # a -> b -> a: the same image
    assert np.array_equal(_ours(r), plain)  # and back to none: bit-identical
    after = r.model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not r.backend.lora_merger.pristine  # nothing kept once the plain model is back


# --- plans, batches, manifests, resume -------------------------------------------------------------------------------

def test_two_movies_with_different_loras_in_one_run(tmp_path, pipes, demo_renderer):
    make_lora(tmp_path / "style.safetensors", pipes["sd"], seed=1)
    make_lora(tmp_path / "own.safetensors", pipes["sd"], seed=2)
    styled = movie("styled", 2)
    styled["style"]["loras"] = [{"file": "style.safetensors", "scale": 0.8}]
    own = movie("own", 2, loras=[{"file": "own.safetensors"}])
    plan = write_plan(tmp_path / "plan.json", [styled, own, movie("plain", 2)], SMALL)
    out = tmp_path / "out"
    ex = LocalExecutor(renderer=demo_renderer)
    summary = render(RunConfig(out=out, batch_size=8, style_training=False), [plan], executor=ex)
    assert summary.frames_rendered == 6 and not summary.failures

    # Frames of different sets never share a batch, even when everything else agrees and the batch would fit.
    tasks = [t for lm in collect_plans([plan]) for t in demo_renderer.plan(lm, None, RenderSettings()).tasks]
    batches = make_batches(tasks, 8)
    assert len(batches) == 3 and all(len({t.settings.loras for t in b}) == 1 for b in batches)

    m = read_manifest(out / "styled" / "manifest.json")
    sha = lora.lora_ref(tmp_path / "style.safetensors", 1).sha256
    assert m["settings"]["loras"] == [{"file": "style.safetensors", "sha256": sha, "scale": 0.8}]
    assert all(f["loras"] == m["settings"]["loras"] for f in m["frames"])
    assert read_manifest(out / "own" / "manifest.json")["frames"][0]["loras"][0]["scale"] == 1.0
    plain = read_manifest(out / "plain" / "manifest.json")
    assert "loras" not in plain["settings"] and all("loras" not in f for f in plain["frames"])
    imgs = {mid: load_png(out / mid / "frames" / "000.png") for mid in ("styled", "own", "plain")}
    assert np.abs(imgs["styled"] - imgs["plain"]).max() > 10 and np.abs(imgs["own"] - imgs["plain"]).max() > 10

    # Same command again: all done. A different scale is a different frame.
    again = render(RunConfig(out=out, batch_size=8, style_training=False), [plan], executor=ex)
    assert again.frames_skipped == 6 and again.frames_rendered == 0
    styled["style"]["loras"][0]["scale"] = 0.5
    plan = write_plan(tmp_path / "plan.json", [styled, own, movie("plain", 2)], SMALL)
    third = render(RunConfig(out=out, batch_size=8, style_training=False), [plan], executor=ex)
    assert third.frames_rendered == 2 and third.frames_skipped == 4


def test_cli_lora_flag_renders_and_records(tmp_path, pipes, tiny_sd):
    f = make_lora(tmp_path / "x.safetensors", pipes["sd"])
    plan = write_plan(tmp_path / "plan.json", [movie("m", 1)], SMALL)
    res = CliRunner().invoke(cli, ["render", str(plan), "--model", str(tiny_sd), "--out", str(tmp_path / "out"),
                                   "--lora", f"{f}:0.8", "--json"])
    assert res.exit_code == 0, res.output
    entry = read_manifest(tmp_path / "out" / "m" / "manifest.json")["frames"][0]
    assert entry["loras"] == [{"file": "x.safetensors", "sha256": lora.lora_ref(f, 1).sha256, "scale": 0.8}]


# --- errors ----------------------------------------------------------------------------------------------------------

def _bad_files(tmp_path, pipes):
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(4, 4),
               "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_b": torch.zeros(4, 4)}, str(loha))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    flux = tmp_path / "flux.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, str(flux))
    sdxl = make_lora(tmp_path / "sdxl.safetensors", pipes["sdxl"], "kohya")
    return {"loha": (loha, "is a LoHa"), "junk": (junk, "cannot be read as safetensors"),
            "flux": (flux, "another kind of model"), "missing": (tmp_path / "nope.safetensors", "file not found"),
            "pt": (tmp_path / "x.pt", "not a .safetensors file"), "sdxl-on-sd": (sdxl, "this model is SD 1.x/2.x")}


@pytest.mark.parametrize("case", ["loha", "junk", "flux", "missing", "pt", "sdxl-on-sd"])
def test_bad_lora_files_give_clear_errors_without_traceback(tmp_path, pipes, tiny_sd, case):
    path, message = _bad_files(tmp_path, pipes)[case]
    if case == "pt":
        path.write_bytes(b"x")
    plan = write_plan(tmp_path / "plan.json", [movie("m", 1, loras=[{"file": path.name}])], SMALL)
    res = CliRunner().invoke(cli, ["render", str(plan), "--model", str(tiny_sd), "--out", str(tmp_path / "out")])
    assert res.exit_code in (1, 2), res.output
    assert message in res.output and path.name in res.output and "Traceback" not in res.output
    if case != "sdxl-on-sd":  # file-level problems: found before any model loads, for plan and flag alike
        assert res.exit_code == 2
        res = CliRunner().invoke(cli, ["render", str(write_plan(tmp_path / "p2.json", [movie("m", 1)], SMALL)),
                                       "--model", str(tiny_sd), "--out", str(tmp_path / "out"), "--lora", str(path)])
        assert res.exit_code == 2 and message in res.output and "--lora" in res.output, res.output


def test_shape_mismatch_names_the_layer(tmp_path, pipes, tiny_sd):
    f = tmp_path / "bad.safetensors"
    save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 7),
               "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 4)}, str(f))
    with pytest.raises(UserError, match=r"proj_in has shape.*bad.safetensors|bad.safetensors.*proj_in has shape"):
        lora.resolve(load_model(tiny_sd), f)


def test_plan_lora_is_validated_before_the_model_loads(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("m", 1, loras=[{"file": "gone.safetensors", "scale": 2}])])
    with pytest.raises(UserError, match="gone.safetensors: file not found"):
        render(RunConfig(out=tmp_path / "out", style_training=False), [plan], model=ModelConfig(model="/nonexistent/model"))
    bad = write_plan(tmp_path / "bad.json", [movie("m", 1, loras=[{"file": "x.safetensors", "strength": 1}])])
    with pytest.raises(UserError, match="unknown key 'strength'"):
        render(RunConfig(out=tmp_path / "out", style_training=False), [bad], model=ModelConfig())


# --- ONNX Runtime: no re-export -------------------------------------------------------------------------------------

def _cache_state():
    from movielm_fast.export import cache

    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in cache.artifacts_root().rglob("*") if p.is_file()}


def test_onnx_with_lora_matches_torch_without_reexport(tmp_path, pipes, demo_renderer):
    pytest.importorskip("onnxruntime")
    from movielm_fast.export.onnx_export import graph_module
    from movielm_fast.export.weight_map import WEIGHT_MAP_FILE, build_weight_map, load_weight_map

    # The torch backend merges into the model it shares with this one: plain weights before anything is exported.
    demo_renderer.backend.set_loras((), demo_renderer.loras)
    o = Renderer(ModelConfig(model=demo_renderer.config.model, backend="onnxruntime"), model=demo_renderer.model)
    plain = _ours(o)
    before = _cache_state()
    # kohya with conv layers (3x3 and 1x1) and text-encoder layers; two files with their own scales
    loras = lora.combine([(make_lora(tmp_path / "a.safetensors", pipes["sd"], seed=5), 0.8),
                          (make_lora(tmp_path / "b.safetensors", pipes["sd"], "diffusers", seed=6, std=0.2), 0.5)])
    ours = _ours(o, loras)
    ref = _ours(demo_renderer, loras)
    _ours(demo_renderer)  # the torch backend merges into the shared model: plain again before matching weights
    assert np.abs(ours - ref).max() <= 2
    assert np.abs(ours - plain).max() > 10
    assert np.array_equal(_ours(o), plain)  # back to the exported weights
    assert _cache_state() == before  # nothing exported, nothing written
    assert o.backend.lora_seconds > 0

    # An artifact exported before maps existed gets the same map rebuilt from the torch model.
    art = o.backend.artifacts["unet"]
    saved = json.loads((art.path / WEIGHT_MAP_FILE).read_text())
    assert saved == build_weight_map(graph_module(demo_renderer.model, "unet"), art.file())
    assert sum(e["transpose"] for e in saved.values()) > 0  # MatMul weights are stored transposed
    old = type(art)(tmp_path / "no-map", art.manifest)
    old.path.mkdir()
    (old.path / art.file().name).write_bytes(art.file().read_bytes())
    assert load_weight_map(old, graph_module(demo_renderer.model, "unet")) == saved


def test_weight_map_finds_transposed_and_packed_weights(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from movielm_fast.export.weight_map import build_weight_map, initializer_values

    torch.manual_seed(0)
    m = torch.nn.ModuleDict({"q": torch.nn.Linear(4, 3, bias=False), "k": torch.nn.Linear(4, 3, bias=False),
                             "c": torch.nn.Conv2d(2, 3, 3)})
    wq, wk, wc = (m[n].weight.detach().numpy() for n in "qkc")
    packed = np.concatenate([wq.T, wk.T], axis=1)  # (in, 2*out), as a fused QKV projection stores it
    g = helper.make_graph([], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(packed, "qk"), numpy_helper.from_array(wc, "conv_w")])
    onnx.save(helper.make_model(g), str(tmp_path / "m.onnx"))
    wm = build_weight_map(m, tmp_path / "m.onnx")
    assert wm["q.weight"] == {"initializer": "qk", "transpose": True, "dtype": "float32", "slice": [1, 0, 3]}
    assert wm["k.weight"]["slice"] == [1, 3, 6]
    assert wm["c.weight"] == {"initializer": "conv_w", "transpose": False, "dtype": "float32", "slice": None}
    dk = torch.randn(3, 4)
    values = initializer_values(wm, {"k.weight": dk}, tmp_path / "m.onnx", "test")
    assert set(values) == {"qk"}
    np.testing.assert_allclose(values["qk"][:, :3], wq.T)  # the untouched block stays as exported
    np.testing.assert_allclose(values["qk"][:, 3:], (torch.from_numpy(wk) + dk).numpy().T, rtol=1e-6)


# --- TensorRT: refittable engines, refit plan (TensorRT itself is not needed for these) ------------------------------

def test_tensorrt_engines_are_built_refittable(tiny_sd):
    from movielm_fast.export.specs import UNET, default_profile, model_specs
    from movielm_fast.export.tensorrt import build_config

    model = load_model(tiny_sd)
    cfg = build_config(model, model_specs(model)[UNET], default_profile(model), "fp16")
    assert cfg.refit and cfg.as_dict()["refit"] is True


def test_tensorrt_refit_plan_sets_merged_weights_and_restores_the_rest(tmp_path, pipes, demo_renderer):
    pytest.importorskip("onnxruntime")
    from movielm_fast.export.onnx_export import export_component, graph_module
    from movielm_fast.export.tensorrt import refit_plan
    from movielm_fast.export.weight_map import _initializers, load_weight_map

    demo_renderer.backend.set_loras((), demo_renderer.loras)  # plain weights in the shared model
    model = demo_renderer.model
    # The map and plan are computed alike for the trt-onnx graph that engines are built from.
    art = export_component(model, "unet", "ort-cpu", "fp32")
    wm = load_weight_map(art, graph_module(model, "unet"))
    exported = {n: a for n, (a, _) in _initializers(art.file()).items()}
    lib = lora.LoraLibrary(model)
    a = lora.combine([(make_lora(tmp_path / "a.safetensors", pipes["sd"], seed=1), 0.8)])
    b = lora.combine([(make_lora(tmp_path / "b.safetensors", pipes["sd"], te=False, seed=2), 1.0)])
    deltas = {p: d for (c, p), d in lib.deltas(a).items() if c == "unet"}
    originals: dict = {}
    plan = refit_plan(wm, deltas, art.file(), "unet", originals, set())
    assert set(plan) == {wm[p]["initializer"] for p in deltas}  # exactly the weights the LoRA changes
    for p, d in deltas.items():
        e = wm[p]
        want = d.numpy().T if e["transpose"] else d.numpy()
        np.testing.assert_allclose(plan[e["initializer"]] - exported[e["initializer"]], want, atol=1e-5)
    # Switching to a set that changes fewer weights writes the others back exactly as exported.
    only_attn = {p: d for (c, p), d in lib.deltas(b).items() if c == "unet" and "attn1" in p}
    plan2 = refit_plan(wm, only_attn, art.file(), "unet", originals, set(plan))
    assert set(plan2) == set(plan)
    for n in set(plan) - {wm[p]["initializer"] for p in only_attn}:
        assert np.array_equal(plan2[n], exported[n])


def test_merge_reaches_fused_qkv_projections(tmp_path, pipes, tiny_sd):
    """On CUDA the torch backend fuses Q/K/V into one projection (copies of the weights): merging and restoring must
    rewrite those copies too. Checked on the CPU with diffusers' own fuse_qkv_projections."""
    from movielm_fast.export.graphs import graph_modules

    model = load_model(tiny_sd)
    graphs = graph_modules(model)
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor(500.0), torch.randn(1, 77, 32)
    loras = lora.combine([(make_lora(tmp_path / "a.safetensors", pipes["sd"], te=False), 1.0)])
    merger = lora.TorchMerger(lora.LoraLibrary(model), graphs)
    with torch.no_grad():
        plain = graphs["unet"](x, t, h)
        merger.apply(loras)
        unfused = graphs["unet"](x, t, h)
        merger.apply(())
        model.unet.fuse_qkv_projections()
        assert torch.allclose(graphs["unet"](x, t, h), plain, atol=1e-5)
        merger.apply(loras)
        fused = graphs["unet"](x, t, h)
        merger.apply(())
        back = graphs["unet"](x, t, h)
    assert (unfused - plain).abs().max() > 1e-2
    assert torch.allclose(fused, unfused, atol=1e-5) and torch.allclose(back, plain, atol=1e-5)
