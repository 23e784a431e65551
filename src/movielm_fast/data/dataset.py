"""Instruction-tuning dataset from rendered movies: LLaVA / Video-LLaVA conversation records and mp4s.

Reads the render output (``OUT/<movie id>/manifest.json`` and its frames) and QA (a qa.json from
``movielm-fast qa``, or QA derived from the plan stored in each manifest). One record per question::

    {"id": "<movie>-<kind>-<n>", "video": "<movie>/movie.mp4"  |  "frames": ["<movie>/frames/001.png", ...],
     "conversations": [{"from": "human", "value": "<video>\\n<question>"}, {"from": "gpt", "value": "<answer>"}]}

Media paths are relative to the folder of the dataset file, the way LLaVA's loaders expect them. Movies with
dialogue also carry it, with who says each line: ``"dialogue": [{"frame": "002", "speaker": "Thomas", "text":
"..."}]`` (``speaker`` is "" where the plan names none); LLaVA's loaders ignore keys they do not know.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from PIL import Image

from movielm_fast.errors import PlanError, UserError
from movielm_fast.optional import require
from movielm_fast.paths import atomic_write_text, check_destination, sha256_file
from movielm_fast.plan import Movie, parse_plan
from movielm_fast.run.manifest import MANIFEST_FORMAT, DamagedManifest, read_manifest  # noqa: F401 (re-export)

from .llm.qa import QA_KINDS, derived_qa, movie_record, story_digest

MEDIA_TOKEN = "<video>"
Format = Literal["llava", "jsonl"]


@dataclass
class RenderedMovie:
    movie: Movie
    folder: Path
    frame_files: list[Path]


def find_rendered(out_dir: Path, only: list[str] | None = None) -> tuple[list[RenderedMovie], dict[str, str]]:
    """Every rendered movie in `out_dir` (or only the movies `only` names, in that order) whose files check out,
    and {movie id: why} for those that do not (incomplete, damaged, tampered with): one bad movie never keeps the
    others out of a dataset."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError(f"render output folder {out_dir} does not exist", "pass the OUT folder given to `render`")
    manifests = sorted(out_dir.glob("*/manifest.json")) if only is None else [out_dir / m / "manifest.json"
                                                                             for m in only]
    if not manifests:
        raise UserError(f"no rendered movies in {out_dir} (no */manifest.json)", "run `movielm-fast render` first")
    rendered, bad = [], {}
    for path in manifests:
        try:
            rendered.append(_load_rendered(path))
        except UserError as exc:
            bad[path.parent.name] = str(exc)
    return rendered, bad


def _load_rendered(path: Path) -> RenderedMovie:
    try:
        manifest = read_manifest(path)
    except DamagedManifest as exc:
        raise UserError(f"{path} is damaged: {exc}", "run `movielm-fast render` again with its plan: it keeps a "
                                                     "copy and rebuilds the manifest from the frames") from None
    if manifest is None:
        raise UserError(f"{path.parent.name} is not rendered (no {path})", "run `movielm-fast render` first")
    try:
        movie = parse_plan(manifest.get("movie"), source=f"{path} (movie)")[0].movie
    except PlanError as exc:
        raise UserError(f"the movie stored in {path} is invalid: {exc.problems[0][0]}: {exc.problems[0][1]}",
                        "render the movie again") from None
    entries = {e["id"]: e for e in manifest["frames"]}
    rendered = sum(f.id in entries for f in movie.frames)
    if rendered < len(movie.frames):
        raise UserError(f"movie {movie.id!r} is incompletely rendered: {rendered} of {len(movie.frames)} frames "
                        "rendered", "run `movielm-fast render` again; it resumes where it stopped")
    return RenderedMovie(movie, path.parent, [_checked_frame(path.parent, entries[f.id]) for f in movie.frames])


def _checked_frame(folder: Path, entry: dict[str, Any]) -> Path:
    """The frame file a manifest entry names, if it lies inside the movie's folder and holds the bytes the entry's
    sha256 says (a manifest is data, and data can be edited: it must not lead outside OUT)."""
    name = PurePosixPath(entry["file"])
    file = folder / name
    inside = not name.is_absolute() and ".." not in name.parts and file.resolve().is_relative_to(folder.resolve())
    if not inside:
        raise UserError(f"{folder / 'manifest.json'}: frame {entry['id']!r} names {entry['file']!r}, outside the "
                        "movie's folder", "render the movie again to rewrite its manifest")
    if not file.is_file():
        raise UserError(f"movie {folder.name!r} is incompletely rendered: missing {file}",
                        "run `movielm-fast render` again; it resumes where it stopped")
    if sha256_file(file) != entry.get("sha256"):
        raise UserError(f"{file} does not match the sha256 in its manifest (damaged or changed since it was "
                        "rendered)", "run `movielm-fast render` again: it re-renders frames that do not check out")
    return file


def media_token_fields(movie: Movie, qa: dict[str, Any]) -> list[str]:
    """Fields whose text holds the media token: in a record it marks where the video goes, exactly once."""
    fields = {"title": movie.title, "overview": movie.overview}
    fields.update({f"frames[{i}].dialogue": f.dialogue for i, f in enumerate(movie.frames)})
    fields.update({f"characters[{i}].name": c.name for i, c in enumerate(movie.characters)})
    for kind, pairs in qa.items():
        for i, pair in enumerate(pairs if isinstance(pairs, list) else []):
            for key in ("question", "answer"):
                fields[f"QA {kind}[{i}].{key}"] = pair.get(key, "") if isinstance(pair, dict) else ""
    return [name for name, text in fields.items() if isinstance(text, str) and MEDIA_TOKEN in text]


def load_qa_file(path: Path) -> dict[str, dict[str, Any]]:
    """Per-movie QA records from ``movielm-fast qa``, keyed by movie id."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read QA file {path}: {exc}", "pass the file written by `movielm-fast qa`") from None
    if isinstance(records, dict):
        records = [records]
    bad = [i for i, r in enumerate(records) if not (isinstance(r, dict) and r.get("movie_id")
                                                    and isinstance(r.get("QA"), dict))]
    if not isinstance(records, list) or bad:
        raise UserError(f"{path}: entry {bad[0] if bad else 0} is not a QA record with 'movie_id' and 'QA'",
                        "pass the file written by `movielm-fast qa`")
    first: dict[str, int] = {}
    for i, r in enumerate(records):
        if first.setdefault(r["movie_id"], i) != i:
            raise UserError(f"{path}: entries {first[r['movie_id']]} and {i} are both QA for movie "
                            f"{r['movie_id']!r}", "keep one of them (or give the movies different ids)")
    return {r["movie_id"]: r for r in records}


# --- video ------------------------------------------------------------------------------------------------------


MAX_SECONDS_PER_FRAME = 3600.0
"""A keyframe shown for an hour is the most a video holds; far beyond it the frame rate rounds to 0 (and with --fps,
the repeats of one keyframe never end)."""
MAX_FPS = 240.0


def check_video_timing(seconds_per_frame: float, fps: float | None) -> None:
    if not 0 < seconds_per_frame <= MAX_SECONDS_PER_FRAME or fps is not None and not 0 < fps <= MAX_FPS:
        raise UserError(f"--seconds-per-frame must be above 0 and at most {MAX_SECONDS_PER_FRAME:g}, and --fps above "
                        f"0 and at most {MAX_FPS:g} (got {seconds_per_frame:g} and {fps})",
                        "a keyframe is shown for seconds: --seconds-per-frame 2 is usual")


def write_video(frames: list[Path], dest: Path, seconds_per_frame: float = 2.0, fps: float | None = None) -> int:
    """Encode keyframes to an H.264 mp4, each shown for `seconds_per_frame`; returns frames encoded.

    Without `fps` every keyframe is one encoded frame at a frame rate of 1/seconds_per_frame (smallest file).
    With `fps` each keyframe is repeated round(seconds_per_frame * fps) times, for tools that expect a
    conventional frame rate.
    """
    check_video_timing(seconds_per_frame, fps)
    # Imported here, not at module top: PyAV is the optional [video] extra, needed only for --video.
    av = require("av", "video", "dataset --video (mp4 encoding)")
    repeat = max(1, round(seconds_per_frame * fps)) if fps else 1
    rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(1 / seconds_per_frame).limit_denominator(1000)
    images = [Image.open(f).convert("RGB") for f in frames]
    # yuv420p halves chroma resolution, so both sides must be even.
    width, height = images[0].width // 2 * 2, images[0].height // 2 * 2
    # The encoder writes the file itself, so it gets a temporary name that is renamed into place when complete.
    check_destination(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    count = 0
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for image in images:
                if image.size != (width, height):
                    image = image.resize((width, height))
                for _ in range(repeat):
                    frame = av.VideoFrame.from_image(image)
                    frame.pts, frame.time_base = count, 1 / rate
                    container.mux(stream.encode(frame))
                    count += 1
            container.mux(stream.encode())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


# --- records ----------------------------------------------------------------------------------------------------


def dialogue_lines(movie: Movie) -> list[dict[str, str]]:
    """Each frame's line with who says it, in story order."""
    return [{"frame": f.id, "speaker": f.speaker, "text": f.dialogue} for f in movie.frames if f.dialogue]


def conversation_records(movie_id: str, qa: dict[str, Any], media: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per question; `media` (the video or frames, and the dialogue if any) goes into each."""
    records = []
    for kind in QA_KINDS:
        for n, p in enumerate(qa.get(kind, []), 1):
            records.append({"id": f"{movie_id}-{kind.removesuffix('_qa')}-{n:02d}", **media,
                            "conversations": [{"from": "human", "value": f"{MEDIA_TOKEN}\n{p['question']}"},
                                              {"from": "gpt", "value": p["answer"]}]})
    return records


def validate_record(record: Any, base: Path | None = None) -> list[str]:
    """Problems with one record (empty when it is a valid LLaVA / Video-LLaVA record)."""
    if not isinstance(record, dict):
        return ["record is not an object"]
    problems = []
    if not isinstance(record.get("id"), str) or not record["id"]:
        problems.append("'id' must be a non-empty string")
    media = [k for k in ("video", "frames") if k in record]
    if len(media) != 1:
        problems.append("exactly one of 'video' or 'frames' is required")
    paths = [record["video"]] if "video" in record else record.get("frames", [])
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        problems.append("media paths must be non-empty strings")
    elif base is not None:
        problems += [f"media file missing: {p}" for p in paths if not (Path(base) / p).is_file()]
    problems += _conversation_problems(record.get("conversations"))
    return problems


def _conversation_problems(turns: Any) -> list[str]:
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        return ["'conversations' must be a non-empty list of human/gpt turn pairs"]
    problems = []
    for i, turn in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str) \
                or not turn["value"].strip():
            problems.append(f"turn {i} must be {{'from': '{want}', 'value': non-empty text}}")
    values = [t.get("value", "") for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]
    if not values or not values[0].startswith(MEDIA_TOKEN + "\n") or sum(v.count(MEDIA_TOKEN) for v in values) != 1:
        problems.append(f"the first human turn must start with '{MEDIA_TOKEN}\\n', and only it may hold the token")
    return problems


# --- export -----------------------------------------------------------------------------------------------------


@dataclass
class DatasetOptions:
    format: Format = "llava"
    video: bool = False
    seconds_per_frame: float = 2.0
    fps: float | None = None
    qa_path: Path | None = None
    dest: Path | None = None
    """Dataset file; default OUT/dataset.json (llava) or OUT/dataset.jsonl."""
    movies: list[str] | None = None
    """Only these movie ids, in this order (`make` exports its finished movies); None: every movie in OUT."""

    def __post_init__(self) -> None:
        if self.video:  # checked before any work (make renders first), not when the first video is encoded
            check_video_timing(self.seconds_per_frame, self.fps)


@dataclass
class DatasetReport:
    path: Path
    records: int = 0
    movies: int = 0
    videos: int = 0
    derived_for: list[str] = field(default_factory=list)
    """Movies whose QA was derived from the plan because the QA file had none for them."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Movies left out, with why (incomplete, damaged, a media token in their text): the others are exported."""


def export_dataset(out_dir: Path, options: DatasetOptions) -> DatasetReport:
    """Export every movie whose files check out; the others are listed in the report's `skipped`. A UserError
    only when no movie can be exported."""
    out_dir = Path(out_dir)
    rendered, skipped = find_rendered(out_dir, options.movies)
    dest = Path(options.dest or out_dir / ("dataset.json" if options.format == "llava" else "dataset.jsonl"))
    check_dataset_destination(dest, out_dir, options.qa_path)
    # Must exist before validation: the kernel cannot resolve "../" through a missing folder.
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {dest.parent}: {exc.strerror or exc}", "choose a writable --dest") from None
    base = dest.parent.resolve()
    qa_by_id = load_qa_file(options.qa_path) if options.qa_path else None
    report = DatasetReport(dest, skipped=skipped)
    records: list[dict[str, Any]] = []
    for item in rendered:
        try:
            records += _movie_records(item, options, base, qa_by_id, report)
            report.movies += 1
        except UserError as exc:
            report.skipped[item.movie.id] = str(exc)
        except Exception as exc:  # an encoder's error on one movie's frames (--video): that movie only
            report.skipped[item.movie.id] = f"{type(exc).__name__}: {exc}"
    if not records:
        first = next(iter(report.skipped.items()), None)
        raise UserError(f"no movie in {out_dir} can be exported" + (f": {first[0]}: {first[1]}" if first else ""))
    _write_records(dest, records, options.format)
    report.records = len(records)
    return report


def check_dataset_destination(dest: Path, out_dir: Path, qa_path: Path | None) -> None:
    """A UserError when the dataset file would overwrite the render output it is made from (a movie folder's
    manifest, frames or anything else in it) or the QA file it reads, or is no regular file: before any work."""
    check_destination(dest)
    target = dest.resolve()
    for manifest in out_dir.glob("*/manifest.json"):
        if target.is_relative_to(manifest.parent.resolve()):
            raise UserError(f"--dest {dest} is inside the rendered movie folder {manifest.parent}: the dataset file "
                            "would overwrite what the movie is made of", f"write it elsewhere, e.g. --dest "
                            f"{out_dir / 'dataset.json'}")
    if qa_path is not None and target == Path(qa_path).resolve():
        raise UserError(f"--dest {dest} is the QA file the dataset is made from",
                        "give the dataset file another name")


def _movie_records(item: RenderedMovie, options: DatasetOptions, base: Path,
                   qa_by_id: dict[str, dict[str, Any]] | None, report: DatasetReport) -> list[dict[str, Any]]:
    """One movie's records, checked: an invalid one raises a UserError naming the movie and the field."""
    qa = _qa_for(item.movie, qa_by_id, report)
    token_in = media_token_fields(item.movie, qa)
    if token_in:
        raise UserError(f"movie {item.movie.id!r}: {token_in[0]} contains {MEDIA_TOKEN!r}, which marks where the "
                        "video goes in a record" + (f" (and {len(token_in) - 1} more field(s))" if len(token_in) > 1
                                                    else ""),
                        f"remove {MEDIA_TOKEN!r} from that text (in the plan, then render again: the frames are "
                        "kept; or in the QA file)")
    media = _media(item, options, base, report)
    lines = dialogue_lines(item.movie)
    records = conversation_records(item.movie.id, qa, {**media, "dialogue": lines} if lines else media)
    problems = [(r["id"], p) for r in records for p in validate_record(r, base)]
    if problems:
        raise UserError(f"record {problems[0][0]} is invalid: {problems[0][1]}")
    return records


def _qa_for(movie: Movie, qa_by_id: dict[str, dict[str, Any]] | None, report: DatasetReport) -> dict[str, Any]:
    """The movie's QA from the QA file, if it has QA for this very movie (its story digest, or for older files
    its title, must match: another film may have the same id), else derived from its plan."""
    record = (qa_by_id or {}).get(movie.id)
    if record is not None:
        digest, title = record.get("story"), record.get("movie_title")
        if digest:
            other = digest != story_digest(movie)
        else:  # a QA file from before the digest: its title is all it says about its movie
            other = title is not None and title != (movie.title or movie.id)
        if other:
            raise UserError(f"the QA file's entry for movie {movie.id!r} ({title!r}) was written for another movie "
                            f"with that id, or before its plan changed (rendered: {movie.title!r})",
                            "write its QA again from the plan it was rendered from (`movielm-fast qa PLAN`)")
        return record["QA"]
    if qa_by_id is not None:
        report.derived_for.append(movie.id)
    return movie_record(movie, derived_qa(movie))["QA"]


def _media(item: RenderedMovie, options: DatasetOptions, base: Path, report: DatasetReport) -> dict[str, Any]:
    if options.video:
        video = item.folder / "movie.mp4"
        write_video(item.frame_files, video, options.seconds_per_frame, options.fps)
        report.videos += 1
        return {"video": _relative(video, base)}
    return {"frames": [_relative(f, base) for f in item.frame_files]}


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base)).as_posix()


def _write_records(dest: Path, records: list[dict[str, Any]], fmt: Format) -> None:
    if fmt == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
    atomic_write_text(dest, text)
