"""Learning the token: training settings, the token's starting vectors and checks, and the trainer.

Why it is fast:
- The VAE encoder runs once per image; each step only samples from the stored latent distribution.
- Only the new token vector(s) are optimised. No model weight needs a gradient, so backward computes activation
  gradients only (about one forward pass more), and the text encoders stay bit-identical: the new rows are
  substituted into the token-embedding lookup (`inputs_embeds`) instead of resizing the encoder's table.
- The training images are batched, the learning rate warms up and decays on a cosine in ~150 steps (common recipes:
  3000+ steps at batch 1-4), autocast to bf16/fp16 on CUDA, optional `torch.compile` of the UNet.
- On out-of-memory the batch is split into smaller micro-batches with gradient accumulation, so the result does
  not depend on how much memory the device has.

FLUX.1 learns one vector for each of its text encoders (CLIP, pooled; T5) by flow matching -- the transformer
predicts noise - x0 from (1 - s) x0 + s noise on the packed latents, s uniform -- with prompts tokenized as its
renders tokenize them (engine.families.flux_text). FLUX.2 [klein] is not trained for yet (its Qwen3 chat template
and its VAE's batch-norm latents are not handled here).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from movielm_fast.engine.models import model_defaults, native_size
from movielm_fast.engine.oom import is_oom, map_halving, smaller
from movielm_fast.engine.text import PromptEncoder, is_vocab_word, select_outputs
from movielm_fast.errors import UserError
from movielm_fast.export.graphs import text_encoder_graph
from movielm_fast.style.images import TrainingImage

log = logging.getLogger("movielm_fast")

TINY_UNET_PARAMS = 50_000_000  # below this a UNet is a test/demo model (real SD UNets have 860 M+)


@dataclass(frozen=True)
class StyleSettings:
    """Training settings. `None` fields are decided by the model (see `resolve`):

    demo/test models (UNet < 50 M parameters): 4 scenes at 64 px, 4 render steps, 30 training steps, batch 4,
    lr 2e-2 -- quick on a CPU (timings: bench/RESULTS.md); the images of a random-weight model mean nothing anyway.
    real models: 8 scenes at the model's native size (512 SD 1.x, 768 SD 2.x-768, 1024 SDXL), 20 render steps,
    150 training steps, batch 8 (SDXL 4), lr 5e-3 (AdamW) with 10% linear warm-up then cosine decay.
    """

    steps: int | None = None
    """Optimiser steps."""
    scenes: int | None = None
    """Scenes to render when no images are given."""
    resolution: int | None = None
    """Training image size in pixels (square; a multiple of the VAE factor, usually 8)."""
    batch_size: int | None = None
    """Images per optimiser step."""
    lr: float | None = None
    warmup: float = 0.1
    """Fraction of the steps spent warming the learning rate up from 0."""
    num_vectors: int = 1
    """Vectors per token (diffusers' multi-vector tokens: <t>, <t>_1, ...)."""
    init_word: str | None = None
    """Word whose embedding starts the vector; default: the first word of the style name that is a single
    vocabulary token, else "style"."""
    scene_steps: int | None = None
    scene_guidance: float = 7.5
    scene_scheduler: str | None = None
    """None: the model's own sampler where it has one (FLUX: its flow-matching Euler), else dpmpp."""
    min_noise: float = 0.0
    """Lowest noise level trained, as a share of the schedule: 0 trains at every level; 0.5 only the noisier half,
    where a diffusion model settles composition and colour rather than fine detail."""
    seed: int = 0
    # --- how to run; not part of the library key (they change speed, not what is learned) --------------------
    amp: str = "auto"
    """auto | fp32 | bf16 | fp16. auto: none on CPU; on CUDA bf16 (fp16 when the weights are fp16, with loss
    scaling). Mixed precision changes the learned vector slightly (no measurable effect on the tiny model)."""
    micro_batch: int | None = None
    """Images per forward/backward (gradient accumulation up to `batch_size`); None = the whole batch. Halved
    automatically on out-of-memory."""
    eval_samples: int | None = None
    """Size of the fixed evaluation set (images x noise x timesteps) whose loss is reported before and after
    training; None = max(batch_size, 8). Costs two forward passes over it."""
    compile: bool = False
    """torch.compile the UNet for training: pays a one-time compile (its cost: bench/RESULTS.md) to speed up each
    step; worth it only for long runs."""

    _RUN_FIELDS = ("amp", "micro_batch", "eval_samples", "compile")

    def key_dict(self) -> dict[str, Any]:
        """What determines the learned vector (the library key)."""
        key = {k: v for k, v in asdict(self).items() if k not in self._RUN_FIELDS}
        if not self.min_noise:  # as before the setting existed: library entries and resume keys stay
            del key["min_noise"]
        return key

    def resolve(self, model) -> "StyleSettings":
        tiny = sum(p.numel() for p in denoiser(model).parameters()) < TINY_UNET_PARAMS
        native = native_size(model)
        s = replace(
            self,
            steps=self.steps or (30 if tiny else 150),
            scenes=self.scenes or (4 if tiny else 8),
            resolution=self.resolution or (64 if tiny else native),
            batch_size=self.batch_size or (4 if tiny else 4 if model.kind == "sdxl" else 8),
            lr=self.lr or (2e-2 if tiny else 5e-3),
            scene_steps=self.scene_steps or (4 if tiny else 20),
            scene_scheduler=self.scene_scheduler or model_defaults(model).get("scheduler", "dpmpp"),
        )
        if s.resolution % model.vae_scale_factor or s.resolution < 8 * model.vae_scale_factor // 2:
            raise UserError(f"training resolution {s.resolution} is not a multiple of {model.vae_scale_factor}",
                            f"use e.g. {max(64, s.resolution // 64 * 64)}")
        if s.resolution > 2 * native:  # before anything is allocated at that size (100000 px: tens of GB)
            raise UserError(f"training resolution {s.resolution} is more than twice this model's native size "
                            f"{native}", f"use at most {2 * native}; its native {native} is what it was trained at")
        for name in ("steps", "scenes", "batch_size", "num_vectors", "scene_steps"):
            if getattr(s, name) < 1:
                raise UserError(f"style training setting {name} must be at least 1", "pass a positive number")
        if not 0.0 <= s.min_noise < 1.0:
            raise UserError(f"style training setting min_noise is {s.min_noise}; it is a share of the noise "
                            "schedule", "pass a number from 0 (every noise level) up to, not including, 1")
        if s.amp not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"unknown mixed-precision mode {s.amp!r}", "use auto, fp32, bf16 or fp16")
        return s


def denoiser(model) -> torch.nn.Module:
    """The module a token is trained through: the UNet, or a transformer family's transformer."""
    return model.unet if model.unet is not None else model.transformer


def check_token(model, token: str) -> None:
    if not token or re.search(r"\s", token):
        raise UserError(f"style token {token!r} must be one word without spaces", "use e.g. <gothic-style>")
    for tok in model.tokenizers:
        if is_vocab_word(tok, token):
            raise UserError(f"style token {token!r} is already a word in the tokenizer's vocabulary; learning it "
                            "would change that word's meaning", f"pick a token that is not a word, e.g. <{token}>")


def init_vectors(model, style_name: str, init_word: str | None, n: int) -> tuple[str, list[torch.Tensor]]:
    """Start from a related word: the first word of the name that is one vocabulary token, else "style"."""
    tok0 = model.tokenizers[0]
    word = init_word
    if word is None:
        candidates = [w for w in re.findall(r"[a-z]+", style_name.lower()) if is_vocab_word(tok0, w)]
        word = candidates[0] if candidates else "style"
    vectors = []
    for tok, enc in zip(model.tokenizers, model.text_encoders):
        ids = tok(word, add_special_tokens=False).input_ids
        if not ids:
            raise UserError(f"init word {word!r} tokenizes to nothing", "pass a real word, e.g. --init-word style")
        table = enc.get_input_embeddings().weight
        v = table[torch.tensor(ids, device=table.device)].detach().float().mean(0)  # several tokens: their mean
        vectors.append(v.cpu().expand(n, -1).clone())  # (n, D)
    return word, vectors


class Trainer:
    """The frozen model, the encoded training set, and the trainable vector(s)."""

    def __init__(self, model, device: torch.device, s: StyleSettings, token_vectors: list[torch.Tensor],
                 token: str = "<style-in-training>"):
        self.model, self.device, self.s = model, device, s
        self.kind = model.kind
        self.unet = denoiser(model).to(device)
        self.flow = model.transformer is not None  # a transformer family: flow matching (FLUX.1)
        self.vae = model.vae.to(device)
        self.encoders = [text_encoder_graph(enc.to(device)) for enc in model.text_encoders]
        self.tables = [enc.get_input_embeddings().weight for enc in model.text_encoders]  # (V, D) frozen
        self.noise_scheduler = DDPMScheduler.from_config(model.scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.timesteps = self.noise_scheduler.config.num_train_timesteps
        self.vectors = [torch.nn.Parameter(v.to(device, torch.float32).clone()) for v in token_vectors]  # (n, D)
        wdtype = next(self.unet.parameters()).dtype
        amp = s.amp
        if amp == "auto":
            amp = "fp32" if device.type != "cuda" else ("fp16" if wdtype == torch.float16 else
                                                         "bf16" if torch.cuda.is_bf16_supported() else "fp16")
        self.amp = amp
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type == "cuda")
        self.unet_fwd = torch.compile(self.unet) if s.compile else self.unet
        # Captions are tokenised and windowed exactly as frame prompts are, by an encoder of its own with copies of
        # the tokenizers: the starting vectors never reach the renderer's encoder and the model's tokenizers gain no
        # token (the learned one is bound by whoever uses it).
        self.token = token
        tokenizers = [copy.deepcopy(t) for t in model.tokenizers]
        self.prompts = model.family.prompt_encoder(model, None, tokenizers) if self.flow else \
            PromptEncoder(model, backend=None, tokenizers=tokenizers)
        self.guidance = None  # FLUX.1 [dev]: the embedded guidance its renders use by default
        if self.flow and model.transformer.config.guidance_embeds:
            self.guidance = float(model_defaults(model)["guidance"])
        self.prompts.add_token(token, [v.detach() for v in token_vectors], "style training")
        names = self.prompts.multi_vector.get(token, [token])
        self.token_ids = [tok.convert_tokens_to_ids(names) for tok in self.prompts.tokenizers]

    # Placeholder ids are vocab_size .. vocab_size + n - 1: they index self.vectors, never the frozen table.
    def caption_ids(self, template: str) -> list[tuple[torch.Tensor, int]]:
        """One (77,) id row and EOS position per tokenizer, for a caption with "{}" where the token goes."""
        caption = template.format(self.token)
        out = []
        for win, table, token_ids in zip(self.prompts.windows(caption), self.tables, self.token_ids):
            if win.ids.shape[0] > 1:
                raise UserError(f"style caption {caption!r} is longer than one text-encoder window (75 tokens)",
                                "use a shorter style description")
            ids = win.ids[0].clone()
            for k, token_id in enumerate(token_ids):
                ids[ids == token_id] = table.shape[0] + k
            out.append((ids, int(win.eos[0])))
        return out

    def _embeds(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        table, vec = self.tables[i], self.vectors[i]
        v = table.shape[0]
        new = ids >= v
        looked_up = table[ids.clamp(max=v - 1)]  # (B, 77, D)
        learned = vec[(ids - v).clamp(0, vec.shape[0] - 1)].to(table.dtype)  # (B, 77, D), grad flows to vec
        return torch.where(new[..., None], learned, looked_up)

    def encode_text(self, ids: list[torch.Tensor], eos: list[torch.Tensor]):
        if self.flow:  # FLUX.1: CLIP's pooled output, T5's hidden states (engine.families.flux_text)
            outs = [enc(self._embeds(i, ids[i]), eos[i]) for i, enc in enumerate(self.encoders)]
            roles = self.prompts.roles
            return (next(o[0] for o, r in zip(outs, roles) if not r.pooled),
                    next((o[2] for o, r in zip(outs, roles) if r.pooled), None))
        hidden, pooled = [], None
        for i, enc in enumerate(self.encoders):
            h, pool = select_outputs(self.kind, i, len(self.encoders), enc(self._embeds(i, ids[i]), eos[i]))
            hidden.append(h)
            pooled = pool if pool is not None else pooled
        return torch.cat(hidden, dim=-1), pooled

    @torch.no_grad()
    def encode_images(self, images: list[TrainingImage], chunk: int) -> None:
        """VAE encoder once per image: keep the latent distribution's mean and std, sample from it per step."""
        vdtype = next(self.vae.parameters()).dtype
        cfg = self.vae.config
        self.scale, self.shift = cfg.scaling_factor, getattr(cfg, "shift_factor", None) or 0.0

        def encode(chunk: list[TrainingImage]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            x = torch.from_numpy(np.stack([im.pixels for im in chunk])).to(self.device)
            x = x.permute(0, 3, 1, 2).to(vdtype) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
            dist = self.vae.encode(x).latent_dist
            return list(zip(dist.mean.float(), dist.std.float()))

        # A large VAE at 1024 px needs several GB per image: chunks shrink on out-of-memory.
        moments = map_halving(encode, images, chunk, "encoding style images")
        means, stds = [torch.stack(m) for m in zip(*moments)]
        self.mean, self.std = means, stds  # (N, C, h, w)
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.std).all()):
            raise FloatingPointError("VAE encoding overflowed")
        self.time_ids = torch.tensor([[*im.original_size, *im.crop_top_left, self.s.resolution, self.s.resolution]
                                      for im in images], dtype=torch.float32)  # (N, 6) SDXL size conditioning

    def loss(self, idx, eps, noise, t, ids, eos) -> torch.Tensor:
        """Mean diffusion loss of one micro-batch. idx: (b,) image indices; eps, noise: (b, C, h, w); t: (b,)."""
        latents = ((self.mean[idx] + self.std[idx] * eps.to(self.device)) - self.shift) * self.scale
        noise = noise.to(self.device)
        t = t.to(self.device)
        if self.flow:
            return self._flow_loss(latents, noise, t, ids, eos)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            hidden, pooled = self.encode_text([x.to(self.device) for x in ids], [x.to(self.device) for x in eos])
            wdtype = next(self.unet.parameters()).dtype
            added = None
            if pooled is not None:
                added = {"text_embeds": pooled.to(wdtype), "time_ids": self.time_ids[idx.cpu()].to(self.device, wdtype)}
            pred = self.unet_fwd(noisy.to(wdtype), t, encoder_hidden_states=hidden.to(wdtype),
                                 added_cond_kwargs=added, return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float())

    def _flow_loss(self, latents, noise, t, ids, eos) -> torch.Tensor:
        sigma = (t.float() + 1) / self.timesteps  # (b,) uniform in (0, 1]
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            hidden, pooled = self.encode_text([x.to(self.device) for x in ids], [x.to(self.device) for x in eos])
            wdtype = next(self.unet.parameters()).dtype
            family = self.model.family
            tokens, txt_ids, img_ids = family.training_inputs(self.model, noisy.to(wdtype), hidden.shape[1])
            guidance = None if self.guidance is None else torch.full_like(sigma, self.guidance)
            pred = self.unet_fwd(hidden_states=tokens, timestep=sigma.to(wdtype), guidance=guidance,
                                 encoder_hidden_states=hidden.to(wdtype), pooled_projections=pooled.to(wdtype),
                                 txt_ids=txt_ids.to(self.device), img_ids=img_ids.to(self.device),
                                 return_dict=False)[0]
        target = family.training_inputs(self.model, noise - latents, hidden.shape[1])[0]
        return F.mse_loss(pred.float(), target.float())


@dataclass
class _Batch:
    idx: torch.Tensor
    eps: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    captions: list[int]


def _draw(gen: torch.Generator, idx: torch.Tensor, latent_shape, timesteps: int, n_captions: list[int],
          t_min: int = 0) -> _Batch:
    """All randomness of one step, drawn on the CPU from one seeded generator: the same on every device and for
    every micro-batch split. Timesteps from t_min up."""
    b = len(idx)
    eps = torch.randn((b, *latent_shape), generator=gen)
    noise = torch.randn((b, *latent_shape), generator=gen)
    t = torch.randint(t_min, timesteps, (b,), generator=gen)
    caps = [int(torch.randint(0, n_captions[int(i)], (1,), generator=gen)) for i in idx]
    return _Batch(idx, eps, noise, t, caps)


def _lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up, then cosine decay to zero: a high peak rate converges in few steps without overshooting at
    the end."""
    w = max(1, round(warmup * total))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, total - w)))


def train_token(trainer: Trainer, captions: list[list[list[tuple[torch.Tensor, int]]]],
                on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Optimise trainer.vectors on the encoded images. captions[i]: caption variants of image i, each one
    (ids, eos) per tokenizer. Returns the training report (losses, timings)."""
    s, device = trainer.s, trainer.device
    n = trainer.mean.shape[0]
    latent_shape = tuple(trainer.mean.shape[1:])
    timesteps = trainer.timesteps
    t_min = round(s.min_noise * timesteps)
    gen = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.AdamW(trainer.vectors, lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _lr_factor(k, s.steps, s.warmup))
    batch = s.batch_size  # with fewer images than that, an image appears twice in a batch
    micro = min(s.micro_batch or batch, batch)
    n_caps = [len(c) for c in captions]

    def run(b: _Batch, grad: bool) -> float:
        """Loss of the whole batch, in micro-batches (gradients accumulate); halves `micro` on out-of-memory."""
        nonlocal micro
        while True:
            total = 0.0
            try:
                for k in range(0, len(b.idx), micro):
                    sl = slice(k, k + micro)
                    ids = [torch.stack([captions[int(i)][c][e][0] for i, c in zip(b.idx[sl], b.captions[sl])])
                           for e in range(len(trainer.encoders))]
                    eos = [torch.tensor([captions[int(i)][c][e][1] for i, c in zip(b.idx[sl], b.captions[sl])])
                           for e in range(len(trainer.encoders))]
                    with torch.set_grad_enabled(grad):
                        part = trainer.loss(b.idx[sl].to(device), b.eps[sl], b.noise[sl], b.t[sl], ids, eos)
                        weighted = part * (len(b.idx[sl]) / len(b.idx))
                        if grad:
                            trainer.scaler.scale(weighted).backward()
                    total += float(weighted.detach())
                return total
            except Exception as exc:
                if not is_oom(exc):
                    raise
                if micro == 1:
                    raise UserError("out of memory while training the style token even one image at a time",
                                    "use a smaller --resolution, or free the GPU") from None
                opt.zero_grad(set_to_none=True)
                micro = smaller(micro)
                log.warning("out of memory while training the style token; micro-batch %d (gradients accumulate, "
                            "so the result is unchanged)", micro)

    # A fixed evaluation set (its own generator, caption 0): the same images, noise and timesteps before and after,
    # so the difference measures the token, not the luck of the draws (the training loss mostly varies with t).
    eval_gen = torch.Generator().manual_seed(s.seed + 1)
    eval_idx = torch.arange(s.eval_samples or max(batch, 8)) % n
    eval_batch = _draw(eval_gen, eval_idx, latent_shape, timesteps, [1] * n, t_min)
    eval_before = run(eval_batch, grad=False)

    losses, order = [], torch.empty(0, dtype=torch.long)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for step in range(s.steps):
        while len(order) < batch:  # shuffled epochs, so every image is seen equally often
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:batch], order[batch:]
        b = _draw(gen, idx, latent_shape, timesteps, n_caps, t_min)
        opt.zero_grad(set_to_none=True)
        loss = run(b, grad=True)
        trainer.scaler.step(opt)
        trainer.scaler.update()
        sched.step()
        losses.append(loss)
        if on_step:
            on_step(step, loss)
    sync()
    train_s = time.perf_counter() - t0
    eval_after = run(eval_batch, grad=False)
    k = max(1, len(losses) // 5)
    return {"steps": s.steps, "batch_size": batch, "micro_batch": micro, "seconds_train": round(train_s, 3),
            "seconds_per_step": round(train_s / s.steps, 4), "loss_first": round(float(np.mean(losses[:k])), 6),
            "loss_last": round(float(np.mean(losses[-k:])), 6), "eval_loss_before": round(eval_before, 6),
            "eval_loss_after": round(eval_after, 6), "amp": trainer.amp, "compiled": s.compile}


class Frozen:
    """Turns off weight gradients for the duration (backward then skips every weight-gradient matmul) and puts
    diffusers' default attention back if a custom processor without backward is installed; restores both."""

    def __init__(self, model):
        self.modules = [denoiser(model), model.vae, *model.text_encoders]
        self.unet = model.unet is not None  # a transformer's own attention processors have a backward

    def __enter__(self):
        self.flags = [[p.requires_grad for p in m.parameters()] for m in self.modules]
        for m in self.modules:
            m.requires_grad_(False)
        unet = self.modules[0]
        self.processors = dict(unet.attn_processors)
        self.swapped = self.unet and any(not isinstance(p, AttnProcessor2_0) for p in self.processors.values())
        if self.swapped:
            unet.set_attn_processor(AttnProcessor2_0())
        return self

    def __exit__(self, *exc):
        for m, flags in zip(self.modules, self.flags):
            for p, f in zip(m.parameters(), flags):
                p.requires_grad_(f)
        if self.swapped:
            self.modules[0].set_attn_processor(self.processors)
        return False
