"""`style train` and `style list`: parse flags -> ModelConfig + StyleSettings -> style."""

from __future__ import annotations

import json
from pathlib import Path

import click

from movielm_fast.engine.config import ModelConfig

from .clean_errors import CleanErrors
from .options import settings_options
from .progress import step_display


@click.group("style", cls=CleanErrors, help="Style immobilization: learn one textual-inversion token per style.")
def style_group() -> None:
    pass


@style_group.command("train", help="Learn a style token: from rendered scenes of the style (default) or from "
                                   "--images. A style already in the library is reused, not retrained.")
@settings_options(ModelConfig, "model")
@click.option("--name", required=True, help="Style name, e.g. Gothic; the token is <name> unless --token.")
@click.option("--description", default="", help="Style description, used in the scene prompts.")
@click.option("--images", type=click.Path(path_type=Path),
              help="Learn from this folder of images instead (a .txt beside an image is its "
              "caption: what it shows, without the style).")
@click.option("--token", help="Token to learn (default <name>); must not be a vocabulary word.")
@click.option("--steps", type=click.IntRange(min=1), help="Training steps [30 demo/test models, 150 real].")
@click.option("--scenes", type=click.IntRange(min=1), help="Scenes to render when no --images [4 demo, 8 real].")
@click.option("--resolution", type=click.IntRange(min=64), help="Training size in px [64 demo, model's native].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per step [4; 8 for SD 1.x/2.x].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate [5e-3; 2e-2 demo].")
@click.option("--vectors", "num_vectors", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Vectors per token.")
@click.option("--init-word", help="Word the vector starts from [first vocabulary word of --name, else 'style'].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Style library folder [~/.cache/movielm-fast/styles].")
@settings_options(ModelConfig, "device", "dtype", "threads")
@click.option("--amp", default="auto", show_default=True, help="Training autocast: auto | fp32 | bf16 | fp16")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the UNet (pays off on long runs only).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train_cmd(model, name, description, images, token, steps, scenes, resolution, batch_size, lr, num_vectors,
              init_word, out, device, dtype, threads, amp, compile_, seed, as_json):
    from movielm_fast.plan import Style
    from movielm_fast.run.renderer import Renderer
    from movielm_fast.style.immobilize import immobilize_style
    from movielm_fast.style.training import StyleSettings

    settings = StyleSettings(steps=steps, scenes=scenes, resolution=resolution, batch_size=batch_size, lr=lr,
                             num_vectors=num_vectors, init_word=init_word, seed=seed, amp=amp, compile=compile_)
    style = Style(name=name, description=description)
    renderer = Renderer(ModelConfig(model=model, device=device, dtype=dtype, threads=threads))
    steps = settings.resolve(renderer.model).steps
    with step_display(f"training {token or name}", steps, quiet=as_json) as on_step:
        result = immobilize_style(renderer.scene_renderer, style, settings, images=images, out=out, token=token,
                                  on_step=on_step)
    if as_json:
        click.echo(json.dumps({"path": str(result.path), "token": result.token, "cache_hit": result.cache_hit,
                               "key": result.key, "report": result.report}))
        return
    if result.cache_hit:
        click.echo(f"style {name!r}: already in the library -> {result.token} {result.path}")
        return
    r = result.report
    for note in r.get("notes", []):
        click.echo(f"note: {note}", err=True)
    click.echo(f"style {name!r} -> {result.token} {result.path}\n"
               f"  {r['seconds_total']:.1f} s in all (scenes {r['seconds_scenes']:.1f} s, training "
               f"{r['seconds_train']:.1f} s = {r['steps']} steps x {r['seconds_per_step']:.3f} s at batch "
               f"{r['batch_size']}, {r['amp']}); eval loss {r['eval_loss_before']:.4f} -> {r['eval_loss_after']:.4f}")


@style_group.command("list", help="Show the styles in the library.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Style library folder [~/.cache/movielm-fast/styles].")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(out, as_json):
    from movielm_fast.style.library import default_library, list_styles

    root = out or default_library()
    entries = list_styles(root)
    if as_json:
        click.echo(json.dumps(entries))
        return
    if not entries:
        click.echo(f"no styles in {root}")
        return
    click.echo(f"{len(entries)} style(s) in {root}")
    for e in entries:
        secs = f"{e['seconds']:.1f} s" if e["seconds"] is not None else "?"
        desc = (e["description"][:40] + "...") if len(e["description"]) > 43 else e["description"]
        click.echo(f"  {e['name']:<16} {e['token']:<20} {e['model_id']} ({e['kind']}, {e['model_hash']})  "
                   f"{e['steps']} steps, {secs}  {desc!r}\n    {e['path']}")
