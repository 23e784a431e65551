"""What the numbers are measured against: timing with synchronization, FLOP counts, the matmul ceiling, memory,
and a description of the machine."""

from __future__ import annotations

import contextlib
import inspect
import os
import platform
import re
import statistics
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[3]  # the checkout, in the src layout (a wheel has none: git answers nothing)
RESULTS = Path("bench", "results")
"""Where results are written by default: relative to the working folder, so a benchmark run from the repository
root writes beside bench/RESULTS.md (installed from a wheel, it writes under the folder it is run in)."""


# --- timing ----------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock interval covers the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def settle(device: torch.device, seconds: float = 0.1) -> None:
    """Let the previous entry's thread pools go idle before the next one is timed. ONNX Runtime's CPU workers
    spin for a while after each run: on a 2-core machine a torch call (the demo model's VAE decode) started right
    after one ran much slower than alone or after a short pause, which would charge one backend for another's
    idle spinning."""
    if device.type == "cpu":
        time.sleep(seconds)


def stats(samples: list[float]) -> dict[str, Any]:
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples), "n": len(samples)}


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, with queued device work finished on both sides of the interval."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def time_calls(fn: Callable[..., Any], repeats: int, device: torch.device,
               setup: Callable[[], Any] | None = None) -> dict[str, Any]:
    """min/median/max seconds of `fn(setup())` (or `fn()`) over `repeats` calls; the caller warms up first.
    `setup` runs outside the timed interval: it builds per-call state that must not be reused, such as a cold
    prompt cache."""
    samples = []
    for _ in range(repeats):
        arg = setup() if setup else None
        samples.append(timed((lambda: fn(arg)) if setup else fn, device)[0])
    return stats(samples)


# --- FLOPs -----------------------------------------------------------------------------------------------------
def count_flops(fn: Callable[[], Any], device: torch.device) -> int:
    """FLOPs of one call of `fn`, as torch's FlopCounterMode counts them (matmuls, convolutions, attention: the
    work MFU is defined over; normalisations and pointwise ops are not counted).

    On CPU, PyTorch's fused attention (`_scaled_dot_product_flash_attention_for_cpu`) has no FLOP formula and would
    count as zero, so counting runs attention through the math backend, whose matmuls are counted; the FLOPs of
    attention are the same whichever kernel computes it. CUDA's fused kernels have formulas."""
    kernel = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()
    with torch.inference_mode(), kernel, FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# --- matmul ceiling --------------------------------------------------------------------------------------------
def _rates(flops: int, t: dict[str, Any]) -> dict[str, float]:
    return {"min": flops / t["max"], "median": flops / t["median"], "max": flops / t["min"]}


def _torch_gemm(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> dict[str, Any]:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    # Enough back-to-back GEMMs per sample that launch overhead and timer resolution vanish on a fast GPU.
    inner = 20 if device.type == "cuda" else 1
    with torch.inference_mode():
        a @ b  # warm-up: thread pools, allocator, cuBLAS heuristics
        synchronize(device)
        t = time_calls(lambda: [a @ b for _ in range(inner)], repeats, device)
    return {"seconds": t, "flops_per_s": _rates(2 * n ** 3 * inner, t)}


def _onnxruntime_gemm(n: int, repeats: int) -> dict[str, Any] | None:
    """The same GEMM through ONNX Runtime's CPU kernels (MLAS), which on some CPUs (AMD with MKL, for one) beat
    torch's: a ceiling that a backend exceeds is no ceiling. None where onnxruntime is not installed."""
    try:  # optional dependencies (the onnx extra)
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b", "c")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # old enough for any onnxruntime the project supports
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()  # the same cores torch's GEMM gets
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    sess.run(None, feeds)
    t = time_calls(lambda: sess.run(None, feeds), repeats, torch.device("cpu"))
    return {"seconds": t, "flops_per_s": _rates(2 * n ** 3, t)}


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5
                   ) -> dict[str, Any]:
    """Achieved FLOP/s of a large square GEMM in `dtype` on `device`: the practical limit MFU is measured against.

    Measured rather than taken from a data sheet: on a shared or throttled machine the data-sheet peak would
    flatter nothing and explain nothing. On CPU in fp32 the GEMM runs through every library at hand (torch, and
    ONNX Runtime when installed) and the fastest one sets the ceiling."""
    n = n or (8192 if device.type == "cuda" else 2048)
    settle(device)
    libraries = {"torch": _torch_gemm(device, dtype, n, repeats)}
    if device.type == "cpu" and dtype == torch.float32:
        settle(device)
        ort_gemm = _onnxruntime_gemm(n, repeats)
        if ort_gemm is not None:
            libraries["onnxruntime"] = ort_gemm
    best = max(libraries, key=lambda k: libraries[k]["flops_per_s"]["median"])
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "library": best, **libraries[best],
            "libraries": {k: v["flops_per_s"]["median"] for k, v in libraries.items()}}


# --- memory ----------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory while the block runs: resident set size of this process on CPU (sampled every 5 ms by a thread,
    since the OS keeps only the lifetime peak), peak allocated by PyTorch's allocator on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            proc = psutil.Process()
            self.peak_bytes = proc.memory_info().rss

            def sample():
                while not self._stop.wait(0.005):
                    self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
        return False

    @property
    def kind(self) -> str:
        return "cuda_peak_allocated" if self.device.type == "cuda" else "cpu_peak_rss"


# --- the machine -----------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt",
                 "triton", "accelerate"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        # Only tracked changes count: results and images written by this very run must not mark it dirty.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: on a shared machine, how much else was running while we measured."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def source_state(cls: type) -> dict[str, Any]:
    """Where a backend's code came from and whether git has it as committed, so a result measured on work in
    progress says so."""
    try:
        path = Path(inspect.getfile(cls)).resolve()
        rel = path.relative_to(ROOT)
    except (TypeError, ValueError):
        return {"file": None, "git": "outside the repository"}
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--", str(rel)], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"file": rel.as_posix(), "git": None}
    state = "committed" if not status else ("untracked" if status.startswith("??") else "modified")
    return {"file": rel.as_posix(), "git": state}


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.type, "cpu_model": _cpu_model(), "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False), "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "os": platform.platform(),
        "gpu_model": None, "gpu_memory_gb": None, "cuda": None, "load_avg_start": load_average()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_model=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    gpu_count=torch.cuda.device_count())
        info["slug"] = "cuda-" + _slug(props.name)
    else:
        info["slug"] = f"cpu-{_slug(info['cpu_model'])}-{info['cpu_cores_logical']}c"
    return {**info, "versions": _versions(), "git": _git()}
