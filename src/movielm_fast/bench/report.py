"""Result JSON -> CSV, plot, and bench/RESULTS.md.

    python -m movielm_fast.bench.report [--results bench/results] [--out bench/RESULTS.md]

RESULTS.md is generated from every benchmark JSON file in the results folder and is never edited by hand: to change
it, run the benchmark again (or delete a result file) and regenerate. One section per machine; a GPU section exists
only where a result was measured on a GPU.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
from pathlib import Path
from typing import Any

from movielm_fast.paths import atomic_write_text

from .args import bench_parser
from .formats import Section, median_text
from .gpu_check import HOW_TO
from .hardware import RESULTS

FORMAT = "movielm-bench/1"
BASELINE = "diffusers"
STAGES = ("text_encode", "unet_step", "transformer_step", "vae_decode")
DENOISERS = {"unet_step": "UNet", "transformer_step": "transformer"}
"""The denoiser step's stage: a UNet's, or a transformer family's (FLUX.1, FLUX.2 [klein]), as bench.runner names
it."""


def denoiser_step(measured: dict[str, Any]) -> str | None:
    """Which denoiser step a run's stages (or MFU, or FLOPs) hold, if any (diffusers' rows time no stages)."""
    return next((k for k in DENOISERS if k in measured), None)


def denoiser_label(result: dict[str, Any]) -> str:
    """"UNet" or "transformer": the denoiser of a result's model (results from before DiTs name none: a UNet)."""
    return DENOISERS[f"{result['settings'].get('denoiser', 'unet')}_step"]


CSV_FIELDS = [
    "created", "machine", "device", "cpu_model", "gpu_model", "model", "dtype", "steps", "backend", "size", "batch",
    "status", "frame_s_min", "frame_s_median", "frame_s_max", "batch_s_median", "images_per_s", "unet_step_s_min",
    "unet_step_s_median", "unet_step_s_max", "unet_steps_per_s", "transformer_step_s_min", "transformer_step_s_median",
    "transformer_step_s_max", "transformer_steps_per_s", "vae_decode_s_min", "vae_decode_s_median",
    "vae_decode_s_max", "text_encode_s_min", "text_encode_s_median", "text_encode_s_max", "speedup_vs_diffusers",
    "flops_frame", "flops_unet_step", "flops_transformer_step", "flops_vae_decode", "ceiling_flops_per_s",
    "achieved_flops_per_s_frame", "mfu_frame", "mfu_unet_step", "mfu_transformer_step", "mfu_vae_decode",
    "peak_memory_mb", "memory_kind", "max_abs_diff_vs_diffusers", "psnr_vs_fp32", "max_abs_diff_vs_fp32", "image",
    "note"]


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
                   flops_transformer_step=flops.get("transformer_step"), flops_vae_decode=flops.get("vae_decode"))
        if run["status"] == "ok":
            stages = run["stages"]
            for key in ("frame",) + STAGES:
                if key in stages:
                    for q in ("min", "median", "max"):
                        row[f"{key}_s_{q}"] = stages[key][q]
            row.update(batch_s_median=stages["batch"]["median"], images_per_s=run["images_per_s"],
                       unet_steps_per_s=run.get("unet_steps_per_s"),
                       transformer_steps_per_s=run.get("transformer_steps_per_s"),
                       speedup_vs_diffusers=run.get("speedup_vs_diffusers"),
                       achieved_flops_per_s_frame=run["achieved_flops_per_s"]["frame"],
                       mfu_frame=run["mfu"]["frame"], mfu_unet_step=run["mfu"].get("unet_step"),
                       mfu_transformer_step=run["mfu"].get("transformer_step"),
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

    # Stage breakdown of one batch, per frame: text + steps x denoiser step + VAE decode; "other" is what remains of
    # the end-to-end time (scheduler, latents, copies). diffusers is shown as one bar: its stages are not timed.
    labels = []
    parts: dict[str, list[float]] = {"text": [], f"{denoiser_label(result)} (all steps)": [], "VAE decode": [],
                                     "other": [], "diffusers, end to end": []}
    for r in sorted(ok, key=lambda r: (r["size"], r["batch"], r["backend"] != BASELINE, r["backend"])):
        s, b = r["stages"], r["batch"]
        frame = s["frame"]["median"]
        labels.append(f"{r['backend']} {r['size']} b{b}")
        step = denoiser_step(s)
        if step is not None:
            text, unet, vae = (s["text_encode"]["median"] / b, st["steps"] * s[step]["median"] / b,
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
             "How a GPU run is done (`docs/gpu.md` has the details):", "", *HOW_TO, "",
             "Protocol (`bench/runner.py`): warm-up, then each figure is the median over the repeats (min–max in "
             "brackets), device work synchronized. *vs diffusers* is diffusers' own pipeline of the model's "
             "family (StableDiffusion(XL)Pipeline, FluxPipeline, Flux2KleinPipeline) with the same components, "
             "scheduler, steps, size, batch and seeds, measured in the same run; "
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
              "speed-up | MFU frame | MFU denoiser step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    latest: dict[tuple, tuple[Path, dict]] = {}
    for path, res in results:
        latest[(res["machine"]["slug"], res["settings"]["model"], res["settings"]["dtype"])] = (path, res)
    for (slug, model, dtype), (path, res) in latest.items():
        for h in headline(res):
            b, ref = h["best"], h["diffusers"]
            speedup = "–" if h["speedup"] is None else f"{h['speedup']:.2f}×"
            lines.append(
                f"| {slug} | {model} | {dtype} | {h['size']} | {res['settings']['steps']} | {b['backend']}, "
                f"b{b['batch']} | {median_text(b['stages']['frame'])} | "
                f"{median_text(ref['stages']['frame']) if ref else '–'} | "
                f"{speedup} | {_pct(b['mfu']['frame'])} | {_pct(b['mfu'].get(denoiser_step(b['mfu']) or ''))} |")
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
            den = denoiser_label(res)
            lines += [f"| backend | size | batch | s/frame | images/s | {den} step s | {den} steps/s | VAE decode s | "
                      f"text s | vs diffusers | MFU {den} | MFU VAE | MFU frame | peak mem MB | Δ vs diffusers | "
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
                step = denoiser_step(s)
                steps_per_s = f"{r[f'{step}s_per_s']:.2f}" if step else "–"
                mem = f"{r['memory']['peak_mb']:.0f} ({'RSS' if r['memory']['kind'] == 'cpu_peak_rss' else 'alloc'})"
                # Images kept beside the JSON are linked; a run whose images were not kept links none.
                shot = path.parent / r["image"] if r.get("image") else None
                image = f"[png]({rel(shot)})" if shot and shot.exists() else ""
                cells = [r["backend"], r["size"], r["batch"], median_text(s["frame"], True),
                         f"{r['images_per_s']:.3f}", median_text(s.get(step or ""), True), steps_per_s,
                         median_text(s.get("vae_decode"), True), median_text(s.get("text_encode"), True),
                         "–" if sp is None else f"{sp:.2f}×",
                         _pct(mfu.get(step or "")), _pct(mfu.get("vae_decode")), _pct(mfu["frame"]), mem,
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
    head = f"{'model':<10} {'backend':<12} {'size':<9} {'batch':>5} {'s/frame':>9} {'img/s':>8} {'step it/s':>9} " \
           f"{'vs diffusers':>12} {'MFU step':>8} {'MFU frame':>9}"
    lines = [head, "-" * len(head)]
    for res in results:
        for r in res["runs"]:
            if r["status"] != "ok":
                lines.append(f"{res['settings']['model']:<10} {r['backend']:<12} {r['size']:<9} {r['batch']:>5} "
                             f"{r['status']}")
                continue
            sp = r.get("speedup_vs_diffusers")
            step = denoiser_step(r["mfu"]) or ""
            its = r.get(f"{step}s_per_s")
            lines.append(
                f"{res['settings']['model']:<10} {r['backend']:<12} {r['size']:<9} {r['batch']:>5} "
                f"{r['stages']['frame']['median']:>9.4f} {r['images_per_s']:>8.3f} "
                f"{'–' if its is None else f'{its:.2f}':>9} {'–' if sp is None else f'{sp:.2f}x':>12} "
                f"{_pct(r['mfu'].get(step)):>8} {_pct(r['mfu']['frame']):>9}")
    return "\n".join(lines)


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


# The benchmarks that declare sections of RESULTS.md (each module's SECTIONS), in the order the sections appear.
# A new benchmark adds its module's name here; its format and its section stay in its own module.
SECTION_MODULES = ("host", "threads", "regression", "consistency", "lora", "vae_decode", "openvino_peer",
                   "toy_quality", "step_cache", "dit_accel", "startup", "serve", "fp16_range", "lossy_arch")


def bench_sections() -> list[Section]:
    """Every benchmark's sections, in RESULTS.md's order. The modules are imported here, on use: some of them import
    this module (a cycle at import time), and they bring the engine and diffusers, which readers of results such as
    bench.knobs do not need."""
    return [section for name in SECTION_MODULES
            for section in importlib.import_module(f"{__package__}.{name}").SECTIONS]


def write_results_md(results_dir: Path, md_path: Path) -> Path:
    md_path = Path(md_path)
    text = render_results_md(load_results(results_dir), md_path.parent)
    extra = knob_section() + \
        [line for s in bench_sections() for line in s.render(load_other(results_dir, s.format))]
    atomic_write_text(md_path, text.rstrip("\n") + "\n\n" + "\n".join(extra) if extra else text)
    return md_path


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser("report", __doc__, results="--results")
    ap.add_argument("--out", type=Path, default=RESULTS.parent / "RESULTS.md")
    args = ap.parse_args(argv)
    print(write_results_md(args.results, args.out))


if __name__ == "__main__":
    main()
