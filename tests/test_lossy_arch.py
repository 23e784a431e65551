"""bench.lossy_arch: each lossy option's frames against the reference render, and its RESULTS.md section."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_lossy_arch_bench_on_a_tiny_model(tmp_path, tiny_sd):
    from movielm_fast.bench import lossy_arch
    from movielm_fast.bench.lossy_arch import lossy_arch_section

    assert lossy_arch.main(["--model", str(tiny_sd), "--size", "64", "--steps", "6", "--prompts", "2",
                            "--depths", "0,1", "--results", str(tmp_path)]) == 0
    [path] = tmp_path.glob("lossy_arch-*.json")
    res = json.loads(path.read_text())
    runs = {r["case"]: r for r in res["runs"]}
    assert list(runs) == ["reference", "step cache N=3 depth 0", "step cache N=3 depth 1", "fp8-emulated",
                          "fp8-emulated + step cache N=3 depth 0"]
    ref = runs["reference"]
    assert ref["psnr_db"] is None and ref["ssim"] == 1.0 and ref["max_abs_pixel_diff"] == 0  # identical to itself
    assert "fp32" in res["reference"] and ref["dtype"] == "float32"
    for name, r in runs.items():
        if name != "reference":
            assert r["max_abs_pixel_diff"] > 0 and 10 < r["psnr_db"] < 100 and r["ssim"] < 1.0, name
            assert len(r["psnr_db_per_frame"]) == 2
    depth0, depth1 = runs["step cache N=3 depth 0"], runs["step cache N=3 depth 1"]
    assert depth0["unet_flop_ratio"] > depth1["unet_flop_ratio"] > 1.0  # a deeper branch recomputes more
    assert runs["fp8-emulated"]["unet_flop_ratio"] == 1.0 and runs["fp8-emulated"]["quantize"] == "fp8-emulated"
    assert 0 < res["flops"]["fp8_flop_share"] < 1
    section = "\n".join(lossy_arch_section([res]))
    assert "| reference (float32) | identical | 1.0000 |" in section and section.count("\n| ") == 6  # header and 5 rows
