"""`movielm-fast export` through click's test runner: export, cache hit, --list, --clear, bad input."""

import json

import pytest
from click.testing import CliRunner

from movielm_fast.cli.export_cmds import export_cmd

pytest.importorskip("onnxruntime")


def test_export_list_clear(tiny_sd):
    runner = CliRunner()
    res = runner.invoke(export_cmd, ["--model", str(tiny_sd), "--backend", "onnxruntime", "--sizes", "64x64,96x64",
                                     "--batch-sizes", "1,2"])
    assert res.exit_code == 0, res.output
    assert "unet:" in res.output and "vae_decoder:" in res.output and "manifest.json" in res.output
    assert '"model_hash"' not in res.output  # whole manifests only with --json (issue 33)
    res = runner.invoke(export_cmd, ["--model", str(tiny_sd), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) == {"text_encoder", "unet", "vae_decoder"}
    assert all(v["target"] == "ort-cpu" and v["dtype"] == "fp32" for v in data.values())
    res = runner.invoke(export_cmd, ["--list"])
    assert res.exit_code == 0 and "unet" in res.output and "ort-cpu" in res.output
    res = runner.invoke(export_cmd, ["--clear", "--model", str(tiny_sd)])
    assert res.exit_code == 0 and "removed 3 artifact(s)" in res.output
    res = runner.invoke(export_cmd, ["--list", "--json"])
    assert all(e["model_hash"] != data["unet"]["model_hash"] for e in json.loads(res.stdout))


@pytest.mark.parametrize("args,message", [
    (["--backend", "openvino"], "cannot export for backend 'openvino'"),
    (["--backend", "tensorrt"], "TensorRT is not installed"),
    (["--sizes", "500x512"], "multiples of 8"),
    (["--dtype", "bf17"], "unknown dtype"),
    (["--dtype", "bf16"], "not bf16 (bf16 is for TensorRT engines)"),
])
def test_bad_input(tiny_sd, args, message):
    if args[:2] == ["--backend", "tensorrt"]:
        try:
            import tensorrt  # noqa: F401
            pytest.skip("tensorrt is installed here")
        except ImportError:
            pass
    res = CliRunner().invoke(export_cmd, ["--model", str(tiny_sd), *args])
    assert res.exit_code != 0
    assert message in str(res.exception)
