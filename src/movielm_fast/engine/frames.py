"""A batch's decoded frames on their way to the files: the render thread starts the trip, the writer threads end it.

`Frames(images)` takes the decoder's (B, 3, H, W) floats in [0, 1] where they are and returns at once:

- on a GPU it queues the uint8 conversion and the (B, H, W, 3) reorder on the device (a quarter of the bytes then
  cross the bus) and one non-blocking copy into pinned host memory, and records an event. A writer thread reading
  a frame waits for that event only: the render thread never waits for the GPU to finish a batch, so it queues
  the next batch's work while the GPU still decodes this one, and the GPU does not idle between batches.
- on the CPU it keeps the floats; each writer thread converts the frame it writes (numpy releases the GIL, so the
  writers convert in parallel with each other and with the render loop) -- time the render thread no longer
  spends (bench/RESULTS.md, the host section).

The pixels are the same either way, and the same as diffusers' `(image * 255).round()`. A frame whose image holds
NaN (a numeric overflow: clamping leaves nothing else) raises FloatingPointError when it is read, so the writer
fails that frame's movie and keeps the others' frames of the batch.
"""

from __future__ import annotations

import numpy as np
import torch

OVERFLOW = "the decoded image contains NaN/inf (numeric overflow)"


class Frames:
    def __init__(self, images: torch.Tensor):
        self.count = images.shape[0]
        # One sum per frame finds NaN: an image-sized boolean mask would cost a pass and its memory.
        nan = torch.isnan(images.flatten(1).sum(1))  # (B,)
        if images.device.type == "cuda":
            pixels = torch.mul(images, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (B, H, W, 3)
            self._pixels = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            self._nan = torch.empty(nan.shape, dtype=torch.bool, pin_memory=True)
            self._pixels.copy_(pixels, non_blocking=True)
            self._nan.copy_(nan, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
            self._images = None
        else:
            self._images, self._nan, self._ready = images.float(), nan, None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        """Frame i as (H, W, 3) uint8."""
        if not 0 <= i < self.count:
            raise IndexError(i)
        if self._ready is not None:
            self._ready.synchronize()  # this batch's copy, not the GPU's later work
        if self._nan[i]:
            raise FloatingPointError(OVERFLOW)
        if self._images is None:
            return self._pixels[i].numpy()
        scaled = np.multiply(self._images[i].detach().numpy(), 255, dtype=np.float32)  # (3, H, W)
        np.rint(scaled, out=scaled)  # half to even, as torch's round and numpy's round
        out = np.empty((*scaled.shape[1:], 3), dtype=np.uint8)
        out.transpose(2, 0, 1)[...] = scaled  # the cast and the reorder in one pass; exact: integers in [0, 255]
        return out

    def __iter__(self):
        return (self[i] for i in range(self.count))

    def numpy(self) -> np.ndarray:
        """All frames as one (B, H, W, 3) uint8 array."""
        return np.stack(list(self))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # np.asarray / np.concatenate of batches
        return self.numpy() if dtype is None else self.numpy().astype(dtype)
