"""How many frames go into a batch: `--batch-size auto` for throughput, and a first batch of one frame.

A batch larger than the device needs to be busy buys little throughput and delays every file by the whole batch
(the GPU measurements behind the knees below are in bench/RESULTS.md: a batch of 64 that fitted in memory gained
a few percent of images/s over 8 for SD 1.5-arch at 512², while its first file waited for 64 frames' work).
So "auto" takes the smallest of: what fits in memory, the throughput knee of the architecture scaled to the
frame size (the knee is a number of latent pixels in flight), and 64.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")

MAX_AUTO_BATCH = 64

THROUGHPUT_KNEE: dict[str, tuple[int, int]] = {
    "sd": (8, 512 * 512),  # SD 1.x/2.x: 8 frames of 512²; beyond it little more images/s (bench/RESULTS.md)
    "sdxl": (4, 1024 * 1024),  # SDXL: 4 frames of 1024²
}
"""Model kind -> (frames, at this many pixels per frame) where a CUDA GPU's images/s stops growing with batch."""

CPU_AUTO_BATCH = 4
"""A CPU's throughput barely grows with batch: a few frames keep the in-flight loss (Ctrl-C, out of memory) small."""


def throughput_batch(kind: str, width: int, height: int, fits: int) -> int:
    """The "auto" batch size on a GPU: `fits` (the most that fit in free memory) capped by the throughput knee of
    model `kind` at width x height (an unknown kind uses SD's), and by MAX_AUTO_BATCH."""
    frames, pixels = THROUGHPUT_KNEE.get(kind, THROUGHPUT_KNEE["sd"])
    knee = max(1, round(frames * pixels / (width * height)))
    return max(1, min(fits, knee, MAX_AUTO_BATCH))


def shape_cost(config) -> bool:
    """Whether a batch of a new size costs a CUDA graph capture or a compile of its own (engine.config.ModelConfig
    `config`): CUDA graphs (asked for, or the torch backend's default on CUDA: engine/cuda_knobs.py), --compile,
    and bf16 on the CPU (engine/cpu.py compiles there by itself)."""
    cpu_bf16 = config.dtype == "bf16" and config.device == "cpu"
    default_graphs = config.cuda_graphs is None and config.backend == "torch" and config.device.startswith("cuda")
    return bool(config.cuda_graphs) or default_graphs or config.compile_unet or cpu_bf16


def ramp_first_batch(batch_size: int | str, shape_cost: bool) -> bool:
    """Whether the run's first batch is a single frame (its file lands after one frame's work): with "auto" batch
    sizes only (a size the user gave is kept), and not where a new batch size costs a capture or a compile."""
    return batch_size == "auto" and not shape_cost


def first_frame_alone(batches: list[list[T]]) -> list[list[T]]:
    """The first batch split into its first frame, then the rest of it; later batches unchanged."""
    if not batches or len(batches[0]) < 2:
        return batches
    head = batches[0]
    return [head[:1], head[1:], *batches[1:]]
