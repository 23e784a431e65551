"""The CPU bf16 path: feature detection from fake cpuinfo texts, the fast-path table, bf16 against fp32 on the tiny
model, the compiled path against eager, inductor's disk cache across processes, the VAE's fp32 fallback and the
--dtype auto hint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from movielm_fast.engine import cpu
from movielm_fast.engine.backends.torch_backend import Fp32FallbackDecoder
from movielm_fast.engine.config import BackendConfig, ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.run.renderer import Renderer

XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 \
avx512_fp16 amx_tile amx_int8
"""
SKYLAKE_AVX512 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl
"""
COOPER_BF16 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8380H
flags\t\t: avx2 avx512f avx512bw avx512_vnni avx512_bf16
"""
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 avx avx2 fma bmi2
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16
"""
PROMPT = "a woman in lavender stands at the ballroom entrance"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


# --- detection and the table ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, tier, model", [
    (XEON_AMX, "amx", "Intel(R) Xeon(R) Platinum 8480+"),
    (COOPER_BF16, "avx512_bf16", "Intel(R) Xeon(R) Platinum 8380H"),
    (SKYLAKE_AVX512, "avx512", "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz"),
    (EPYC_AVX2, "avx2", "AMD EPYC 7B12"),
    (ARM, "baseline", "unknown"),  # Arm's "bf16" feature is not x86's: no AMX/AVX-512 path for it
])
def test_detection_from_fake_cpuinfo(text, tier, model):
    f = cpu.detect(text=text, torch_capability=None)
    assert (f.tier, f.model) == (tier, model)
    assert f.amx == (tier == "amx")
    assert f.native_bf16 == (tier in ("amx", "avx512_bf16"))


def test_detection_reads_a_file_and_survives_a_missing_one(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(XEON_AMX)
    assert cpu.detect(path, torch_capability=None).amx
    missing = cpu.detect(tmp_path / "absent", torch_capability=None)  # macOS, Windows, a sandbox
    assert (missing.tier, missing.model, missing.amx) == ("baseline", "unknown", False)
    # Without cpuinfo only what torch reports counts, and torch's ISA says nothing about AMX.
    assert cpu.detect(tmp_path / "absent", torch_capability="AVX512").tier == "avx512"
    assert cpu.detect(tmp_path / "absent", torch_capability="AVX2").tier == "avx2"


@pytest.mark.parametrize("text", [XEON_AMX, COOPER_BF16, SKYLAKE_AVX512, EPYC_AVX2, ARM, ""])
def test_no_path_the_cpu_lacks(text):
    f = cpu.detect(text=text, torch_capability=None)
    p = cpu.cpu_fast_path(torch.device("cpu"), torch.bfloat16, f)
    if not f.native_bf16:  # no oneDNN bf16 kernels: nothing beyond today's eager path
        assert not p.compile and not p.channels_last
    else:
        assert p.compile and p.channels_last and not p.confirmed  # the AMX entries await an AMX measurement
    # Only bf16 on the CPU takes the table's path.
    assert cpu.cpu_fast_path(torch.device("cpu"), torch.float32, f) == cpu.EAGER
    assert cpu.cpu_fast_path(torch.device("cuda"), torch.bfloat16, f) == cpu.EAGER


def test_this_machine_gets_the_path_of_its_own_flags():
    f = cpu.host_cpu()
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    assert f.amx == ({"amx_tile", "amx_bf16"} <= flags)
    assert cpu.cpu_fast_path(torch.device("cpu"), torch.bfloat16).compile == f.native_bf16


# --- the --dtype auto hint -----------------------------------------------------------------------------------------

def test_auto_dtype_hint(tmp_path):
    amx = cpu.detect(text=XEON_AMX, torch_capability=None)
    store = tmp_path / "cpu-bf16.json"
    on_cpu = torch.device("cpu")
    unmeasured = cpu.auto_dtype_hint("auto", on_cpu, amx, store)
    assert cpu.BENCH_COMMAND in unmeasured and "x faster" not in unmeasured  # no figure without a measurement
    cpu.record_bf16_measurement(amx.model, 2.31, 47.96, "sd15-arch UNet step", "bench/openvino_peer.py", store)
    cpu.record_bf16_measurement("AMD EPYC 7B12", 0.01, 30.0, "x", "y", store)  # another CPU model's figure
    measured = cpu.auto_dtype_hint("auto", on_cpu, amx, store)
    assert "~2.3x faster" in measured and "PSNR 48 dB" in measured and "sd15-arch UNet step" in measured
    assert json.loads(store.read_text())[amx.model]["speedup"] == 2.31
    # Only --dtype auto on an AMX CPU prints it.
    assert cpu.auto_dtype_hint("fp32", on_cpu, amx, store) is None
    assert cpu.auto_dtype_hint("bf16", on_cpu, amx, store) is None
    assert cpu.auto_dtype_hint("auto", torch.device("cuda"), amx, store) is None
    for text in (COOPER_BF16, SKYLAKE_AVX512, EPYC_AVX2, ""):
        assert cpu.auto_dtype_hint("auto", on_cpu, cpu.detect(text=text, torch_capability=None), store) is None


# --- bf16 on the tiny model ----------------------------------------------------------------------------------------

def _render(renderer: Renderer, steps: int = 2, size: int = 64, seed: int = 11) -> np.ndarray:
    jobs = [FrameJob("m", "f", PROMPT, "", seed)]
    return render_batch(renderer.model, renderer.backend, renderer.encoder, jobs,
                        BatchSettings(size, size, steps, 7.5, "dpmpp"))[0]


@pytest.fixture(scope="module")
def fp32_frame(tiny_sd):
    return _render(Renderer(ModelConfig(model=str(tiny_sd), dtype="fp32")))


# The config's quality bar for half-precision dtypes; the tiny model measured ~48 dB in bf16 (2 steps, 64²).
BF16_PSNR_DB = 35.0


def test_bf16_frame_within_tolerance_of_fp32(tiny_sd, fp32_frame):
    r = Renderer(ModelConfig(model=str(tiny_sd), dtype="bf16"))
    assert r.backend.dtype == torch.bfloat16 and next(r.backend.unet.parameters()).dtype == torch.bfloat16
    frame = _render(r)
    assert fp32_frame.std() > 1 and frame.shape == fp32_frame.shape
    assert psnr(frame, fp32_frame) >= BF16_PSNR_DB
    assert not np.array_equal(frame, fp32_frame)  # it did run in bf16


def test_bf16_attention_runs_sdpa_cpu_flash_kernel(tiny_sd):
    r = Renderer(ModelConfig(model=str(tiny_sd), dtype="bf16"))
    x = torch.randn(2, 4, 8, 8)
    cond = r.encoder.encode_pair(PROMPT, "")
    from movielm_fast.engine.backends.base import UNetCond

    hidden = torch.cat([cond[0].hidden, cond[1].hidden])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        r.backend.denoise(x, torch.tensor(500), UNetCond(hidden))
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names


def test_vae_falls_back_to_fp32_on_a_bf16_overflow(tiny_sd, fp32_frame, caplog):
    r = Renderer(ModelConfig(model=str(tiny_sd), dtype="bf16"))
    decoder = r.backend._decode
    assert isinstance(decoder, Fp32FallbackDecoder)
    clean = _render(r)
    assert decoder.fallbacks == 0

    # A real overflow starts mid-network and the next group norm turns its infs into NaN (inf - inf): planted in
    # the bf16 decode's output, which covers both paths. A forward hook inside the decoder cannot do it: on a CPU
    # with native bf16 the decoder is compiled by inductor, and a hook registered after compilation never runs in
    # the compiled graph.
    bf16_decode = decoder.fast

    def overflowing(latents):
        out = bf16_decode(latents)
        return out.masked_fill(torch.rand_like(out, dtype=torch.float32) < 0.01, float("nan"))

    decoder.fast = overflowing
    try:
        with caplog.at_level("WARNING", logger="movielm_fast"):
            frame = _render(r)  # passes the pipeline's NaN check only if the fallback decoded it
    finally:
        decoder.fast = bf16_decode
    assert decoder.fallbacks == 1 and decoder.fp32 is not None
    assert next(decoder.fp32.parameters()).dtype == torch.float32
    assert any("decoded again in fp32" in rec.message for rec in caplog.records)
    # The same bf16 latents decoded in fp32: close to the bf16 decode of the clean run and to the fp32 frame.
    assert psnr(frame, clean) >= BF16_PSNR_DB and psnr(frame, fp32_frame) >= BF16_PSNR_DB


# --- torch.compile (inductor's CPU backend) -----------------------------------------------------------------------

def _compiler_missing() -> str | None:
    if sys.platform != "linux":
        return "inductor's CPU backend is only exercised here on Linux"
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "inductor's CPU backend needs a C++ compiler (g++, c++ or clang++): none on PATH"
    return None


needs_compiler = pytest.mark.skipif(_compiler_missing() is not None, reason=_compiler_missing() or "")


@pytest.mark.slow
@needs_compiler
def test_compiled_bf16_unet_matches_eager_bf16(tiny_sd):
    eager = Renderer(ModelConfig(model=str(tiny_sd), dtype="bf16"))
    compiled = Renderer(ModelConfig(model=str(tiny_sd), dtype="bf16", compile_unet=True))
    step = compiled.backend._unet_step
    assert isinstance(step, cpu.CompiledCpu)
    a, b = _render(eager, steps=1), _render(compiled, steps=1)
    assert len(step.buckets) == 1  # one (batch, size) bucket, timed
    (bucket,) = step.buckets.values()
    assert bucket["seconds"] > 0
    assert psnr(b, a) >= 40.0  # kernel fusion changes bf16 rounding, nothing else


_CACHE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from movielm_fast.engine import cpu

    class Block(torch.nn.Module):  # a conv, a group norm and attention: the kernel kinds of a UNet, in miniature
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.norm = torch.nn.GroupNorm(2, 8)

        def forward(self, x):
            h = torch.nn.functional.silu(self.norm(self.conv(x)))
            q = h.flatten(2).transpose(1, 2)[:, None]  # (B, 1, tokens, C)
            return x + torch.nn.functional.scaled_dot_product_attention(q, q, q).squeeze(1).transpose(1, 2) \\
                .reshape(x.shape)

    torch.manual_seed(0)
    m = Block().eval()
    fn = cpu.CompiledCpu(m, "block", report=lambda msg: None)
    x = torch.randn(1, 8, 8, 8)
    with torch.inference_mode():
        out = fn(x)
        ref = m(x)
    (bucket,) = fn.buckets.values()
    print(json.dumps({**bucket, "err": float((out - ref).abs().max()), "dir": str(fn.cache_dir)}))
""")


@pytest.mark.slow
@needs_compiler
def test_second_process_hits_the_compile_cache(tmp_path):
    env = {**os.environ, "MOVIELM_CACHE": str(tmp_path / "cache")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)

    def run():
        out = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["dir"] == second["dir"] == str(tmp_path / "cache" / "inductor")
    assert (tmp_path / "cache" / "inductor").is_dir()
    assert not first["cache_hit"] and second["cache_hit"]
    assert first["err"] < 1e-4 and second["err"] < 1e-4


# --- bench: bf16 rows beside fp32 ----------------------------------------------------------------------------------

def test_bench_bf16_rows_carry_psnr_against_fp32(tmp_path, tiny_sd):
    from click.testing import CliRunner

    from movielm_fast.bench.runner import backend_variant
    from movielm_fast.cli.bench_cmds import bench_cmd

    assert backend_variant("torch+dtype=bf16") == ("torch", {"dtype": "bf16"})
    out = tmp_path / "results"
    # The random tiny model, as the other bf16 bounds here: the trained toy demo model at one step is a sharper
    # image, whose bf16 PSNR is lower (31.9 dB measured).
    res = CliRunner().invoke(bench_cmd, ["--model", str(tiny_sd), "--backend", "torch,torch+dtype=bf16", "--sizes",
                                         "64x64", "--batch-sizes", "1", "--steps", "1", "--repeats", "1",
                                         "--warmup", "0", "--no-baseline", "--out", str(out), "--report",
                                         str(tmp_path / "RESULTS.md")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    [path] = out.glob("*.json")
    runs = {r["backend"]: r for r in json.loads(path.read_text())["runs"]}
    fp32, bf16 = runs["torch"], runs["torch+dtype=bf16"]
    assert "psnr_vs_fp32" not in fp32
    assert bf16["dtype"] == "bfloat16" and BF16_PSNR_DB <= bf16["psnr_vs_fp32"] < float("inf")
    assert 0 < bf16["max_abs_diff_vs_fp32"] <= 255 and bf16["speedup_vs_fp32"] > 0
    md = (tmp_path / "RESULTS.md").read_text()
    assert f"bfloat16 vs fp32: {bf16['psnr_vs_fp32']:.1f} dB" in md
    csv_text = next(out.glob("*.csv")).read_text()
    assert "psnr_vs_fp32" in csv_text.splitlines()[0] and "bfloat16" in csv_text


def test_backend_wiring_on_a_fake_amx_cpu(tiny_sd, monkeypatch, caplog, tmp_path):
    """What the torch backend does on an AMX CPU, short of compiling (compiles are lazy: nothing runs here)."""
    from movielm_fast.engine.backends.base import create_backend
    from movielm_fast.engine.models import load_model

    amx = cpu.detect(text=XEON_AMX, torch_capability=None)
    monkeypatch.setattr(cpu, "host_cpu", lambda: amx)  # the test seam: this machine's own cpuinfo is replaced
    monkeypatch.setenv("MOVIELM_CACHE", str(tmp_path))
    cpu._warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="movielm_fast"):
        be = create_backend("torch", load_model(tiny_sd), BackendConfig(dtype="bf16"))
        auto = create_backend("torch", load_model(tiny_sd), BackendConfig(dtype="auto"))
        cpu.print_auto_dtype_hint("auto", auto.device)  # what the CLI says when it builds an auto-dtype config
    assert isinstance(be._unet_step, cpu.CompiledCpu) and isinstance(be._decode, Fp32FallbackDecoder)
    assert isinstance(be._decode.fast, cpu.CompiledCpu)
    conv = be.unet.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    # --dtype auto: fp32 and eager, plus the one hint line (nothing measured in this fresh cache).
    assert auto.dtype == torch.float32 and auto._unet_step is auto.unet
    hints = [r.message for r in caplog.records if "has AMX" in r.message]
    assert len(hints) == 1 and cpu.BENCH_COMMAND in hints[0]
    assert not any("no native bf16" in r.message for r in caplog.records)


def test_cpu_peer_section_names_the_cpu_and_every_row():
    from movielm_fast.bench.openvino_peer import cpu_peer_section

    def sec(median):
        return {"min": median, "median": median, "max": median, "n": 1}

    res = {"format": "movielm-bench-cpu-peer/1", "created": "2026-12-02T00:00:00+0000",
           "machine": {"cpu_model": "Intel(R) Xeon(R) Platinum 8480+", "tier": "amx", "amx": True,
                       "avx512_bf16": True, "threads": 2, "load_avg_start": [0.5, 0.5, 0.5],
                       "load_avg_end": [0.7, 0.6, 0.5]},
           "settings": {"model": "sd15-arch", "steps": 4}, "chosen_bf16_path": {"why": "AMX bf16"},
           "gemm": {"fp32": {"n": 2048, "flops_per_s": 241e9}, "bf16": {"n": 2048, "flops_per_s": 766e9}},
           "unet_step": {"torch fp32 eager": {"status": "ok", "seconds": sec(2.7), "first_call_s": 3.0},
                         "torch bf16 compiled": {"status": "ok", "seconds": sec(0.9), "first_call_s": 60.0,
                                                 "max_rel_diff_vs_torch_fp32": 0.01},
                         "openvino (CPU defaults)": {"status": "not run", "note": "OpenVINO is not installed"}},
           "frame": {"torch bf16": {"status": "ok", "seconds": sec(4.0), "speedup_vs_fp32": 3.0,
                                    "psnr_vs_fp32": 47.9, "max_abs_diff_vs_fp32": 5}}}
    text = "\n".join(cpu_peer_section([res]))
    assert "Intel(R) Xeon(R) Platinum 8480+ (AMX)" in text and "bf16 766.00 GFLOP/s" in text
    assert "| torch bf16 compiled | 0.900 (0.900–0.900) | 3.00× | 60.0 |" in text
    assert "| openvino (CPU defaults) | not run |" in text and "OpenVINO is not installed" in text
    assert "| torch bf16 | 4.000 (4.000–4.000) | 3.00× | 47.9 dB | 5 |" in text
