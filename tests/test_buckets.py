"""Shape buckets of the captured/compiled UNet step (engine/backends/buckets.py): keys, padding, and a compiled
render of a short batch that reuses the full batch's compiled graph."""

import numpy as np
import pytest
import torch
from test_cpu_bf16 import needs_compiler

from movielm_fast.engine import cpu
from movielm_fast.engine.backends.buckets import pad_rows, padded_bucket, unet_bucket
from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.run.renderer import Renderer


def test_bucket_key_is_rows_size_windows_dtype():
    latents, hidden = torch.zeros(6, 4, 8, 12), torch.zeros(6, 154, 32)
    assert unet_bucket(latents, hidden) == (6, 8, 12, 2, torch.float32)
    assert unet_bucket(latents.half(), hidden.half()) == (6, 8, 12, 2, torch.float16)


def test_padded_bucket_picks_the_smallest_made_bucket_that_fits():
    f32 = torch.float32
    made = {(8, 64, 64, 1, f32), (16, 64, 64, 1, f32), (4, 64, 64, 1, f32), (16, 96, 64, 1, f32)}
    assert padded_bucket((6, 64, 64, 1, f32), made) == (8, 64, 64, 1, f32)
    assert padded_bucket((8, 64, 64, 1, f32), made) == (8, 64, 64, 1, f32)
    assert padded_bucket((2, 64, 64, 1, f32), made) == (4, 64, 64, 1, f32)
    # Nothing to pad up to: a bucket of its own (more rows, another size, window count or dtype).
    for key in [(18, 64, 64, 1, f32), (6, 64, 96, 1, f32), (6, 64, 64, 2, f32), (6, 64, 64, 1, torch.float16)]:
        assert padded_bucket(key, made) == key
    assert padded_bucket((6, 64, 64, 1, f32), set()) == (6, 64, 64, 1, f32)


def test_pad_rows_repeats_the_last_row_and_keeps_the_real_ones():
    x = torch.arange(3 * 2, dtype=torch.float32).reshape(3, 2)
    t = torch.tensor(999.0)
    px, pt, none = pad_rows((x, t, None), 5)
    assert px.shape == (5, 2) and torch.equal(px[:3], x) and torch.equal(px[3:], x[2:].expand(2, 2))
    assert pt is t and none is None
    assert pad_rows((x,), 3)[0] is x  # already the bucket's size: untouched


def _jobs(n):
    return [FrameJob("m", f"{i}", f"frame {i}, a lighthouse in the storm", "", 100 + i) for i in range(n)]


@pytest.mark.slow
@needs_compiler
def test_short_batch_is_padded_into_the_compiled_bucket(tiny_sd):
    s = BatchSettings(64, 64, 2, 7.5, "dpmpp")
    compiled = Renderer(ModelConfig(model=str(tiny_sd), compile_unet=True))
    step = compiled.backend._unet_step
    assert isinstance(step, cpu.CompiledCpu)
    render_batch(compiled.model, compiled.backend, compiled.encoder, _jobs(4), s)
    short = render_batch(compiled.model, compiled.backend, compiled.encoder, _jobs(3), s)
    # The batch of 3 (6 CFG rows) ran in the batch of 4's graph (8 rows): one compile in all.
    assert len(step.buckets) == 1 and compiled.backend.buckets == {(8, 8, 8, 1, torch.float32)}
    eager = Renderer(ModelConfig(model=str(tiny_sd)))
    assert eager.backend._unet_step is eager.backend.unet and not eager.backend.buckets  # the plain path: no padding
    ref = render_batch(eager.model, eager.backend, eager.encoder, _jobs(3), s)
    assert len(short) == 3
    for a, b in zip(short, ref):
        # The project's batch-invariance tolerance (oneDNN's summation order depends on the batch size).
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    assert np.abs(short[0].astype(int) - short[1].astype(int)).mean() > 5  # the frames are not all the same image
