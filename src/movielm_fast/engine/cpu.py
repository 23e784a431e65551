"""What this CPU can do, and which bf16 fast path the torch backend runs on it.

`--dtype bf16 --device cpu` picks its path by itself from `BF16_PATHS`, a small table keyed by the CPU's bf16
ability as read from /proc/cpuinfo at run time: a path that needs an instruction set the CPU lacks is never chosen.
Only what was measured to pay on a kind of CPU is switched on for it; entries not yet measured on such a CPU say
so (`confirmed=False`, "to be confirmed on AMX"). `bench/openvino_peer.py` is the measurement that confirms them.

`--dtype auto` stays fp32 on the CPU (exact reproducibility against diffusers is a promise), but on an AMX CPU the
run says once how much faster bf16 is here -- from a measurement stored for this CPU model by the bench, never
from a guess (`auto_dtype_hint`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

from movielm_fast.paths import atomic_write_text, cache_root

log = logging.getLogger("movielm_fast")

CPUINFO = Path("/proc/cpuinfo")
BENCH_COMMAND = "movielm-fast bench --cpu-bf16"  # measures bf16 against fp32 here and stores the figures


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    """The CPU's model name ("Intel(R) Xeon(R) Platinum 8480+"), "unknown" where it cannot be read."""
    flags: frozenset[str]
    """The kernel's feature flags (x86 "flags", Arm "Features"); empty where /proc/cpuinfo is missing."""
    torch_capability: str | None = None
    """torch.backends.cpu.get_cpu_capability(): the vector ISA ATen's own kernels were dispatched to."""

    @property
    def amx(self) -> bool:
        """AMX tiles with bf16 multiply: oneDNN runs bf16 convolutions and matmuls on them."""
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags or (not self.flags and self.torch_capability in ("AVX512", "AVX512_BF16"))

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags or self.avx512 or (not self.flags and self.torch_capability == "AVX2")

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware; without it oneDNN has no bf16 kernels and bf16 falls back to slow
        reference loops (an AVX2 EPYC: bf16 GEMM 0.22 GFLOP/s against 138 in fp32)."""
        return self.amx or self.avx512_bf16

    @property
    def tier(self) -> str:
        """The key into BF16_PATHS: the best bf16 ability this CPU has."""
        for name in ("amx", "avx512_bf16", "avx512", "avx2"):
            if getattr(self, name):
                return name
        return "baseline"


def parse_cpuinfo(text: str, torch_capability: str | None = None) -> CpuFeatures:
    """/proc/cpuinfo text -> CpuFeatures, from the first processor's entry (all cores of a machine are alike)."""
    model = re.search(r"^(?:model name|Model|Processor|cpu model)\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
    return CpuFeatures(model.group(1).strip() if model else "unknown",
                       frozenset(flags.group(1).split()) if flags else frozenset(), torch_capability)


def detect(path: Path | str = CPUINFO, text: str | None = None, torch_capability: str | None = "probe"
           ) -> CpuFeatures:
    """This machine's CPU features. `text` (a cpuinfo's content) or `path` replace /proc/cpuinfo in tests; without
    a readable file (macOS, Windows, a sandbox) no AMX or bf16 path is assumed, only what torch itself reports."""
    if torch_capability == "probe":
        torch_capability = torch.backends.cpu.get_cpu_capability()
    if text is None:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            text = ""
    return parse_cpuinfo(text, torch_capability)


@lru_cache(maxsize=1)
def host_cpu() -> CpuFeatures:
    return detect()


# --- threads -------------------------------------------------------------------------------------------------------


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask (taskset, a container's cpuset), at most one per physical
    core (hyper-threads share the FMA units that convolutions and matmuls keep busy)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        allowed = os.cpu_count() or 1
    return max(1, min(allowed, psutil.cpu_count(logical=False) or allowed))


def busy_cores(window: float = 0.05) -> float:
    """How many of this process's usable cores other work keeps busy now: the mean utilisation of the CPUs in its
    affinity mask over `window` seconds (this process sleeps meanwhile, so it is not counted), times the cores."""
    per_cpu = psutil.cpu_percent(interval=window, percpu=True)
    try:
        mine = [per_cpu[i] for i in os.sched_getaffinity(0) if i < len(per_cpu)] or per_cpu
    except AttributeError:  # no affinity masks (macOS, Windows)
        mine = per_cpu
    return usable_cores() * sum(mine) / (100.0 * max(len(mine), 1))


_lowered: tuple[int, int] | None = None  # (torch's count, what `auto` set instead) when it chose fewer threads

SMALL_DENOISER = 50_000_000
"""Parameters of a denoiser below which `auto` runs one thread: its ops are too small for a second thread to pay
for being woken. The UNet demo model (1.7M) ran faster on one thread than on two even on an idle machine, SD 1.5's
UNet (860M) faster on two (bench/RESULTS.md, "CPU threads under load"); the DiT demo (2.6M) is as small."""


def _own_count() -> int:
    """torch's count as the user or torch chose it. A count `auto` lowered is not the user's choice: a later `auto`
    (another model, the load gone) may go back up from what it was."""
    current = torch.get_num_threads()
    return _lowered[0] if _lowered and _lowered[1] == current else current


def cpu_threads(threads: int | str = "auto", denoiser_params: int | None = None) -> int:
    """Intra-op threads for `--threads` (engine.config.BackendConfig.threads), torch's and ONNX Runtime's alike.
    auto: the count torch runs with (its default, OMP_NUM_THREADS, or what this process set), but never more than
    the cores it may use (torch's default counts every core of the machine, whatever the affinity), one for a
    denoiser of fewer than SMALL_DENOISER parameters, and at most one more than the cores other work leaves free
    now. The last rule is measured (bench/RESULTS.md, "CPU threads under load", 2 cores): with both cores busy,
    one thread beat two -- a thread that waits for a taken core holds up every parallel region it is part of."""
    if threads != "auto":
        return int(threads)
    n = min(_own_count(), usable_cores())
    if n > 1 and denoiser_params is not None and denoiser_params < SMALL_DENOISER:
        log.info("--threads auto: 1 thread for a denoiser of %.1fM parameters (a second one does not pay for ops "
                 "this small)", denoiser_params / 1e6)
        return 1
    if n > 1:
        busy = busy_cores()
        fit = max(1, min(n, usable_cores() - round(busy) + 1))
        if fit < n:
            log.info("--threads auto: %d thread(s), not %d: other work keeps %.1f of %d cores busy", fit, n, busy,
                     usable_cores())
        n = fit
    return n


def use_threads(threads: int | str = "auto", denoiser_params: int | None = None) -> int:
    """Run torch's CPU work on `cpu_threads(threads, denoiser_params)` threads; returns the count."""
    global _lowered
    n = cpu_threads(threads, denoiser_params)
    if n != torch.get_num_threads():
        base = _own_count()
        _lowered = (base, n) if threads == "auto" and n < base else None
        torch.set_num_threads(n)
    return n


# --- the bf16 fast path -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bf16Path:
    """How the torch backend runs the UNet and the VAE decoder in bf16 on one kind of CPU."""

    channels_last: bool
    """NHWC weights and activations, the layout oneDNN's bf16 convolution kernels use without reorders."""
    compile: bool
    """torch.compile with inductor's CPU backend, freezing (weights folded as constants) and weight prepacking
    (oneDNN-blocked layouts made once): UNet and VAE decoder, one compile per shape bucket, cached on disk."""
    confirmed: bool
    """Measured to pay on such a CPU; False: the entry follows oneDNN's design and awaits a measurement."""
    why: str


BF16_PATHS: dict[str, Bf16Path] = {
    # To be confirmed on AMX: no AMX machine was at hand when this table was written. oneDNN has AMX bf16 kernels
    # for convolutions and matmuls, reached fastest with prepacked NHWC weights; attention runs SDPA's CPU flash
    # kernel in bf16 in every entry (the default `--attention sdpa` dispatches to it for bf16 CPU tensors).
    # `python -m movielm_fast.bench.openvino_peer` on an AMX machine times eager, channels-last and compiled side by
    # side.
    "amx": Bf16Path(True, True, False, "AMX bf16 (to be confirmed on AMX): channels-last + inductor with freezing"),
    "avx512_bf16": Bf16Path(True, True, False, "AVX-512-BF16 (to be confirmed on such a CPU): channels-last + "
                                               "inductor with freezing"),
    # Measured on an AMD EPYC (AVX2, 2 threads): oneDNN has no bf16 kernels without native bf16, a bf16 GEMM ran at
    # 0.22 GFLOP/s against 138 GFLOP/s in fp32, so no layout or compile makes bf16 pay there: eager, as before.
    "avx512": Bf16Path(False, False, False, "no native bf16 (AVX-512 without BF16): eager, as before"),
    "avx2": Bf16Path(False, False, True, "no native bf16 (AVX2): eager, as before; bf16 is emulated and slow"),
    "baseline": Bf16Path(False, False, True, "no vector bf16: eager, as before"),
}
EAGER = Bf16Path(False, False, True, "eager")


def bf16_path(features: CpuFeatures) -> Bf16Path:
    return BF16_PATHS[features.tier]


def cpu_fast_path(device: torch.device, dtype: torch.dtype, features: CpuFeatures | None = None) -> Bf16Path:
    """The path for a run: the table's entry for bf16 on the CPU, plain eager for anything else."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return EAGER
    features = features or host_cpu()
    path = bf16_path(features)
    if not features.native_bf16:
        _warn_once(f"this CPU ({features.model}) has no native bf16 (no AMX or AVX-512-BF16): --dtype bf16 runs "
                   f"emulated and is much slower than fp32 here; use --dtype fp32")
    return path


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


# --- torch.compile on the CPU, timed and cached -------------------------------------------------------------------


def inductor_cache_dir() -> Path:
    return cache_root() / "inductor"


def use_compile_cache() -> Path:
    """Point inductor's on-disk caches (FX graphs, compiled C++ kernels) at the project's cache root, so a second
    process loads what the first compiled instead of compiling again. Inductor reads its folder only from the
    TORCHINDUCTOR_CACHE_DIR environment variable (it has no config field for it) and writes its own default there
    when first asked (some imports already ask), so only that default is replaced: a folder the user chose wins."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


# Inductor config patches for CPU inference. Freezing folds the weights into the graph as constants, which is what
# lets inductor prepack them into oneDNN's blocked layouts once (weight_prepack) instead of on every call.
INDUCTOR_CPU_OPTIONS = {"freezing": True, "cpp.weight_prepack": True, "fx_graph_cache": True}


class CompiledCpu:
    """A module compiled by inductor for the CPU (`INDUCTOR_CPU_OPTIONS`), one graph per shape bucket; the first
    call of each bucket is timed and reported (compile cost, and whether inductor's disk cache served it)."""

    def __init__(self, module: torch.nn.Module, name: str, report: Callable[[str], None] | None = None):
        self.cache_dir = use_compile_cache()
        self.name = name
        self.report = report or log.warning
        # torch.compile applies `options` as a torch._inductor.config.patch around each compile of this module.
        self.fn = torch.compile(module, dynamic=False, options=dict(INDUCTOR_CPU_OPTIONS))
        self.buckets: dict[tuple, dict[str, Any]] = {}

    def __call__(self, *args):
        key = tuple(None if a is None else (tuple(a.shape), a.dtype) for a in args)
        if key in self.buckets:
            return self.fn(*args)
        from torch._dynamo.utils import counters  # inductor's own hit/miss counters

        hits = counters["inductor"]["fxgraph_cache_hit"]
        t0 = time.perf_counter()
        out = self.fn(*args)
        seconds = time.perf_counter() - t0
        hit = counters["inductor"]["fxgraph_cache_hit"] > hits
        self.buckets[key] = {"seconds": seconds, "cache_hit": hit}
        shape = "x".join(map(str, args[0].shape))
        self.report(f"compiled the {self.name} for {shape} {str(args[0].dtype).removeprefix('torch.')} in "
                    f"{seconds:.1f} s (first call; inductor cache {'hit' if hit else 'miss'}, {self.cache_dir})")
        return out


# --- what bf16 measured on this CPU model, and the --dtype auto hint ----------------------------------------------


def measurements_file() -> Path:
    return cache_root() / "cpu-bf16.json"


def record_bf16_measurement(cpu_model: str, speedup: float, psnr_db: float, what: str, source: str,
                            path: Path | None = None) -> None:
    """Store a measured bf16-over-fp32 figure for this CPU model (written by the bench, read by the hint)."""
    path = path or measurements_file()
    data = _load(path)
    data[cpu_model] = {"speedup": round(speedup, 2), "psnr_db": round(psnr_db, 1), "what": what, "source": source,
                       "measured": time.strftime("%Y-%m-%d")}
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def stored_bf16_measurement(cpu_model: str, path: Path | None = None) -> dict[str, Any] | None:
    return _load(path or measurements_file()).get(cpu_model)


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def auto_dtype_hint(requested: str, device: torch.device, features: CpuFeatures | None = None,
                    path: Path | None = None) -> str | None:
    """The one line `--dtype auto` prints on an AMX CPU (None elsewhere): bf16's speed-up and PSNR as measured on
    this CPU model by the bench, or, where nothing was measured, the command that measures it."""
    if requested != "auto" or device.type != "cpu":
        return None
    features = features or host_cpu()
    if not features.amx:
        return None
    m = stored_bf16_measurement(features.model, path)
    if m is None:
        return (f"this CPU ({features.model}) has AMX, where --dtype bf16 may be much faster than the fp32 that "
                f"--dtype auto keeps; not yet measured on this CPU model: `{BENCH_COMMAND}` measures it")
    return (f"this CPU has AMX: --dtype bf16 is ~{m['speedup']:.1f}x faster here ({m['what']}, PSNR "
            f"{m['psnr_db']:.0f} dB against fp32; measured {m['measured']} by {m['source']}); --dtype auto "
            f"stays fp32 for exact reproducibility")


def hints_file() -> Path:
    return cache_root() / "hints-shown.json"


def print_auto_dtype_hint(requested: str, device: torch.device, quiet: bool = False) -> None:
    """The hint, once per machine (each distinct line is remembered in the cache root) and never under --quiet."""
    hint = None if quiet else auto_dtype_hint(requested, device)
    if not hint:
        return
    shown = _load(hints_file())
    if hint in shown:
        return
    _warn_once(hint)
    try:
        atomic_write_text(hints_file(), json.dumps({**shown, hint: time.strftime("%Y-%m-%d")}, indent=1))
    except OSError:
        pass  # a read-only cache only means the hint may show again
