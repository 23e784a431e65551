"""OUT/index.html: a static gallery of a `make` job that works offline from the folder.

One page, relative links only, no scripts, no CDN: a table of the movies with their counts, then one section per
finished movie (title, overview, style, characters, storyboard, every frame with its description and dialogue,
the QA pairs) and the failures with their reasons. Every text is HTML-escaped: plans and QA come from an LLM.
Rewritten atomically each time a movie finishes, so a browser never sees half a page.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any
from urllib.parse import quote

from movielm_fast.paths import atomic_write_text
from movielm_fast.plan import Movie
from movielm_fast.run.manifest import DamagedManifest, read_manifest
from movielm_fast.run.storyboard import FRAMES_PER_PAGE

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
section.movie{border-top:2px solid #444;margin-top:2.5em}
.frames{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:1em}
figure{margin:0}figure img{width:100%;height:auto;image-rendering:pixelated;background:#eee}
img.storyboard{max-width:100%}.dialogue{font-style:italic}.meta{color:#666;font-size:.9em}
.failed{color:#a00}
"""


def _e(text: Any) -> str:
    return html.escape(str(text if text is not None else ""), quote=True)


def _src(*parts: str) -> str:
    """A relative URL from OUT/ (ids are SAFE_IDs, but file names are quoted anyway)."""
    return "/".join(quote(p) for p in parts)


def _qa_count(record: dict[str, Any]) -> int:
    return sum(len(v) for v in record.get("QA", {}).values())


def _storyboard_images(movie: Movie) -> str:
    """storyboard.png, or the pages of a long movie's (run.storyboard.StoryboardPages.write)."""
    pages = (len(movie.frames) + FRAMES_PER_PAGE - 1) // FRAMES_PER_PAGE
    names = ["storyboard.png"] if pages == 1 else [f"storyboard-{n:03d}.png" for n in range(1, pages + 1)]
    return "".join(f"<img class=storyboard src='{_src('movies', movie.id, name)}' alt='storyboard of "
                   f"{_e(movie.id)}'>" for name in names)


def movie_section(movie: Movie, qa_record: dict[str, Any], manifest: dict[str, Any]) -> str:
    files = {f["id"]: f["file"] for f in manifest.get("frames", [])}
    chars = "".join(f"<li><b>{_e(c.name)}</b>: {_e(c.appearance)}</li>" for c in movie.characters)
    frames = []
    for f in movie.frames:
        line = f"<p class=dialogue>{_e(f.speaker) + ': ' if f.speaker else ''}“{_e(f.dialogue)}”</p>" \
            if f.dialogue else ""
        shot = " · ".join(_e(x) for x in (f.shot, f.camera) if x)
        frames.append(f"<figure id='{_e(movie.id)}-{_e(f.id)}'>"
                      f"<img src='{_src('movies', movie.id, files.get(f.id, ''))}' alt='frame {_e(f.id)}'>"
                      f"<figcaption><span class=meta>{_e(f.id)}{' · ' + shot if shot else ''}</span>"
                      f"<p>{_e(f.description)}</p>{line}</figcaption></figure>")
    qa_parts = []
    for kind, pairs in qa_record.get("QA", {}).items():
        if pairs:
            items = "".join(f"<dt>{_e(p['question'])}</dt><dd>{_e(p['answer'])}</dd>" for p in pairs)
            qa_parts.append(f"<h4>{_e(kind)}</h4><dl>{items}</dl>")
    style_text = f": {_e(movie.style.description)}" if movie.style.description else ""
    return (f"<section class=movie id='{_e(movie.id)}'><h2>{_e(movie.title or movie.id)}</h2>"
            f"<p class=meta>{_e(movie.id)} · theme: {_e(movie.theme)}</p><p>{_e(movie.overview)}</p>"
            f"<p><b>Style</b>: {_e(movie.style.name)}{style_text}</p>"
            f"<h3>Characters</h3><ul>{chars}</ul>"
            f"<h3>Storyboard</h3>{_storyboard_images(movie)}"
            f"<h3>Frames</h3><div class=frames>{''.join(frames)}</div>"
            f"<h3>Questions and answers</h3>{''.join(qa_parts)}</section>")


def gallery_html(out: Path, finished: list[tuple[Movie, dict[str, Any]]], failures: list[dict[str, Any]]) -> str:
    rows, sections = [], []
    for movie, record in finished:
        try:
            manifest = read_manifest(Path(out) / "movies" / movie.id / "manifest.json") or {}
        except DamagedManifest:
            manifest = {}
        rows.append(f"<tr><td><a href='#{_e(movie.id)}'>{_e(movie.title or movie.id)}</a></td>"
                    f"<td>{_e(movie.theme)}</td><td>{_e(movie.style.name)}</td><td>{len(movie.characters)}</td>"
                    f"<td>{len(manifest.get('frames', []))}</td><td>{_qa_count(record)}</td></tr>")
        sections.append(movie_section(movie, record, manifest))
    failed = "".join(f"<li class=failed>{_e(f['stage'])}: {_e(f.get('movie') or f.get('theme') or '')}"
                     f"{' (version ' + _e(f['version']) + ')' if f.get('version') else ''}: "
                     f"<pre>{_e(f['reason'])}</pre></li>" for f in failures)
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>movielm-fast make</title>"
            f"<style>{_CSS}</style></head><body><h1>Movies</h1>"
            f"<p>{len(finished)} finished movie(s), {len(failures)} failure(s).</p>"
            "<table><thead><tr><th>Movie</th><th>Theme</th><th>Style</th><th>Characters</th><th>Frames</th>"
            f"<th>QA pairs</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            + (f"<h2>Failures</h2><ul>{failed}</ul>" if failed else "") + "".join(sections) + "</body></html>\n")


def write_gallery(out: Path, finished: list[tuple[Movie, dict[str, Any]]], failures: list[dict[str, Any]]) -> Path:
    path = Path(out) / "index.html"
    atomic_write_text(path, gallery_html(out, finished, failures))
    return path
