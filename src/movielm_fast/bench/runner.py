"""The benchmark protocol: one model, every requested backend and diffusers' own pipeline, side by side.

Once per run: the matmul ceiling (a large GEMM in the run's dtype). Then for each size, for each batch size
(ascending; a batch that does not fit stops the larger ones for that backend):
  1. count FLOPs once (text encoders, one denoiser step on the guidance batch, one VAE decode) on the very torch
     modules the backends run and export (export/graphs.py), and measure the matmul ceiling again (the machine's
     load can change during a run);
  2. warm up every entry -- diffusers' own pipeline of the model's family (StableDiffusion(XL)Pipeline,
     FluxPipeline, Flux2KleinPipeline) with the same components, scheduler, steps, size, batch and seeds, then each
     of our backends through `engine.pipeline.render_batch`;
  3. time whole batches end to end, `repeats` rounds, interleaved (round 1 of every entry, then round 2 ...);
  4. time our stages through the backend, interleaved the same way: text encoding (cold prompt cache), one
     denoiser step (`unet_step`, or `transformer_step` for the transformer families), one VAE decode.
MFU divides achieved FLOP/s by the highest ceiling measured in the run (`finalize_mfu`).
Every figure is min/median/max over the repeats; device work is synchronized before the clock is read.

Results: <out>/<timestamp>-<machine>.json (rewritten after every configuration, so an interrupted run keeps what it
measured), .csv, .png (plot), and a folder of the same name with one rendered image per configuration.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import diffusers
import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from movielm_fast.engine.backends.base import backend_names, create_backend
from movielm_fast.engine.config import BackendConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.models import native_size, own_defaults
from movielm_fast.engine.oom import is_oom
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.engine.schedulers import make_scheduler
from movielm_fast.errors import UserError
from movielm_fast.export.graphs import graph_modules
from movielm_fast.export.onnx_export import graph_args
from movielm_fast.export.specs import TRANSFORMER, UNET, VAE_DECODER, component_dtype, model_specs
from movielm_fast.paths import atomic_write_bytes, atomic_write_text
from movielm_fast.run.images import png_bytes

from .hardware import (
    PeakMemory,
    count_flops,
    load_average,
    machine_info,
    matmul_ceiling,
    settle,
    source_state,
    stats,
    timed,
)
from .image_quality import to_uint8
from .models import load_bench_model
from .report import BASELINE, DENOISERS, FORMAT, denoiser_step, write_csv, write_plot

# Movie-like prompts of typical length; the negative prompt is empty, as in a plan's defaults.
PROMPTS = [
    "Gothic style, soft sepia, a young woman with auburn hair in lavender stands at the ballroom entrance",
    "Gothic style, soft sepia, a carriage waits in the rain outside a manor at night, lanterns glowing",
    "Gothic style, soft sepia, two figures argue in a candle-lit library full of old books",
    "Gothic style, soft sepia, a crowded Victorian street market at dawn, fog between the stalls",
]


def backend_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """"torch+cuda_graphs+sdpa_backend=flash+no-fuse_qkv" -> ("torch", {cuda_graphs: True, sdpa_backend: "flash",
    fuse_qkv: False}); the options are engine.config.BackendConfig fields. ``dtype=bf16`` runs one entry in another
    dtype than the run's: its rows get PSNR and max difference against the run's first fp32 entry of ours."""
    base, *parts = spec.split("+")
    allowed = {"attention", "sdpa_backend", "channels_last", "cuda_graphs", "cudnn_benchmark", "fuse_qkv",
               "compile_unet", "dtype", "quantize"}
    opts: dict[str, Any] = {}
    for part in parts:
        key, _, value = part.partition("=")
        flag = not key.startswith("no-")
        key = key.removeprefix("no-")
        if key not in allowed:
            raise UserError(f"unknown backend option {part!r} in {spec!r}", f"use one of: {', '.join(sorted(allowed))}")
        opts[key] = value if value else flag
    return base, opts


@dataclass
class BenchSettings:
    """One benchmark run. Defaults depend on the device where they are None (see `resolved`)."""

    model: str = "demo"
    """demo | sd15-arch | sdxl-arch | a local diffusers folder or .safetensors file."""
    backends: list[str] | None = None
    """Backends to time; None: every registered one. Unregistered or failing ones are skipped with a note.
    A name may carry engine options after '+' to time a fast-path variant, e.g. ``torch+cuda_graphs``,
    ``torch+sdpa_backend=flash``, ``torch+no-channels_last`` (see `backend_variant`)."""
    device: str = "cpu"
    dtype: str = "auto"
    threads: int | str = "auto"
    """CPU threads (engine.config.BackendConfig.threads)."""
    sizes: list[tuple[int, int]] | None = None
    """(width, height) pairs. None: the model's own size where its movielm_defaults.json gives one (the demo
    model's 64x64), else the native size on CUDA and 256x256 on the CPU (native sizes take minutes per frame on a
    CPU)."""
    batch_sizes: list[int] | None = None
    """None: 1, 2, 4, 8 on CUDA; 1, 2 on CPU."""
    steps: int | None = None
    """None: the model's own, else 20 on CUDA, 4 on CPU."""
    repeats: int = 3
    warmup: int = 1
    guidance: float | None = None
    """None: the model's own (its movielm_defaults.json; a transformer family's: FLUX.1 [dev] 3.5, FLUX.2 [klein]
    4.0 or, distilled, 1.0), else 7.5."""
    scheduler: str | None = None
    """None: the model family's ("default": a transformer family's own flow-matching scheduler), else dpmpp."""
    baseline: bool = True
    peer_compile: str | None = None
    """Also time diffusers with its own documented speed recipe (`compiled_diffusers_pipeline`), compiled in this
    mode: "max-autotune" (the recipe's) or "default"; None: not timed. Its compile time is reported apart."""
    out: Path = Path("bench/results")
    machine: str | None = None
    """Name used in file names and as the RESULTS.md section; default: derived from the CPU/GPU model."""

    def resolved(self, device: torch.device, model) -> "BenchSettings":
        """Every default filled in for `model` (an engine.models.ModelBundle) on `device`."""
        cuda = device.type == "cuda"
        native = native_size(model)
        # The model's movielm_defaults.json, where it ships one, over its family's (FLUX: steps, guidance, scheduler)
        own = {**model.family.defaults(model), **own_defaults(model)}
        size = (own["width"], own.get("height", own["width"])) if "width" in own else \
            (native, native) if cuda else (256, 256)
        return BenchSettings(**{
            **asdict(self),
            "sizes": self.sizes or [size],
            "batch_sizes": sorted(set(self.batch_sizes or ([1, 2, 4, 8] if cuda else [1, 2]))),
            "steps": self.steps or own.get("steps") or (20 if cuda else 4),
            "guidance": self.guidance if self.guidance is not None else own.get("guidance", 7.5),
            "scheduler": self.scheduler or own.get("scheduler", "dpmpp")})


@dataclass
class _Backend:
    name: str
    impl: Any = None  # a Backend, or diffusers' pipeline for the baseline
    baseline: bool = False
    oom_at: int | None = None  # smallest batch that did not fit: larger ones are not tried


@dataclass
class BenchRun:
    result: dict[str, Any]
    json_path: Path
    files: dict[str, Path] = field(default_factory=dict)


def _scaled(s: dict[str, Any], k: float) -> dict[str, Any]:
    return {**{key: s[key] * k for key in ("min", "median", "max")}, "n": s["n"]}


def _save_png(image: np.ndarray, path: Path, meta: dict[str, str]) -> None:
    atomic_write_bytes(path, png_bytes(image, meta))


def diffusers_pipeline(model, scheduler: str, device: torch.device, dtype: torch.dtype):
    """diffusers' own text-to-image pipeline around the model's components, with our scheduler choice."""
    def on(module):  # moving only when needed keeps diffusers from warning about casts that change nothing
        p = next(module.parameters())
        return module if (p.device, p.dtype) == (device, dtype) else module.to(device, dtype)

    if model.transformer is not None:  # FLUX.1, FLUX.2 [klein]: the family's pipeline, its parts by their names
        family = model.family
        parts = {folder: on(enc) for (folder, _, _, _), enc in zip(family.encoders, model.text_encoders)}
        parts.update({tok: t for (_, tok, _, _), t in zip(family.encoders, model.tokenizers)})
        extra = {"is_distilled": model.distilled} if model.kind == "flux2-klein" else {}
        pipe = getattr(diffusers, family.pipelines[0])(
            **parts, **extra, transformer=on(model.transformer), vae=on(model.vae),
            scheduler=make_scheduler(scheduler, model.scheduler_config))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    parts = dict(vae=on(model.vae), unet=on(model.unet), text_encoder=on(model.text_encoders[0]),
                 tokenizer=model.tokenizers[0], scheduler=make_scheduler(scheduler, model.scheduler_config))
    if model.kind == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=on(model.text_encoders[1]),
                                         tokenizer_2=model.tokenizers[1], add_watermarker=False,
                                         force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Inductor settings of diffusers' speed guide ("Accelerate inference of text-to-image diffusion models"), plus what
# each torch.compile mode sets (torch.compile takes a mode or options, not both).
PEER_INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                         "coordinate_descent_check_all_directions": True}
PEER_COMPILE_MODES = {"max-autotune": {"max_autotune": True, "triton.cudagraphs": True}, "default": {}}


def compiled_diffusers_pipeline(model, scheduler: str, device: torch.device, dtype: torch.dtype,
                                mode: str = "max-autotune"):
    """diffusers' pipeline with diffusers' own speed recipe: the dtype asked for (fp16 on a GPU), channels-last
    UNet and VAE, fused QKV projections, and the UNet and the VAE decode compiled with torch.compile (fullgraph) and
    the guide's inductor settings. Each new shape compiles on its first call: `Bench` reports that call apart."""
    if mode not in PEER_COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r} for the diffusers peer",
                        f"use {' or '.join(PEER_COMPILE_MODES)}")
    if model.unet is None:
        raise UserError(f"the compiled diffusers peer is diffusers' UNet recipe; none is written for {model.kind}",
                        "time this model with --peer-compile off")
    pipe = diffusers_pipeline(model, scheduler, device, dtype)
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    options = {**PEER_INDUCTOR_OPTIONS, **PEER_COMPILE_MODES[mode]}
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, options=options)
    pipe.vae.decode = torch.compile(pipe.vae.decode, fullgraph=True, options=options)  # the guide's own recipe
    return pipe


class Bench:
    def __init__(self, settings: BenchSettings, log: Callable[[str], None] = print):
        self.log = log
        probe = BackendConfig(device=settings.device, dtype=settings.dtype, threads=settings.threads)
        self.device, self.dtype, self.dtype_name = probe.torch_device, probe.torch_dtype, probe.dtype_name
        self.settings = settings
        log(f"loading {settings.model} ...")
        self.model = self._load()
        self.s = settings.resolved(self.device, self.model)
        # The denoiser's step: the UNet's, or a transformer family's (its stage, FLOPs and it/s are named so).
        self.step = f"{UNET if self.model.unet is not None else TRANSFORMER}_step"
        self.backend_config = lambda **opts: BackendConfig(device=settings.device, threads=settings.threads,
                                                           **{"dtype": settings.dtype, **opts})
        self.machine = machine_info(self.device)
        if settings.machine:
            self.machine["slug"] = settings.machine
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.base = Path(self.s.out) / f"{self.stamp}-{self.machine['slug']}"
        self.result: dict[str, Any] = {
            "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False,
            "machine": self.machine,
            "settings": {"model": settings.model, "model_kind": self.model.kind, "model_hash": self.model.content_hash,
                         "device": self.device.type, "dtype": self.dtype_name, "backends": settings.backends,
                         "sizes": [f"{w}x{h}" for w, h in self.s.sizes], "batch_sizes": self.s.batch_sizes,
                         "steps": self.s.steps, "repeats": self.s.repeats, "warmup": self.s.warmup,
                         "denoiser": self.step.removesuffix("_step"),
                         "guidance": self.s.guidance, "scheduler": self.s.scheduler,
                         "negative_prompt": "", "attention": "sdpa"},
            "ceiling": None, "configs": [], "runs": [], "skipped": [], "notes": [], "backend_sources": {},
            "bench_source": source_state(Bench)}

    # --- set-up ------------------------------------------------------------------------------------------------
    def _load(self):
        """The model, loaded (or, for the DiT architectures, built) afresh."""
        return load_bench_model(self.settings.model, self.device, self.dtype)

    def _backends(self) -> list[_Backend]:
        names = self.s.backends or backend_names()
        out = []
        for name in names:
            base, opts = backend_variant(name)
            if base not in backend_names():
                self._skip(name, f"not registered in this checkout (registered: {', '.join(backend_names())})")
                continue
            try:
                # A variant changes modules in place (attention processors, fused QKV): give it its own copy.
                model = self._load() if opts else self.model
                impl = create_backend(base, model, self.backend_config(**opts))
            except Exception as exc:  # noqa: BLE001 - one backend failing to start must not lose the others' run
                kind = "" if isinstance(exc, (UserError, ImportError)) else f"{type(exc).__name__}: "
                self._skip(name, kind + str(exc).replace("\n", " ")[:300])
                continue
            out.append(_Backend(name, impl))
            self.result["backend_sources"][name] = source_state(type(impl))
        return out

    def _skip(self, name: str, reason: str) -> None:
        self.log(f"skipping backend {name}: {reason}")
        self.result["skipped"].append({"backend": name, "reason": reason})

    def _peers(self) -> list[_Backend]:
        """diffusers' pipeline as it comes (the baseline), then with its speed recipe if asked for. On CUDA our torch
        backend changes a UNet's modules in place (channels_last, fused QKV; the VAE's dtype), which would tune the
        peers too: each peer gets its own copy there. On CPU the plain one shares ours (a second fp32 copy of a model
        would not fit many machines' memory), and so does a transformer family's on CUDA: our backend only places
        its modules (and makes the VAE channels-last), and two copies of FLUX.1 would not fit an 80 GB GPU."""
        peers = []
        if self.s.baseline:
            upcast = component_dtype(self.model, VAE_DECODER, self.dtype_name) != self.dtype_name
            own = (self.device.type == "cuda" and self.model.unet is not None) or upcast
            model = self._load() if own else self.model
            peers.append(_Backend(BASELINE, diffusers_pipeline(model, self.s.scheduler, self.device, self.dtype),
                                  baseline=True))
        else:
            self.result["notes"].append("diffusers baseline disabled (--no-baseline): no speed-up figures")
        if self.s.peer_compile:
            pipe = compiled_diffusers_pipeline(self._load(), self.s.scheduler, self.device,
                                               self.dtype, self.s.peer_compile)
            peers.append(_Backend(f"{BASELINE}+compile", pipe, baseline=True))
        return peers

    # --- FLOPs -------------------------------------------------------------------------------------------------
    def _flops(self, width: int, height: int, batch: int) -> dict[str, int]:
        """Work of one batch, counted on the modules every backend runs (export/graphs.py), at the shapes a render
        hands them (export/specs.py): each prompt of the guidance batch through every text encoder, one denoiser
        step on the guidance batch, one VAE decode."""
        m = self.model
        cfg = m.family.cfg_scale(m, self._batch_settings(width, height)) is not None
        graphs, specs = graph_modules(m), model_specs(m)

        def count(component: str, chunks: int = 1) -> int:
            graph, spec = graphs[component], specs[component]
            p = next(graph.parameters())
            inputs = spec.sample_inputs(spec.dims(batch, width, height, chunks, cfg), p.dtype)
            inputs = {k: v.to(p.device) for k, v in inputs.items()}
            return count_flops(lambda: graph(*graph_args(graph, inputs)), p.device)

        prompts = 2 * batch if cfg else batch  # one window each
        text = sum(count(c, chunks=prompts) for c in specs if c.startswith("text_encoder"))
        step, vae = count(self.step.removesuffix("_step")), count(VAE_DECODER)
        total = text + self.s.steps * step + vae
        return {"text_encode": text, self.step: step, "vae_decode": vae, "batch": total, "frame": total // batch}

    # --- measurements ------------------------------------------------------------------------------------------
    def _jobs(self, batch: int):
        return [FrameJob("bench", f"{i:03d}", PROMPTS[i % len(PROMPTS)], "", 1000 + i) for i in range(batch)]

    def _batch_settings(self, width: int, height: int) -> BatchSettings:
        return BatchSettings(width, height, self.s.steps, self.s.guidance, self.s.scheduler)

    def _whole_batch(self, e: _Backend, width: int, height: int, batch: int):
        """(setup, call) for one end-to-end batch: `setup()` runs untimed, `call(setup())` returns uint8 images."""
        jobs = self._jobs(batch)
        if e.baseline:
            def call(generators):
                # No negative prompt: diffusers' default, which an empty plan negative means.
                return to_uint8(e.impl(prompt=[j.prompt for j in jobs], height=height, width=width,
                                     num_inference_steps=self.s.steps, guidance_scale=self.s.guidance,
                                     generator=generators, output_type="np").images)

            # One generator per frame, as our seeds promise: the same initial latents, so the same images.
            return (lambda: [torch.Generator("cpu").manual_seed(j.seed) for j in jobs]), call
        s = self._batch_settings(width, height)
        # A fresh prompt encoder per call: in a render every frame has its own prompt, so its cache never hits
        # (diffusers encodes every call too).
        return (lambda: self.model.family.prompt_encoder(self.model, e.impl)), \
            (lambda enc: to_uint8(np.stack(render_batch(self.model, e.impl, enc, jobs, s))))

    def _stage_calls(self, e: _Backend, width: int, height: int, batch: int) -> dict[str, tuple]:
        """(setup, call) per stage -- text encoding (cold cache), one denoiser step on the guidance batch, one VAE
        decode -- each through the backend, on the inputs the hot path makes for them (the model family's own
        conditioning, schedule, noise and unpacking, so shapes and order cannot drift). Timed after the whole-batch
        warm-up, so all are warm."""
        m, be, dev, family = self.model, e.impl, self.device, self.model.family
        s = self._batch_settings(width, height)
        jobs = self._jobs(batch)
        guidance = family.cfg_scale(m, s)  # None: no negative batch
        fresh = lambda: family.prompt_encoder(m, be)  # noqa: E731
        cond = family.conditioning(m, fresh(), jobs, s, guidance is not None).to(dev)
        scheduler = family.scheduler(m, s, dev)
        latents, generators = family.initial_latents(m, scheduler, [j.seed for j in jobs], s, dev)
        steps = family.steps(scheduler, scheduler.timesteps, generators)
        t = scheduler.timesteps[0]
        x = steps.scale(torch.cat([latents, latents]) if guidance is not None else latents, 0)  # negatives first
        z = family.unpack(m, latents, s)  # (B, C, h, w)
        none = lambda: None  # noqa: E731
        return {"text_encode": (fresh, lambda enc: family.conditioning(m, enc, jobs, s, guidance is not None)),
                self.step: (none, lambda _: be.denoise(x, t, cond)),
                "vae_decode": (none, lambda _: be.decode(z))}

    def _interleaved(self, tag: str, what: str, live: list[dict[str, Any]], calls: Callable[[dict], tuple],
                     on_sample: Callable[[dict, float, Any], None], oom: Callable) -> None:
        """`repeats` rounds; each round times one call of every live entry in turn, so a burst of load from
        elsewhere on a shared machine hits all entries alike instead of skewing one of them."""
        for r in range(self.s.repeats):
            self.log(f"{tag} {what}, round {r + 1}/{self.s.repeats}: " + ", ".join(st["entry"].name for st in live))
            for st in [st for st in live if not st.get("failed")]:
                setup, call = calls(st)
                arg = setup()
                settle(self.device)
                try:
                    with PeakMemory(self.device) as mem:
                        seconds, out = timed(lambda: call(arg), self.device)
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    oom(st, exc)
                    continue
                st["peak"] = max(st["peak"], mem.peak_bytes)
                on_sample(st, seconds, out)

    # --- one configuration -------------------------------------------------------------------------------------
    def _record(self, e: _Backend, width: int, height: int, batch: int, flops: dict[str, int], ceiling: float,
                state: dict[str, Any] | None = None, status: str = "ok", note: str = "",
                baseline: dict[str, Any] | None = None, fp32: dict[str, Any] | None = None,
                peer: dict[str, Any] | None = None) -> dict[str, Any]:
        run: dict[str, Any] = {"backend": e.name, "size": f"{width}x{height}", "width": width, "height": height,
                               "batch": batch, "status": status, "note": note}
        if getattr(e.impl, "knobs", None):  # the lossless knobs this entry ran with (bench/knobs.py reads them)
            run["knobs"] = e.impl.knobs
        if getattr(e.impl, "vae_fallbacks", 0):  # an fp16/bf16 decode that overflowed was decoded again in fp32
            run["vae_fp32_fallbacks"] = e.impl.vae_fallbacks
        self.result["runs"].append(run)
        if state is None:
            return run
        whole = stats(state["samples"])
        stages = {**state.get("stages", {}), "batch": whole, "frame": _scaled(whole, 1 / batch)}
        run.update(stages=stages, images_per_s=batch / whole["median"],
                   memory={"kind": state["memory_kind"], "peak_mb": round(state["peak"] / 2**20, 1)})
        achieved = {"frame": flops["batch"] / whole["median"]}
        if self.step in stages:
            run[f"{self.step}s_per_s"] = 1 / stages[self.step]["median"]
            achieved[self.step] = flops[self.step] / stages[self.step]["median"]
            achieved["vae_decode"] = flops["vae_decode"] / stages["vae_decode"]["median"]
        run["achieved_flops_per_s"] = achieved
        run["mfu"] = {k: v / ceiling for k, v in achieved.items()}
        run["ceiling_flops_per_s"] = ceiling
        image = state["image"]
        rel = f"{self.base.name}/{self.s.model}-{e.name}-{width}x{height}-b{batch}.png"
        _save_png(image[0], self.base.parent / rel,
                  {"model": self.s.model, "backend": e.name, "prompt": PROMPTS[0], "seed": "1000",
                   "settings": f"{width}x{height} steps={self.s.steps} guidance={self.s.guidance} "
                               f"scheduler={self.s.scheduler} dtype={self.dtype_name}"})
        run["image"] = rel
        if state.get("first_call") is not None:
            # The first call of this shape in a warm process: compile or graph capture included, i.e. what a new
            # shape costs before its first image. For compiled entries the excess over a warm call is compile time.
            run["first_batch_s"] = state["first_call"]
            run["first_call_overhead_s"] = max(0.0, state["first_call"] - whole["median"])
        if baseline is not None:
            # Same seeds, same components: the pixels must agree, or the speed-up would compare different work.
            run["max_abs_diff_vs_diffusers"] = int(np.abs(image.astype(np.int16) -
                                                          baseline["image"].astype(np.int16)).max())
            run["speedup_vs_diffusers"] = stats(baseline["samples"])["median"] / whole["median"]
        if peer is not None:
            run["speedup_vs_diffusers_compile"] = stats(peer["samples"])["median"] / whole["median"]
        if fp32 is not None and e.impl.dtype != torch.float32:
            # A lower-precision row beside its fp32 twin: same seeds, so the pixel error is the precision's cost.
            err = image.astype(np.float64) - fp32["image"].astype(np.float64)
            mse = float((err ** 2).mean())
            run["dtype"] = str(e.impl.dtype).removeprefix("torch.")
            run["psnr_vs_fp32"] = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
            run["max_abs_diff_vs_fp32"] = int(np.abs(err).max())
            run["speedup_vs_fp32"] = stats(fp32["samples"])["median"] / whole["median"]
        return run

    def _config(self, entries: list[_Backend], width: int, height: int, batch: int) -> None:
        """The baseline (first entry, when enabled) and each backend at one size and batch: warm-up, whole batches
        and then each stage, all timed in interleaved rounds (see `_interleaved`)."""
        tag = f"[{width}x{height} batch {batch}]"
        self.log(f"{tag} counting FLOPs ...")
        try:
            flops = self._flops(width, height, batch)
        except Exception as exc:
            if not is_oom(exc):
                raise
            self._free()
            for e in entries:  # even one forward does not fit: nothing larger will
                e.oom_at = e.oom_at or batch
            self.result["notes"].append(f"{width}x{height} batch {batch}: out of memory while counting FLOPs")
            return
        # The ceiling again for every configuration: on a shared machine the load changes within a run, and the
        # highest value seen is the fairest denominator (see `finalize_mfu`).
        ceiling = matmul_ceiling(self.device, self.dtype)
        self.result["configs"].append({"size": f"{width}x{height}", "batch": batch, "flops": flops,
                                       "ceiling_flops_per_s": ceiling["flops_per_s"]})
        ceil = ceiling["flops_per_s"]["median"]
        self.log(f"{tag} {flops['frame'] / 1e9:.1f} GFLOP per frame; matmul ceiling {ceil / 1e9:.1f} GFLOP/s")
        live: list[dict[str, Any]] = []

        def oom(state_or_entry, exc) -> None:
            e = state_or_entry["entry"] if isinstance(state_or_entry, dict) else state_or_entry
            e.oom_at = batch
            if isinstance(state_or_entry, dict):
                state_or_entry["failed"] = True
            self._free()
            self.log(f"{tag} {e.name}: out of memory")
            self._record(e, width, height, batch, flops, ceil, status="oom", note=str(exc).splitlines()[0][:200])

        for e in entries:
            if e.oom_at is not None:
                self._record(e, width, height, batch, flops, ceil, status="skipped",
                             note=f"batch {e.oom_at} already ran out of memory")
                continue
            self.log(f"{tag} {e.name}: warm-up ...")
            setup, call = self._whole_batch(e, width, height, batch)
            state = {"entry": e, "setup": setup, "call": call, "samples": [], "peak": 0, "image": None,
                     "first_call": None}
            try:
                with PeakMemory(self.device) as mem:
                    for i in range(self.s.warmup):
                        arg = setup()
                        seconds, state["image"] = timed(lambda: call(arg), self.device)
                        if i == 0:
                            state["first_call"] = seconds
                state.update(peak=mem.peak_bytes, memory_kind=mem.kind)
                live.append(state)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                oom(e, exc)

        def whole(st, seconds, image):
            st["samples"].append(seconds)
            st["image"] = image

        self._interleaved(tag, "end to end", live, lambda st: (st["setup"], st["call"]), whole, oom)
        # diffusers' stages are the same modules as ours; only its end-to-end time is the baseline.
        ours = [st for st in live if not st["entry"].baseline]
        for st in ours:
            st["stage_calls"] = self._stage_calls(st["entry"], width, height, batch)
            st["stage_samples"] = {k: [] for k in st["stage_calls"]}
        for stage in ("text_encode", self.step, "vae_decode"):
            self._interleaved(tag, stage.replace("_", " "), ours, lambda st: st["stage_calls"][stage],
                              lambda st, seconds, _: st["stage_samples"][stage].append(seconds), oom)
        live = [st for st in live if not st.get("failed")]
        for st in ours:
            if not st.get("failed"):
                st["stages"] = {k: stats(v) for k, v in st["stage_samples"].items()}
                del st["stage_calls"]  # drops the stage inputs before the next configuration allocates its own
        base = next((st for st in live if st["entry"].name == BASELINE), None)
        peer = next((st for st in live if st["entry"].name == f"{BASELINE}+compile"), None)
        fp32 = next((st for st in live if not st["entry"].baseline and st["entry"].impl.dtype == torch.float32), None)
        recorded = [self._record(st["entry"], width, height, batch, flops, ceil, st,
                                 baseline=None if st is base else base, fp32=fp32,
                                 peer=None if st["entry"].baseline else peer) for st in live]
        self._free()
        self._write()  # also sets every run's MFU (finalize_mfu) before the lines below print it
        for run in recorded:
            self.log(_line(run))

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _write(self) -> None:
        finalize_mfu(self.result)
        atomic_write_text(self.base.with_suffix(".json"), json.dumps(self.result, indent=1, default=str))

    # --- the whole run -----------------------------------------------------------------------------------------
    def run(self) -> BenchRun:
        self.log(f"measuring the {self.dtype_name} matmul ceiling on {self.device} ...")
        self.result["ceiling"] = matmul_ceiling(self.device, self.dtype)
        self.log(f"  {self.result['ceiling']['flops_per_s']['median'] / 1e9:.1f} GFLOP/s (median)")
        backends = self._backends()
        entries = self._peers() + backends
        if not entries:
            raise UserError("no backend could be benchmarked", "see the skipped backends above")
        for width, height in self.s.sizes:
            for e in entries:  # a batch that did not fit stops larger ones; a new size starts from batch 1 again
                e.oom_at = None
            for batch in self.s.batch_sizes:
                self._config(entries, width, height, batch)
        self.result["ceiling_end"] = matmul_ceiling(self.device, self.dtype)
        self.result["complete"] = True
        self.result["machine"]["load_avg_end"] = load_average()
        self._write()
        files = {"json": self.base.with_suffix(".json")}
        files["csv"] = write_csv(self.result, self.base.with_suffix(".csv"))
        plot = write_plot(self.result, self.base.with_suffix(".png"))
        if plot is None:
            self.log("matplotlib is not installed: no plot (pip install 'movielm-fast[bench]')")
        else:
            files["png"] = plot
        return BenchRun(self.result, files["json"], files)


def finalize_mfu(result: dict[str, Any]) -> None:
    """Every run's MFU against the highest matmul ceiling measured in the run (start, each configuration, end).

    One denominator for all rows keeps MFU proportional to throughput, and the highest ceiling is what the machine
    showed it can do: on a loaded machine a ceiling measured during a burst would inflate MFU past what the code
    achieves, so MFU here errs low, never high."""
    ceilings = [result["ceiling"]] + [c["ceiling_flops_per_s"] for c in result["configs"]] \
        + ([result["ceiling_end"]] if result.get("ceiling_end") else [])
    best = max(c["flops_per_s"]["median"] if "flops_per_s" in c else c["median"] for c in ceilings)
    result["mfu_ceiling_flops_per_s"] = best
    for run in result["runs"]:
        if run["status"] == "ok":
            run["mfu"] = {k: v / best for k, v in run["achieved_flops_per_s"].items()}
            run["ceiling_flops_per_s"] = best


def _line(run: dict[str, Any]) -> str:
    st = run["stages"]
    parts = [f"  {run['backend']:<12} {st['frame']['median']:.3f} s/frame (min {st['frame']['min']:.3f}, "
             f"max {st['frame']['max']:.3f}), {run['images_per_s']:.3f} images/s"]
    step = denoiser_step(st)
    if step is not None:
        parts.append(f"{DENOISERS[step]} step {st[step]['median']:.3f} s, VAE {st['vae_decode']['median']:.3f} s, "
                     f"text {st['text_encode']['median']:.3f} s")
    if "speedup_vs_diffusers" in run:
        parts.append(f"x{run['speedup_vs_diffusers']:.2f} vs diffusers")
    if "psnr_vs_fp32" in run:
        parts.append(f"{run['dtype']}: x{run['speedup_vs_fp32']:.2f} vs fp32, PSNR {run['psnr_vs_fp32']:.1f} dB, "
                     f"max diff {run['max_abs_diff_vs_fp32']}/255")
    parts.append(f"MFU {100 * run['mfu']['frame']:.1f}%")
    return ", ".join(parts)


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print) -> BenchRun:
    return Bench(settings, log).run()
