"""What the toy demo model's images mean, as read by the analytic judge (bench.toy.judge).

    python -m movielm_fast.bench.toy_quality [--model demo|demo-dit] [--n 100]
        [--checks conditioning,phrasing,open,style,consistency,lossy]

Every prompt is built by the engine from a plan, as a render builds it (run.prompts: "<style> style, <frame>").
Steps, guidance, true CFG and sampler are the model's own defaults (its movielm_defaults.json: the UNet demo 20
DPM++ steps at guidance 4; the DiT demo its flow-matching Euler) unless --steps / --guidance say otherwise.
- conditioning: `--n` held-out layouts (never trained on) at those steps, each a frame described by
  world.caption in a plan of its style: background and every named shape's colour at its named position right (the
  issue's criterion), plus the judge's other rates (shape, size at position, ...);
- phrasing: hand-written captions in sentence forms the model never trained on (bench.toy.phrasing.HELD_OUT) and
  the issue's eight (ISSUE), frames of a style-"plain" plan, `--phrasing-seeds` seeds each: the judge's rates per
  attribute against the scenes they mean, and the same scenes captioned by world.caption for comparison;
- style: a textual-inversion token learned by the engine's trainer from neon scenes, each with a caption file of
  what it shows and never the word "neon"; renders of captions without a style word, with and without the token
  (and with the words "neon style" for reference), judged neon how often;
- open: descriptions that leave the colour, size or shape open, `--open-seeds` seeds each: what the seed draws;
- consistency: a movie whose two characters, described without a colour, move between positions and backgrounds;
  per character, how often its colour equals its anchor's and its most common one, per consistency setting (none,
  anchor_attention, character_token and `--consistency-variants`), and the colour leaking between them; beside
  them "words", the anchor's colour stated in the frames: what the model does with a colour it is told;
- lossy: each lossy option (bf16, fp16, fewer steps, other schedulers, FP8 emulated, step caching) against the
  fp32 render at those steps on the same captions and seeds: the conditioning rate, how often the judge's reading is
  unchanged, and PSNR / SSIM of the pixels. (The DiT demo's step cache and FP8 at several step counts: bench.dit_accel.)
Results go to bench/results/toy_quality-<stamp>.json, with a grid of renders beside it (the first 16 captions).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.step_cache import StepCache
from movielm_fast.plan import RenderSettings, Style, parse_plan
from movielm_fast.run.prompts import frame_prompt
from movielm_fast.run.renderer import Renderer, batch_settings
from movielm_fast.style.immobilize import immobilize_style
from movielm_fast.style.training import StyleSettings

from .args import bench_parser
from .formats import Section, load_note, rate, save_result
from .hardware import load_average, machine_info
from .image_quality import psnr, ssim
from .toy import judge as J
from .toy import phrasing as P
from .toy import world as W

TOY_FORMAT = "movielm-bench-toy-quality/1"

HELD_OUT_SEED = 1_000_000


def held_out_scenes(n: int, styles=W.STYLES) -> list[W.Scene]:
    return [W.scene_for_seed(HELD_OUT_SEED + i, styles, held_out=True) for i in range(n)]


def engine_prompts(descriptions: list[str], style: str) -> list[str]:
    """The prompts a render builds for a plan of these frame descriptions in this style."""
    plan = {"id": "toy", "style": {"name": style},
            "frames": [{"id": f"{i:04d}", "description": d} for i, d in enumerate(descriptions)]}
    movie = parse_plan(plan)[0].movie
    return [frame_prompt(movie, f) for f in movie.frames]


def scene_prompts(scenes: list[W.Scene]) -> list[str]:
    """Each scene's world.caption (without its style) as a frame of a plan in the scene's style."""
    return [engine_prompts([s.caption(with_style=False)], s.style)[0] for s in scenes]


def render_prompts(r: Renderer, prompts: list[str], s: BatchSettings, batch: int = 4, seed0: int = 0
                   ) -> np.ndarray:
    out = []
    for i in range(0, len(prompts), batch):
        jobs = [FrameJob("toy", f"{j:04d}", p, "", seed0 + j) for j, p in enumerate(prompts[i:i + batch], i)]
        out.append(r.render(jobs, s)[0])
    return np.concatenate(out)


def judged(images: np.ndarray, wanted: list[W.Scene]) -> tuple[dict, list[J.Reading]]:
    scores = [J.score(img, w) for img, w in zip(images, wanted)]
    return J.summarize(scores), [J.read(img) for img in images]


def grid(images: np.ndarray, cols: int = 8, scale: int = 2) -> Image.Image:
    n = len(images)
    rows = (n + cols - 1) // cols
    h, w = images.shape[1:3]
    sheet = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for k, img in enumerate(images):
        sheet[(k // cols) * h:(k // cols + 1) * h, (k % cols) * w:(k % cols + 1) * w] = img
    return Image.fromarray(sheet).resize((cols * w * scale, rows * h * scale), Image.NEAREST)


def toy_settings(r: Renderer, steps: int | None = None, guidance: float | None = None) -> BatchSettings:
    """64x64 frames at the model's own steps, guidance, true CFG and sampler, unless steps / guidance are given."""
    d = r.defaults
    return BatchSettings(64, 64, steps or d["steps"], d["guidance"] if guidance is None else guidance,
                         d.get("scheduler", "dpmpp"), true_cfg=d.get("true_cfg") or 1.0)


def check_conditioning(r: Renderer, args, scenes) -> tuple[dict, np.ndarray]:
    prompts = scene_prompts(scenes)
    t0 = time.perf_counter()
    images = render_prompts(r, prompts, toy_settings(r, args.steps, args.guidance))
    rates, _ = judged(images, scenes)
    truth, _ = judged(np.stack([(W.render(s) * 255).round().astype(np.uint8) for s in scenes]), scenes)
    return {"rates": rates, "judge_on_ground_truth": truth, "seconds": round(time.perf_counter() - t0, 1),
            "examples": prompts[:16]}, images


def check_phrasing(r: Renderer, args) -> tuple[dict, np.ndarray]:
    """The judge's rates on hand-written captions in unseen sentence forms, on the issue's eight, and on the held-out
    captions' scenes as world.caption words them (what the phrasing alone costs), each rendered with
    --phrasing-seeds seeds, frames of a style-"plain" plan."""
    s = toy_settings(r, args.steps, args.guidance)
    sets = {"held_out": P.HELD_OUT, "issue": P.ISSUE,
            "held_out_scenes_as_world_captions": [(sc.caption(with_style=False), sc) for _, sc in P.HELD_OUT]}
    out, shown = {}, None
    for name, pairs in sets.items():
        t0 = time.perf_counter()
        prompts = engine_prompts([c for c, _ in pairs], "plain") * args.phrasing_seeds
        scenes = [sc for _, sc in pairs] * args.phrasing_seeds
        images = render_prompts(r, prompts, s, seed0=700)
        rates, readings = judged(images, scenes)
        out[name] = {"captions": len(pairs), "seeds": args.phrasing_seeds, "rates": rates,
                     "seconds": round(time.perf_counter() - t0, 1)}
        if name == "issue":  # what each of the issue's captions came out as, first seed
            out[name]["readings"] = [{"prompt": p, "read": _describe(g)}
                                     for p, g in zip(prompts, readings[:len(pairs)])]
            shown = images[:len(pairs)]
    out["examples"] = engine_prompts([c for c, _ in P.HELD_OUT[:4]], "plain")
    return out, shown


def _describe(g: J.Reading) -> str:
    chars = [f"{g.sizes[p]} {g.colours[p]} {g.shapes[p]} {p}" for p in W.POSITIONS if g.colours[p] != J.EMPTY]
    return ", ".join(chars + [g.background, f"{g.style} style"])


def check_style(r: Renderer, args, scenes) -> dict:
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "neon"
        folder.mkdir()
        for i in range(args.style_images):
            scene = W.random_scene(rng, ("neon",))
            Image.fromarray((W.render(scene) * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
            # Its caption file says what it shows but not its style ("<token>, <caption>" when training): the
            # token has to carry the look, and the word neon is in no caption.
            (folder / f"{i:03d}.txt").write_text(scene.caption(with_style=False))
        t0 = time.perf_counter()
        res = immobilize_style(r.scene_renderer, Style(name="Glow"),
                               StyleSettings(steps=args.style_steps, batch_size=8),
                               images=folder, out=Path(tmp) / "library")
        train_s = time.perf_counter() - t0
    r.encoder.add_token(res.token, list(res.vectors), str(res.path))
    base = [s.caption(with_style=False) for s in scenes]
    s = toy_settings(r, args.steps, args.guidance)
    out = {"token": res.token, "train_seconds": round(train_s, 1), "images": args.style_images, "captions": len(base),
           "steps": args.style_steps, "report": {k: v for k, v in res.report.items() if isinstance(v, (int, float))}}
    for name, prompts in (("without token", base), ("with token", [f"{res.token}, {c}" for c in base]),
                          ("with the words 'neon style'", [f"neon style, {c}" for c in base])):
        images = render_prompts(r, prompts, s, seed0=500)
        readings = [J.read(img) for img in images]
        out[name] = {"judged_neon": sum(x.style == "neon" for x in readings) / len(readings),
                     "styles": {st: sum(x.style == st for x in readings) for st in W.STYLES},
                     "conditioning_ignoring_style": J.summarize(
                         [J.score(img, c) for img, c in zip(images, base)])["conditioning"]}
    return out


OPEN = [  # (the attribute left open, a description that leaves it open, where it is drawn)
    ("colour", W.Character("circle", None, "big"), "in the centre, on grass"),
    ("size", W.Character("circle", "red", None), "in the centre, on grass"),
    ("shape", W.Character(None, "red", "big"), "in the centre, on grass"),
]


def _entropy_share(counts: dict[str, int], values: int) -> float:
    """The entropy of a distribution as a share of the largest possible over `values` values."""
    p = np.array([c for c in counts.values() if c], float)
    p /= max(p.sum(), 1)
    return float(-(p * np.log(p)).sum() / np.log(values)) + 0.0 if len(p) else 0.0  # + 0.0: no "-0.0"


def check_open(r: Renderer, args) -> dict:
    """What the model draws for what a caption leaves open: each description of OPEN as a frame of a plain plan,
    --open-seeds seeds; the open attribute's distribution over the pure readings, its entropy as a share of the
    largest possible, how often the colour read is pure (not a blend), and how often the stated attributes are
    right."""
    s = toy_settings(r, args.steps, args.guidance)
    out = {}
    for attribute, described, where in OPEN:
        [prompt] = engine_prompts([f"{described.phrase} {where}"], "plain")
        images = render_prompts(r, [prompt] * args.open_seeds, s, seed0=900)
        drawn = [J.read(img).character("centre") for img in images]
        values = [getattr(d, attribute) for d in drawn if d is not None]
        counts = {v: values.count(v) for v in {"colour": W.COLOURS, "size": W.RADIUS, "shape": W.SHAPES}[attribute]}
        out[attribute] = {"prompt": prompt, "images": len(images), "counts": counts,
                          "entropy_share": _entropy_share(counts, len(counts)),
                          "pure": sum(d is not None for d in drawn) / len(images),
                          "stated_right": sum(J.open_values(d, described) is not None for d in drawn) / len(images)}
    return out


CAST = {"Rosa": W.Character("circle", None, "big"), "Tom": W.Character("square", None, "small")}
STORY = [  # (background, {position: name}): each character in 8 frames, 4 of them together
    ("grass", {"left": "Rosa"}), ("sea", {"right": "Tom"}), ("night", {"centre": "Rosa"}),
    ("sunset", {"left": "Tom", "right": "Rosa"}), ("sky", {"right": "Rosa"}), ("grass", {"centre": "Tom"}),
    ("sea", {"left": "Rosa", "centre": "Tom"}), ("night", {"left": "Tom"}), ("sunset", {"centre": "Rosa"}),
    ("sky", {"left": "Rosa", "right": "Tom"}), ("grass", {"right": "Tom"}),
    ("night", {"centre": "Tom", "right": "Rosa"}),
]
_POS = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
# A toy-world caption needs a place and a background: the anchors show each character alone, in the middle, on grass
# (where `open` measures what the model draws). At night, the first choice, the DiT demo draws only white or yellow:
# an anchor there shows little of what the seed decides elsewhere (docs/consistency.md).
ANCHOR_PROMPT = "{appearance} in the centre, on grass"
_NIGHT_ANCHORS = "{appearance} in the centre, at night"  # results written before they recorded their anchor prompt


def story_plan(consistency: dict, s: BatchSettings, seed: int, cast: dict[str, W.Character] = CAST) -> dict:
    frames = [{"id": f"{i:03d}", "description": " and ".join(f"{n} {_POS[p]}" for p, n in cast.items()) +
               f", {W.BACKGROUND_PHRASES[bg]}"} for i, (bg, cast) in enumerate(STORY)]
    return {"id": "story", "style": {"name": "plain"},
            "characters": [{"name": n, "appearance": c.phrase} for n, c in cast.items()], "frames": frames,
            "render": {"width": 64, "height": 64, "steps": s.steps, "guidance": s.guidance, "scheduler": s.scheduler,
                       "seed": seed, "negative_prompt": ""},
            "consistency": {"anchor_prompt": ANCHOR_PROMPT, **consistency}}


def story_readings(r: Renderer, consistency: dict, args, seed: int, stated: bool = False
                   ) -> tuple[dict[str, J.Reading], list[J.Reading], int]:
    """One movie of STORY: each character's anchor read, every frame read, and the anchors' steps. The anchors are
    rendered as character_token renders them, whatever the mode (without it: the anchors the mode would use).
    `stated`: the frames state each anchor's colour (judge.anchor_colour) in words instead."""
    ts = toy_settings(r, args.steps, args.guidance)
    lm = parse_plan(story_plan(consistency, ts, seed))[0]
    s = r.info.resolved(lm, RenderSettings())
    s = s.model_copy(update={"consistency": s.consistency.model_copy(update={"mode": "character_token"})})
    anchors, specs = {}, r.anchor_specs(lm, None, s, batch_settings(s))
    for name, spec in specs.items():
        job = FrameJob(spec.movie_id, f"anchor-{name}", spec.prompt, spec.negative_prompt, spec.seed)
        anchors[name] = J.read(r.render([job], spec.settings)[0][0])
    if stated:
        cast = {n: replace(c, colour=J.anchor_colour(anchors[n])) for n, c in CAST.items()}  # None: left open
        lm = parse_plan(story_plan(consistency, ts, seed, cast))[0]
    tasks = r.plan(lm, None, RenderSettings()).tasks
    steps = next(iter(specs.values())).settings.steps
    return anchors, [J.read(r.render([t.job], t.settings)[0][0]) for t in tasks], steps


def check_consistency(r: Renderer, args) -> dict:
    """STORY's two characters leave their colour open; over --story-seeds movie seeds, per consistency setting:
    each character's open-attribute agreement with its anchor and with its most common appearance (judge.agreement,
    averaged over characters and seeds); how often it is drawn at its place, with its stated shape and size, in a
    pure colour; and, in frames with both, how often it shows the other's anchor colour (leak: without the mode,
    chance). "words" is the reference: no mode, each anchor's colour stated in its character's frames --
    what the model does with a colour it is told, the most a method that conveys the colour as well as a word gets
    ("stated": true in a setting of --consistency-variants)."""
    variants = {"none": {"mode": "none"}, "words": {"mode": "none", "stated": True},
                "anchor_attention": {"mode": "anchor_attention"}, "character_token": {"mode": "character_token"}}
    variants.update(json.loads(args.consistency_variants) if args.consistency_variants else {})
    out = {}
    for label, consistency in variants.items():
        if consistency is None:  # a default left out
            continue
        t0 = time.perf_counter()
        groups, counts = [], dict.fromkeys(("appearances", "colour", "drawn", "shape", "size", "pure", "shared",
                                            "leak"), 0)
        read = {1: [0, 0], 2: [0, 0]}  # characters in the frame -> [agrees with a readable anchor, appearances]
        mode = {k: v for k, v in consistency.items() if k != "stated"}
        for seed in range(args.story_seeds):
            anchor_readings, readings, anchor_steps = story_readings(r, mode, args, seed,
                                                                     consistency.get("stated", False))
            anchors = {n: J.anchor_values(a, CAST[n]) for n, a in anchor_readings.items()}
            colours = {n: J.anchor_colour(a) for n, a in anchor_readings.items()}
            seen: dict[str, list] = {n: [] for n in CAST}
            for g, (_, cast) in zip(readings, STORY):
                for pos, name in cast.items():
                    v = J.open_values(g.character(pos), CAST[name])
                    seen[name].append(v)
                    counts["appearances"] += 1
                    counts["drawn"] += g.colours[pos] != J.EMPTY
                    counts["shape"] += g.shapes[pos] == CAST[name].shape
                    counts["size"] += g.sizes[pos] == CAST[name].size
                    counts["pure"] += g.colours[pos] != J.EMPTY and g.pure[pos]
                    counts["colour"] += colours[name] is not None and J.colour_at(g, pos) == colours[name]
                    if anchors[name] is not None:
                        read[len(cast)][0] += v == anchors[name]
                        read[len(cast)][1] += 1
                    if len(cast) > 1:
                        counts["shared"] += 1
                        others = {anchors[o] for o in cast.values() if o != name} - {anchors[name], None}
                        counts["leak"] += v in others
            groups += [J.agreement(seen[n], anchors[n]) for n in CAST]
        n = counts["appearances"]
        out[label] = {"consistency": consistency, "movie_seeds": args.story_seeds, "appearances": n,
                      "with_anchor": float(np.mean([g["with_anchor"] for g in groups])),
                      "with_most_common": float(np.mean([g["with_most_common"] for g in groups])),
                      "colour_with_anchor": counts["colour"] / n,
                      "anchors_read": sum(g["anchor"] is not None for g in groups) / len(groups),
                      "anchor_prompt": ANCHOR_PROMPT, "anchor_steps": anchor_steps,
                      "read_alone": read[1][0] / max(read[1][1], 1), "read_together": read[2][0] / max(read[2][1], 1),
                      **{k: counts[k] / n for k in ("drawn", "shape", "size", "pure")},
                      "shared_appearances": counts["shared"], "leak": counts["leak"] / max(counts["shared"], 1),
                      "per_character": groups, "seconds": round(time.perf_counter() - t0, 1)}
        print(label, {k: v for k, v in out[label].items() if k != "per_character"}, flush=True)
    return out


LOSSY_CASES = [  # name, ModelConfig fields, BatchSettings fields (besides the reference's)
    ("bf16", {"dtype": "bf16"}, {}), ("fp16", {"dtype": "fp16"}, {}),
    ("dpmpp 8 steps", {}, {"steps": 8}), ("dpmpp 4 steps", {}, {"steps": 4}),
    ("lcm 4 steps", {}, {"steps": 4, "scheduler": "lcm"}),
    ("euler_a 20 steps", {}, {"steps": 20, "scheduler": "euler_a"}),
    ("fp8 (emulated)", {"quantize": "fp8-emulated"}, {}),
    ("step cache N=2", {}, {"step_cache": StepCache(2, 0)}), ("step cache N=3", {}, {"step_cache": StepCache(3, 0)}),
    ("step cache N=3, depth 2", {}, {"step_cache": StepCache(3, 2)}),
    ("step cache N=3 + fp8 (emulated)", {"quantize": "fp8-emulated"}, {"step_cache": StepCache(3, 0)}),
]


def check_lossy(model: str, args, scenes, fp32_images: np.ndarray, reference: BatchSettings) -> dict:
    """Each lossy option against the fp32 render at `reference`'s settings, same captions and seeds: the judge's
    conditioning rate and readings, and PSNR / SSIM of the pixels."""
    captions = scene_prompts(scenes)
    ref = [J.read(img) for img in fp32_images]
    out = {}
    base = J.summarize([J.score(img, sc) for img, sc in zip(fp32_images, scenes)])["conditioning"]
    for name, config, settings in LOSSY_CASES:
        if args.lossy_cases and not any(name.startswith(p) for p in args.lossy_cases.split(",")):
            continue
        t0 = time.perf_counter()
        try:
            r = Renderer(ModelConfig(model=model, **config))
            images = render_prompts(r, captions, replace(reference, **settings))
        except Exception as exc:  # fp16 convolutions are missing on some CPU builds: report, go on
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        rates, readings = judged(images, scenes)
        same = sum(a == b for a, b in zip(readings, ref)) / len(ref)
        diff = np.abs(images.astype(np.int16) - fp32_images.astype(np.int16))
        out[name] = {"conditioning": rates["conditioning"], "delta_vs_fp32": rates["conditioning"] - base,
                     "same_reading_as_fp32": same, "psnr_db_vs_fp32": round(psnr(images, fp32_images), 2),
                     "ssim_vs_fp32": round(ssim(images, fp32_images), 4), "max_abs_pixel_diff": int(diff.max()),
                     "mean_abs_pixel_diff": round(float(diff.mean()), 3), "seconds": round(time.perf_counter() - t0, 1)}
    return {"fp32_conditioning": base, "captions": len(captions), "cases": out}


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("toy_quality", __doc__, model="demo", results="--results")
    ap.add_argument("--steps", type=int, default=None, help="default: the model's own")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's own")
    ap.add_argument("--checks", default="conditioning,phrasing,open,style,consistency,lossy")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--phrasing-seeds", type=int, default=2)
    ap.add_argument("--style-images", type=int, default=16)
    ap.add_argument("--style-steps", type=int, default=150)
    ap.add_argument("--open-seeds", type=int, default=50)
    ap.add_argument("--story-seeds", type=int, default=6)
    ap.add_argument("--consistency-variants", default="",
                    help='more consistency settings to measure beside none, words, anchor_attention and '
                         'character_token, as JSON: {"label": {"mode": "character_token", "token_steps": 75}, ...}; '
                         'a label mapped to null leaves that setting out; "stated": true states the anchors\' '
                         'colours in the frames')
    ap.add_argument("--lossy-n", type=int, default=50)
    ap.add_argument("--lossy-cases", default="", help="only the lossy cases whose names start with one of these "
                    "comma-separated prefixes (e.g. 'fp8,step cache'); default: all")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    checks = set(args.checks.split(","))

    load_start = load_average()
    r = Renderer(ModelConfig(model=args.model))
    scenes = held_out_scenes(args.n)
    s = toy_settings(r, args.steps, args.guidance)
    result = {"format": TOY_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": machine_info(torch.device("cpu")),
              "settings": {"model": args.model, "family": r.model.family.name, "model_hash": r.model.content_hash,
                           "n": args.n, "steps": s.steps, "guidance": s.guidance, "true_cfg": s.true_cfg,
                           "scheduler": s.scheduler, "size": 64}}
    fp32_images = issue_images = None
    if "conditioning" in checks or "lossy" in checks:
        result["conditioning"], fp32_images = check_conditioning(r, args, scenes)
        print("conditioning", result["conditioning"]["rates"])
    if "phrasing" in checks:
        result["phrasing"], issue_images = check_phrasing(r, args)
        print("phrasing", {k: v["rates"] for k, v in result["phrasing"].items() if isinstance(v, dict)})
    if "open" in checks:
        result["open"] = check_open(r, args)
        print("open", result["open"])
    if "style" in checks:
        result["style"] = check_style(r, args, scenes[:args.lossy_n])
        print("style", {k: v for k, v in result["style"].items() if isinstance(v, dict)})
    if "consistency" in checks:
        result["consistency"] = check_consistency(Renderer(ModelConfig(model=args.model)), args)
        print("consistency", result["consistency"])
    if "lossy" in checks:
        result["lossy"] = check_lossy(args.model, args, scenes[:args.lossy_n], fp32_images[:args.lossy_n], s)
        print("lossy", result["lossy"])
    result["load_average"] = {"start": load_start, "end": load_average()}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if fp32_images is not None:  # the renders beside the numbers: the first 16 held-out captions
        args.results.mkdir(parents=True, exist_ok=True)
        image = args.results / f"toy_quality-{stamp}.png"
        grid(fp32_images[:16]).save(image)
        result["image"] = image.name
    if issue_images is not None:  # the issue's eight captions as the model draws them
        args.results.mkdir(parents=True, exist_ok=True)
        image = args.results / f"toy_quality-{stamp}-issue.png"
        grid(issue_images).save(image)
        result["phrasing"]["issue"]["image"] = image.name
    save_result(args.results, "toy_quality", result)
    return 0


def toy_quality_section(results: list[dict[str, Any]]) -> list[str]:
    """One block per model family measured (the UNet demo, the DiT demo), in the order first measured."""
    if not results:
        return []
    lines = ["## The toy demo model: what its images mean (`python -m movielm_fast.bench.toy_quality`)"]
    for family in dict.fromkeys(_family(r) for r in results):
        lines += _model_block([r for r in results if _family(r) == family])
    return lines + [""]


SHIPPED = ("demo", "demo-dit")  # the models the package ships; others are fine-tunes measured on the way
_SAMPLERS = {"dpmpp": "DPM++", "default": "flow-matching Euler"}  # the toy models' own: the UNet demo's, the DiT's
_GOALS = {"SD 1.x/2.x": "80%", "FLUX.1": "90%; 85% on the held-out phrasing set"}  # each demo model's issue's bar


def _family(result: dict[str, Any]) -> str:
    return result["settings"].get("family", "SD 1.x/2.x")  # results before the DiT demo: the UNet demo's


def _model_block(results: list[dict[str, Any]]) -> list[str]:
    # Checks may run in separate processes (--checks): each part comes from the newest result that has it, for
    # the shipped model (else the newest model measured); other models (fine-tunes not shipped) follow with what
    # was measured of them.
    res = _merged(results, next((r for r in reversed(results) if r["settings"]["model"] in SHIPPED and
                                 "conditioning" in r), results[-1]))
    same_model = [r for r in results if r["settings"]["model_hash"] == res["settings"]["model_hash"]]
    # Lossy cases may be measured a few at a time (--lossy-cases): those against the same reference (steps,
    # captions) form one table, the newest measurement of each case winning.
    lossy: dict[tuple, dict[str, Any]] = {}
    for r in same_model:
        if "lossy" in r:
            part = r["lossy"]
            key = (r["settings"]["steps"], part.get("captions"), part["fp32_conditioning"])
            lossy.setdefault(key, {**part, "steps": key[0], "cases": {}})["cases"].update(part["cases"])
    st, m = res["settings"], res["machine"]
    cfg = f", true CFG {st['true_cfg']}" if (st.get("true_cfg") or 1.0) > 1 else ""
    sampler = _SAMPLERS.get(st["scheduler"], st["scheduler"])
    lines = ["", f"### {_family(res)}: --model {st['model']}", "",
             f"Model {st['model']} (hash {st['model_hash']}), {st['size']}², {st['steps']} {sampler} steps, "
             f"guidance {st['guidance']}{cfg}, fp32 unless stated, on {m['cpu_model']}; read back by the analytic "
             f"judge (`bench/toy/judge.py`); {load_note(res)}; {res['created']}."]
    if "image" in res:
        lines += ["", f"![first 16 held-out captions](results/{res['image']})"]
    c = res.get("conditioning")
    if c:
        r, t = c["rates"], c["judge_on_ground_truth"]
        lines += ["", f"**Conditioning** on {r['images']} held-out captions (layouts never trained on): background "
                  f"and every named shape's colour at its named position right in **{rate(r['conditioning'])}** of "
                  f"the images (the goal: {_GOALS.get(_family(res), '—')}).", "",
                  "| rate | model | world's own images |", "|---|---|---|"]
        for k in ("conditioning", "strict", "background", "style", "colour_at_position", "shape_at_position",
                  "size_at_position", "empty_positions"):
            lines.append(f"| {k.replace('_', ' ')} | {rate(r[k])} | {rate(t[k])} |")
    ph = res.get("phrasing")
    if ph:
        lines += ["", "**Phrasing** the model never trained on (`bench/toy/phrasing.py`: hand-written sentence forms, "
                  "and the issue's eight captions), frames of a style-plain plan; each attribute as the judge reads "
                  "it:", "", "| captions | images | conditioning | background | colour | shape | size | empty |",
                  "|---|---|---|---|---|---|---|---|"]
        names = {"held_out": "held-out forms", "held_out_scenes_as_world_captions": "the same scenes, world.caption",
                 "issue": "the issue's eight"}
        for k, label in names.items():
            if k in ph:
                r = ph[k]["rates"]
                lines.append(f"| {label} | {r['images']} | {rate(r['conditioning'])} | {rate(r['background'])} | "
                             f"{rate(r['colour_at_position'])} | {rate(r['shape_at_position'])} | "
                             f"{rate(r['size_at_position'])} | {rate(r['empty_positions'])} |")
    sty = res.get("style")
    if sty:
        lines += ["", f"**Style immobilization**: token {sty['token']} learned by the engine's trainer from "
                  f"{sty['images']} neon scenes ({sty['steps']} steps, {sty['train_seconds']} s), each with a caption "
                  "file of what it shows that never says neon; held-out captions without a style word (the first "
                  f"{sty.get('captions', 'few')}):", "",
                  "| prompt | judged neon | conditioning (style ignored) |", "|---|---|---|"]
        for k in ("without token", "with token", "with the words 'neon style'"):
            lines.append(f"| {k} | {rate(sty[k]['judged_neon'])} | {rate(sty[k]['conditioning_ignoring_style'])} |")
    lines += _open_lines(res.get("open")) + _consistency_lines(res.get("consistency"))
    for lossy in sorted(lossy.values(), key=lambda x: x["steps"]):
        lines += ["", f"**Lossy options** against fp32 {sampler} {lossy['steps']} steps (conditioning "
                  f"{rate(lossy['fp32_conditioning'])}) on the same held-out captions and seeds (the first "
                  f"{lossy.get('captions', 'few')}):", "",
                  "| option | conditioning | change | same reading as fp32 | max / mean pixel diff | PSNR / SSIM |",
                  "|---|---|---|---|---|---|"]
        for k, v in lossy["cases"].items():
            if "error" in v:
                lines.append(f"| {k} | does not run: {v['error']} | | | | |")
            else:
                lines.append(f"| {k} | {rate(v['conditioning'])} | {100 * v['delta_vs_fp32']:+.0f} points | "
                             f"{rate(v['same_reading_as_fp32'])} | {v['max_abs_pixel_diff']} / "
                             f"{v['mean_abs_pixel_diff']} | " + (f"{v['psnr_db_vs_fp32']} dB / {v['ssim_vs_fp32']}"
                                                                 if "psnr_db_vs_fp32" in v else "—") + " |")
    for other in dict.fromkeys(r["settings"]["model_hash"] for r in results if r["settings"]["model_hash"] !=
                               res["settings"]["model_hash"]):
        o = _merged(results, next(r for r in reversed(results) if r["settings"]["model_hash"] == other))
        parts = _open_lines(o.get("open")) + _consistency_lines(o.get("consistency"))
        if parts:
            what = "Shipped before" if o["settings"]["model"] in SHIPPED else "Not shipped"  # weights replaced since
            lines += ["", f"#### {what}: {o['settings']['model']} (hash {other}); {load_note(o)}; {o['created']}"]
            lines += parts
    return lines


def _merged(results: list[dict[str, Any]], res: dict[str, Any]) -> dict[str, Any]:
    """`res` with each check from the newest result of its model that has it; the consistency settings of every
    result of the model in one table (the newest measurement of each label winning)."""
    res = dict(res)
    same_model = [r for r in results if r["settings"]["model_hash"] == res["settings"]["model_hash"]]
    for key in ("conditioning", "phrasing", "open", "style", "image"):
        for r in reversed(same_model):
            if key in r:
                res[key] = r[key]
                break
    # Before results recorded their anchors' steps, anchors rendered at the frames' steps.
    consistency = {k: {"anchor_steps": r["settings"]["steps"], **v} for r in same_model
                   for k, v in r.get("consistency", {}).items()}
    if consistency:
        res["consistency"] = consistency
    return res


def _open_lines(op: dict[str, Any] | None) -> list[str]:
    if not op:
        return []
    lines = ["", "**What the text leaves open**: a description without one attribute, in the centre on grass, "
             f"{next(iter(op.values()))['images']} seeds; the open attribute's distribution over the pure readings, "
             "its entropy as a share of the largest possible (the issue's bar for colour: 80%), how often the colour "
             "is pure rather than a blend (bar: 90%) and the stated attributes right:", "",
             "| open | prompt | distribution | entropy | pure colour | stated right |", "|---|---|---|---|---|---|"]
    for k, v in op.items():
        dist = ", ".join(f"{name} {n}" for name, n in v["counts"].items())
        # + 0.0: results written before _entropy_share added it hold -0.0, shown as "-0%"
        lines.append(f"| {k} | {v['prompt']} | {dist} | {rate(v['entropy_share'] + 0.0)} | {rate(v['pure'])} | "
                     f"{rate(v['stated_right'])} |")
    return lines


def _consistency_lines(con: dict[str, Any] | None) -> list[str]:
    if not con or "with_anchor" not in next(iter(con.values())):
        return []
    first = next(iter(con.values()))
    lines = ["", f"**Consistency**: a movie of {len(STORY)} frames whose two characters, described without a colour "
             f"(\"a big circle\", \"a small square\"), change places and backgrounds, over {first['movie_seeds']} "
             "movie seeds; per character, how often its colour equals its anchor's and its most common one's (the "
             "issue's bar: 90% with the anchor, and at most 60% without the mode; a character whose anchor the judge "
             "cannot read, a blend, counts 0 with the anchor), how often it is drawn at its place with its stated "
             "shape and size in a pure colour, and, in frames with both, how often it shows the other's anchor "
             "colour (leak). Where the judge reads the anchor: how often the colour equals it in frames with one "
             "character (alone) and with both (together); and the colour alone, whatever the shape and size drawn, "
             "against the anchor's colour read the same way (the open attribute apart from how well the model draws "
             "the stated ones). The anchor prompt follows `{appearance}`; the anchors' steps "
             "(twice the frames' since `anchor_steps`) after it. A setting with `\"stated\": true` (\"words\") "
             "writes each anchor's colour in its character's frames, without a mode: what the model does "
             "with a colour it is told, the most a method that conveys the colour as well as a word can reach:", "",
             "| setting | anchor | appearances | = anchor | = most common | anchors read | = read anchor, alone / "
             "together | colour alone = anchor's | drawn | shape | size | pure | leak | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, v in con.items():
        knobs = {a: b for a, b in v["consistency"].items() if a != "mode"}
        label = f"{k} ({v['consistency']['mode']}" + (f", {json.dumps(knobs)[1:-1]}" if knobs else "") + ")"
        cells = [rate(v[x]) if x in v else "—" for x in ("drawn", "shape", "size", "pure")]
        where = v.get("anchor_prompt", _NIGHT_ANCHORS).replace("{appearance}", "").strip() + \
            f"; {v['anchor_steps']} steps"
        alone = f"{rate(v['read_alone'])} / {rate(v['read_together'])}" if "read_alone" in v else "—"
        colour = rate(v["colour_with_anchor"]) if "colour_with_anchor" in v else "—"
        lines.append(f"| {label} | {where} | {v['appearances']} | {rate(v['with_anchor'])} | "
                     f"{rate(v['with_most_common'])} | {rate(v['anchors_read'])} | {alone} | {colour} | "
                     f"{' | '.join(cells)} | {rate(v['leak'])} | {v['seconds']} |")
    return lines


SECTIONS = (Section(TOY_FORMAT, toy_quality_section),)


if __name__ == "__main__":
    raise SystemExit(main())
