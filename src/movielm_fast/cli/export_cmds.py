"""`movielm-fast export`: parse flags -> export/ -> print the artifact folder(s) and manifest(s)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from movielm_fast.errors import UserError


@click.command("export", help="Export a model for the onnxruntime or tensorrt backend (or find it in the cache) "
                              "and print the artifact folders and manifests. --list / --clear manage the cache.")
@click.option("--model", default="demo", show_default=True, help="'demo', a diffusers folder or a .safetensors file.")
@click.option("--backend", default="onnxruntime", show_default=True, help="onnxruntime | tensorrt")
@click.option("--dtype", default="auto", show_default=True, help="auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda (onnxruntime execution provider)")
@click.option("--batch-sizes", default=None, help="Frames per batch to serve, e.g. 1,4,8 (default 1,4).")
@click.option("--sizes", default=None, help="Image sizes WIDTHxHEIGHT, e.g. 512x512,768x512 (default: native).")
@click.option("--dynamic/--static", default=None,
              help="TensorRT: one dynamic profile, or one engine per (batch, size) bucket (default: static).")
@click.option("--refiner", type=click.Path(path_type=Path), help="Also export this SDXL refiner folder.")
@click.option("--vae", type=click.Path(path_type=Path), help="Also export this VAE folder's decoder (as --vae).")
@click.option("--list", "list_", is_flag=True, help="List cached artifacts.")
@click.option("--clear", is_flag=True, help="Delete cached artifacts (only --model's if given explicitly).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def export_cmd(ctx, model, backend, dtype, device, batch_sizes, sizes, dynamic, refiner, vae, list_, clear, as_json):
    # Imported on use: every `movielm-fast` command (--help too) loads this module, and diffusers takes seconds to
    # import; --list needs only the cache.
    from movielm_fast.export import cache

    if list_:
        entries = cache.list_entries()
        if as_json:
            click.echo(json.dumps([{"path": str(e.path), **e.manifest} for e in entries], indent=2))
            return
        click.echo(f"{len(entries)} artifact(s) in {cache.artifacts_root()}")
        for e in entries:
            m = e.manifest
            click.echo(f"  {m['model_id']:<20} {m['component']:<15} {m['target']:<12} {m['dtype']:<5} "
                       f"{m['profile']:<28} {cache.human_bytes(m['total_bytes']):>9}  {e.path}")
        for folder, size, age in cache.unfinished():
            click.echo(f"  unfinished export ({cache.human_bytes(size)}, unchanged for {age / 60:.0f} min; --clear "
                       f"removes it after {cache.UNFINISHED_SECONDS // 60} min)  {folder}")
        return
    from movielm_fast.engine.models import check_refiner, load_model, load_refiner, load_vae, vae_folder
    from movielm_fast.export.artifacts import check_backend, export_for_backend
    from movielm_fast.export.specs import default_profile, parse_batch_sizes, parse_sizes
    from movielm_fast.export.tensorrt import require_tensorrt

    if clear:
        model_hash = None
        if ctx.get_parameter_source("model") == click.core.ParameterSource.COMMANDLINE:
            model_hash = load_model(model).content_hash
        n = cache.clear(model_hash=model_hash)
        gone, kept = cache.clear_unfinished(model_hash=model_hash)
        click.echo(f"removed {n} artifact(s) and {gone} unfinished export(s) from {cache.artifacts_root()}"
                   + (f"; kept {kept} unfinished export(s) that may still be running" if kept else ""))
        return

    check_backend(backend)  # the checks a user can fail come before loading gigabytes
    if dtype not in ("auto", "fp32", "fp16"):
        raise UserError(f"unknown dtype {dtype!r} for export", "use auto, fp32 or fp16")
    if backend == "tensorrt":
        require_tensorrt()
    batches = parse_batch_sizes(batch_sizes) if batch_sizes else None
    shapes = parse_sizes(sizes) if sizes else None
    if refiner:
        check_refiner(refiner)
    if vae:
        vae_folder(vae)
    bundle = load_model(model)
    profile = default_profile(bundle, batches, shapes, dynamic=bool(dynamic) if backend == "tensorrt" else True)
    artifacts = export_for_backend(bundle, backend, device, dtype, profile)
    # A refiner and a swapped VAE are exported under their own content hash, for the base model's shapes.
    for prefix, extra in (("refiner", load_refiner(refiner) if refiner else None),
                          ("vae", load_vae(vae) if vae else None)):
        if extra is not None:
            for name, a in export_for_backend(extra, backend, device, dtype, profile).items():
                artifacts[f"{prefix}:{name}"] = a
    if as_json:
        click.echo(json.dumps({name: {"path": str(a.path), **a.manifest} for name, a in artifacts.items()}, indent=2))
        return
    folders = {a.path.parent for a in artifacts.values()}
    click.echo(f"artifacts for {bundle.model_id} ({backend}, {device}): {', '.join(map(str, sorted(folders)))}")
    for name, a in artifacts.items():
        m = a.manifest
        click.echo(f"\n{name}: {a.path}  ({cache.human_bytes(m['total_bytes'])}; covers {m['covers']})")
        click.echo(json.dumps({k: m[k] for k in ("component", "target", "dtype", "profile", "model_hash", "key",
                                                 "versions", "files", "created") if k in m}, indent=2))
