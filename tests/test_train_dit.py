"""The DiT demo model's trainer (bench.toy.train_dit): a CPU-time budget, checkpoints that are complete FluxPipeline
folders the engine renders, and a resume that goes on from the saved step up to the same total budget."""

import json

import numpy as np

from movielm_fast.bench.toy import train_dit
from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.run.renderer import Renderer


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dit_trainer_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "dit"
    args = ["--out", str(out), "--pool", "16", "--batch", "2", "--checkpoint-minutes", "0.01"]
    train_dit.main(args + ["--cpu-minutes", "0.03"])
    first = _log(tmp_path / "dit_log.jsonl")
    done = first[-1]
    assert done["phase"] == "checkpoint" and done["final"] and done["steps"] > 0
    assert sum(r["phase"] == "checkpoint" for r in first) >= 2  # the periodic ones, then the final one
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == done["steps"] and info["args"]["pool"] == "16"

    r = Renderer(ModelConfig(model=str(out)))  # the engine loads the checkpoint as any FLUX.1 folder
    assert [role.length for role in r.encoder.roles][-1] == 40  # the toy T5's tokenizer length, not FLUX's 512
    image = r.render([FrameJob("m", "f", "a red circle on the left, on grass", "", 1)],
                     BatchSettings(64, 64, 2, 0.0, "default", true_cfg=2.0))[0][0]
    assert image.shape == (64, 64, 3) and np.ptp(image) > 0

    pool = tmp_path / "dit_pool" / "pool.safetensors"
    encoded = pool.stat().st_mtime_ns
    train_dit.main(args + ["--cpu-minutes", "0.06"])  # the same command with a larger budget goes on
    second = _log(tmp_path / "dit_log.jsonl")[len(first):]
    resume = next(r for r in second if r["phase"] == "resume")
    assert resume["step"] == done["steps"] and resume["cpu_s"] >= done["cpu_s"] - 0.5
    assert pool.stat().st_mtime_ns == encoded  # the pool's latents are read back, not encoded again
    assert second[-1]["final"] and second[-1]["steps"] > done["steps"]


def test_dit_trainer_continues_a_model_folder(tmp_path):
    """--init-from starts from a folder's weights (the shipped demo-dit, when the training state is gone) and counts
    its steps and CPU time toward the budget."""
    from safetensors.torch import load_file

    common = ["--pool", "16", "--batch", "2"]
    train_dit.main(["--out", str(tmp_path / "a"), *common, "--cpu-minutes", "0.02"])
    earlier = json.loads((tmp_path / "a" / "training.json").read_text())
    weights = "transformer/diffusion_pytorch_model.safetensors"

    # A budget the folder has already spent: nothing trains, and what is saved is what was loaded.
    train_dit.main(["--out", str(tmp_path / "b"), *common, "--cpu-minutes", "0.001", "--init-from", str(tmp_path / "a")])
    init = next(r for r in _log(tmp_path / "b_log.jsonl") if r["phase"] == "init")
    assert init["step"] == earlier["steps"] and init["cpu_s"] == round(earlier["cpu_s"], 1)
    a, b = load_file(str(tmp_path / "a" / weights)), load_file(str(tmp_path / "b" / weights))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    train_dit.main(["--out", str(tmp_path / "c"), *common, "--cpu-minutes", "0.05", "--init-from", str(tmp_path / "a")])
    info = json.loads((tmp_path / "c" / "training.json").read_text())
    assert info["steps"] > earlier["steps"] and info["continued_from"]["steps"] == earlier["steps"]
