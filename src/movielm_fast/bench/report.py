"""Result JSON -> CSV, plot, and bench/RESULTS.md.

    python -m movielm_fast.bench.report [--results bench/results] [--out bench/RESULTS.md]

RESULTS.md is generated from every benchmark JSON file in the results folder and is never edited by hand: to change
it, run the benchmark again (or delete a result file) and regenerate. One section per machine; a GPU section exists
only where a result was measured on a GPU.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from movielm_fast.paths import atomic_write_text

from .hardware import RESULTS

FORMAT = "movielm-bench/1"
BASELINE = "diffusers"
STAGES = ("text_encode", "unet_step", "vae_decode")

CSV_FIELDS = [
    "created", "machine", "device", "cpu_model", "gpu_model", "model", "dtype", "steps", "backend", "size", "batch",
    "status", "frame_s_min", "frame_s_median", "frame_s_max", "batch_s_median", "images_per_s", "unet_step_s_min",
    "unet_step_s_median", "unet_step_s_max", "unet_steps_per_s", "vae_decode_s_min", "vae_decode_s_median",
    "vae_decode_s_max", "text_encode_s_min", "text_encode_s_median", "text_encode_s_max", "speedup_vs_diffusers",
    "flops_frame", "flops_unet_step", "flops_vae_decode", "ceiling_flops_per_s", "achieved_flops_per_s_frame",
    "mfu_frame", "mfu_unet_step", "mfu_vae_decode", "peak_memory_mb", "memory_kind", "max_abs_diff_vs_diffusers",
    "psnr_vs_fp32", "max_abs_diff_vs_fp32", "image", "note"]


def _flops_of(result: dict[str, Any], run: dict[str, Any]) -> dict[str, int]:
    for c in result["configs"]:
        if c["size"] == run["size"] and c["batch"] == run["batch"]:
            return c["flops"]
    return {}


def csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    m, st = result["machine"], result["settings"]
    rows = []
    for run in result["runs"]:
        row: dict[str, Any] = {
            "created": result["created"], "machine": m["slug"], "device": m["device"], "cpu_model": m["cpu_model"],
            "gpu_model": m.get("gpu_model"), "model": st["model"], "dtype": st["dtype"], "steps": st["steps"],
            "backend": run["backend"], "size": run["size"], "batch": run["batch"], "status": run["status"],
            "note": run.get("note", ""), "ceiling_flops_per_s": run.get("ceiling_flops_per_s")}
        flops = _flops_of(result, run)
        row.update(flops_frame=flops.get("frame"), flops_unet_step=flops.get("unet_step"),
                   flops_vae_decode=flops.get("vae_decode"))
        if run["status"] == "ok":
            stages = run["stages"]
            for key in ("frame",) + STAGES:
                if key in stages:
                    for q in ("min", "median", "max"):
                        row[f"{key}_s_{q}"] = stages[key][q]
            row.update(batch_s_median=stages["batch"]["median"], images_per_s=run["images_per_s"],
                       unet_steps_per_s=run.get("unet_steps_per_s"),
                       speedup_vs_diffusers=run.get("speedup_vs_diffusers"),
                       achieved_flops_per_s_frame=run["achieved_flops_per_s"]["frame"],
                       mfu_frame=run["mfu"]["frame"], mfu_unet_step=run["mfu"].get("unet_step"),
                       mfu_vae_decode=run["mfu"].get("vae_decode"), peak_memory_mb=run["memory"]["peak_mb"],
                       memory_kind=run["memory"]["kind"],
                       max_abs_diff_vs_diffusers=run.get("max_abs_diff_vs_diffusers"), image=run.get("image"),
                       psnr_vs_fp32=run.get("psnr_vs_fp32"), max_abs_diff_vs_fp32=run.get("max_abs_diff_vs_fp32"))
            if "dtype" in run:  # an entry run in another dtype than the run's (torch+dtype=bf16)
                row["dtype"] = run["dtype"]
        rows.append(row)
    return rows


def write_csv(result: dict[str, Any], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="raise")
    writer.writeheader()
    writer.writerows(csv_rows(result))
    atomic_write_text(Path(path), buf.getvalue())
    return Path(path)


def write_plot(result: dict[str, Any], path: Path) -> Path | None:
    """Throughput vs batch size per backend (left) and where one batch's time goes (right). None without
    matplotlib, which the project does not require."""
    try:  # optional dependency (the bench extra)
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window, work on headless machines
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in result["runs"] if r["status"] == "ok"]
    st, m = result["settings"], result["machine"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.4]})
    for key in sorted({(r["backend"], r["size"]) for r in ok}):
        runs = sorted((r for r in ok if (r["backend"], r["size"]) == key), key=lambda r: r["batch"])
        left.plot([r["batch"] for r in runs], [r["images_per_s"] for r in runs], marker="o",
                  linestyle="--" if key[0] == BASELINE else "-", label=f"{key[0]} {key[1]}")
    left.set_xlabel("batch size (frames)")
    left.set_ylabel("images / s (median)")
    batches = sorted({r["batch"] for r in ok})
    left.set_xscale("log", base=2)
    left.set_xticks(batches, [str(b) for b in batches])
    left.set_ylim(bottom=0)
    left.set_title("throughput vs batch size")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    # Stage breakdown of one batch, per frame: text + steps x UNet step + VAE decode; "other" is what remains of
    # the end-to-end time (scheduler, latents, copies). diffusers is shown as one bar: its stages are not timed.
    labels = []
    parts: dict[str, list[float]] = {"text": [], "UNet (all steps)": [], "VAE decode": [], "other": [],
                                     "diffusers, end to end": []}
    for r in sorted(ok, key=lambda r: (r["size"], r["batch"], r["backend"] != BASELINE, r["backend"])):
        s, b = r["stages"], r["batch"]
        frame = s["frame"]["median"]
        labels.append(f"{r['backend']} {r['size']} b{b}")
        if "unet_step" in s:
            text, unet, vae = (s["text_encode"]["median"] / b, st["steps"] * s["unet_step"]["median"] / b,
                               s["vae_decode"]["median"] / b)
            vals = [text, unet, vae, max(frame - text - unet - vae, 0.0), 0.0]
        else:
            vals = [0.0, 0.0, 0.0, 0.0, frame]
        for k, v in zip(parts, vals):
            parts[k].append(v)
    y = list(range(len(labels)))
    start = [0.0] * len(labels)
    for k, vals in parts.items():
        right.barh(y, vals, left=start, label=k, color="0.6" if k.startswith("diffusers") else None)
        start = [a + v for a, v in zip(start, vals)]
    right.set_yticks(y, labels, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("seconds per frame (median)")
    right.set_title("stage breakdown")
    right.legend(fontsize=8)
    fig.suptitle(f"{st['model']} {st['dtype']} {st['steps']} steps on {m.get('gpu_model') or m['cpu_model']} "
                 f"({m['slug']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# --- RESULTS.md --------------------------------------------------------------------------------------------------
def load_results(results_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every benchmark result in the folder, oldest first; other JSON files there (kernel timings) are ignored."""
    out = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == FORMAT:
            out.append((path, data))
    return sorted(out, key=lambda pr: (pr[1]["created"], pr[0].name))


def _t(s: dict[str, Any] | None, rng: bool = False) -> str:
    if not s:
        return "–"
    med = s["median"]
    digits = 3 if med < 10 else 1
    return f"{med:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})" if rng else f"{med:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _flops_rate(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def _libraries(ceil: dict[str, Any]) -> str:
    libs = ceil.get("libraries")
    if not libs:
        return ""
    return ", fastest of " + ", ".join(f"{k} {_flops_rate(v)}" for k, v in libs.items()) if len(libs) > 1 \
        else f", {next(iter(libs))}"


def _ceiling_range(res: dict[str, Any]) -> str:
    """The ceiling MFU is computed against, and the range of all measurements of it in the run."""
    seen = [res["ceiling"]["flops_per_s"]["median"]] + \
        [c["ceiling_flops_per_s"]["median"] for c in res["configs"] if "ceiling_flops_per_s" in c] + \
        ([res["ceiling_end"]["flops_per_s"]["median"]] if res.get("ceiling_end") else [])
    used = res.get("mfu_ceiling_flops_per_s", max(seen))
    return (f"{_flops_rate(used)} (the highest of {len(seen)} measurements in this run, "
            f"{_flops_rate(min(seen))}–{_flops_rate(max(seen))}; MFU is computed against it)")


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per size: our fastest configuration (any backend, any batch) against diffusers' fastest, by images/s."""
    rows = []
    ok = [r for r in result["runs"] if r["status"] == "ok"]
    for size in dict.fromkeys(r["size"] for r in ok):
        ours = [r for r in ok if r["size"] == size and r["backend"] != BASELINE]
        base = [r for r in ok if r["size"] == size and r["backend"] == BASELINE]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["images_per_s"])
        ref = max(base, key=lambda r: r["images_per_s"]) if base else None
        rows.append({"size": size, "best": best, "diffusers": ref,
                     "speedup": best["images_per_s"] / ref["images_per_s"] if ref else None})
    return rows


def _describe(m: dict[str, Any]) -> str:
    if m["device"] == "cuda":
        return f"{m['gpu_model']} ({m['gpu_memory_gb']} GB), CUDA {m.get('cuda')}, host {m['cpu_model']}"
    return (f"{m['cpu_model']}, {m['cpu_cores_logical']} logical cores ({m['cpu_cores_physical']} physical), "
            f"{m['torch_threads']} torch threads, {m['ram_gb']} GB RAM")


def render_results_md(results: list[tuple[Path, dict[str, Any]]], md_dir: Path) -> str:
    def rel(p: Path) -> str:
        return Path(os.path.relpath(Path(p).resolve(), Path(md_dir).resolve())).as_posix()

    lines = ["# Benchmark results", "",
             "Generated by `python -m movielm_fast.bench.report` from the JSON files in `bench/results/` — "
             "do not edit by hand; "
             "re-run `movielm-fast bench` (or `python -m movielm_fast.bench.gpu` on a GPU machine) and regenerate.", "",
             "Protocol (`bench/runner.py`): warm-up, then each figure is the median over the repeats (min–max in "
             "brackets), device work synchronized. *vs diffusers* is diffusers' own StableDiffusion(XL)Pipeline "
             "with the same components, scheduler, steps, size, batch and seeds, measured in the same run; "
             "*MFU* is achieved FLOP/s (FlopCounterMode count: matmuls, convolutions, attention) over the matmul "
             "ceiling measured in the same run (a large GEMM in the same dtype; the highest of its measurements, "
             "so on a loaded machine MFU errs low). MFU above 100% is possible: the ceiling is a measured GEMM, not "
             "a data-sheet peak, and some convolution kernels (oneDNN's, ONNX Runtime's NCHWc) run closer to the "
             "hardware peak than a GEMM does. *frame* = end to end per frame "
             "(batch time / batch size), text encoding included. *Δ vs diffusers*: largest pixel difference (0–255) "
             "between our image and diffusers' for the same seed — small means both did the same work. *peak mem*: "
             "on CPU the whole process's resident set (every backend's copy of the model is loaded at once), on "
             "CUDA torch's peak allocated memory. "
             "Models named `*-arch` have the real architecture "
             "with random weights: right for timing, their images are noise.", ""]
    if not results:
        lines += ["No results yet.", ""]
        return "\n".join(lines)
    lines += ["## Headline", "",
              "Per machine, model and size, from the latest run: our fastest configuration against diffusers' "
              "fastest (images/s, each at its best batch size).", "",
              "| machine | model | dtype | size | steps | ours (backend, batch) | s/frame | diffusers s/frame | "
              "speed-up | MFU frame | MFU UNet step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    latest: dict[tuple, tuple[Path, dict]] = {}
    for path, res in results:
        latest[(res["machine"]["slug"], res["settings"]["model"], res["settings"]["dtype"])] = (path, res)
    for (slug, model, dtype), (path, res) in latest.items():
        for h in headline(res):
            b, ref = h["best"], h["diffusers"]
            speedup = "–" if h["speedup"] is None else f"{h['speedup']:.2f}×"
            lines.append(
                f"| {slug} | {model} | {dtype} | {h['size']} | {res['settings']['steps']} | {b['backend']}, "
                f"b{b['batch']} | {_t(b['stages']['frame'])} | {_t(ref['stages']['frame']) if ref else '–'} | "
                f"{speedup} | {_pct(b['mfu']['frame'])} | {_pct(b['mfu'].get('unet_step'))} |")
    lines.append("")
    machines: dict[str, list[tuple[Path, dict]]] = {}
    for path, res in results:
        machines.setdefault(res["machine"]["slug"], []).append((path, res))
    # CPU machines first; a GPU section exists only where something was measured on a GPU.
    for slug, items in sorted(machines.items(), key=lambda kv: (kv[1][0][1]["machine"]["device"] != "cpu", kv[0])):
        m = items[-1][1]["machine"]
        lines += [f"## {slug} ({'GPU' if m['device'] == 'cuda' else 'CPU'})", "", _describe(m), ""]
        for path, res in items:
            st, ceil = res["settings"], res["ceiling"]
            git = res["machine"].get("git", {})
            v = res["machine"].get("versions", {})
            lines += [
                f"### {path.stem}: {st['model']}, {st['dtype']}, {st['steps']} steps, {st['scheduler']}, "
                f"guidance {st['guidance']}", "",
                f"Repeats: {st['repeats']} after {st['warmup']} warm-up; matmul ceiling ({ceil['dtype']}, "
                f"{ceil['n']}² GEMM, median{_libraries(ceil)}) {_ceiling_range(res)}; "
                f"torch {v.get('torch')}, diffusers {v.get('diffusers')}"
                + (f", onnxruntime {v['onnxruntime']}" if v.get("onnxruntime") else "")
                + f"; commit {str(git.get('commit'))[:10]}{' (uncommitted changes)' if git.get('dirty') else ''}"
                + ("" if res.get("complete") else "; **incomplete run**") + ".", ""]
            load = [res["machine"].get("load_avg_start"), res["machine"].get("load_avg_end")]
            if m["device"] == "cpu" and all(load):
                lines += [f"Load average (1/5/15 min) {'/'.join(map(str, load[0]))} at the start, "
                          f"{'/'.join(map(str, load[1]))} at the end, on "
                          f"{res['machine']['cpu_cores_logical']} cores: other work shared the CPU, so absolute "
                          "times are noisy; ratios come from interleaved repeats in the same run.", ""]
            wip = {b: src for b, src in res.get("backend_sources", {}).items() if src.get("git") != "committed"}
            if wip:
                lines += ["Measured on uncommitted code: " + "; ".join(f"{b} ({src['file']}: {src['git']})"
                                                                      for b, src in wip.items()), ""]
            if res.get("skipped"):
                lines += ["Skipped: " + "; ".join(f"{s['backend']} ({s['reason']})" for s in res["skipped"]), ""]
            lines += ["| backend | size | batch | s/frame | images/s | UNet step s | UNet steps/s | VAE decode s | "
                      "text s | vs diffusers | MFU UNet | MFU VAE | MFU frame | peak mem MB | Δ vs diffusers | "
                      "image |", "|" + "---|" * 16]
            for r in res["runs"]:
                if r["status"] != "ok":
                    lines.append(f"| {r['backend']} | {r['size']} | {r['batch']} | {r['status']}: "
                                 f"{r.get('note', '')} |" + " |" * 12)
                    continue
                s, mfu = r["stages"], r["mfu"]
                sp = r.get("speedup_vs_diffusers")
                diff = r.get("max_abs_diff_vs_diffusers")
                if "psnr_vs_fp32" in r:  # a bf16/fp16 row: its precision's cost against our fp32 row, same seeds
                    diff = f"{'–' if diff is None else diff}; {r['dtype']} vs fp32: {r['psnr_vs_fp32']:.1f} dB, " \
                           f"max {r['max_abs_diff_vs_fp32']}"
                steps_per_s = f"{r['unet_steps_per_s']:.2f}" if "unet_steps_per_s" in r else "–"
                mem = f"{r['memory']['peak_mb']:.0f} ({'RSS' if r['memory']['kind'] == 'cpu_peak_rss' else 'alloc'})"
                # Images kept beside the JSON are linked; a run whose images were not kept links none.
                shot = path.parent / r["image"] if r.get("image") else None
                image = f"[png]({rel(shot)})" if shot and shot.exists() else ""
                cells = [r["backend"], r["size"], r["batch"], _t(s["frame"], True), f"{r['images_per_s']:.3f}",
                         _t(s.get("unet_step"), True), steps_per_s, _t(s.get("vae_decode"), True),
                         _t(s.get("text_encode"), True), "–" if sp is None else f"{sp:.2f}×",
                         _pct(mfu.get("unet_step")), _pct(mfu.get("vae_decode")), _pct(mfu["frame"]), mem,
                         "–" if diff is None else diff, image]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
            plot = path.with_suffix(".png")
            if plot.exists():
                lines += ["", f"Plot: [{plot.name}]({rel(plot)})"]
            lines.append("")
    if not any(res["machine"]["device"] == "cuda" for _, res in results):
        lines += ["No GPU results yet: run `python -m movielm_fast.bench.gpu` on a CUDA machine and regenerate.", ""]
    return "\n".join(lines)


def short_table(results: list[dict[str, Any]]) -> str:
    """A few columns per run, fixed width, for the end of a terminal session."""
    head = f"{'model':<10} {'backend':<12} {'size':<9} {'batch':>5} {'s/frame':>9} {'img/s':>8} {'UNet it/s':>9} " \
           f"{'vs diffusers':>12} {'MFU UNet':>8} {'MFU frame':>9}"
    lines = [head, "-" * len(head)]
    for res in results:
        for r in res["runs"]:
            if r["status"] != "ok":
                lines.append(f"{res['settings']['model']:<10} {r['backend']:<12} {r['size']:<9} {r['batch']:>5} "
                             f"{r['status']}")
                continue
            sp = r.get("speedup_vs_diffusers")
            its = r.get("unet_steps_per_s")
            lines.append(
                f"{res['settings']['model']:<10} {r['backend']:<12} {r['size']:<9} {r['batch']:>5} "
                f"{r['stages']['frame']['median']:>9.4f} {r['images_per_s']:>8.3f} "
                f"{'–' if its is None else f'{its:.2f}':>9} {'–' if sp is None else f'{sp:.2f}x':>12} "
                f"{_pct(r['mfu'].get('unet_step')):>8} {_pct(r['mfu']['frame']):>9}")
    return "\n".join(lines)


HOST_FORMAT = "movielm-bench-host/1"
BOUNDARY_FORMAT = "movielm-bench-host-boundaries/1"
CPU_PEER_FORMAT = "movielm-bench-cpu-peer/1"
CONSISTENCY_FORMAT = "movielm-bench-consistency/1"
REGRESSION_FORMAT = "movielm-bench-regression/1"
LORA_FORMAT = "movielm-bench-lora/1"
VAE_FORMAT = "movielm-bench-vae-decode/1"
FP16_RANGE_FORMAT = "movielm-bench-fp16-range/1"
TOY_FORMAT = "movielm-bench-toy-quality/1"
STEP_CACHE_FORMAT = "movielm-step-cache-v1"
STARTUP_FORMAT = "movielm-fast-startup-v1"
SERVE_FORMAT = "movielm-bench-serve/1"
LOSSY_ARCH_FORMAT = "movielm-bench-lossy-arch/1"


def save_result(results_dir: Path, prefix: str, result: dict[str, Any]) -> Path:
    """A small benchmark's result as results_dir/<prefix>-<stamp>.json (atomically); prints and returns the path."""
    path = Path(results_dir) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(path)
    return path


def load_other(results_dir: Path, fmt: str) -> list[dict[str, Any]]:
    """Results of the smaller benchmarks (bench/host.py, bench/consistency.py), oldest first."""
    out = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == fmt:
            out.append(data)
    return sorted(out, key=lambda d: d["created"])


def _load(res: dict[str, Any]) -> str:
    la = res.get("load_average") or {}
    start, end = la.get("start"), la.get("end")
    return f"load average {start[0]:.2f} at the start, {end[0]:.2f} at the end" if start and end else ""


def host_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, m = res["settings"], res["machine"]
    lines = ["## Host-side throughput (`python -m movielm_fast.bench.host`)", "",
             f"The real engine on the zero-cost `null` backend: {st['frames']} frames per case"
             f"{', the median of %d interleaved runs' % st['repeats'] if st.get('repeats', 1) > 1 else ''}, "
             f"{st['steps']} "
             f"{st['scheduler']} steps, batch {st['batch']}, torch threads {st.get('torch_threads')}; "
             f"{m['cpu_model']}, "
             f"{m['cpu_cores_logical']} logical cores; {_load(res)}; {res['created']}. *render thread*: the render "
             "loop's time minus its waits for a free writer slot, per frame (what a GPU would wait for); *end to "
             "end*: frames over the whole run (planning, the write drain and the storyboard included). Sequential = "
             "every file written on the render thread (writer threads 0), pipelined = the write stage on its "
             "threads; *same files*: frames and storyboard byte-identical, manifests equal but for timings.", "",
             "| size | format | writer threads | render thread ms/frame | end to end frames/s | same files | "
             "split ms/frame (prompt, latents, scheduler, decode · pixels, encode, hash, write, manifest, "
             "storyboard) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        sp = r["split_ms_per_frame"]
        split = ", ".join(f"{sp[k]:g}" for k in ("prompt", "latents", "scheduler", "decode")) + " · " + \
            ", ".join(f"{sp[k]:g}" if k in sp else "–" for k in (
                "pixels", "encode", "hash", "write", "manifest", "storyboard"))
        lines.append(f"| {r['size']} | {r['format']} | {r['writer_threads']} | {r['render_thread_ms_per_frame']:.1f} "
                     f"| {r['frames_per_s']:.1f} | {'yes' if r['same_files_as_sequential'] else 'NO'} | {split} |")
    return lines + [""]


def boundary_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, m = res["settings"], res["machine"]
    lines = ["## Movie boundaries on the render thread (`python -m movielm_fast.bench.host --movies N`)", "",
             f"{st['movies']} movies of {st['frames_per_movie']} frames, batch {st['batch']}, {st['steps']} steps, "
             f"null backend, {st['writer_threads']} writer threads, the median of {st['repeats']} runs; "
             f"{m['cpu_model']}, {m['cpu_cores_logical']} logical cores; {_load(res)}; {res['created']}. *gap*: the "
             "render thread's time between one batch and the next (a GPU's idle time there), after a batch that "
             "completes a movie vs after the others: its own CPU time (work on the render thread) and wall time "
             "(with its waits for a free writer slot, which on 2 cores dominate).", "",
             "| size | format | batch CPU ms | gap CPU ms at a boundary / elsewhere | excess CPU ms per boundary | "
             "gap wall ms at a boundary / elsewhere | frames/s |", "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['size']} | {r['format']} | {r['batch_cpu_ms']} | {r['gap_cpu_ms_at_boundary']} / "
                     f"{r['gap_cpu_ms_elsewhere']} | {r['excess_cpu_ms_per_boundary']} | "
                     f"{r['gap_wall_ms_at_boundary']} / {r['gap_wall_ms_elsewhere']} | {r['frames_per_s']} |")
    return lines + [""]


def consistency_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, m = res["settings"], res["machine"]
    lines = ["## Consistent characters: cost (`python -m movielm_fast.bench.consistency`)", "",
             f"{st['model']}, {st['size']}², {st['steps']} steps, batch {st['batch']}, guidance {st['guidance']}, "
             f"fp32 on {m['cpu_model']} ({m['cpu_cores_logical']} cores); medians over {st['repeats']} interleaved "
             f"repeats of {st['frames']} frames; {_load(res)}; {res['created']}. Anchors were rendered beforehand "
             f"(each {res['anchor_seconds']:.2f} s, once per character and worker); the record takes "
             f"{res['record_mb_per_character']} MB per character.", "",
             "| case | s/frame | vs plain |", "|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['case']} | {r['seconds_per_frame']:.3f} | {r['vs_plain']:.2f}× |")
    return lines + [""]


def regression_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, m, med = res["settings"], res["machine"], res["median_seconds_per_frame"]
    lines = ["## A real CPU render against an earlier revision (`python -m movielm_fast.bench.regression`)", "",
             f"{st['model']}, {st['size']}², {st['steps']} steps, batch 1, fp32 on {m['cpu_model']} "
             f"({m['cpu_cores_logical']} cores); revision {st['base']} and this tree in alternating order, each run a "
             f"fresh process rendering {st['frames']} frames; medians over {st['rounds']} rounds; {_load(res)}; "
             f"{res['created']}.", "",
             "| code | render s/frame (median) | runs (s/frame) |", "|---|---|---|"]
    for side in ("base", "head"):
        runs = ", ".join(f"{r['render_seconds_per_frame']:.3f}" for r in res["runs"][side])
        lines.append(f"| {st['base'] if side == 'base' else 'this tree'} | {med[side]:.3f} | {runs} |")
    return lines + ["", f"This tree / base: **{res['head_over_base']:.3f}**.", ""]


def lora_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, m = res["settings"], res["machine"]
    lines = ["## LoRA: per-frame cost, switching sets, ONNX Runtime without re-export "
             "(`python -m movielm_fast.bench.lora`)", "",
             f"{st['model']}, {st['size']}², {st['steps']} steps, batch {st['batch']}, guidance {st['guidance']}, "
             f"fp32 on {m['cpu_model']} ({m['cpu_cores_logical']} cores); LoRA: {st['lora']} at scale 0.8; medians "
             f"over {st['repeats']} interleaved repeats of {st['frames']} frames; {_load(res)}; {res['created']}. "
             "*switch*: the backend's `set_loras` alone (torch: merge in place / restore from the kept copies; "
             "ONNX Runtime: new sessions of the affected components with overridden initializers). ONNX Runtime: "
             f"exporting every component took **{res['onnx_export_seconds']:.1f} s**, creating the sessions from "
             f"the cached artifacts {res['onnx_sessions_seconds']:.2f} s.", "",
             "| backend | plain s/frame | with LoRA s/frame | ratio | switch plain → A | A → B | B → plain |",
             "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        sw = r["switch_seconds"]
        lines.append(f"| {r['backend']} | {r['plain_seconds_per_frame']:.3f} | {r['lora_seconds_per_frame']:.3f} | "
                     f"{r['lora_vs_plain']:.2f}× | {sw['plain -> A']:.3f} s | {sw['A -> B']:.3f} s | "
                     f"{sw['B -> plain']:.3f} s |")
    return lines + [""]


def vae_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, m = res["settings"], res["machine"]
    lines = ["## VAE swap: decode cost (`python -m movielm_fast.bench.vae_decode`)", "",
             f"Decode of one {st['size']}² frame (batch {st['batch']}, {st['dtype']}, {st['device']}, "
             f"{st['threads']} threads) through the `--vae` path, real architectures with random weights; medians of "
             f"{st['repeats']} interleaved repeats on {m['cpu_model']} ({m['cpu_cores_logical']} cores); {_load(res)}; "
             f"{res['created']}.", "", "| decoder | s/frame | vs AutoencoderKL |", "|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['decoder']} | {r['seconds_per_frame']:.4f} | {r['vs_autoencoder_kl']:.3f}× |")
    return lines + [""]


def cpu_peer_section(results: list[dict[str, Any]]) -> list[str]:
    """bench/openvino_peer.py: the CPU bf16 path beside OpenVINO and ONNX Runtime, latest run per CPU and model."""
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
            lines.append(f"| {name} | {_t(sec, True)} | {fp32 / sec['median']:.2f}× | {r['first_call_s']:.1f} | "
                         f"{r.get('max_rel_diff_vs_torch_fp32', 0):.1e} | {r.get('note', '')} |")
        if res.get("frame"):
            lines += ["", f"| {st['steps']}-step frame, batch 1 | s/frame | vs fp32 twin | PSNR vs fp32 | "
                      "max diff |", "|---|---|---|---|---|"]
            for name, r in res["frame"].items():
                if r["status"] != "ok":
                    lines.append(f"| {name} | {r['status']}: {r.get('note', '')} | | | |")
                    continue
                sp, ps = r.get("speedup_vs_fp32"), r.get("psnr_vs_fp32")
                lines.append(f"| {name} | {_t(r['seconds'], True)} | {'–' if sp is None else f'{sp:.2f}×'} | "
                             f"{'–' if ps is None else f'{ps:.1f} dB'} | {r.get('max_abs_diff_vs_fp32', '–')} |")
        lines.append("")
    return lines


def _rate(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def toy_quality_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    # Checks may run in separate processes (--checks): each part comes from the newest result that has it, for
    # the newest model measured.
    res = dict(results[-1])
    same_model = [r for r in results if r["settings"]["model_hash"] == res["settings"]["model_hash"]]
    for key in ("conditioning", "phrasing", "style", "consistency", "image"):
        for r in reversed(same_model):
            if key in r:
                res[key] = r[key]
                break
    # Lossy cases may be measured a few at a time (--lossy-cases): those against the same reference (steps,
    # captions) form one table, the newest measurement of each case winning.
    lossy: dict[tuple, dict[str, Any]] = {}
    for r in same_model:
        if "lossy" in r:
            part = r["lossy"]
            key = (r["settings"]["steps"], part.get("captions"), part["fp32_conditioning"])
            lossy.setdefault(key, {**part, "steps": key[0], "cases": {}})["cases"].update(part["cases"])
    st, m = res["settings"], res["machine"]
    lines = ["## The toy demo model: what its images mean (`python -m movielm_fast.bench.toy_quality`)", "",
             f"Model {st['model']} (hash {st['model_hash']}), {st['size']}², {st['steps']} {st['scheduler']} steps, "
             f"guidance {st['guidance']}, fp32 unless stated, on {m['cpu_model']}; read back by the analytic judge "
             f"(`bench/toy/judge.py`); {_load(res)}; {res['created']}."]
    if "image" in res:
        lines += ["", f"![first 16 held-out captions](results/{res['image']})"]
    c = res.get("conditioning")
    if c:
        r, t = c["rates"], c["judge_on_ground_truth"]
        lines += ["", f"**Conditioning** on {r['images']} held-out captions (layouts never trained on): background "
                  f"and every named shape's colour at its named position right in **{_rate(r['conditioning'])}** of "
                  "the images (the issue's bar: 80%).", "",
                  "| rate | model | world's own images |", "|---|---|---|"]
        for k in ("conditioning", "strict", "background", "style", "colour_at_position", "shape_at_position",
                  "size_at_position", "empty_positions"):
            lines.append(f"| {k.replace('_', ' ')} | {_rate(r[k])} | {_rate(t[k])} |")
    ph = res.get("phrasing")
    if ph:
        lines += ["", "**Phrasing** the model never trained on (`bench/toy/phrasing.py`: hand-written sentence forms, "
                  "and the issue's eight captions), frames of a style-plain plan; each attribute as the judge reads "
                  "it:", "", "| captions | images | conditioning | background | colour | shape | size | empty |",
                  "|---|---|---|---|---|---|---|---|"]
        names = {"held_out": "held-out forms", "held_out_scenes_as_world_captions": "the same scenes, world.caption",
                 "issue": "the issue's eight"}
        for k, label in names.items():
            if k in ph:
                r = ph[k]["rates"]
                lines.append(f"| {label} | {r['images']} | {_rate(r['conditioning'])} | {_rate(r['background'])} | "
                             f"{_rate(r['colour_at_position'])} | {_rate(r['shape_at_position'])} | "
                             f"{_rate(r['size_at_position'])} | {_rate(r['empty_positions'])} |")
    sty = res.get("style")
    if sty:
        lines += ["", f"**Style immobilization**: token {sty['token']} learned by the engine's trainer from "
                  f"{sty['images']} neon scenes ({sty['steps']} steps, {sty['train_seconds']} s), each with a caption "
                  "file of what it shows that never says neon; held-out captions without a style word (the first "
                  f"{sty.get('captions', 'few')}):", "",
                  "| prompt | judged neon | conditioning (style ignored) |", "|---|---|---|"]
        for k in ("without token", "with token", "with the words 'neon style'"):
            lines.append(f"| {k} | {_rate(sty[k]['judged_neon'])} | {_rate(sty[k]['conditioning_ignoring_style'])} |")
    con = res.get("consistency")
    if con:
        lines += ["", "**Consistency**: a movie of 8 frames whose three characters change places and backgrounds "
                  "(over one or more movie seeds); each appearance judged at its named place:", "",
                  "| consistency mode | appearances | colour right | colour and shape right |", "|---|---|---|---|"]
        for k, v in con.items():
            lines.append(f"| {k} | {v['character_appearances']} | {_rate(v['colour_at_position'])} | "
                         f"{_rate(v['colour_and_shape_at_position'])} |")
    for lossy in sorted(lossy.values(), key=lambda x: x["steps"]):
        lines += ["", f"**Lossy options** against fp32 DPM++ {lossy['steps']} steps (conditioning "
                  f"{_rate(lossy['fp32_conditioning'])}) on the same held-out captions and seeds (the first "
                  f"{lossy.get('captions', 'few')}):", "",
                  "| option | conditioning | change | same reading as fp32 | max / mean pixel diff | PSNR / SSIM |",
                  "|---|---|---|---|---|---|"]
        for k, v in lossy["cases"].items():
            if "error" in v:
                lines.append(f"| {k} | does not run: {v['error']} | | | | |")
            else:
                lines.append(f"| {k} | {_rate(v['conditioning'])} | {100 * v['delta_vs_fp32']:+.0f} points | "
                             f"{_rate(v['same_reading_as_fp32'])} | {v['max_abs_pixel_diff']} / "
                             f"{v['mean_abs_pixel_diff']} | " + (f"{v['psnr_db_vs_fp32']} dB / {v['ssim_vs_fp32']}"
                                                                 if "psnr_db_vs_fp32" in v else "—") + " |")
    return lines + [""]


def step_cache_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, demo = res["settings"], res["demo"]
    lines = ["## Step caching: FLOPs, time, pixels (`python -m movielm_fast.bench.step_cache`)", "",
             f"`--step-cache {st['interval']}` (a full UNet step every {st['interval']}, the shallow blocks only in "
             f"between), branch depth {st['depth']}, {st['steps']} steps; {res['machine']['cpu_model']}, torch threads "
             f"{st['threads']}; {_load(res)}; {res['created']}. FLOPs counted by torch's FlopCounterMode on the meta "
             "device at CFG batch 2.", "",
             "| model | full step TFLOP | cached step TFLOP | UNet FLOPs of the render, uncached / cached |",
             "|---|---|---|---|"]
    for name, f in res["flops"].items():
        d = f["depths"][str(st["depth"])]
        lines.append(f"| {name} | {f['full_step_tflop']:.3f} | {d['cached_step_tflop']:.3f} | "
                     f"**{d['render_flops_ratio']:.2f}×** |")
    cond = demo["judge_conditioning"]
    lines += ["", f"The toy demo model, {demo['frames']} held-out captions, medians of {demo['repeats']} interleaved "
              f"rounds: UNet time **{demo['unet_time_ratio']:.2f}×** shorter, whole render "
              f"{demo['render_time_ratio']:.2f}×; PSNR {demo['psnr_db']} dB, SSIM {demo['ssim']} against the uncached "
              f"frames (max pixel difference {demo['max_abs_pixel_diff']}/255); judged conditioning "
              f"{_rate(cond['uncached'])} uncached, {_rate(cond['cached'])} cached."]
    arch = res.get("sd15_arch_time")
    if arch:
        lines += ["", f"{arch['model']}: a full step {arch['full_step_seconds']} s, a cached step "
                  f"{arch['cached_step_seconds']} s (medians of {arch['repeats']}): a {st['steps']}-step render "
                  f"{arch['render_time_ratio']:.2f}× shorter in UNet time."]
    return lines + [""]


def startup_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    best = min(res["runs"], key=lambda r: r["first_frame_seconds"])
    phases = (best.get("startup") or {}).get("phases", {})
    ff, tot = res["first_frame_seconds"], res["total_seconds"]
    lines = ["## Time to first frame (`python -m movielm_fast.bench.startup`)", "",
             f"`movielm-fast render {res['plan']} {' '.join(res['render_args'])}` as a fresh process, "
             f"{len(res['runs'])} timed runs after an untimed one; {res['cpu_count']} CPUs, load average "
             f"{res['load_avg'][0]:.2f} at the start; {res['created']}. Process start to the first frame file on "
             f"disk: **best {ff['best']:.2f} s**, median {ff['median']:.2f} s; whole run best {tot['best']:.2f} s.",
             "", "Phases of the best run (seconds, as the run's own `--json` reports them):", "",
             "| " + " | ".join(phases) + " |", "|" + "---|" * len(phases),
             "| " + " | ".join(f"{v:.2f}" for v in phases.values()) + " |"]
    return lines + [""]


def serve_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    firsts = ", ".join(f"{p['first_frame_seconds']:.2f}" for p in res["plans"])
    dones = ", ".join(f"{p['done_seconds']:.2f}" for p in res["plans"])
    return ["## A warm server (`python -m movielm_fast.bench.serve`)", "",
            f"`movielm-fast serve --model {res['model']} --device {res['device']}` on 127.0.0.1, then "
            f"{len(res['plans'])} copies of `{res['plan']}` ({res['plans'][0]['frames']} frames each) POSTed one "
            f"after another; {res['cpu_count']} CPUs; {_load(res)}; {res['created']}. The server answered /health "
            f"{res['server_ready_seconds']:.2f} s after its process started (the model load every `render` pays). "
            f"Submission to the plan's first frame file on disk: **{firsts} s**; to the plan done: {dones} s.", ""]


def fp16_range_section(results: list[dict[str, Any]]) -> list[str]:
    """The latest fp16-range result per (model, dtype, device): which component's activations leave fp16's range."""
    latest = {(r["settings"]["model"], r["settings"].get("dtype", "fp32"), r["machine"].get("device", "cpu")): r
              for r in results}
    if not latest:
        return []
    lines = ["## fp16 range: the largest activation per component (`python -m movielm_fast.bench.fp16_range`)", "",
             "diffusers' pipeline run once with a forward hook on every module, in fp32, or in fp16 with "
             "`--dtype fp16` "
             "(then also once in fp32 without hooks, for the PSNR of its fp16 image); *over*: modules whose output "
             "passed 65504 (fp16 overflows there), *near*: within "
             "2x of it; *first*: the first such module in call order (where an overflow starts); *inf/NaN*: modules "
             "whose output held one (a low-precision run)."]
    for (model, dtype, device), res in sorted(latest.items()):
        st = res["settings"]
        lines += ["", "| model | run | size, steps | component | max \\|activation\\| | over | near | inf/NaN | "
                  "first over (or near) |", "|---|---|---|---|---|---|---|---|---|"]
        for p in res["components"]:
            first = (p["first_over"] or p["first_near"] or [None])[0]
            where = f"`{first['module']}` ({first['class']}, {first['max_abs']:.3g})" if first else "–"
            lines.append(f"| {model} | {dtype}, {device} | {st['size']}², {st['steps']} {st['scheduler']} | "
                         f"{p['component']} | {p['max_abs']:.3g} | {p['over_fp16']} | {p['near_fp16']} | "
                         f"{p.get('nonfinite', '–')} | {where} |")
        said = f"; its image {res['psnr_vs_fp32']} dB from diffusers' fp32 one" if res.get("psnr_vs_fp32") else ""
        lines += ["", f"{model}, {dtype} on {device} ({res['created']}): {res['verdict']}{said}."]
    return lines + [""]


def lossy_arch_section(results: list[dict[str, Any]]) -> list[str]:
    """bench/lossy_arch.py: the newest result of each model and size."""
    newest = {(r["settings"]["model"], r["settings"]["size"], r["machine"]["device"]): r for r in results}
    if not newest:
        return []
    lines = ["## Lossy speed-ups on the real architectures (`python -m movielm_fast.bench.lossy_arch`)", "",
             "FP8 (`--quantize`) and step caching (`--step-cache`) against the exact render of the same prompts and "
             "seeds (batch 1). Random weights: the images are structured noise, so PSNR/SSIM say how far an option "
             "moves a full-size UNet's pixels, not how a trained model's pictures look. *UNet FLOPs*: the render's "
             "UNet FLOPs over the reference's (FP8 runs the same FLOPs at a faster rate on GPUs that have it). Seconds "
             "are one run each, under the machine's load at the time (see the load averages)."]
    for (model, size, _), res in newest.items():
        st, m = res["settings"], res["machine"]
        where = m["gpu_model"] or f"{m['cpu_model']} ({m['cpu_cores_logical']} cores)"
        lines += ["", f"**{model}, {size}²**, {st['steps']} {st['scheduler']} steps, guidance {st['guidance']}, "
                  f"{st['prompts']} prompt{'s' if st['prompts'] > 1 else ''} (seeds 1000+), on {where}; reference: "
                  f"{res['reference']}; "
                  f"{100 * res['flops']['fp8_flop_share']:.0f}% of a full UNet step's FLOPs are in the layers FP8 "
                  f"quantizes; {_load(res)}; {res['created']}.", "",
                  "| case | PSNR dB | SSIM | max pixel diff | s/frame | UNet s/frame | UNet FLOPs |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["runs"]:
            unet = "–" if r["unet_seconds_per_frame"] is None else f"{r['unet_seconds_per_frame']:.2f}"
            db = "identical" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
            lines.append(f"| {r['case']} ({r['dtype']}) | {db} | {r['ssim']:.4f} | "
                         f"{r['max_abs_pixel_diff']} | {r['seconds_per_frame']:.2f} | {unet} | "
                         f"{1 / r['unet_flop_ratio']:.2f}× |")
    return lines + [""]


# The smaller benchmarks' sections of RESULTS.md, in this order: (result format, section builder).
SMALL_BENCHES = ((HOST_FORMAT, host_section), (BOUNDARY_FORMAT, boundary_section),
                 (REGRESSION_FORMAT, regression_section),
                 (CONSISTENCY_FORMAT, consistency_section), (LORA_FORMAT, lora_section), (VAE_FORMAT, vae_section),
                 (CPU_PEER_FORMAT, cpu_peer_section), (TOY_FORMAT, toy_quality_section),
                 (STEP_CACHE_FORMAT, step_cache_section), (STARTUP_FORMAT, startup_section),
                 (SERVE_FORMAT, serve_section), (FP16_RANGE_FORMAT, fp16_range_section),
                 (LOSSY_ARCH_FORMAT, lossy_arch_section))


def knob_section() -> list[str]:
    """The CUDA knob table the torch backend reads (engine/cuda_knobs.json), as measured."""
    from movielm_fast.engine.cuda_knobs import BUILT_IN, load_table, measured_knobs

    rows = load_table()
    if not rows:
        return []
    lines = ["## CUDA knob table (`src/movielm_fast/engine/cuda_knobs.json`, `python -m movielm_fast.bench.knobs`)", "",
             "Lossless knobs, fastest entry per GPU, model, size and batch (entries within 2% count as as fast). A "
             "knob left unset takes the value that was as fast at every measured batch of the architecture; "
             f"otherwise its built-in default ({', '.join(f'{k}={v}' for k, v in BUILT_IN.items())}).", "",
             "| GPU | model | size | batch | default s/frame | fastest | its s/frame | as fast | source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fast = "; ".join(", ".join(f"{k}={v}" for k, v in sorted(c.items()) if v != BUILT_IN.get(k)) or "built-in"
                         for c in r.get("as_fast", []))
        lines.append(f"| {r['gpu']} | {r['model']} | {r['size']} | {r['batch']} | {r['default_s_per_frame']:.3f} | "
                     f"{r['winner']} | {r['winner_s_per_frame']:.3f} | {fast} | {r['source']} |")
    for kind in sorted({r["kind"] for r in rows}):
        for gpu in sorted({r["gpu"] for r in rows if r["kind"] == kind}):
            lines.append(f"\nChosen for {kind} on {gpu}: " +
                         ", ".join(f"{k}={v}" for k, v in sorted(measured_knobs(kind, gpu).items())) + ".")
    return lines + [""]


def write_results_md(results_dir: Path, md_path: Path) -> Path:
    md_path = Path(md_path)
    text = render_results_md(load_results(results_dir), md_path.parent)
    extra = knob_section() + \
        [line for fmt, section in SMALL_BENCHES for line in section(load_other(results_dir, fmt))]
    atomic_write_text(md_path, text.rstrip("\n") + "\n\n" + "\n".join(extra) if extra else text)
    return md_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m movielm_fast.bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSON files")
    ap.add_argument("--out", type=Path, default=RESULTS.parent / "RESULTS.md")
    args = ap.parse_args(argv)
    print(write_results_md(args.results, args.out))


if __name__ == "__main__":
    main()
