"""The CPU bf16 path against its measuring peers, side by side in one process (issue 17's table).

    python -m movielm_fast.bench.openvino_peer [--model sd15-arch] [--repeats 3] [--no-frames] [--force-bf16]

Measures on this CPU, with the threads ONNX Runtime's CPU backend uses (physical cores):
  1. the GEMM ceilings: torch.matmul on large square matrices in fp32 and in bf16 (the bf16 limit of a frame);
  2. one UNet step at CFG batch 2, 256² (32x32 latent), same inputs for every row, rounds interleaved:
     torch fp32 eager; torch bf16 eager, bf16 channels-last, bf16 compiled (inductor, freezing, weight prepacking),
     each alone; our torch backend with `--dtype bf16` (the path engine/cpu.py picks for this CPU); ONNX Runtime fp32
     (our exported UNet); OpenVINO with its CPU defaults on the same exported ONNX UNet (bf16 by itself on AMX);
  3. unless --no-frames: one 256², 4-step frame, batch 1 -- diffusers fp32 and bf16, our torch backend fp32 and
     bf16 -- with PSNR / max difference of each bf16 frame against its fp32 twin; our bf16 figure is stored for this
     CPU model (engine/cpu.py), which is what `--dtype auto` quotes on an AMX CPU.
Without native bf16 (no AMX, no AVX-512-BF16) bf16 runs emulated, orders of magnitude slower: its model rows are
skipped with the GEMM figure that says why, unless --force-bf16.

OpenVINO is a measuring peer, not a dependency: `pip install openvino` (or the `bench-peers` extra); without it its
row says so. Writes bench/results/cpu-peer-<timestamp>.json and regenerates bench/RESULTS.md.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from movielm_fast.engine import cpu
from movielm_fast.engine.backends.base import UNetCond, create_backend
from movielm_fast.engine.config import BackendConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.models import load_model
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.engine.text import PromptEncoder
from movielm_fast.errors import UserError
from movielm_fast.export.graphs import graph_modules
from movielm_fast.export.onnx_export import export_component
from movielm_fast.export.specs import UNET, model_specs
from movielm_fast.paths import atomic_write_text

from .args import bench_parser
from .formats import Section, median_text, save_result
from .hardware import load_average, stats
from .image_quality import psnr
from .models import resolve_model
from .report import write_results_md
from .runner import PROMPTS, diffusers_pipeline

CPU_PEER_FORMAT = "movielm-bench-cpu-peer/1"


def require_openvino():
    try:
        import openvino  # optional: a measuring peer, never a dependency of the package
    except ImportError:
        raise UserError("OpenVINO is not installed, so its row cannot be measured",
                        "pip install openvino (or pip install 'movielm-fast[bench-peers]')") from None
    return openvino

def gemm(dtype: torch.dtype, n: int, repeats: int) -> dict[str, Any]:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)  # warm-up: thread pool, oneDNN primitive creation
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        samples.append(time.perf_counter() - t)
    s = stats(samples)
    return {"n": n, "seconds": s, "flops_per_s": 2 * n ** 3 / s["median"]}

def interleaved(calls: dict[str, Callable[[], Any]], repeats: int, log) -> dict[str, dict[str, Any]]:
    """Warm each call once (compiles happen here), then `repeats` rounds of every call in turn."""
    out: dict[str, dict[str, Any]] = {}
    for name, fn in calls.items():
        t = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            out[name] = {"status": "failed", "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            log(f"  {name}: failed ({out[name]['note']})")
            continue
        out[name] = {"status": "ok", "first_call_s": time.perf_counter() - t, "samples": [], "output": result}
        log(f"  {name}: first call {out[name]['first_call_s']:.2f} s")
    for r in range(repeats):
        for name, fn in calls.items():
            if out[name]["status"] == "ok":
                t = time.perf_counter()
                try:
                    out[name]["output"] = fn()
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: keep the other rows
                    out[name] = {"status": "failed", "note": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    continue
                out[name]["samples"].append(time.perf_counter() - t)
        log(f"  round {r + 1}/{repeats} done")
    for name, row in out.items():
        if row["status"] == "ok":
            row["seconds"] = stats(row.pop("samples"))
            log(f"  {name:<28} {row['seconds']['median']:.3f} s (median of {row['seconds']['n']})")
    return out

def unet_rows(model, path: Path, features: cpu.CpuFeatures, bf16: bool, repeats: int, log) -> dict[str, Any]:
    """One UNet step at CFG batch 2, 256², through every way we and our peers run it."""
    h = w = 256 // model.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.latent_channels, h, w, generator=g)
    hidden = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(999.0)
    cond = UNetCond(hidden)
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    notes: dict[str, str] = {}

    fp32 = create_backend("torch", model, BackendConfig(dtype="fp32"))
    calls["torch fp32 eager"] = lambda: fp32.denoise(x, t, cond).float()
    if bf16:
        # Each bf16 variant alone, on its own copy of the UNet (channels-last and freezing change modules).
        def variant(channels_last: bool, compiled: bool):
            unet = graph_modules(load_model(path))[UNET].to(torch.bfloat16).eval()
            if channels_last:
                unet.to(memory_format=torch.channels_last)
            step = cpu.CompiledCpu(unet, "UNet", report=log) if compiled else unet
            xb, hb = x.to(torch.bfloat16), hidden.to(torch.bfloat16)

            @torch.inference_mode()
            def call():
                return step(xb, t, hb, None, None, None).float()
            return call

        calls["torch bf16 eager"] = variant(False, False)
        calls["torch bf16 channels-last"] = variant(True, False)
        calls["torch bf16 compiled"] = variant(True, True)
        ours = create_backend("torch", load_model(path), BackendConfig(dtype="bf16"))
        chosen = cpu.bf16_path(features)
        notes["torch bf16 (--dtype bf16)"] = chosen.why
        calls["torch bf16 (--dtype bf16)"] = lambda: ours.denoise(x, t, cond).float()
    try:
        ort = create_backend("onnxruntime", model, BackendConfig(dtype="fp32"))
        calls["onnxruntime fp32"] = lambda: ort.denoise(x, t, cond).float()
    except (UserError, ImportError) as exc:
        notes["onnxruntime fp32"] = str(exc)
    try:
        ov = require_openvino()
        core = ov.Core()
        onnx_path = export_component(model, UNET, "ort-cpu", "fp32").file()  # the artifact ONNX Runtime runs
        compiled = core.compile_model(str(onnx_path), "CPU")  # its CPU defaults: bf16 by itself on AMX
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        notes["openvino (CPU defaults)"] = f"OpenVINO {ov.get_version()}, inference precision {hint}"
        names = [i.name for i in model_specs(model)[UNET].inputs]
        feeds = {"sample": x.numpy(), "timestep": t.reshape(1).numpy(), "encoder_hidden_states": hidden.numpy()}
        request = compiled.create_infer_request()
        calls["openvino (CPU defaults)"] = lambda: torch.from_numpy(
            np.array(request.infer({k: feeds[k] for k in names if k in feeds})[compiled.output(0)]))
    except UserError as exc:
        notes["openvino (CPU defaults)"] = f"{exc} -- {exc.hint}" if getattr(exc, "hint", None) else str(exc)
    log("UNet step, CFG batch 2, 256²:")
    rows = interleaved(calls, repeats, log)
    ref = rows["torch fp32 eager"].get("output")
    for name, row in rows.items():
        out = row.pop("output", None)
        if out is not None and ref is not None:
            row["max_rel_diff_vs_torch_fp32"] = float((out - ref).abs().max() / ref.abs().max())
    for name, note in notes.items():
        rows.setdefault(name, {"status": "not run"})["note"] = note
    if bf16 and "torch bf16 compiled" in rows:
        rows["torch bf16 compiled"]["note"] = "first call = compile of this shape bucket (cached on disk)"
    return rows

def frame_rows(path: Path, bf16: bool, repeats: int, steps: int, log) -> dict[str, Any]:
    """One 256² frame, batch 1: diffusers and our torch backend, fp32 and (with native bf16) bf16."""
    job = [FrameJob("bench", "000", PROMPTS[0], "", 1000)]
    s = BatchSettings(256, 256, steps, 7.5, "dpmpp")
    calls: dict[str, Callable[[], np.ndarray]] = {}
    dtypes = ("fp32", "bf16") if bf16 else ("fp32",)
    for dt in dtypes:
        # fp32: diffusers and our backend share one model (our CPU fp32 path changes no module). bf16: each its
        # own, since our bf16 path may change module layouts (channels-last), which must not tune the baseline.
        ours_model = load_model(path)
        m = ours_model if dt == "fp32" else load_model(path)
        pipe = diffusers_pipeline(m, "dpmpp", torch.device("cpu"), {"fp32": torch.float32,
                                                                    "bf16": torch.bfloat16}[dt])

        def diffusers_frame(pipe=pipe):
            img = pipe(prompt=PROMPTS[0], negative_prompt=None, height=256, width=256, num_inference_steps=steps,
                       guidance_scale=7.5, generator=[torch.Generator("cpu").manual_seed(1000)],
                       output_type="np").images[0]
            return (np.asarray(img, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)
        calls[f"diffusers {dt}"] = diffusers_frame
        be = create_backend("torch", ours_model, BackendConfig(dtype=dt))
        # A fresh prompt encoder per frame: diffusers encodes the prompt every call too.
        calls[f"torch {dt}"] = lambda m=ours_model, be=be: render_batch(m, be, PromptEncoder(m, be), job, s)[0]
    log(f"frame 256², {steps} steps, batch 1:")
    rows = interleaved(calls, repeats, log)
    for name, row in rows.items():
        row["image"] = row.pop("output", None)
    for dt in dtypes[1:]:
        for who in ("diffusers", "torch"):
            a, b = rows[f"{who} {dt}"], rows[f"{who} fp32"]
            if a.get("image") is not None and b.get("image") is not None:
                a["psnr_vs_fp32"] = psnr(a["image"], b["image"])
                a["max_abs_diff_vs_fp32"] = int(np.abs(a["image"].astype(int) - b["image"].astype(int)).max())
                a["speedup_vs_fp32"] = b["seconds"]["median"] / a["seconds"]["median"]
    for row in rows.values():
        row.pop("image", None)
    return rows

def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = bench_parser("openvino_peer", __doc__, model="sd15-arch", steps=4, repeats=3, results="--results")
    ap.add_argument("--no-frames", action="store_true", help="only the GEMM ceilings and the UNet step")
    ap.add_argument("--force-bf16", action="store_true", help="time bf16 even without native bf16 (very slow)")
    ap.add_argument("--no-report", action="store_true", help="do not regenerate RESULTS.md")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    features = cpu.host_cpu()
    threads = cpu.usable_cores()
    torch.set_num_threads(threads)
    res: dict[str, Any] = {
        "format": CPU_PEER_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu_model": features.model, "tier": features.tier, "amx": features.amx,
                    "avx512_bf16": features.avx512_bf16, "torch_capability": features.torch_capability,
                    "threads": threads, "load_avg_start": load_average()},
        "settings": {"model": args.model, "size": "256x256", "cfg_batch": 2, "steps": args.steps,
                     "repeats": args.repeats},
        "versions": {"torch": torch.__version__}, "chosen_bf16_path": cpu.bf16_path(features).__dict__}
    log(f"{features.model}: {features.tier}, {threads} threads, load {load_average()}")
    res["gemm"] = {"fp32": gemm(torch.float32, 2048, 5)}
    # Emulated bf16 (no native bf16) is orders of magnitude slower: a smaller matrix says the same in seconds.
    res["gemm"]["bf16"] = gemm(torch.bfloat16, 2048 if features.native_bf16 else 512, 5 if features.native_bf16
                               else 2)
    for k, v in res["gemm"].items():
        log(f"{k} GEMM {v['n']}²: {v['flops_per_s'] / 1e9:.1f} GFLOP/s")
    bf16 = features.native_bf16 or args.force_bf16
    if not bf16:
        res["notes"] = [f"no native bf16 on this CPU ({features.tier}; no AMX): bf16 GEMM "
                        f"{res['gemm']['bf16']['flops_per_s'] / 1e9:.2f} GFLOP/s against fp32 "
                        f"{res['gemm']['fp32']['flops_per_s'] / 1e9:.0f}: bf16 model rows not run "
                        "(--force-bf16 runs them)"]
        log(res["notes"][0])
    path = resolve_model(args.model)
    model = load_model(path)
    res["unet_step"] = unet_rows(model, path, features, bf16, args.repeats, log)
    del model
    gc.collect()
    res["machine"]["load_avg_end"] = load_average()
    out = save_result(args.results, "cpu-peer", res)  # kept if the frames below are interrupted; rewritten after
    if not args.no_frames:
        res["frame"] = frame_rows(path, bf16, args.repeats, args.steps, log)
        mine = res["frame"].get("torch bf16", {})
        if "psnr_vs_fp32" in mine and features.native_bf16:
            cpu.record_bf16_measurement(features.model, mine["speedup_vs_fp32"], mine["psnr_vs_fp32"],
                                        f"{args.model} 256² {args.steps}-step frame",
                                        "python -m movielm_fast.bench.openvino_peer")
            log(f"stored for --dtype auto's hint: {cpu.measurements_file()}")
    res["machine"]["load_avg_end"] = load_average()
    atomic_write_text(out, json.dumps(res, indent=2) + "\n")
    log(f"results: {out}")
    if not args.no_report:
        log(f"report: {write_results_md(args.results, args.results.parent / 'RESULTS.md')}")
    return res


def cpu_peer_section(results: list[dict[str, Any]]) -> list[str]:
    """The CPU bf16 path beside OpenVINO and ONNX Runtime, latest run per CPU and model."""
    if not results:
        return []
    latest = {(res["machine"]["cpu_model"], res["settings"]["model"]): res for res in results}
    lines = ["## CPU bf16 against its peers (`python -m movielm_fast.bench.openvino_peer`)", "",
             "One process per CPU, rows interleaved; medians (min–max) over the repeats. UNet step: CFG batch 2, "
             "256² (32×32 latent), the same inputs for every row; *first call* includes any compile. The bf16 fast "
             "path's AMX entries are **to be confirmed on AMX** until a run below names an AMX CPU. "
             "On a loaded machine "
             "(see each run's load average) torch's OpenMP threads lose most to oversubscription: compare rows "
             "within one run, never across runs.", ""]
    for (model, _), res in latest.items():
        m, st = res["machine"], res["settings"]
        la0, la1 = m.get("load_avg_start"), m.get("load_avg_end")
        ability = "AMX" if m["amx"] else ("AVX-512-BF16" if m["avx512_bf16"]
                                          else f"{m['tier']}, no AMX, no native bf16")
        gemm = res["gemm"]
        lines += [f"### {model} ({ability}), {m['threads']} threads, {st['model']}, {res['created']}", "",
                  f"Load average {la0[0] if la0 else '?'} at the start, {la1[0] if la1 else '?'} at the end. "
                  f"GEMM ceilings (torch.matmul): fp32 {gemm['fp32']['flops_per_s'] / 1e9:.1f} GFLOP/s "
                  f"({gemm['fp32']['n']}²), bf16 {gemm['bf16']['flops_per_s'] / 1e9:.2f} GFLOP/s "
                  f"({gemm['bf16']['n']}²). Chosen `--dtype bf16` path here: {res['chosen_bf16_path']['why']}.", ""]
        lines += [f"- {n}" for n in res.get("notes", [])] + ([""] if res.get("notes") else [])
        fp32 = res["unet_step"].get("torch fp32 eager", {}).get("seconds", {}).get("median")
        lines += ["| UNet step | s | vs torch fp32 | first call s | max rel diff vs fp32 | note |",
                  "|---|---|---|---|---|---|"]
        for name, r in res["unet_step"].items():
            if r["status"] != "ok":
                lines.append(f"| {name} | {r['status']} | | | | {r.get('note', '')} |")
                continue
            sec = r["seconds"]
            lines.append(f"| {name} | {median_text(sec, True)} | {fp32 / sec['median']:.2f}× | "
                         f"{r['first_call_s']:.1f} | "
                         f"{r.get('max_rel_diff_vs_torch_fp32', 0):.1e} | {r.get('note', '')} |")
        if res.get("frame"):
            lines += ["", f"| {st['steps']}-step frame, batch 1 | s/frame | vs fp32 twin | PSNR vs fp32 | "
                      "max diff |", "|---|---|---|---|---|"]
            for name, r in res["frame"].items():
                if r["status"] != "ok":
                    lines.append(f"| {name} | {r['status']}: {r.get('note', '')} | | | |")
                    continue
                sp, ps = r.get("speedup_vs_fp32"), r.get("psnr_vs_fp32")
                lines.append(f"| {name} | {median_text(r['seconds'], True)} | "
                             f"{'–' if sp is None else f'{sp:.2f}×'} | "
                             f"{'–' if ps is None else f'{ps:.1f} dB'} | {r.get('max_abs_diff_vs_fp32', '–')} |")
        lines.append("")
    return lines


SECTIONS = (Section(CPU_PEER_FORMAT, cpu_peer_section),)


if __name__ == "__main__":
    main()
