"""Plan scheduler names -> diffusers schedulers, built from the model's own scheduler config.

Building from the model's config keeps its training betas, timestep spacing and prediction type (epsilon or
v-prediction for SD 2.x), so a name only picks the sampling algorithm.
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
    "pndm": ("PNDMScheduler", {}),
}
SCHEDULERS = (*_CLASSES, "default")  # "default": the model's own scheduler class


def make_scheduler(name: str, model_config: dict[str, Any]):
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
    return cls.from_config(dict(model_config), **extra)
