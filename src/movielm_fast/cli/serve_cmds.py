"""`movielm-fast serve`: flags -> the resident model's config and the server's run settings -> serve.app. The server
itself lives in movielm_fast.serve."""

from __future__ import annotations

from pathlib import Path

import click

from movielm_fast.serve.config import ServeLimits

from .options import render_configs, render_options, settings_options


@click.command("serve", help="A resident renderer: load the model once, keep it warm, and render plans POSTed to "
                             "http://HOST:PORT/plans as they come (same outputs, manifests and resume as `render`). "
                             "Accepted plans survive a killed server: a restart resumes them. Render flags set the "
                             "server's settings. Needs the [serve] extra.")
@click.option("--out", default=Path("out"), type=click.Path(path_type=Path), show_default=True,
              help="Output root: every plan renders into it (or into ?out=SUB below it).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Bind address; anything but 127.0.0.1/localhost requires --token.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535))
@click.option("--token", envvar="MOVIELM_SERVE_TOKEN", help="Require 'Authorization: Bearer TOKEN' on every request "
                                                            "(env MOVIELM_SERVE_TOKEN).")
@click.option("--allow-files", multiple=True, type=click.Path(file_okay=False, path_type=Path), metavar="FOLDER",
              help="Folders whose files (style embeddings, LoRAs, refiner and VAE folders) submitted plans may name; "
                   "repeatable; relative paths in a plan are relative to the first [default: the current folder].")
@settings_options(ServeLimits, *ServeLimits.model_fields)
@render_options(cluster=False, json=False)
def serve_cmd(out, host, port, token, allow_files, **kw):
    from movielm_fast.serve.app import serve

    limits = ServeLimits(**{name: kw.pop(name) for name in ServeLimits.model_fields})
    model, run, _, _ = render_configs(out, kw)
    click.echo(f"serving on http://{host}:{port} (output root {Path(out).resolve()})", err=True)
    serve(model, run, host=host, port=port, token=token, allow_files=tuple(allow_files), limits=limits)
