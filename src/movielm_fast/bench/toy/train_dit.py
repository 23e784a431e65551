"""Train the DiT demo model (`--model demo-dit`) on the toy world, on a CPU:
`python -m movielm_fast.bench.toy.train_dit --out DIR [--cpu-minutes 120]`.

A FLUX.1-layout transformer (bench.toy.model.dit) and a small T5 learn from scratch, with the demo model's CLIP
(pooled) fine-tuned beside them, on latents of the demo model's own trained VAE (which is kept as it is): flow
matching (x_t = (1 - s) x0 + s noise, the transformer predicts noise - x0 at s drawn logit-normal), captions dropped
10% of the time for classifier-free guidance, EMA weights. Only training layouts (world.is_held_out is never drawn)
and training phrasings (world.caption, world.paraphrase) are seen.

The budget is CPU time of this process (`--cpu-minutes`, one thread by default), so the run means the same on a
busy machine as on an idle one. Every --checkpoint-minutes of CPU time a complete FluxPipeline folder with the EMA
weights replaces DIR atomically, and the training state (live and EMA weights, optimizer, step, CPU time used)
replaces DIR_state.pt: the same command run again resumes from there, up to the same total budget. The latents of
the scene pool are kept in DIR_pool/ so a resumed run does not encode them again. `DIR_log.jsonl` records loss,
CPU and wall time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from movielm_fast.engine.demo import TOY_MODEL_DIR, clip_tokenizer
from movielm_fast.paths import replace_dir

from . import model as M
from . import world as W
from .train import EMA, Log, encode_pool, optimizer_step, save_pipeline_folder, trainer_parser, training_captions

PATCH = 2  # a token is a 2x2 patch of latent pixels, as FluxPipeline packs them


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4), FluxPipeline's _pack_latents."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, 2, 2)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def image_ids(h: int, w: int) -> torch.Tensor:
    """(h * w, 3) FLUX.1 position ids of the image tokens: (0, row, column)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def load_vae():
    """The demo model's trained VAE, with the shift FLUX.1's pipeline subtracts (none) written into its config."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(TOY_MODEL_DIR, subfolder="vae", torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)
    return vae.requires_grad_(False).eval()


def load_clip_from(folder: Path):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(folder, dtype=torch.float32)


def save_pipeline(out: Path, vae, transformer, clip, t5, t5_tok, extra: dict) -> None:
    """Replace `out` with a complete FluxPipeline folder (written beside it, then swapped in by renames)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=M.flow_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    save_pipeline_folder(pipe, out, extra)


def scene_pool(folder: Path, vae, rng, n: int):
    """The pool's scaled latents, captions, scenes and shape masks: encoded once, then read from `folder`."""
    if (folder / "pool.safetensors").exists():
        t = load_file(str(folder / "pool.safetensors"))
        meta = json.loads((folder / "pool.json").read_text())
        scenes = [W.Scene(b, s, {p: W.Character(*c) for p, c in chars.items()}) for b, s, chars in meta["scenes"]]
        return t["latents"], meta["captions"], scenes, t["masks"].bool()
    latents, captions, scenes, masks = encode_pool(vae, rng, n)
    latents = latents * vae.config.scaling_factor  # the demo VAE's scale: latents of about unit variance
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({"latents": latents.contiguous(), "masks": masks.to(torch.uint8).contiguous()},
              str(tmp / "pool.safetensors"))
    meta = {"captions": captions, "scenes": [(s.background, s.style, {p: [c.shape, c.colour, c.size]
                                                                       for p, c in s.characters.items()})
                                              for s in scenes]}
    (tmp / "pool.json").write_text(json.dumps(meta))
    replace_dir(tmp, folder)
    return latents, captions, scenes, masks


def main(argv=None) -> None:
    ap = trainer_parser("toy.train_dit", __doc__, "transformer", lr=5e-4, augment=0.6, checkpoint_minutes=15.0,
                        clock="CPU")
    ap.add_argument("--cpu-minutes", type=float, default=120.0, help="total CPU-time budget, resumed runs included")
    ap.add_argument("--fg-weight", type=float, default=3.0, help="loss weight of the tokens a shape touches")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue the transformer and text encoders of a model folder (this script's output or "
                         "the shipped demo-dit) when there is no training state to resume: its steps and CPU time "
                         "count toward --cpu-minutes, the optimizer starts afresh")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    log = Log(args.out.with_name(args.out.name + "_log.jsonl"))
    state_file = args.out.with_name(args.out.name + "_state.pt")
    cpu0 = time.process_time()

    vae = load_vae()
    pool, captions, scenes, shape_mask = scene_pool(args.out.with_name(args.out.name + "_pool"), vae, rng, args.pool)
    log(phase="pool", n=len(captions), latent_std=round(float(pool.std()), 4),
        cpu_s=round(time.process_time() - cpu0, 1))

    earlier = None
    if args.init_from and not state_file.exists():
        from diffusers import FluxTransformer2DModel
        from transformers import T5EncoderModel

        earlier = json.loads((args.init_from / "training.json").read_text())
        transformer = FluxTransformer2DModel.from_pretrained(args.init_from, subfolder="transformer").float()
        clip = load_clip_from(args.init_from / "text_encoder")
    else:
        transformer, clip = M.dit(), load_clip_from(TOY_MODEL_DIR / "text_encoder")
    # The demo's token table stays as trained (its rows for words the toy world never uses stay zero): a dense
    # AdamW update of 49408 rows a step would cost more than the T5 does.
    clip.get_input_embeddings().requires_grad_(False)
    # Trained and shipped with the tokenizer as it loads from a folder (what the engine and diffusers read).
    t5_dir = args.out.with_name(args.out.name + "_t5_tokenizer")
    M.t5_tokenizer().save_pretrained(t5_dir)
    from transformers import AutoTokenizer

    t5_tok, clip_tok = AutoTokenizer.from_pretrained(t5_dir), clip_tokenizer()
    if earlier is not None:
        t5 = T5EncoderModel.from_pretrained(args.init_from / "text_encoder_2").float()
    else:
        t5 = M.t5_encoder(len(t5_tok))
    modules = [transformer, t5, clip]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = EMA(modules, args.ema)
    step, cpu_used, warm_from = 0, 0.0, 0
    if state_file.exists():  # resume: weights only (tensors, numbers), no code
        state = torch.load(state_file, weights_only=True)
        for m, sd in zip(modules, state["live"]):
            m.load_state_dict(sd)
        for m, sd in zip(ema.shadow, state["ema"]):
            m.load_state_dict(sd)
        opt.load_state_dict(state["opt"])
        step, cpu_used, ema.n = state["step"], state["cpu_s"], state["ema_n"]
        rng = np.random.default_rng([args.seed, step])
        log(phase="resume", step=step, cpu_s=round(cpu_used, 1))
    elif earlier is not None:  # the schedule goes on where that run stopped; EMA starts from its (EMA) weights
        step, cpu_used, ema.n = earlier["steps"], earlier["cpu_s"], earlier["steps"]
        warm_from = step  # a fresh optimizer warms up again: Adam's first updates are full-size whatever the grad
        rng = np.random.default_rng([args.seed, step])
        log(phase="init", init_from=str(args.init_from), step=step, cpu_s=round(cpu_used, 1))
    log(phase="start", args={k: str(v) for k, v in vars(args).items()},
        params={type(m).__name__: sum(p.numel() for p in m.parameters()) for m in modules})
    gen = torch.Generator().manual_seed(args.seed + step)

    def tokens(texts):
        clip_ids = clip_tok(texts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
        t5_ids = t5_tok(texts, padding="max_length", max_length=t5_tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return clip_ids, t5_ids

    img_ids = image_ids(pool.shape[-2] // PATCH, pool.shape[-1] // PATCH)
    txt_ids = torch.zeros(t5_tok.model_max_length, 3)
    budget = args.cpu_minutes * 60
    start_cpu = time.process_time() - cpu_used  # CPU time is counted from this process's start, plus earlier runs'
    next_ckpt = cpu_used + args.checkpoint_minutes * 60
    losses: list[float] = []

    def checkpoint(final: bool):
        used = time.process_time() - start_cpu
        info = {"steps": step, "loss_last200": float(np.mean(losses[-200:])) if losses else None,
                "cpu_s": round(used, 1), "final": final, "args": {k: str(v) for k, v in vars(args).items()},
                "torch_threads": torch.get_num_threads()}
        if earlier is not None:
            info["continued_from"] = {k: v for k, v in earlier.items() if k != "selection"}
        ema_transformer, ema_t5, ema_clip = ema.shadow
        save_pipeline(args.out, vae, ema_transformer, ema_clip, ema_t5, t5_tok, info)
        tmp = state_file.with_name(state_file.name + ".tmp")
        torch.save({"live": [m.state_dict() for m in modules], "ema": [m.state_dict() for m in ema.shadow],
                    "opt": opt.state_dict(), "step": step, "cpu_s": used, "ema_n": ema.n}, tmp)
        os.replace(tmp, state_file)
        log(phase="checkpoint", **{k: v for k, v in info.items() if k != "args"})

    for m in modules:
        m.train()
    while (used := time.process_time() - start_cpu) < budget:
        idx = torch.randint(0, len(captions), (args.batch,), generator=gen)
        x0 = pool[idx]  # (B, 4, 16, 16)
        texts = training_captions(rng, [scenes[i] for i in idx], args.augment, args.open)
        drop = torch.rand(args.batch, generator=gen) < 0.1
        texts = ["" if d else t for d, t in zip(drop.tolist(), texts)]
        clip_ids, t5_ids = tokens(texts)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal(0, 1), as SD3 trains
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        lr = args.lr * min(1.0, (step - warm_from + 1) / 200)
        for g in opt.param_groups:  # cosine decay over the CPU budget, so the last weights are the settled ones
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(used / budget, 1.0))))
        pooled = clip(clip_ids).pooler_output  # (B, 64)
        hidden = t5(t5_ids).last_hidden_state  # (B, L, 64)
        pred = transformer(hidden_states=pack(xt), encoder_hidden_states=hidden, pooled_projections=pooled,
                           timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        # Shapes are a small share of the tokens and what a caption is about: --fg-weight on the tokens they touch.
        wts = pack((1.0 + (args.fg_weight - 1.0) * shape_mask[idx].float()).expand(-1, 4, -1, -1))
        loss = ((((pred - pack(noise - x0)) ** 2) * wts).mean(dim=(1, 2)) / wts.mean(dim=(1, 2))).mean()
        losses.append(optimizer_step(opt, params, ema, loss))
        step += 1
        if step % 50 == 0:
            log(phase="train", step=step, loss=round(float(np.mean(losses[-50:])), 5),
                lr=round(opt.param_groups[0]["lr"], 6), cpu_s=round(used, 1))
        if used >= next_ckpt:
            checkpoint(False)
            next_ckpt = used + args.checkpoint_minutes * 60
    checkpoint(True)


if __name__ == "__main__":
    main()
