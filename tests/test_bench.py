"""The benchmark keeps working: protocol on the demo model, result files, RESULTS.md, the GPU script's CPU exit,
and the real architectures' sizes. Timings are never asserted (design principle: bench/ must not)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from movielm_fast.bench.report import CSV_FIELDS
from movielm_fast.bench.report import main as report_main
from movielm_fast.cli.bench_cmds import bench_cmd


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One tiny run: demo model, 64x64, 2 steps, batch 1 and 2, one repeat and no warm-up (timings are not
    asserted, so their quality does not matter here); plus a backend that does not exist."""
    out = tmp_path_factory.mktemp("bench") / "results"
    res = CliRunner().invoke(bench_cmd, ["--model", "demo", "--backend", "torch,no-such-backend", "--sizes", "64x64",
                                         "--batch-sizes", "1,2", "--steps", "2", "--repeats", "1", "--warmup", "0",
                                         "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    [path] = out.glob("*.json")
    return out, path, json.loads(path.read_text()), res.output


def test_result_json_holds_the_protocol(bench_run):
    out, path, result, _ = bench_run
    assert result["format"] == "movielm-bench/1" and result["complete"] is True
    assert path.name.endswith(f"-{result['machine']['slug']}.json")
    m = result["machine"]
    assert m["device"] == "cpu" and m["cpu_cores_logical"] >= 1 and m["versions"]["torch"] == torch.__version__
    assert "commit" in m["git"]
    st = result["settings"]
    assert (st["model"], st["steps"], st["repeats"], st["sizes"], st["batch_sizes"]) == ("demo", 2, 1, ["64x64"],
                                                                                          [1, 2])
    assert result["skipped"][0]["backend"] == "no-such-backend"
    assert result["ceiling"]["flops_per_s"]["median"] > 0

    # FLOPs are counted once per configuration; convolutions and matmuls scale exactly with the batch.
    f1, f2 = (c["flops"] for c in result["configs"])
    assert f1["unet_step"] > 0 and f1["vae_decode"] > 0 and f1["text_encode"] > 0
    assert f2["unet_step"] == 2 * f1["unet_step"] and f2["vae_decode"] == 2 * f1["vae_decode"]
    assert f1["batch"] == f1["text_encode"] + 2 * f1["unet_step"] + f1["vae_decode"]

    runs = {(r["backend"], r["batch"]): r for r in result["runs"]}
    assert set(runs) == {("diffusers", 1), ("diffusers", 2), ("torch", 1), ("torch", 2)}
    for (backend, batch), r in runs.items():
        assert r["status"] == "ok"
        for stage in ("batch", "frame") + (("text_encode", "unet_step", "vae_decode") if backend == "torch" else ()):
            s = r["stages"][stage]
            assert 0 < s["min"] <= s["median"] <= s["max"] and s["n"] == 1
        assert r["stages"]["frame"]["median"] == pytest.approx(r["stages"]["batch"]["median"] / batch)
        assert 0 < r["mfu"]["frame"] and r["memory"]["peak_mb"] > 0
        image = out / r["image"]
        with Image.open(image) as im:
            assert im.size == (64, 64)
    for batch in (1, 2):
        torch_run = runs[("torch", batch)]
        assert torch_run["speedup_vs_diffusers"] > 0
        # Same components and seeds as diffusers: the speed-up compares the same work, pixel for pixel.
        assert torch_run["max_abs_diff_vs_diffusers"] <= 2
        assert torch_run["backend"] in result["backend_sources"]


def test_csv_plot_and_images_beside_the_json(bench_run):
    out, path, result, output = bench_run
    rows = list(csv.DictReader(path.with_suffix(".csv").open()))
    assert len(rows) == len(result["runs"]) == 4
    assert list(rows[0]) == CSV_FIELDS
    assert {r["backend"] for r in rows} == {"diffusers", "torch"}
    assert all(float(r["frame_s_median"]) > 0 for r in rows)
    plot = path.with_suffix(".png")
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] > 500
    assert len(list(path.with_suffix("").glob("*.png"))) == 4  # one image per configuration and backend
    assert str(path) in output


def test_results_md_is_generated_from_the_json_files(bench_run, tmp_path):
    out, path, result, _ = bench_run
    md = out.parent / "RESULTS.md"  # the command regenerates it beside the results folder
    text = md.read_text()
    assert f"## {result['machine']['slug']} (CPU)" in text
    assert "| torch | 64x64 | 2 |" in text and "| diffusers | 64x64 | 1 |" in text
    assert "No GPU results yet" in text  # and no GPU section without a GPU measurement
    assert "(GPU)" not in text
    # Other JSON files in the folder (kernel timings) are not benchmark results and must be ignored.
    (out / "kernels-x.json").write_text(json.dumps({"cases": []}))
    regenerated = tmp_path / "RESULTS.md"
    report_main(["--results", str(out), "--out", str(regenerated)])
    assert regenerated.read_text().count("| torch | 64x64 |") == 2


def test_bad_flags_are_user_errors():
    res = CliRunner().invoke(bench_cmd, ["--sizes", "100x7"])
    assert res.exit_code == 2 and "multiples of 8" in res.output
    res = CliRunner().invoke(bench_cmd, ["--batch-sizes", "1,x"])
    assert res.exit_code == 2 and "comma-separated integers" in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpu_script_says_it_needs_cuda(capsys):
    from movielm_fast.bench.gpu import main

    assert main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_arch_models_have_the_published_sizes():
    """sd15-arch / sdxl-arch are the real architectures: parameter counts equal SD 1.5's and SDXL base's
    (checked on the meta device: no memory, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from movielm_fast.bench.models import SD15_UNET, SDXL_UNET, VAE_CONFIG, clip_text_config

    def params(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        assert params(UNet2DConditionModel(**SD15_UNET)) == 859_520_964
        assert params(UNet2DConditionModel(**SDXL_UNET)) == 2_567_463_684
        assert params(AutoencoderKL(**VAE_CONFIG)) == 83_653_863
        assert params(CLIPTextModel(clip_text_config(768, 12, 12, "quick_gelu"))) == 123_060_480
        assert params(CLIPTextModelWithProjection(clip_text_config(1280, 32, 20, "gelu", 1280))) == 694_659_840


def test_gpu_psnr_against_fp32_for_every_row(tmp_path):
    import numpy as np
    from PIL import Image

    from movielm_fast.bench.gpu import annotate_psnr, quality_table
    from movielm_fast.bench.runner import backend_variant

    rng = np.random.default_rng(0)
    ref_img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    close = np.clip(ref_img.astype(int) + 1, 0, 255).astype(np.uint8)  # off by one everywhere: ~48 dB
    far = 255 - ref_img
    for name, img in (("ref.png", ref_img), ("close.png", close), ("far.png", far)):
        Image.fromarray(img).save(tmp_path / name)

    def run(backend, image):
        return {"backend": backend, "status": "ok", "image": image, "size": "16x16", "batch": 1}

    ref = {"settings": {"model": "m"}, "runs": [run("diffusers", "far.png"), run("torch", "ref.png")]}
    fast = {"settings": {"model": "m"}, "runs": [run("torch", "close.png"), run("diffusers", "far.png"),
                                                  run("diffusers+compile", "ref.png")]}
    annotate_psnr(fast, ref, tmp_path)  # against our fp32 image, never diffusers' fp32 one
    assert [r["max_abs_diff_vs_fp32_torch"] for r in fast["runs"]] == [1, 255, 0]
    assert 47 < fast["runs"][0]["psnr_vs_fp32_torch"] < 49 and fast["runs"][2]["psnr_vs_fp32_torch"] == float("inf")
    table = quality_table(fast).splitlines()
    assert "torch " in table[1] and "max diff   1/255" in table[1] and table[1].endswith("ok")
    assert "diffusers " in table[2] and table[2].endswith("BELOW 40 dB")
    assert backend_variant("torch+no-cuda_graphs+sdpa_backend=flash+no-fuse_qkv") == (
        "torch", {"cuda_graphs": False, "sdpa_backend": "flash", "fuse_qkv": False})


def test_gpu_goals_table_has_every_row_of_the_issue(tmp_path):
    import json

    from movielm_fast.bench.gpu import _render_record, goals_table

    def run(backend, batch, img_s, its, psnr=60.0, vs_compile=None, mfu=0.3):
        return {"backend": backend, "status": "ok", "batch": batch, "images_per_s": img_s, "unet_steps_per_s": its,
                "psnr_vs_fp32_torch": psnr, "speedup_vs_diffusers_compile": vs_compile,
                "mfu": {"unet_step": mfu}, "stages": {"batch": {"median": batch / img_s}}}

    settings = {"steps": 20, "dtype": "fp16"}
    sd = {"settings": {"model": "sd15-arch", **settings},
          "runs": [run("torch", 1, 4.0, 131.0), run("torch", 8, 12.0, 20.0, vs_compile=1.4),
                   run("diffusers+compile", 8, 13.0, 21.0), run("torch", 16, 11.0, 10.0, vs_compile=1.1),
                   {"backend": "torch", "status": "out of memory", "batch": 32}]}
    xl = {"settings": {"model": "sdxl-arch", "steps": 3, "dtype": "fp16"},
          "runs": [run("torch", 1, 0.9, 22.9, psnr=35.0), run("torch", 4, 1.7, 6.0, mfu=0.43)]}
    log = tmp_path / "render-2.log"
    record = {"rendered": 1, "startup": {"phases": {"model_load": 3.1, "first_batch": 0.6}, "time_to_first_image": 5}}
    log.write_text("a warning line\n" + json.dumps(record) + "\n")
    lines = goals_table([sd, xl], _render_record(log)).splitlines()
    assert len(lines) == 6  # a heading and the table's five rows
    assert "131.0 UNet it/s" in lines[1] and "(goal >= 130: met)" in lines[1]
    # The best batch is the fastest of ours (not the peer's row), with its ratio to diffusers+compile.
    assert "12.00 img/s at batch 8" in lines[2] and "1.40x diffusers+compile" in lines[2] and ": met" in lines[2]
    assert "not met" in lines[3] and "LOSSY" in lines[3] and "not the goal's setting" in lines[3]
    assert "UNet MFU 43% (goal >= 57%): not met" in lines[4]
    assert "first batch 0.6 s" in lines[5] and "0.250 s" in lines[5] and "time to first image 5 s" in lines[5]
    assert "not measured" in goals_table([sd], None).splitlines()[-1]
    assert _render_record(tmp_path / "missing.log") is None


def test_diffusers_speed_recipe_peer_is_timed_beside_ours(tmp_path):
    """diffusers compiled with its own recipe is a row of its own: first batch (its compile) reported apart, and
    the same pixels as plain diffusers within compile rounding. Timings are not asserted."""
    from movielm_fast.bench.runner import BenchSettings, run_bench

    settings = BenchSettings(model="demo", backends=["torch"], sizes=[(64, 64)], batch_sizes=[1], steps=2,
                             repeats=1, warmup=1, out=tmp_path, peer_compile="default")
    result = run_bench(settings, log=lambda _: None).result
    runs = {r["backend"]: r for r in result["runs"]}
    assert set(runs) == {"diffusers", "diffusers+compile", "torch"}
    peer = runs["diffusers+compile"]
    assert peer["status"] == "ok" and peer["max_abs_diff_vs_diffusers"] <= 2
    assert peer["first_batch_s"] > 0 and peer["first_call_overhead_s"] >= 0
    assert "speedup_vs_diffusers_compile" in runs["torch"] and "speedup_vs_diffusers_compile" not in peer


def test_host_bench_reports_median_runs_and_same_files(tmp_path):
    from movielm_fast.bench import host
    from movielm_fast.bench.host import host_section
    assert host.main(["--frames", "4", "--sizes", "64", "--formats", "png,jpg", "--steps", "2", "--batch", "2",
                      "--repeats", "2", "--results", str(tmp_path)]) == 0
    [path] = tmp_path.glob("host-*.json")
    res = json.loads(path.read_text())
    assert [(r["format"], r["writer_threads"]) for r in res["runs"]] == [("png", 0), ("png", 2), ("jpg", 0), ("jpg", 2)]
    for r in res["runs"]:
        assert r["frames"] == 4 and r["same_files_as_sequential"] and len(r["repeats"]) == 2
        assert [r["render_thread_ms_per_frame"], r["frames_per_s"]] in r["repeats"]
        assert r["split_ms_per_frame"]["scheduler"] > 0 and r["split_ms_per_frame"]["encode"] > 0
        assert r["split_ms_per_frame"]["pixels"] > 0  # the uint8 conversion, on the writers' side
    section = "\n".join(host_section([res]))
    assert "the median of 2 interleaved runs" in section and section.count("| 64x64 |") == 4


def test_entry_points_build_their_parsers_with_the_shared_flags(capsys):
    from movielm_fast.bench.args import bench_parser

    ap = bench_parser("x", "First paragraph.\n\nMore.", model="demo", device=True, steps=4, results="--out")
    args = ap.parse_args(["--steps", "2"])
    assert (args.model, args.device, args.steps, args.out.as_posix()) == ("demo", "cpu", 2, "bench/results")
    assert (ap.prog, ap.description) == ("python -m movielm_fast.bench.x", "First paragraph.")
    for parse, bad in ((ap.parse_args, "--size"), (report_main, "--nope")):  # a flag not asked for: a usage error
        with pytest.raises(SystemExit) as exit_:
            parse([bad, "1"])
        assert exit_.value.code == 2 and f"unrecognized arguments: {bad} 1" in capsys.readouterr().err


def test_every_benchmark_with_a_section_is_listed_once():
    """A module that declares SECTIONS but is missing from report's list would silently drop out of RESULTS.md;
    two sections of one format would print its results twice."""
    import re
    from pathlib import Path

    from movielm_fast.bench import report

    bench = Path(report.__file__).parent
    declaring = {p.stem for p in bench.glob("*.py") if re.search(r"^SECTIONS = ", p.read_text(), re.M)}
    assert declaring == set(report.SECTION_MODULES) and len(report.SECTION_MODULES) == len(declaring)
    formats = [s.format for s in report.bench_sections()]
    assert len(formats) == len(set(formats)) == 14 and report.FORMAT not in formats


def test_small_bench_sections_come_from_their_json(tmp_path):
    """Step cache and start-up results get their sections; toy lossy cases measured in separate runs join the
    table of their own reference (same steps and captions) and never one of another step count."""
    from movielm_fast.bench import report
    from movielm_fast.bench.serve import SERVE_FORMAT
    from movielm_fast.bench.startup import STARTUP_FORMAT
    from movielm_fast.bench.step_cache import STEP_CACHE_FORMAT
    from movielm_fast.bench.toy_quality import TOY_FORMAT

    results = tmp_path / "results"
    results.mkdir()
    machine = {"cpu_model": "Test CPU"}
    depth = {"cached_step_tflop": 0.1, "cached_over_full": 0.1, "render_flops_ratio": 2.51}
    (results / "step_cache-1.json").write_text(json.dumps({
        "format": STEP_CACHE_FORMAT, "created": "2026-01-01T00:00:00", "machine": machine,
        "settings": {"interval": 3, "depth": 0, "steps": 50, "threads": 1},
        "flops": {"sd15-arch 512²": {"full_step_tflop": 1.6, "depths": {"0": depth}}},
        "demo": {"frames": 8, "repeats": 3, "unet_time_ratio": 2.37, "render_time_ratio": 2.3, "psnr_db": 44.1,
                 "ssim": 0.98, "max_abs_pixel_diff": 9, "judge_conditioning": {"uncached": 0.875, "cached": 0.75}}}))
    run = {"first_frame_seconds": 3.21, "total_seconds": 5.0,
           "startup": {"phases": {"imports": 2.5, "model_load": 0.4}}}
    (results / "startup-1.json").write_text(json.dumps({
        "format": STARTUP_FORMAT, "created": "2026-01-01T00:00:00", "plan": "p.json", "render_args": [],
        "load_avg": [1.0, 1.0, 1.0], "cpu_count": 2, "first_frame_seconds": {"best": 3.21, "median": 4.0},
        "total_seconds": {"best": 5.0, "median": 6.0}, "runs": [run]}))

    (results / "serve-1.json").write_text(json.dumps({
        "format": SERVE_FORMAT, "created": "2026-01-01T00:00:00", "plan": "p.json", "model": "demo",
        "device": "cpu", "cpu_count": 2, "server_ready_seconds": 6.5,
        "plans": [{"first_frame_seconds": 0.71, "done_seconds": 3.0, "frames": 9}]}))

    def toy(name, steps, cases):
        case = {"conditioning": 0.9, "delta_vs_fp32": -0.06, "same_reading_as_fp32": 0.8, "max_abs_pixel_diff": 3,
                "mean_abs_pixel_diff": 0.1}
        (results / f"toy_quality-{name}.json").write_text(json.dumps({
            "format": TOY_FORMAT, "created": f"2026-01-0{name}T00:00:00", "machine": machine,
            "settings": {"model": "demo", "model_hash": "h", "steps": steps, "size": 64, "scheduler": "dpmpp",
                         "guidance": 4.0},
            "lossy": {"fp32_conditioning": 0.96, "captions": 50, "cases": {c: case for c in cases}}}))

    toy("1", 20, ["bf16"])
    toy("2", 20, ["fp8 (emulated)"])
    toy("3", 50, ["step cache N=3"])
    md = tmp_path / "RESULTS.md"
    report.main(["--results", str(results), "--out", str(md)])
    text = md.read_text()
    assert "| sd15-arch 512² | 1.600 | 0.100 | **2.51×** |" in text
    assert "UNet time **2.37×** shorter" in text and "judged conditioning 88% uncached, 75% cached" in text
    assert "**best 3.21 s**" in text and "| 2.50 | 0.40 |" in text
    assert "/health 6.50 s after" in text and "first frame file on disk: **0.71 s**" in text
    twenty, fifty = text.split("DPM++ 20 steps")[1].split("DPM++ 50 steps")
    assert "| bf16 |" in twenty and "| fp8 (emulated) |" in twenty and "step cache" not in twenty
    assert "| step cache N=3 |" in fifty and "bf16" not in fifty


def test_serve_bench_times_plans_sent_to_a_warm_server(tmp_path):
    """The real server process on 127.0.0.1 with the demo model; one plan sent after it is ready."""
    from movielm_fast.bench import serve

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"id": "one", "title": "One", "style": {"name": "plain"}, "characters": [],
                                "frames": [{"id": "001", "description": "a big red circle on the left, on grass"}]}))
    result = serve.main(["--plan", str(plan), "--plans", "1", "--results", str(tmp_path / "results"),
                         "--timeout", "300"])
    [done] = result["plans"]
    assert done["frames"] == 1 and 0 < done["first_frame_seconds"] <= done["done_seconds"]
    assert result["server_startup"]["model_load"] > 0  # the phases the server reports on /health
    assert len(list((tmp_path / "results").glob("serve-*.json"))) == 1


def test_fp16_range_finds_the_first_module_that_leaves_the_range():
    """The recorder on a planted overflow: a module that multiplies by 1e5 is over fp16's range, the next one
    inherits it, and a module whose output is inf is reported as where inf/NaN starts."""
    from movielm_fast.bench import fp16_range as F

    class Scale(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            return x * self.k

    net = torch.nn.Sequential(Scale(2.0), Scale(1e5), Scale(1.0), Scale(float("inf")))
    rec = F.RangeRecorder()
    rec.attach("unet", net)
    net(torch.ones(3))
    rec.detach()
    [part] = [rec.summary("unet")]
    assert part["over_fp16"] == 2 and part["first_over"][0]["module"] == "unet.1"  # unet.1 and unet.2 (2e5)
    assert part["nonfinite"] == 2 and part["first_nonfinite"][0]["module"] == "unet.3"  # then the Sequential
    assert "unet produces inf/NaN" in F.verdict([part]) and "the first unet.3" in F.verdict([part])


def test_fp16_range_low_precision_run_is_compared_with_fp32(tmp_path):
    from movielm_fast.bench import fp16_range as F

    res = F.main(["--model", "tiny-sd", "--size", "64", "--steps", "2", "--dtype", "bf16", "--results",
                  str(tmp_path)])
    assert res["settings"]["dtype"] == "bf16" and 20 < res["psnr_vs_fp32"] < float("inf")
    assert {p["component"] for p in res["components"]} == {"text_encoder", "unet", "vae"}
    assert all(p["nonfinite"] == 0 for p in res["components"])


def test_gpu_goals_merge_runs_made_in_separate_steps(tmp_path):
    """gpu-check.sh times ours and diffusers eager first and the compile peer last, in separate runs: the goals
    read every fp16 CUDA run of the folder (never the fp32 reference run), and the best batch's ratio to
    diffusers+compile comes from the run that timed the peer at that batch."""
    from movielm_fast.bench.gpu import goals_table, merged_fp16_results
    from movielm_fast.bench.report import FORMAT

    def result(name, created, dtype, runs):
        (tmp_path / f"{name}.json").write_text(json.dumps({
            "format": FORMAT, "created": created, "machine": {"device": "cuda"},
            "settings": {"model": "sd15-arch", "steps": 20, "dtype": dtype}, "runs": runs}))

    def run(batch, img_s, its, vs_compile=None):
        return {"backend": "torch", "status": "ok", "batch": batch, "images_per_s": img_s, "unet_steps_per_s": its,
                "psnr_vs_fp32_torch": 60.0, "speedup_vs_diffusers_compile": vs_compile, "mfu": {}}

    result("eager", "2026-01-01T00:00:00", "fp16", [run(1, 4.0, 131.0), run(8, 12.0, 20.0)])
    result("reference", "2026-01-01T00:01:00", "fp32", [run(1, 1.0, 30.0)])
    result("peer", "2026-01-01T00:02:00", "fp16", [run(8, 11.5, 19.0, vs_compile=1.35)])
    [merged] = merged_fp16_results(tmp_path)
    assert len(merged["runs"]) == 3
    lines = goals_table([merged]).splitlines()
    assert "131.0 UNet it/s" in lines[1]
    assert "12.00 img/s at batch 8" in lines[2] and "1.35x diffusers+compile" in lines[2]
