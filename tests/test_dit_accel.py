"""The transformer families' lossy speed-ups (docs/dit-accelerators.md) against their oracles: the step cache is
diffusers' own TaylorSeer hook, so a cached render equals diffusers' FluxPipeline with the same hook; a frame renders
the same in any batch with it on; FP8 on a transformer's block linears matches its reference rounding."""

import numpy as np
import pytest
import torch

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.engine.step_cache import StepCache, dit_full_steps, dit_hook_config
from movielm_fast.errors import UserError
from movielm_fast.run.renderer import Renderer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SIZE = 64


def _render(r: Renderer, steps: int, seeds, cache: StepCache | None = None, guidance=3.5, true_cfg=1.0,
            prompts=None) -> np.ndarray:
    prompts = prompts or [PROMPT] * len(seeds)
    jobs = [FrameJob("m", f"f{i}", p, "", seed) for i, (p, seed) in enumerate(zip(prompts, seeds))]
    s = BatchSettings(SIZE, SIZE, steps, guidance, "default", true_cfg=true_cfg, step_cache=cache)
    return np.stack([im.astype(np.int16) for im in render_batch(r.model, r.backend, r.encoder, jobs, s)])


def _diffusers(path, steps, seed, config=None, **kw) -> np.ndarray:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if config is not None:
        pipe.transformer.enable_cache(config)
    out = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, output_type="np",
               generator=torch.Generator().manual_seed(seed), **kw)
    return (out.images[0] * 255).round().astype(np.int16)


@pytest.mark.parametrize("depth", [0, 1])
def test_step_cache_matches_diffusers_taylorseer(tiny_flux_dev, depth):
    """--step-cache 2 on FLUX.1 is diffusers' TaylorSeer hook as FluxPipeline runs it; the attention of the first
    block really runs on the full steps only (dit_full_steps), and a later plain batch runs without the hook."""
    cache = StepCache(2, depth)
    r = Renderer(ModelConfig(model=str(tiny_flux_dev)))
    calls = []
    r.model.transformer.transformer_blocks[0].attn.to_q.register_forward_hook(lambda *_: calls.append(1))
    ours = _render(r, 8, [42], cache)[0]
    assert len(calls) == sum(dit_full_steps(cache, 8)) == 5
    ref = _diffusers(tiny_flux_dev, 8, 42, dit_hook_config(cache), guidance_scale=3.5)
    assert np.abs(ours - ref).max() <= 2
    calls.clear()
    plain = _render(r, 8, [42])[0]
    assert len(calls) == 8
    assert np.abs(plain - _diffusers(tiny_flux_dev, 8, 42, guidance_scale=3.5)).max() <= 2
    assert np.abs(ours - plain).max() > 0


def test_step_cache_with_true_cfg_matches_diffusers(tiny_flux_schnell):
    """True CFG: the engine runs negatives and positives as one batch, diffusers as two calls in their own cache
    contexts; the hook's per-row extrapolation makes them the same."""
    cache = StepCache(3, 0)
    r = Renderer(ModelConfig(model=str(tiny_flux_schnell)))
    jobs = [FrameJob("m", "f", PROMPT, "blurry", 5)]
    ours = render_batch(r.model, r.backend, r.encoder, jobs,
                        BatchSettings(SIZE, SIZE, 9, 0.0, "default", true_cfg=4.0, step_cache=cache))[0]
    ref = _diffusers(tiny_flux_schnell, 9, 5, dit_hook_config(cache), negative_prompt="blurry", true_cfg_scale=4.0,
                     guidance_scale=0.0)
    assert np.abs(ours.astype(np.int16) - ref).max() <= 2


def test_step_cache_on_klein_matches_diffusers(tiny_klein):
    """FLUX.2 [klein] base (CFG against the empty negative prompt): the same hook, the same frame as diffusers'."""
    from diffusers import Flux2KleinPipeline

    cache = StepCache(2, 0)
    r = Renderer(ModelConfig(model=str(tiny_klein)))
    ours = _render(r, 8, [4], cache, guidance=4.0)[0]
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(dit_hook_config(cache))
    ref = pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(4)).images[0]
    assert np.abs(ours - (ref * 255).round()).max() <= 2
    assert np.abs(ours - _render(r, 8, [4], guidance=4.0)[0]).max() > 0


def test_step_cached_frame_is_the_same_in_any_batch(tiny_flux_dev):
    """Which steps run whole is fixed by the step index, and a skipped step extrapolates each row from its own
    history: a frame's pixels do not depend on the frames beside it."""
    cache = StepCache(2, 0)
    r = Renderer(ModelConfig(model=str(tiny_flux_dev)))
    alone = _render(r, 8, [3], cache)[0]
    batch = _render(r, 8, [11, 3, 7], cache, prompts=["a red circle", PROMPT, "a blue square at night"])
    assert np.abs(batch[1] - alone).max() <= 1


def test_first_block_cache_decides_from_the_whole_batch(tiny_flux_dev):
    """Why the engine does not offer diffusers' FirstBlockCache: its skip decision is one number for the whole batch
    (the mean change of the first block's residual over every row), so the same frame -- same prompt, same noise --
    skips other steps, and comes out otherwise, beside another frame (here one whose residuals change differently: it
    starts from zero noise). Shown on diffusers' own FluxPipeline, counting the steps on which the last block ran.
    Pinned: if diffusers ever decides per row, this fails and the hook can be offered."""
    from diffusers import FluxPipeline
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = FluxPipeline.from_pretrained(tiny_flux_dev, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    ran = []
    pipe.transformer.single_transformer_blocks[-1].proj_out.register_forward_hook(lambda *_: ran.append(1))
    noise = pipe.prepare_latents(1, 4, SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(3))[0]

    def render(latents):
        ran.clear()
        per_step = []

        def mark(pipe, i, t, kwargs):
            per_step.append(len(ran))
            return kwargs

        out = pipe([PROMPT] * len(latents), height=SIZE, width=SIZE, num_inference_steps=10, latents=latents,
                   output_type="np", callback_on_step_end=mark)
        return [b - a for a, b in zip([0] + per_step[:-1], per_step)], (out.images[0] * 255).round()

    alone, image_alone = render(noise)
    beside, image_beside = render(torch.cat([noise, torch.zeros_like(noise)]))
    assert 0 < sum(alone) < 10  # it did skip steps
    assert alone != beside  # one decision per step for the whole batch: it changed with the frame's neighbour
    assert np.abs(image_alone - image_beside).max() > 2


def test_dit_full_steps_follow_the_hook():
    """The FLOP accounting (bench.dit_accel) counts the full steps TaylorSeer's own rule gives."""
    assert dit_full_steps(StepCache(2), 8) == [True, True, True, False, True, False, True, False]
    assert sum(dit_full_steps(StepCache(3), 28)) == 3 + 8  # steps 0-2, then 4, 7, ..., 25


def test_step_cache_depth_beyond_a_transformers_is_refused(tiny_flux_dev):
    with pytest.raises(UserError, match="depths 0-1"):
        Renderer(ModelConfig(model=str(tiny_flux_dev), step_cache=3, step_cache_depth=2))


# --- FP8 on a transformer's blocks ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["flux", "klein"])
def quantized_dit(request, tiny_flux_dev, tiny_klein):
    path = str(tiny_flux_dev if request.param == "flux" else tiny_klein)
    return Renderer(ModelConfig(model=path, quantize="fp8-emulated"))


def test_fp8_layers_of_a_transformer(quantized_dit):
    """Every Linear inside the double and single blocks but their AdaLN modulation; nothing outside them."""
    from movielm_fast.engine import fp8

    transformer = quantized_dit.model.transformer
    layers = set(quantized_dit.backend.fp8_layers)
    for name, m in transformer.named_modules():
        in_block = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        if isinstance(m, torch.nn.Linear):
            assert isinstance(m, fp8._Fp8Weight) == (name in layers) == (in_block and ".norm" not in name), name
    assert any(n.endswith("attn.add_q_proj") for n in layers) and any(n.endswith("attn.to_out.0") for n in layers)
    for keep in ("x_embedder", "context_embedder", "norm_out.linear", "proj_out"):
        assert type(transformer.get_submodule(keep)) is torch.nn.Linear, keep


def test_fp8_dit_render_emulated_and_gpu_path(quantized_dit):
    """The emulated render is close to the plain one and really rounded; the GPU path's code (torch._scaled_mm, run
    by the CPU build of torch) gives the emulation's pixels."""
    from movielm_fast.bench.image_quality import psnr
    from movielm_fast.engine import fp8

    guidance = 3.5 if "flux" in quantized_dit.config.model else 4.0
    plain = _render(Renderer(ModelConfig(model=quantized_dit.config.model)), 4, [3], guidance=guidance)[0]
    emulated = _render(quantized_dit, 4, [3], guidance=guidance)[0]
    assert not np.array_equal(plain, emulated)
    assert psnr(plain.astype(np.uint8), emulated.astype(np.uint8)) > 30.0
    layers = [m for m in quantized_dit.model.transformer.modules() if isinstance(m, fp8._Fp8Weight)]
    for m in layers:
        m.emulate = False
    try:
        real = _render(quantized_dit, 4, [3], guidance=guidance)[0]
    finally:
        for m in layers:
            m.emulate = True
    assert np.abs(real - emulated).max() <= 1


@pytest.mark.gpu
def test_fp8_and_step_cache_on_gpu(tiny_flux_dev):
    """torch._scaled_mm in a bf16 FLUX render: close to the bf16 render; with the step cache on top, a frame is the
    same alone and in a batch (bf16 kernels may differ by batch size: within 2/255)."""
    from movielm_fast.bench.image_quality import psnr
    from movielm_fast.engine import fp8

    if torch.cuda.get_device_capability() < fp8.FP8_CAPABILITY:
        pytest.skip("no FP8 tensor cores")
    plain = Renderer(ModelConfig(model=str(tiny_flux_dev), device="cuda"))
    quant = Renderer(ModelConfig(model=str(tiny_flux_dev), device="cuda", quantize="fp8"))
    a, b = _render(plain, 8, [3])[0], _render(quant, 8, [3])[0]
    assert quant.backend.fp8_layers and psnr(a.astype(np.uint8), b.astype(np.uint8)) > 30.0
    cache = StepCache(2, 0)
    alone = _render(quant, 8, [3], cache)[0]
    batch = _render(quant, 8, [11, 3, 7], cache, prompts=["a red circle", PROMPT, "a blue square at night"])
    assert np.abs(batch[1] - alone).max() <= 2


def test_fp8_covers_the_linears_of_a_flux_step():
    """FLUX.1's published layout at 512²: the FP8 layers hold all but a sliver of the linear FLOPs (the AdaLN and
    embedding rows), and linears about 92% of the step (the issue's count; the rest is attention)."""
    from movielm_fast.bench.dit_accel import flop_shares

    shares = flop_shares(sizes=(512,))["flux-arch 512²"]
    assert 0.90 < shares["fp8_share"] <= shares["linear_share"] < 0.94
    assert shares["linear_share"] - shares["fp8_share"] < 0.005


# --- a text length below the family's ----------------------------------------------------------------------------

def test_t5_length_from_the_tokenizer_matches_diffusers(tiny_flux_schnell, tmp_path):
    """A FLUX.1 folder whose T5 tokenizer says model_max_length 24 (the DiT demo's says 40) is encoded at 24
    tokens: diffusers' pipeline with max_sequence_length=24 gives the same frame."""
    import json
    import shutil

    folder = tmp_path / "short-t5"
    shutil.copytree(tiny_flux_schnell, folder)
    config = folder / "tokenizer_2" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 24}))
    r = Renderer(ModelConfig(model=str(folder)))
    assert [role.length for role in r.encoder.roles] == [77, 24]
    ours = _render(r, 4, [9], guidance=0.0)[0]
    ref = _diffusers(folder, 4, 9, guidance_scale=0.0, max_sequence_length=24)
    assert np.abs(ours - ref).max() <= 2
    assert np.abs(ours - _render(Renderer(ModelConfig(model=str(tiny_flux_schnell))), 4, [9], guidance=0.0)[0]
                  ).max() > 2  # 24 tokens, not 512: another image


def test_lossy_dit_options_are_recorded_and_keyed(tiny_flux_dev, tmp_path):
    """--step-cache and --quantize on FLUX, through the CLI: in the manifest, in each frame's metadata and its resume
    key (the plain render of the same plan renders again, and resumes as plain)."""
    import json

    from PIL import Image

    from tests.helpers import cli_json, movie, write_plan

    plan = write_plan(tmp_path / "plan.json", [movie("fx", 2)], {"width": SIZE, "height": SIZE, "steps": 6})
    out = tmp_path / "out"
    plain = ["render", str(plan), "--model", str(tiny_flux_dev), "--out", str(out), "--json", "--no-style-training"]
    lossy = plain + ["--step-cache", "2", "--quantize", "fp8-emulated"]
    assert cli_json(plain)["rendered"] == 2
    assert cli_json(lossy)["rendered"] == 2
    manifest = json.loads((out / "fx" / "manifest.json").read_text())
    assert manifest["settings"]["step_cache"] == {"interval": 2, "depth": 0}
    assert manifest["settings"]["quantize"] == "fp8-emulated"
    with Image.open(out / "fx" / "frames" / "000.png") as im:
        settings = json.loads(im.text["settings"])
    assert settings["step_cache"] == {"interval": 2, "depth": 0} and settings["quantize"] == "fp8-emulated"
    assert cli_json(lossy)["skipped"] == 2
    assert cli_json(plain)["rendered"] == 2 and cli_json(plain)["skipped"] == 2


# --- RESULTS.md --------------------------------------------------------------------------------------------------

def test_results_md_has_a_section_per_option(tmp_path):
    """bench.dit_accel's results make two sections: the step cache's cases (and the GPU loop with it) in one, FP8's
    FLOP shares, its emulated quality and its GPU step and loops in the other."""
    import json

    from movielm_fast.bench import report
    from movielm_fast.bench.dit_accel import DIT_ACCEL_FORMAT

    def row(cond, speedup, psnr=None):
        out = {"conditioning": cond, "full_steps": 9, "transformer_flop_ratio": 1.77, "cpu_s_per_frame": 0.2,
               "wall_s_per_frame": 0.4, "cpu_speedup": speedup, "delta_points": 0.0}
        return out if psnr is None else {**out, "psnr_db": psnr, "ssim": 0.98}

    machine = {"cpu_model": "Test CPU", "torch_threads": 1}
    cpu = {"format": DIT_ACCEL_FORMAT, "created": "2026-01-01T00:00:00", "machine": machine,
           "flops": {"flux-arch 512²": {"full_step_tflop": 21.5, "fp8_share": 0.9222, "linear_share": 0.9231,
                                        "attention_share": 0.0769}},
           "fp8_attention": {"torch": "2.x", "device": "cpu", "sdpa_on_e4m3": "refused: X", "sdpa_backends": ["MATH"]},
           "flux_arch_cache_bytes_per_row": {"0": 2097152, "1": 6455033856},
           "demo": {"model": "demo-dit", "model_hash": "h", "captions": 40, "size": 64, "guidance": 0.0,
                    "true_cfg": 4.0, "full_step_mflop": 562.9, "predicted_step_mflop": {"0": 2.3, "1": 353.3},
                    "cache_bytes_per_row": {"0": 8192, "1": 638976},
                    "steps": {"28": {"plain": row(0.9, 1.0), "step cache N=2": row(0.88, 1.77, 42.9),
                                     "fp8 (emulated)": row(0.9, 0.6, 43.1)}}}}
    gpu = {"format": DIT_ACCEL_FORMAT, "created": "2026-01-02T00:00:00", "machine": machine,
           "gpu": {"gpu": "Test GPU", "arch": "flux-arch", "size": 1024, "steps": 28, "memory_gb": 30.0,
                   "step_s": {"bf16": 0.2, "fp8": 0.1},
                   "loop_s": {"bf16": 6.0, "bf16 + step cache N=2": 3.5, "fp8": 3.1, "fp8 + step cache N=2": 2.0}}}
    results = tmp_path / "results"
    results.mkdir()
    for i, res in enumerate((cpu, gpu)):
        (results / f"dit_accel-{i}.json").write_text(json.dumps(res))
    md = tmp_path / "RESULTS.md"
    report.main(["--results", str(results), "--out", str(md)])
    text = md.read_text()
    cache, fp8 = text.split("## DiT step cache")[1].split("## DiT FP8")
    assert "| step cache N=2 | 9 | 1.77× | 1.77× |" in cache and "42.9 dB" in cache and "fp8" not in cache
    assert "| bf16 + step cache N=2 | 3.500 | 1.71× |" in cache and "6455033856" not in cache and "6156 MiB" in cache
    assert "| flux-arch 512² | 21.5 TFLOP | 92% | 92% | 8% |" in fp8 and "| fp8 (emulated) |" in fp8
    assert "step cache N=2 |" not in fp8.split("Test GPU")[0] and "(**2.00×**)" in fp8
    assert "| fp8 + step cache N=2 | 2.000 | 3.00× |" in fp8
