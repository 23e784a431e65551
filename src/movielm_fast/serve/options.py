"""What a submission may set for its own plan besides the plan itself: the render flags a resident model can honour
per plan (`render --server` forwards them), and the rule for the files a submitted plan names.

A request body is a plan, or ``{"plan": PLAN, "options": OPTIONS}``. OPTIONS (every key optional):

    render          render settings, as a plan's "render" (steps, width, height, guidance, scheduler, seed, ...)
                    -- `render --steps ...`; they win over the plan's own and over the server's flags
    image_format    png | jpg | webp (--image-format);  quality  1-100 (--quality)
    replace         true: render over another movie of the same id in OUT (--replace)
    style_training  false: write styles out as text (--no-style-training)

These are the run settings declared `served=PER_PLAN` (run.config.RunConfig): `PlanOptions` is made from those
declarations. Everything else of a render run (model, backend, device, dtype, batch size, attention, compile, CUDA
graphs, quantization, step cache, --lora, --consistency) belongs to the resident model, or the server, and is set
when the server starts; each setting's declaration says why (`render --server` refuses it with that reason).

Files: a plan names files by path (style.embedding, LoRA files, a refiner or VAE folder). A submitted plan travels
without its folder, so `render --server` sends them absolute, resolved against the plan file's folder as `render`
would. The server then reads only files under its --allow-files roots (default: the folder it was started in):
a relative path there is relative to the first root, and a path that resolves (links followed) outside every root
is refused with a 422 that says which. The check is made again each time a file is opened (plan.LoadedMovie.confined),
so a file swapped for a link after its plan was accepted, or a plan resumed after a restart with other roots, is
caught when it renders: the plan fails, saying which file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from movielm_fast.errors import UserError
from movielm_fast.plan import PATH_SETTINGS, RenderSettings, absolute_plan_paths
from movielm_fast.run.config import RunConfig
from movielm_fast.settings import PER_PLAN, meta

OPTION_KEYS = ("plan", "options")


def _plan_options() -> type[BaseModel]:
    """The options of a submission: `render` (a plan's render settings), and every run setting declared PER_PLAN
    (run.config.RunConfig), optional here: unset means the server's own."""
    fields: dict[str, Any] = {"render": (RenderSettings, Field(default_factory=RenderSettings))}
    for name, field in RunConfig.model_fields.items():
        if meta(field, "served") == PER_PLAN:
            optional = copy.copy(field)
            optional.default = None
            fields[name] = (field.annotation | None, optional)
    return create_model("PlanOptions", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


PlanOptions = _plan_options()
OPTION_NAMES = tuple(PlanOptions.model_fields)


def split_request(data: Any) -> tuple[Any, PlanOptions]:
    """A request's JSON -> (the plan's JSON, its options). A plan cannot be mistaken for the envelope: neither a
    plan file nor a movie has a "plan" key."""
    if not (isinstance(data, dict) and "plan" in data and set(data) <= set(OPTION_KEYS)):
        return data, PlanOptions()
    try:
        return data["plan"], PlanOptions.model_validate(data.get("options") or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"options.{where}: {err['msg'].removeprefix('Value error, ')}",
                        f"options take {', '.join(OPTION_NAMES)} (render: a plan's render settings); everything else "
                        "is set when the server starts") from None


def confine_paths(plan: Any, options: PlanOptions, roots: tuple[Path, ...]) -> tuple[Any, PlanOptions]:
    """The plan and options with every path they name absolute (relative ones joined to the first root); a
    UserError naming the first path that resolves outside every root."""
    plan, found = absolute_plan_paths(plan, roots[0])
    flags = {k: str(roots[0] / v) for k in PATH_SETTINGS if (v := getattr(options.render, k))}
    found += [(f"options.render.{k}", Path(v)) for k, v in flags.items()]
    resolved = [r.resolve() for r in roots]
    for where, path in found:
        if not any(path.resolve().is_relative_to(r) for r in resolved):
            raise UserError(f"{where}: {path} is outside the folders this server reads files from "
                            f"({', '.join(map(str, roots))})",
                            "put the file under one of them, or start the server with --allow-files FOLDER")
    if flags:
        options = options.model_copy(update={"render": options.render.model_copy(update=flags)})
    return plan, options
