"""FP8 (--quantize, engine/fp8.py): rounding bounds, layer selection, LoRA re-quantization, refusals, and the
emulated render against the plain one. The GPU path (torch._scaled_mm) is checked against its fp32 twin on CUDA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from movielm_fast.cli.main import cli
from movielm_fast.engine import fp8
from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.lora import combine
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.errors import UserError
from movielm_fast.kernels import scaled_mm
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import render
from movielm_fast.run.executors import LocalExecutor
from movielm_fast.run.renderer import Renderer
from tests.helpers import movie, write_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"width": 64, "height": 64, "steps": 3, "guidance": 7.5, "seed": 11}
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def test_round_trip_within_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different ranges
    x[3, 5] = 0.0
    q, scale = scaled_mm.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value for normal numbers, and 2^-10 of the scale
    # below the smallest normal (2^-6); each row's largest value maps to 448 exactly.
    bound = torch.maximum(x.abs() * 2 ** -4, scale * 2 ** -10) * (1 + 1e-6)
    assert ((back - x).abs() <= bound).all()
    assert torch.allclose(back.abs().amax(dim=1), x.abs().amax(dim=1), rtol=1e-6)
    assert back[3, 5] == 0.0


def test_matmul_twin_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(128, 320, generator=g), torch.randn(640, 320, generator=g) / 20
    wq, ws = scaled_mm.quantize_rows(w)
    y = scaled_mm.fp8_matmul_ref(x, wq, ws.t())
    exact = x @ w.t()
    rel = (y - exact).norm() / exact.norm()
    assert 1e-3 < rel < 0.05  # really rounded, and by about what 3 mantissa bits on both sides give (~2-3%)


def _within_one_bf16_ulp(fast: torch.Tensor, ref: torch.Tensor) -> bool:
    """Both round an fp32 sum to bf16; summed in another order, the fp32 sums may differ in their last bits, which
    can move a bf16 rounding by one step, which is 2^-8 to 2^-7 of the value."""
    return bool(((fast.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-30).all())


def test_scaled_mm_on_the_cpu_is_the_twin():
    """The GPU path's own code (torch._scaled_mm with row-wise scales, its argument layouts, bf16 output) runs on
    the CPU build of torch, which dequantizes and multiplies in fp32: it must give the twin's numbers."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(640, 320, generator=g) / 20
    wq, ws = scaled_mm.quantize_rows(w)
    ws = ws.t().contiguous()  # (1, N), as _Fp8Weight keeps it
    x = torch.randn(128, 320, generator=g)
    nchw = torch.randn(1, 320, 8, 8, generator=g)  # a 1x1 convolution's input at batch 1: a column-major view
    for a in (x, x.half(), nchw.permute(0, 2, 3, 1).reshape(-1, 320)):
        fast, ref = scaled_mm.fp8_matmul(a, wq, ws), scaled_mm.fp8_matmul_ref(a, wq, ws)
        assert fast.dtype == ref.dtype == scaled_mm.OUT_DTYPE
        assert _within_one_bf16_ulp(fast, ref)
        exact = a.float() @ w.t()
        assert 1e-3 < (fast.float() - exact).norm() / exact.norm() < 0.05  # really e4m3 (see the twin's test)


def _dynamo_ops(module: torch.nn.Module, *args) -> list[str]:
    """The operations dynamo traces from module(*args) as one graph (fullgraph: a graph break is an error)."""
    ops = []

    def record(gm, example_inputs):
        ops.extend(getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
                   if n.op in ("call_method", "call_function"))
        return gm.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(module, fullgraph=True, backend=record)(*args)
    return ops


def test_fp8_forward_has_no_host_sync():
    """CUDA graphs replay device work only: the FP8 layers' forward must not read values on the host (.item(),
    data-dependent branches) -- dynamo traces it as one graph and finds no such call."""
    g = torch.Generator().manual_seed(3)
    layers = [(fp8.Fp8Linear(torch.nn.Linear(64, 32), emulate=False), torch.randn(2, 5, 64, generator=g)),
              (fp8.Fp8Conv1x1(torch.nn.Conv2d(64, 32, 1), emulate=False), torch.randn(1, 64, 4, 4, generator=g))]
    for layer, x in layers:
        ops = _dynamo_ops(layer, x)
        assert "_scaled_mm" in ops and "amax" in ops  # the real path, scales computed in the graph
        assert not {"item", "tolist", "cpu", "numpy", "_local_scalar_dense"} & set(ops), ops

    class HostScale(torch.nn.Module):  # the instrument sees a host read
        def forward(self, x):
            return x / x.abs().amax().item()

    assert "item" in _dynamo_ops(HostScale(), torch.randn(3))


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def quantized(request, tiny_sd, tiny_sdxl):
    path = str(tiny_sd if request.param == "sd" else tiny_sdxl)
    return Renderer(ModelConfig(model=path, quantize="fp8-emulated"))


def test_layer_selection(quantized):
    unet = quantized.model.unet
    layers = set(quantized.backend.fp8_layers)
    assert layers and all(".attentions." in f".{n}" for n in layers)
    for suffix in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                   "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"):
        assert any(n.endswith(suffix) for n in layers), suffix
    for name, m in unet.named_modules():
        assert isinstance(m, fp8._Fp8Weight) == (name in layers), name
    # What stays in the model's dtype: embeddings, first/last convs, resnets, norms.
    for keep in ("time_embedding.linear_1", "conv_in", "conv_out", "down_blocks.0.resnets.0.conv1",
                 "down_blocks.0.resnets.0.time_emb_proj"):
        assert type(unet.get_submodule(keep)) in (torch.nn.Linear, torch.nn.Conv2d), keep
    # The FP8 layers share the model's parameters: LoRA names and the state dict are unchanged.
    assert not any("fp8" in k or "weight_scale" in k for k in unet.state_dict())


def _frame(renderer, loras=(), seed=3):
    s = BatchSettings(64, 64, 4, 7.5, "dpmpp", loras=loras)
    return np.asarray(render_batch(renderer.model, renderer.backend, renderer.encoder,
                                   [FrameJob("m", "f", PROMPT, "", seed)], s, library=renderer.loras)[0])


def test_emulated_render_close_to_plain(quantized):
    from movielm_fast.bench.image_quality import psnr

    plain = Renderer(ModelConfig(model=quantized.config.model))
    a, b = _frame(plain), _frame(quantized)
    assert not np.array_equal(a, b)  # the rounding is really applied
    assert psnr(a, b) > 30.0  # the bar; tiny random-weight models measured 41.8 (sd) and 39.4 dB (sdxl)


def _set_emulate(unet, emulate: bool) -> None:
    for m in unet.modules():
        if isinstance(m, fp8._Fp8Weight):
            m.emulate = emulate


def test_gpu_code_path_on_the_cpu(quantized):
    """The whole UNet with every FP8 layer on torch._scaled_mm (the GPU path's code; `emulate` is not a user
    setting) against the emulation and against the unrounded weights, then a render of each."""
    from movielm_fast.bench.image_quality import psnr
    from movielm_fast.bench.step_cache import unet_inputs

    unet, step = quantized.model.unet, quantized.backend.unet
    torch.manual_seed(4)
    args = unet_inputs(unet, 8)
    with torch.enable_grad():  # grad mode runs the fp32 weights (test_grad_mode_runs_the_fp16_weights)
        exact = step(*args).detach()
    with torch.inference_mode():
        emulated = step(*args)
    emulated_frame = _frame(quantized)
    _set_emulate(unet, False)
    try:
        with torch.inference_mode():
            real = step(*args)
        real_frame = _frame(quantized)
    finally:
        _set_emulate(unet, True)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    # Same rounding everywhere; only the last bits of fp32 sums may differ, amplified a little by later layers.
    assert rel(real, emulated) < 1e-3, rel(real, emulated)  # 0.0 on the CPU this was written on
    # e4m3's 3 mantissa bits (2-3% per matmul, test_matmul_twin_close_to_fp32), diluted by the fp32 layers.
    assert 1e-2 < rel(real, exact) < 0.1, rel(real, exact)  # measured 0.034 (sd), 0.043 (sdxl)
    assert np.abs(real_frame.astype(int) - emulated_frame.astype(int)).max() <= 1
    assert psnr(real_frame, _frame(Renderer(ModelConfig(model=quantized.config.model)))) > 30.0


def _lora_on(path, unet, layer: str, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = unet.get_submodule(layer).weight
    base = "lora_unet_" + layer.replace(".", "_")
    save_file({f"{base}.lora_down.weight": torch.randn(2, w.shape[1], generator=g),
               f"{base}.lora_up.weight": torch.randn(w.shape[0], 2, generator=g) * 0.3,
               f"{base}.alpha": torch.tensor(2.0)}, str(path))
    return combine([(path, 1.0)])


def test_lora_switch_requantizes_only_touched_layers(tmp_path, quantized):
    r, unet = quantized, quantized.model.unet
    layers = sorted(n for n in r.backend.fp8_layers if isinstance(unet.get_submodule(n), fp8.Fp8Linear))
    target, other = layers[0], layers[-1]
    lora = _lora_on(tmp_path / "one.safetensors", unet, target)
    before = {n: unet.get_submodule(n).weight_fp8.clone() for n in (target, other)}
    plain = _frame(r)
    with_lora = _frame(r, lora)
    assert r.backend.fp8_requantized == [target]  # merged, then only that layer quantized again
    merged = unet.get_submodule(target)
    assert torch.equal(merged.weight_fp8, scaled_mm.quantize_rows(merged.weight)[0])  # the merged weights, quantized
    assert not torch.equal(merged.weight_fp8, before[target])
    assert torch.equal(unet.get_submodule(other).weight_fp8, before[other])
    assert not np.array_equal(with_lora, plain)
    assert np.array_equal(_frame(r), plain)  # switched back: restored weights, the same e4m3 copy, the same image
    assert r.backend.fp8_requantized == [target]
    assert torch.equal(unet.get_submodule(target).weight_fp8, before[target])


def test_grad_mode_runs_the_fp16_weights(quantized):
    unet = quantized.model.unet
    layer = next(unet.get_submodule(n) for n in quantized.backend.fp8_layers
                 if isinstance(unet.get_submodule(n), fp8.Fp8Linear))
    x = torch.randn(3, layer.in_features)
    with torch.enable_grad():
        exact = layer(x).detach()  # style training: the fp16 (here fp32) weights, no rounding
    assert torch.equal(exact, torch.nn.functional.linear(x, layer.weight, layer.bias).detach())
    with torch.inference_mode():
        assert not torch.equal(layer(x), exact)


def test_refusals(monkeypatch):
    with pytest.raises(UserError) as exc:
        fp8.check_quantize("fp8", "torch", torch.device("cpu"))
    assert "compute capability 8.9" in exc.value.message and "fp8-emulated" in exc.value.hint
    with pytest.raises(UserError, match="--backend torch"):
        fp8.check_quantize("fp8", "onnxruntime", torch.device("cpu"))
    with pytest.raises(UserError, match="unknown --quantize"):
        fp8.check_quantize("int4", "torch", torch.device("cpu"))
    fp8.check_quantize("fp8-emulated", "torch", torch.device("cpu"))  # allowed anywhere
    fp8.check_quantize(None, "onnxruntime", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UserError) as exc:
        fp8.check_quantize("fp8", "torch", torch.device("cuda"))
    assert "A100" in exc.value.message and "8.0" in exc.value.message
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_quantize("fp8", "torch", torch.device("cuda"))  # Hopper: accepted


def test_cli_refuses_fp8_on_cpu(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("m", 1)], SMALL)
    result = CliRunner().invoke(cli, ["render", str(plan), "--out", str(tmp_path / "o"), "--no-style-training",
                                      "--quantize", "fp8"])
    assert result.exit_code != 0 and "needs a CUDA GPU with FP8" in result.output
    assert "Traceback" not in result.output


def test_keys_and_manifest(tmp_path, tiny_sd):
    plan = write_plan(tmp_path / "plan.json", [movie("m", 2)], SMALL)
    base = Renderer(ModelConfig(model=str(tiny_sd)))
    quant = Renderer(ModelConfig(model=str(tiny_sd), quantize="fp8-emulated"))

    def run(renderer):
        return render(RunConfig(out=tmp_path / "out", style_training=False), [plan], executor=LocalExecutor(renderer=renderer))

    run(base)
    manifest = json.loads((tmp_path / "out" / "m" / "manifest.json").read_text())
    assert "quantize" not in manifest["settings"] and all("quantize" not in f for f in manifest["frames"])
    assert run(quant).frames_rendered == 2
    manifest = json.loads((tmp_path / "out" / "m" / "manifest.json").read_text())
    assert manifest["settings"]["quantize"] == "fp8-emulated"
    assert all(f["quantize"] == "fp8-emulated" for f in manifest["frames"])
    assert run(quant).frames_skipped == 2


@pytest.mark.gpu
def test_scaled_mm_matches_its_twin_on_fp8_gpus():
    if torch.cuda.get_device_capability() < fp8.FP8_CAPABILITY:
        pytest.skip("no FP8 tensor cores")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 640, device="cuda", generator=g, dtype=torch.float16)
    w = torch.randn(1280, 640, device="cuda", generator=g, dtype=torch.float16) / 25
    wq, ws = scaled_mm.quantize_rows(w)
    fast = scaled_mm.fp8_matmul(x, wq, ws.t().contiguous()).float()
    ref = scaled_mm.fp8_matmul_ref(x.float(), wq, ws.t().contiguous())
    # Same rounding of inputs and outputs; the tensor cores sum in another order (and, on Hopper, keep fewer bits).
    assert ((fast - ref.float()).norm() / ref.float().norm()) < 1e-2


@pytest.mark.gpu
def test_fp8_render_on_gpu(tiny_sd):
    """torch._scaled_mm in a real render: close to the fp16 render, and the same with CUDA graphs."""
    if torch.cuda.get_device_capability() < fp8.FP8_CAPABILITY:
        pytest.skip("no FP8 tensor cores")
    from movielm_fast.bench.image_quality import psnr

    plain = Renderer(ModelConfig(model=str(tiny_sd), device="cuda"))
    quant = Renderer(ModelConfig(model=str(tiny_sd), device="cuda", quantize="fp8"))
    graphed = Renderer(ModelConfig(model=str(tiny_sd), device="cuda", quantize="fp8", cuda_graphs=True))
    a, b, c = _frame(plain), _frame(quant), _frame(graphed)
    assert quant.backend.fp8_layers and psnr(a, b) > 30.0
    assert np.abs(b.astype(int) - c.astype(int)).max() <= 1


def test_bench_variant_takes_quantize():
    from movielm_fast.bench.runner import backend_variant

    assert backend_variant("torch+cuda_graphs+quantize=fp8") == ("torch", {"cuda_graphs": True, "quantize": "fp8"})
