"""VAE swap: decode time per frame of the SD VAE (AutoencoderKL) against TAESD (AutoencoderTiny).

    python -m movielm_fast.bench.vae_decode [--size 256] [--repeats 5] [--batch 1] [--device cpu]

Both decoders at their real architectures (SD 1.x/SDXL VAE: AutoencoderKL's SD config; TAESD: AutoencoderTiny's
default config) with random weights: the cost depends on the architecture only. Each is run as the engine runs it
(the torch backend's decoder graph, the `--vae` path: engine.models.load_vae -> create_backend), interleaved
repeat by repeat so that the machine's load hits both alike; medians are reported and compared as a ratio.
Results go to bench/results/vae-decode-<stamp>.json; `python -m movielm_fast.bench.report` puts them in
bench/RESULTS.md.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from movielm_fast.engine.backends.base import create_backend
from movielm_fast.engine.config import BackendConfig
from movielm_fast.engine.models import load_vae

from .args import bench_parser
from .formats import Section, load_note, save_result
from .hardware import load_average, machine_info, synchronize

VAE_FORMAT = "movielm-bench-vae-decode/1"


def _decoders(root: Path) -> dict[str, Path]:
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       scaling_factor=0.18215)
    kl.save_pretrained(root / "sd-vae")
    AutoencoderTiny().save_pretrained(root / "taesd")
    return {"AutoencoderKL (SD VAE)": root / "sd-vae", "AutoencoderTiny (TAESD)": root / "taesd"}


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser("vae_decode", __doc__, device=True, size=256, repeats=5, results="--results")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    config = BackendConfig(device=args.device)
    device = config.torch_device
    load_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        backends = {name: create_backend("torch", load_vae(path), config)
                    for name, path in _decoders(Path(tmp)).items()}
        latents = torch.randn(args.batch, 4, args.size // 8, args.size // 8,
                              generator=torch.Generator().manual_seed(0))
        samples: dict[str, list[float]] = {name: [] for name in backends}
        for b in backends.values():  # warm-up
            b.decode(latents)
        for _ in range(args.repeats):
            for name, b in backends.items():
                synchronize(device)
                t0 = time.perf_counter()
                b.decode(latents)
                synchronize(device)
                samples[name].append((time.perf_counter() - t0) / args.batch)
    kl_name = next(iter(samples))
    medians = {name: statistics.median(s) for name, s in samples.items()}
    runs = [{"decoder": name, "seconds_per_frame": round(medians[name], 4),
             "samples": [round(x, 4) for x in samples[name]],
             "vs_autoencoder_kl": round(medians[name] / medians[kl_name], 4)} for name in samples]
    result = {"format": VAE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(device),
              "settings": {"size": args.size, "batch": args.batch, "repeats": args.repeats, "device": args.device,
                           "dtype": config.dtype_name, "threads": torch.get_num_threads()},
              "load_average": {"start": load_start, "end": load_average()}, "runs": runs}
    for r in runs:
        print(f"{r['decoder']}: {r['seconds_per_frame']:.4f} s/frame ({r['vs_autoencoder_kl']:.3f}x)")
    save_result(args.results, "vae-decode", result)


def vae_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, m = res["settings"], res["machine"]
    lines = ["## VAE swap: decode cost (`python -m movielm_fast.bench.vae_decode`)", "",
             f"Decode of one {st['size']}² frame (batch {st['batch']}, {st['dtype']}, {st['device']}, "
             f"{st['threads']} threads) through the `--vae` path, real architectures with random weights; medians of "
             f"{st['repeats']} interleaved repeats on {m['cpu_model']} ({m['cpu_cores_logical']} cores); "
             f"{load_note(res)}; "
             f"{res['created']}.", "", "| decoder | s/frame | vs AutoencoderKL |", "|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['decoder']} | {r['seconds_per_frame']:.4f} | {r['vs_autoencoder_kl']:.3f}× |")
    return lines + [""]


SECTIONS = (Section(VAE_FORMAT, vae_section),)


if __name__ == "__main__":
    main()
