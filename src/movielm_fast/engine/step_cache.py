"""Step caching (DeepCache, Ma et al., CVPR 2024): reuse the UNet's deep features across denoising steps.

Neighbouring denoising steps change the UNet's deep, low-resolution features very little. Every `interval`-th step
runs the whole UNet and keeps the input of the up-block layer at the chosen skip branch (the "deep features"); the
`interval - 1` steps between recompute only the shallow path -- conv_in, the down layers above the branch, the up
layers from the branch outwards, conv_out -- and take the deep features from the last full step.

Branches are DeepCache's: the UNet's skip connections counted from the outside. Branch 0 is conv_in's own skip (a
cached step runs conv_in, the last up-block layer and conv_out: the cheapest and the most lossy); branch b runs the
down layers that produce skips 1..b and the up layers that consume skips b..0. The deepest branch (the number of
skips - 1) caches only the mid block.

`CachedUNet` is our own module that calls the diffusers UNet's blocks and layers in the order
`UNet2DConditionModel.forward` does (no diffusers class is patched); its full step computes exactly what the UNet
computes, bit for bit. The cache itself is per batch (`StepCacheRun`, carried by the batch's `UNetCond`), so it
composes with classifier-free guidance (the doubled batch is one batch) and with any batching of frames.

Why not a maintained one: diffusers 0.42's cache hooks (diffusers.hooks: first-block cache, FasterCache, pyramid
attention broadcast, TaylorSeer, MagCache) target transformer blocks of DiT models and skip attention, not UNet
blocks; the DeepCache package (0.1.1) replaces `forward` on the pipeline's UNet blocks, needs a diffusers pipeline
and its scheduler, keeps one cache for all calls and reads the step with `.item()` -- a monkey patch that cannot
be captured as a CUDA graph nor keep two batches apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from movielm_fast.errors import UserError

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")


@dataclass(frozen=True)
class StepCache:
    """`interval`: a full UNet every `interval` steps; `depth`: the skip branch whose deep features are cached."""

    interval: int
    depth: int = 0

    def key(self) -> dict[str, int]:
        """What a frame's resume key and the manifest record."""
        return {"interval": self.interval, "depth": self.depth}

    def full_steps(self, steps: int) -> list[bool]:
        """Which of `steps` denoising steps run the whole UNet: the first, then every `interval`-th."""
        return [i % self.interval == 0 for i in range(steps)]


def check_step_cache(interval: int | None, depth: int, backend: str) -> StepCache | None:
    """--step-cache / --step-cache-depth -> the setting (None: off; an interval of 1 recomputes every step, which
    is the plain render, so it is off too and frames keep their keys)."""
    if interval is None or interval == 1:
        return None
    if interval < 1:
        raise UserError(f"--step-cache {interval}: the interval must be 1 or more",
                        "use e.g. --step-cache 3 (a full UNet every 3rd step), or leave it out")
    if depth < 0:
        raise UserError(f"--step-cache-depth {depth} is negative", "use 0 (the shallowest branch) or more")
    if backend != "torch":
        raise UserError(f"--step-cache needs --backend torch (the {backend} backend runs the UNet as one graph)",
                        "use --backend torch with --step-cache, or drop --step-cache")
    return StepCache(interval, depth)


class StepCacheRun:
    """One batch's pass through its schedule: which step comes next, and the deep features of the last full step."""

    def __init__(self, cache: StepCache):
        self.cache = cache
        self.step = 0
        self.features: torch.Tensor | None = None

    def full_now(self) -> bool:
        return self.features is None or self.step % self.cache.interval == 0

    def advance(self) -> None:
        self.step += 1


class CachedUNet(nn.Module):
    """A diffusers UNet2DConditionModel (SD 1.x/2.x, SDXL) run layer by layer, as a full step that also returns the
    deep features at skip branch `depth`, and a shallow step that takes them. Arguments follow
    export.graphs.UNetGraph, so both steps can be compiled or captured as CUDA graphs like the plain UNet step."""

    def __init__(self, unet: nn.Module, depth: int):
        super().__init__()
        self.unet = unet
        _check_supported(unet)
        # Each down layer makes one skip (conv_in makes skip 0); each up layer takes one, the last first.
        self.down_layers: list[tuple[nn.Module, nn.Module | None, Any]] = []
        for block in unet.down_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            self.down_layers += [(resnet, attn, None) for resnet, attn in zip(block.resnets, attentions)]
            if block.downsamplers is not None:
                self.down_layers.append((None, None, block.downsamplers))
        self.up_layers: list[tuple[nn.Module, nn.Module | None, Any]] = []
        for block in unet.up_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            last = len(block.resnets) - 1
            self.up_layers += [(resnet, attn, block.upsamplers if i == last else None)
                               for i, (resnet, attn) in enumerate(zip(block.resnets, attentions))]
        skips = len(self.down_layers) + 1
        if len(self.up_layers) != skips:
            raise UserError("--step-cache: this UNet's up blocks do not take one skip per down layer",
                            "render this model without --step-cache")
        if not 0 <= depth < skips:
            raise UserError(f"--step-cache-depth {depth}: this UNet has skip branches 0-{skips - 1}",
                            f"use a depth from 0 (fastest, most lossy) to {skips - 1} (caches only the mid block)")
        self.depth = depth
        self.first_shallow_up = skips - 1 - depth  # the up layer that takes skip `depth`

    def full(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None):
        """The whole UNet: (noise prediction, deep features at the branch)."""
        emb, ehs, h, up_size = self._begin(sample, timestep, encoder_hidden_states, text_embeds, time_ids,
                                           timestep_cond)
        skips = self._down(h, emb, ehs, len(self.down_layers))
        h = skips[-1]
        mid = self.unet.mid_block
        if mid is not None:
            if getattr(mid, "has_cross_attention", False):
                h = mid(h, emb, encoder_hidden_states=ehs, attention_mask=None, cross_attention_kwargs=None,
                        encoder_attention_mask=None)
            else:
                h = mid(h, emb)
        h = self._up(h, skips, emb, ehs, 0, self.first_shallow_up, up_size)
        deep = h
        return self._end(self._up(h, skips, emb, ehs, self.first_shallow_up, len(self.up_layers), up_size)), deep

    def shallow(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None,
                deep=None):
        """Only the layers outside the branch, with the deep features of the last full step."""
        emb, ehs, h, up_size = self._begin(sample, timestep, encoder_hidden_states, text_embeds, time_ids,
                                           timestep_cond)
        skips = self._down(h, emb, ehs, self.depth)
        return self._end(self._up(deep, skips, emb, ehs, self.first_shallow_up, len(self.up_layers), up_size))

    # The pieces of UNet2DConditionModel.forward, in its order, for the features the engine uses.

    def _begin(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond):
        unet = self.unet
        up_factor = 2 ** unet.num_upsamplers
        up_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])  # odd latent sizes: explicit sizes
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        return emb, ehs, unet.conv_in(sample), up_size

    def _down(self, h, emb, ehs, count: int) -> list[torch.Tensor]:
        """conv_in's output and the first `count` down layers' outputs: the skips, in order."""
        skips = [h]
        for resnet, attn, downsamplers in self.down_layers[:count]:
            if downsamplers is not None:
                for down in downsamplers:
                    h = down(h)
            else:
                h = resnet(h, emb)
                if attn is not None:
                    h = attn(h, encoder_hidden_states=ehs, cross_attention_kwargs=None, attention_mask=None,
                             encoder_attention_mask=None, return_dict=False)[0]
            skips.append(h)
        return skips

    def _up(self, h, skips, emb, ehs, start: int, stop: int, up_size: bool):
        """Up layers start..stop-1; layer j takes skip (len(up_layers) - 1 - j)."""
        last = len(self.up_layers) - 1
        for j in range(start, stop):
            resnet, attn, upsamplers = self.up_layers[j]
            h = resnet(torch.cat([h, skips[last - j]], dim=1), emb)
            if attn is not None:
                h = attn(h, encoder_hidden_states=ehs, cross_attention_kwargs=None, attention_mask=None,
                         encoder_attention_mask=None, return_dict=False)[0]
            if upsamplers is not None:
                size = skips[last - j - 1].shape[2:] if up_size else None
                for up in upsamplers:
                    h = up(h, size)
        return h

    def _end(self, h):
        unet = self.unet
        if unet.conv_norm_out:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)


def _check_supported(unet: nn.Module) -> None:
    kinds = [type(b).__name__ for b in unet.down_blocks] + [type(b).__name__ for b in unet.up_blocks]
    unknown = sorted({k for k in kinds if k not in DOWN_BLOCKS + UP_BLOCKS})
    extra = [name for name in ("class_embedding",) if getattr(unet, name, None) is not None]
    if unknown or extra or unet.config.addition_embed_type not in (None, "text_time") or \
            any(getattr(b, "s1", None) for b in unet.up_blocks):  # FreeU rescales skips inside the blocks
        raise UserError(f"--step-cache supports SD 1.x/2.x and SDXL UNets; this one has "
                        f"{', '.join(unknown + extra) or 'other conditioning'}",
                        "render this model without --step-cache")


# --- the transformer families: diffusers' own cache hooks --------------------------------------------------------
# A DiT has no skip branches to cut at; diffusers 0.42 ships cache hooks for its blocks instead. Which one, and why:
# - TaylorSeer (Liu et al. 2025; diffusers.hooks.taylorseer_cache), used here: which steps run the whole transformer
#   is fixed by the step index alone (the first DIT_WARMUP_STEPS, then every N-th), and a skipped step's output is
#   each row's own Taylor extrapolation from its own last full steps. No decision reads the batch, so a frame renders
#   the same in any batch (tests/test_dit_accel.py holds it to that), and the result equals diffusers' own pipeline
#   with the same hook (the same test).
# - FirstBlockCache (and SeaCache) decide whether to skip from the mean change of the whole batch's first-block
#   residual, one `.item()` for every row: a frame's pixels would depend on which frames share its batch (pinned by
#   tests/test_dit_accel.py::test_first_block_cache_decides_from_the_whole_batch), so the engine does not offer it.
# - MagCache decides from the step index too, but from magnitude ratios calibrated per model and step count; not
#   offered yet (docs/dit-accelerators.md).

DIT_WARMUP_STEPS = 3  # diffusers' default: the first steps run whole (they seed the expansion; layout forms there)
DIT_DEPTHS = 2  # depth 0: predict the transformer's output, skip every block; 1: predict only attention outputs


def dit_hook_config(cache: StepCache):
    """The diffusers hook --step-cache N / --step-cache-depth D runs a transformer with: TaylorSeer of first order,
    a full step on the first DIT_WARMUP_STEPS and then every N-th. Depth 0 ("lite", the fastest): between full steps
    only the embedders run and the output projection's result is extrapolated. Depth 1: each block's attention output
    is extrapolated and the rest of the block (feed-forward, norms) recomputed. Factors are kept in float32."""
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(cache_interval=cache.interval, disable_cache_before_step=DIT_WARMUP_STEPS,
                                 max_order=1, taylor_factors_dtype=torch.float32, use_lite_mode=cache.depth == 0)


def dit_full_steps(cache: StepCache, steps: int) -> list[bool]:
    """Which of `steps` denoising steps run the whole transformer under dit_hook_config (TaylorSeer's own rule)."""
    return [i < DIT_WARMUP_STEPS or (i - DIT_WARMUP_STEPS - 1) % cache.interval == 0 for i in range(steps)]


def check_dit_depth(depth: int) -> None:
    if depth >= DIT_DEPTHS:
        raise UserError(f"--step-cache-depth {depth}: a transformer's step cache has depths 0-{DIT_DEPTHS - 1}",
                        "use 0 (extrapolate the whole transformer's output; fastest) or 1 (only the attention "
                        "outputs)")


class HookedTransformer:
    """A transformer family's step cache: diffusers' hook on the transformer, put on afresh at the first step of
    each batch with a step cache (so no state crosses from one batch to the next) and taken off for a batch without.
    The hooks keep Python state between calls, so these steps run eagerly (never a captured or compiled step)."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer

    @property
    def on(self) -> bool:
        return self.transformer.is_cache_enabled

    def __call__(self, step, args: tuple, run: StepCacheRun | None) -> torch.Tensor:
        if self.on and (run is None or run.step == 0):
            self.transformer.disable_cache()
        if run is None:
            return step(*args)
        if run.step == 0:
            self.transformer.enable_cache(dit_hook_config(run.cache))
        with self.transformer.cache_context("frames"):
            noise = step(*args)
        run.advance()
        return noise
