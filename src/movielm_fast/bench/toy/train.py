"""Train the toy model from scratch on the toy world, on a CPU: `python -m movielm_fast.bench.toy.train --out DIR`.

Two phases, each with a wall-clock budget (so the run fits its time box on whatever machine it runs on):
1. the VAE, on whole images with an L1 + MSE loss on the reconstruction of the posterior mean and a tiny KL term;
2. the UNet and the text encoder together, on VAE latents of a pool of scenes encoded once (epsilon prediction,
   min-SNR-5 loss weighting, captions dropped 10% of the time for classifier-free guidance, EMA weights).
A checkpoint -- a complete diffusers folder with the EMA weights -- replaces DIR atomically every
--checkpoint-minutes, so a usable model exists at any time; `train_log.jsonl` beside it records loss and wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from movielm_fast.engine.demo import clip_tokenizer
from movielm_fast.paths import atomic_write_text, replace_dir

from ..args import bench_parser
from . import model as M
from . import world as W


def has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


class Log:
    def __init__(self, path: Path):
        self.path, self.t0 = path, time.time()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fp = open(path, "a")

    def __call__(self, **rec) -> None:
        rec["wall_s"] = round(time.time() - self.t0, 1)
        line = json.dumps(rec)
        print(line, flush=True)
        self.fp.write(line + "\n")
        self.fp.flush()


def optimizer_step(opt, params, ema: EMA, loss: torch.Tensor) -> float:
    """One optimizer step (gradients clipped to norm 1), then the EMA's; the loss as a number."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema.update()
    return loss.item()


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _shape_weights(scenes, fg: float) -> torch.Tensor:
    """(B, 1, H, W): 1 on the background, `fg` on shapes and a pixel around them -- shapes are a small share of
    the pixels, and what the judge (and a viewer) reads."""
    w = np.ones((len(scenes), 1, W.SIZE, W.SIZE), np.float32)
    for i, sc in enumerate(scenes):
        for pos, ch in sc.characters.items():
            w[i, 0][W._dilate(W.shape_mask(ch.shape, pos, ch.size), 1)] = fg
    return torch.from_numpy(w)


def train_vae(vae, rng, minutes: float, log: Log, amp: bool, batch: int = 6, lr: float = 1e-3,
              decoder_only: bool = False, fg_weight: float = 1.0):
    """decoder_only: the encoder (and so every latent a UNet was trained on) stays fixed; only the decoding
    improves."""
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    end, step = time.time() + minutes * 60, 0
    vae.train()
    while time.time() < end:
        # Whole images, not crops: GroupNorm's statistics and the mid-block attention see the whole image at
        # inference, and crops trained them on something else.
        imgs, _, scenes = W.batch(rng, batch, held_out=None)
        x = torch.from_numpy(imgs)
        wts = _shape_weights(scenes, fg_weight)
        with _autocast(amp):
            post = vae.encode(x).latent_dist
            # The mean, not a sample: with the KL weight this small the posterior's noise only slows learning
            # (the UNet trains on, and the engine decodes, means anyway).
            rec = vae.decode(post.mode()).sample.float()
        kl = post.kl().mean() / x[0].numel()
        err = (rec - x).abs() + (rec - x) ** 2
        loss = (err * wts).mean() / wts.mean() + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log(phase="vae", step=step, loss=round(loss.item(), 5))
    vae.eval()
    return step, loss.item()


@torch.no_grad()
def encode_pool(vae, rng, n: int, batch: int = 64):
    """Latents of n training scenes, their captions, the scenes, and (n, 1, h, w) masks of the latent pixels a
    shape touches."""
    latents, captions, scenes, masks = [], [], [], []
    for i in range(0, n, batch):
        imgs, caps, scs = W.batch(rng, min(batch, n - i))
        lat = vae.encode(torch.from_numpy(imgs)).latent_dist.mean
        latents.append(lat)
        captions += caps
        scenes += scs
        factor = W.SIZE // lat.shape[-1]
        masks.append(torch.nn.functional.max_pool2d(_shape_weights(scs, 2.0) - 1.0, factor) > 0)
    return torch.cat(latents), captions, scenes, torch.cat(masks)


def training_captions(rng, scenes, augment: float, p_open: float) -> list[str]:
    """The captions of one step. Each scene's description leaves attributes open with probability `p_open` each
    (world.describe), and is worded, with probability `augment`, as a paraphrase (world.paraphrase), else as
    world.caption; with the same style rules as world.batch: "plain style" left out half the time, the style first
    or last."""
    out = []
    for sc in scenes:
        desc = W.describe(sc, rng, p_open)
        with_style, style_first = not (sc.style == "plain" and rng.random() < 0.5), bool(rng.random() < 0.5)
        if rng.random() < augment:
            out.append(W.paraphrase(desc, rng, with_style=with_style, style_first=style_first))
        else:
            out.append(desc.caption(with_style=with_style, style_first=style_first))
    return out


class EMA:
    def __init__(self, modules, decay: float):
        self.decay, self.n = decay, 0
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.live = modules

    @torch.no_grad()
    def update(self):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, m in zip(self.shadow, self.live):
            for ps, pm in zip(s.parameters(), m.parameters()):
                ps.lerp_(pm.detach(), 1 - d)


def save_model(out: Path, vae, unet, text_encoder, extra: dict) -> None:
    """Replace `out` with a complete diffusers folder: written beside it, then swapped in by renames."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=M.scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    save_pipeline_folder(pipe, out, extra)


def save_pipeline_folder(pipe, out: Path, extra: dict) -> None:
    """Write a diffusers pipeline and its training.json beside `out`, then swap it in by renames: a reader (or a
    run killed mid-write) sees the old checkpoint or the new one, never half of one."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    atomic_write_text(tmp / "training.json", json.dumps(extra, indent=1))
    replace_dir(tmp, out)


def trainer_parser(name: str, doc: str | None, denoiser: str, *, lr: float, augment: float,
                   checkpoint_minutes: float, clock: str) -> argparse.ArgumentParser:
    """The options both toy trainers take (this one and train_dit), with each one's defaults."""
    ap = bench_parser(name, doc)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoint-minutes", type=float, default=checkpoint_minutes,
                    help=f"{clock} minutes between checkpoints")
    ap.add_argument("--pool", type=int, default=10000, help=f"scenes whose latents the {denoiser} trains on")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--augment", type=float, default=augment,
                    help="probability that a training caption is a paraphrase (world.paraphrase) of its scene")
    ap.add_argument("--open", type=float, default=0.0,
                    help="probability that a caption leaves a character's colour, size or shape open (each on its "
                         "own; world.describe): the image keeps its drawn value, so the seed learns to draw it")
    return ap


def main(argv=None) -> None:
    ap = trainer_parser("toy.train", __doc__, "UNet", lr=6e-4, augment=0.0, checkpoint_minutes=10.0, clock="wall")
    ap.add_argument("--vae-minutes", type=float, default=6.0)
    ap.add_argument("--unet-minutes", type=float, default=45.0)
    ap.add_argument("--vae-from", type=Path, default=None, help="reuse the VAE of an earlier run's folder")
    ap.add_argument("--unet-from", type=Path, default=None,
                    help="continue the UNet and text encoder of a model folder (this script's or ship's output); "
                         "its VAE and latent scale are kept as they are")
    ap.add_argument("--vae-only", action="store_true", help="stop after the VAE phase")
    ap.add_argument("--decoder-only", action="store_true",
                    help="train only the VAE's decoder (the latents a UNet was trained on stay the same)")
    ap.add_argument("--fg-weight", type=float, default=1.0, help="loss weight of shape pixels in the VAE phase")
    ap.add_argument("--vae-lr", type=float, default=1e-3, help="the VAE phase's learning rate")
    ap.add_argument("--unet-fg-weight", type=float, default=1.0,
                    help="loss weight of the latent pixels a shape touches in the UNet phase")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    amp = has_amx()
    log = Log(args.out.with_name(args.out.name + "_log.jsonl"))
    log(phase="start", args={k: str(v) for k, v in vars(args).items()}, bf16_autocast=amp)

    if args.unet_from:  # the latents the UNet learned are its VAE's: that VAE, with at most its decoder trained on
        args.vae_from = args.unet_from
        if not args.decoder_only:
            args.vae_minutes = 0.0
    if args.vae_from:  # continue an earlier run's VAE for --vae-minutes (0: use it as it is)
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").float()
        record = next((f for f in (args.vae_from / "vae_training.json", args.vae_from / "training.json")
                       if f.exists()), None)
        prior = json.loads(record.read_text()) if record else {"vae_steps": 0, "vae_loss": None}
    else:
        vae, prior = M.vae(), {"vae_steps": 0, "vae_loss": None}
    vae_steps, vae_loss = prior["vae_steps"], prior["vae_loss"]
    if args.vae_minutes > 0:
        steps, vae_loss = train_vae(vae, rng, args.vae_minutes, log, amp, decoder_only=args.decoder_only,
                                    fg_weight=args.fg_weight, lr=args.vae_lr)
        vae_steps += steps
    # Kept on its own too: a later run can reuse it (--vae-from) and it can be inspected while the UNet trains.
    vae_dir = args.out.with_name(args.out.name + "_vae")
    vae.save_pretrained(vae_dir / "vae", safe_serialization=True)
    atomic_write_text(vae_dir / "vae_training.json", json.dumps({"vae_steps": vae_steps, "vae_loss": vae_loss}))
    if args.vae_only:
        return
    vae.requires_grad_(False).eval()

    # Latents of unit variance, as SD's scaling_factor makes them, so the noise schedule means what it says.
    t0 = time.time()
    pool, captions, scenes, shape_mask = encode_pool(vae, rng, args.pool)
    scale = vae.config.scaling_factor if args.unet_from else float(1.0 / pool.std())
    vae.register_to_config(scaling_factor=scale)
    pool = pool * scale
    log(phase="pool", n=len(captions), scaling_factor=round(scale, 4), seconds=round(time.time() - t0, 1))

    tok = clip_tokenizer()

    def tokens(texts):
        return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    ids = tokens(captions)
    empty_ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]

    prior_steps, earlier = 0, None
    if args.unet_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel
        unet = UNet2DConditionModel.from_pretrained(args.unet_from, subfolder="unet").float()
        text_encoder = CLIPTextModel.from_pretrained(args.unet_from, subfolder="text_encoder").float()
        earlier = json.loads((args.unet_from / "training.json").read_text())
        prior_steps = earlier.get("unet_steps", 0)
    else:
        unet, text_encoder = M.unet(), M.text_encoder()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = EMA([unet, text_encoder], args.ema)
    sched = M.scheduler()
    alphas = sched.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction

    end = time.time() + args.unet_minutes * 60
    next_ckpt = time.time() + args.checkpoint_minutes * 60
    step, losses = 0, []
    gen = torch.Generator().manual_seed(args.seed)

    def checkpoint(final: bool):
        info = {"vae_steps": vae_steps, "vae_loss": vae_loss, "unet_steps": prior_steps + step,
                "unet_loss_last200": float(np.mean(losses[-200:])) if losses else None,
                "wall_s": round(time.time() - log.t0, 1), "final": final, "bf16_autocast": amp,
                "args": {k: str(v) for k, v in vars(args).items()}}
        if earlier is not None:
            info["continued_from"] = earlier  # the run(s) whose UNet this one continued
        save_model(args.out, vae, ema.shadow[0], ema.shadow[1], info)
        log(phase="checkpoint", **{k: v for k, v in info.items() if k != "args"})

    while time.time() < end:
        idx = torch.randint(0, len(captions), (args.batch,), generator=gen)
        x0 = pool[idx]
        if args.augment > 0 or args.open > 0:
            tok_ids = tokens(training_captions(rng, [scenes[i] for i in idx], args.augment, args.open))
        else:
            tok_ids = ids[idx].clone()
        drop = torch.rand(args.batch, generator=gen) < 0.1
        tok_ids[drop] = empty_ids
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        lr = args.lr * min(1.0, (step + 1) / 200)
        # Cosine decay over the remaining wall time, so the last weights are the settled ones.
        frac = 1 - max(end - time.time(), 0) / (args.unet_minutes * 60)
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        with _autocast(amp):
            hidden = text_encoder(tok_ids).last_hidden_state
            pred = unet(xt, t, hidden).sample.float()
        # Shapes are a small share of the latent pixels and what a caption is about: --unet-fg-weight on them.
        wts = 1.0 + (args.unet_fg_weight - 1.0) * shape_mask[idx].float()
        loss = (((pred - noise) ** 2) * wts).mean(dim=(1, 2, 3)) / wts.mean(dim=(1, 2, 3))
        loss = (loss * weight[t]).mean()
        losses.append(optimizer_step(opt, params, ema, loss))
        step += 1
        if step % 50 == 0:
            log(phase="unet", step=step, loss=round(float(np.mean(losses[-50:])), 5),
                lr=round(opt.param_groups[0]["lr"], 6))
        if time.time() >= next_ckpt:
            checkpoint(False)
            next_ckpt = time.time() + args.checkpoint_minutes * 60
    checkpoint(True)


if __name__ == "__main__":
    main()
