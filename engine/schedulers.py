"""Plan scheduler names -> diffusers schedulers, built from the model's own scheduler config.

Building from the model's config keeps its training betas, timestep spacing and prediction type (epsilon or
v-prediction for SD 2.x), so a name only picks the sampling algorithm. `timestep_spacing` overrides the config's
spacing: few-step models (SDXL-Lightning, Hyper-SD) are distilled on "trailing" timesteps, which start at the last
training timestep; the "leading" spacing of SD's own configs would start them at a less noisy one.
"""

from __future__ import annotations

from typing import Any

from .errors import UserError

_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}
SCHEDULERS = (*_CLASSES, "default")  # "default": the model's own scheduler class
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def make_scheduler(name: str, model_config: dict[str, Any], timestep_spacing: str | None = None):
    # Imported here, not at the top: `import diffusers` takes seconds, and the CLI reads SCHEDULERS at start-up.
    import diffusers

    if name == "default":
        cls_name, extra = model_config.get("_class_name", "PNDMScheduler"), {}
    elif name in _CLASSES:
        cls_name, extra = _CLASSES[name]
    else:
        raise UserError(f"unknown scheduler {name!r}", f"choose one of: {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise UserError(f"scheduler class {cls_name} is not available in this diffusers", "upgrade diffusers")
    if timestep_spacing is not None:
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise UserError(f"unknown timestep spacing {timestep_spacing!r}",
                            f"choose one of: {', '.join(TIMESTEP_SPACINGS)}")
        extra = {**extra, "timestep_spacing": timestep_spacing}
    return cls.from_config(dict(model_config), **extra)
