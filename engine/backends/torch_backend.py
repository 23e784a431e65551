"""The PyTorch backend: the reference implementation every other backend is compared with."""

from __future__ import annotations

import torch

from ..consistency import AnchorState
from ..consistency import install as install_anchor_attention
from ..errors import UserError
from ..text import EmbedsTextEncoder
from .base import UNetCond, register


@register("torch")
class TorchBackend:
    name = "torch"

    def __init__(self, model, config):
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.unet = model.unet.to(self.device, self.dtype).eval()
        # Some VAEs (SDXL's) overflow in fp16 and say so in their config: keep those in fp32.
        self.vae_dtype = torch.float32 if (self.dtype == torch.float16 and
                                           getattr(model.vae.config, "force_upcast", False)) else self.dtype
        self.vae = model.vae.to(self.device, self.vae_dtype).eval()
        self.encoders = [EmbedsTextEncoder(enc.to(self.device, self.dtype).eval()) for enc in model.text_encoders]
        self.scaling_factor = model.vae.config.scaling_factor
        self.shift_factor = getattr(model.vae.config, "shift_factor", None) or 0.0
        if self.device.type == "cuda" and config.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if config.attention != "sdpa":
            from kernels.attention import install_attention

            install_attention(self.unet, config.attention)
        if self.device.type == "cuda" and config.fuse_qkv and config.attention == "sdpa":
            # One (3D x D) matmul instead of three: same arithmetic, fewer kernel launches. diffusers installs its
            # own fused SDPA processor for this, so it only combines with --attention sdpa.
            self.unet.fuse_qkv_projections()
        self._unet_step = self._unet_call
        self.anchor_state: AnchorState | None = None  # installed on the first batch with character anchors
        if config.compile_unet:
            if config.cuda_graphs:
                raise UserError("--compile and --cuda-graphs both capture CUDA graphs", "choose one of them")
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._unet_step = torch.compile(self._unet_call, mode=mode, dynamic=False)
        elif self.device.type == "cuda" and config.cuda_graphs:
            from .cuda_graph import GraphedCallable

            self._unet_step = GraphedCallable(self._unet_call)

    @torch.inference_mode()
    def encode_text(self, encoder_index, inputs_embeds, eos_index):
        enc = self.encoders[encoder_index]
        return enc(inputs_embeds.to(self.device, self.dtype), eos_index.to(self.device))

    def _unet_call(self, latents, t, hidden, text_embeds, time_ids, timestep_cond):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(latents, t, encoder_hidden_states=hidden, timestep_cond=timestep_cond,
                         added_cond_kwargs=added, return_dict=False)[0]

    @torch.inference_mode()
    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: UNetCond) -> torch.Tensor:
        def cast(x):
            return None if x is None else x.to(self.device, self.dtype)

        if cond.anchors is not None:
            return self._denoise_anchored(cast(latents), t, cond, cast)
        t = torch.as_tensor(t, device=self.device).float().reshape(())  # 0-d device tensor: no host sync, graphable
        return self._unet_step(cast(latents), t, cast(cond.encoder_hidden_states), cast(cond.text_embeds),
                               cast(cond.time_ids), cast(cond.timestep_cond))

    def _denoise_anchored(self, latents, t, cond: UNetCond, cast) -> torch.Tensor:
        """Consistency mode: the anchor processors read which rows attend to which anchors from `anchor_state`;
        eager only (the rows' key lengths change from call to call)."""
        if self._unet_step != self._unet_call:
            raise UserError("consistency mode (anchor attention) cannot run with --cuda-graphs or --compile",
                            "drop --cuda-graphs/--compile for movies with consistency")
        if self.anchor_state is None:
            self.anchor_state = AnchorState()
            install_anchor_attention(self.unet, self.anchor_state)
        self.anchor_state.batch, self.anchor_state.t = cond.anchors, int(t)
        try:
            return self._unet_call(latents, torch.as_tensor(t, device=self.device).float().reshape(()),
                                   cast(cond.encoder_hidden_states), cast(cond.text_embeds), cast(cond.time_ids),
                                   cast(cond.timestep_cond))
        finally:
            self.anchor_state.batch = None

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae_dtype) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()
