"""bf16 against fp32 on this CPU with what `make` installs: one frame through our torch backend in each dtype.

    movielm-fast bench --cpu-bf16 [--model sd15-arch] [--steps 4] [--sizes 256x256] [--repeats 2]

Renders the same frame (batch 1) in fp32 and in bf16, interleaved, and stores the median speed-up and the PSNR of
the bf16 frame against the fp32 one for this CPU model (engine/cpu.py), which is what `--dtype auto` quotes on an
AMX CPU. `python -m movielm_fast.bench.openvino_peer` measures more (GEMM ceilings, ONNX Runtime, OpenVINO) but
needs packages the set-up does not install.
"""

from __future__ import annotations

from typing import Any, Callable

from movielm_fast.engine import cpu
from movielm_fast.engine.backends.base import create_backend
from movielm_fast.engine.config import BackendConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.models import load_model
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.engine.text import PromptEncoder
from movielm_fast.errors import UserError

from .models import resolve_model
from .openvino_peer import interleaved, psnr
from .runner import PROMPTS

COMMAND = "movielm-fast bench --cpu-bf16"


def measure(model: str = "sd15-arch", size: int = 256, steps: int = 4, repeats: int = 2,
            log: Callable[[str], None] = print, features: cpu.CpuFeatures | None = None) -> dict[str, Any]:
    """{"speedup", "psnr_db", "fp32_s", "bf16_s"} of one frame; stored for this CPU model."""
    features = features or cpu.host_cpu()
    if not features.native_bf16:
        raise UserError(f"this CPU ({features.model}) has no native bf16 (no AMX, no AVX-512-BF16): bf16 is emulated "
                        "and far slower than fp32, so there is nothing worth measuring", "keep --dtype auto (fp32)")
    path = resolve_model(model)
    job = [FrameJob("bench", "000", PROMPTS[0], "", 1000)]
    s = BatchSettings(size, size, steps, 7.5, "dpmpp")
    calls = {}
    for dt in ("fp32", "bf16"):  # each its own model: the bf16 path changes module layouts (channels-last)
        m = load_model(path)
        be = create_backend("torch", m, BackendConfig(dtype=dt))
        calls[dt] = lambda m=m, be=be: render_batch(m, be, PromptEncoder(m, be), job, s)[0]
    log(f"{features.model} ({features.tier}): {model}, one {size}x{size} frame, {steps} steps, fp32 and bf16")
    rows = interleaved(calls, repeats, log)
    if any(r["status"] != "ok" for r in rows.values()):
        raise UserError("a dtype failed to render: " + "; ".join(r.get("note", "") for r in rows.values()),
                        "run with -v for details")
    fp32_s, bf16_s = rows["fp32"]["seconds"]["median"], rows["bf16"]["seconds"]["median"]
    result = {"speedup": fp32_s / bf16_s, "psnr_db": psnr(rows["bf16"]["output"], rows["fp32"]["output"]),
              "fp32_s": fp32_s, "bf16_s": bf16_s}
    cpu.record_bf16_measurement(features.model, result["speedup"], min(result["psnr_db"], 99.0),
                                f"{model} {size}x{size} {steps}-step frame", COMMAND)
    log(f"bf16 is {result['speedup']:.2f}x fp32's speed here, PSNR {result['psnr_db']:.1f} dB against fp32; stored "
        f"for --dtype auto's hint in {cpu.measurements_file()}")
    return result
