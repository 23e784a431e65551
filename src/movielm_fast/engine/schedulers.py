"""Plan scheduler names -> diffusers schedulers, built from the model's own scheduler config.

Building from the model's config keeps its training betas, timestep spacing and prediction type (epsilon or
v-prediction for SD 2.x), so a name only picks the sampling algorithm. `timestep_spacing` overrides the config's
spacing: few-step models (SDXL-Lightning, Hyper-SD) are distilled on "trailing" timesteps, which start at the last
training timestep; the "leading" spacing of SD's own configs would start them at a less noisy one.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
from dataclasses import dataclass
from typing import Any

from movielm_fast.errors import UserError
from movielm_fast.plan import SCHEDULERS, TIMESTEP_SPACINGS

log = logging.getLogger("movielm_fast")

# Every name of the plan format (movielm_fast.plan.SCHEDULERS) but "default", the model's own class.
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
    # A fresh scheduler per batch (schedulers keep per-run state), copied from one built per configuration:
    # from_config runs diffusers' config machinery, a copy is much cheaper.
    key = json.dumps([name, cls_name, dict(model_config), extra], sort_keys=True, default=repr)
    if key not in _BUILT:
        _BUILT[key] = cls.from_config(dict(model_config), **extra)
    return copy.deepcopy(_BUILT[key])


_BUILT: dict[str, Any] = {}


# --- Stepping: the denoise loop's scheduler arithmetic --------------------------------------------------------------
#
# diffusers' step() costs a fixed amount of Python per call whatever the batch (sigma lookups, order bookkeeping,
# small tensor ops), plus a dozen passes over the latents. Every deterministic sampler among ours (DPM++ 2M,
# Euler, DDIM, UniPC, PNDM), however it is configured, is linear: each next sample is a fixed combination of the
# last few samples and model outputs. So the combination is read off diffusers itself, once per schedule, by
# stepping a scheduler of the same config over a probe batch of unit vectors, and the loop then does only the
# arithmetic: one multiply-add per term. A scheduler that is not linear on the probe (ancestral and SDE samplers
# draw noise; clip_sample and thresholding clamp) is stepped by diffusers itself.

MAX_WINDOW = 4  # history a linear multistep sampler may use (PNDM's PLMS keeps 4 model outputs)


def _step_kwargs(scheduler, generators) -> dict[str, Any]:
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {"generator": generators} if "generator" in params and generators is not None else {}
    if "eta" in params:
        kwargs["eta"] = 0.0  # diffusers' pipeline default
    return kwargs


class DiffusersSteps:
    """The reference stepper: diffusers' own scale_model_input and step."""

    def __init__(self, scheduler, timesteps, generators=None):
        self.scheduler, self.timesteps = scheduler, timesteps
        self.kwargs = _step_kwargs(scheduler, generators)

    def scale(self, x, i: int):
        return self.scheduler.scale_model_input(x, self.timesteps[i])

    def step(self, eps, i: int, x, fresh: bool = True):
        if not fresh:  # some schedulers keep the model output itself (PNDM's ets)
            eps = eps.clone()
        return self.scheduler.step(eps, self.timesteps[i], x, **self.kwargs, return_dict=False)[0]


class FlowSteps(DiffusersSteps):
    """Flow matching (FLUX): diffusers' own Euler step on the velocity; the model takes the sample unscaled
    (FlowMatchEulerDiscreteScheduler has no scale_model_input), and draws no noise."""

    def scale(self, x, i: int):
        return x


@dataclass(frozen=True)
class Combination:
    """One step of a linear sampler: x[i+1] = sum(c * x[j]) + sum(c * e[j]) over the last few steps j."""

    scale: float  # model input = scale * x[i]
    xs: tuple[tuple[int, float], ...]  # (step j, coefficient of sample x[j])
    es: tuple[tuple[int, float], ...]  # (step j, coefficient of model output e[j])


class LinearSteps:
    """A linear sampler's steps as precomputed combinations (see `linear_schedule`): the same samples as
    `DiffusersSteps` up to float32 rounding, with no per-step Python beyond one multiply-add per term."""

    def __init__(self, combos: tuple[Combination, ...]):
        self.combos = combos
        # The last step whose combination reads each sample / model output, so that history is let go early.
        self.x_until = {j: i for i, c in enumerate(combos) for j, _ in c.xs}
        self.e_until = {j: i for i, c in enumerate(combos) for j, _ in c.es}
        self.xs: dict[int, Any] = {}
        self.es: dict[int, Any] = {}

    def scale(self, x, i: int):
        s = self.combos[i].scale
        return x if s == 1.0 else x * s

    def step(self, eps, i: int, x, fresh: bool = True):
        """`fresh`: `eps` is a tensor of the caller's own (not a backend's reused output buffer), so it may be kept
        for later steps without a copy."""
        if not fresh and self.e_until.get(i, -1) > i:
            eps = eps.clone()
        self.xs[i], self.es[i] = x, eps
        c = self.combos[i]
        (first, a), *rest = [(self.xs[j], a) for j, a in c.xs] + [(self.es[j], a) for j, a in c.es]
        out = first * a  # a new tensor: the history it reads stays as it was
        for t, a in rest:
            out.add_(t, alpha=a)
        for hist, until in ((self.xs, self.x_until), (self.es, self.e_until)):
            for j in [j for j in hist if until.get(j, -1) <= i]:  # no later step reads it
                del hist[j]
        return out


def make_steps(scheduler, timesteps, begin: int = 0, generators=None):
    """The stepper for `timesteps` (a run of `scheduler.timesteps` starting at index `begin`), with `scheduler`
    already set up (set_timesteps, and set_begin_index where `begin` > 0): `LinearSteps` where the scheduler is
    linear, else `DiffusersSteps` over `scheduler` itself."""
    config = json.dumps(dict(scheduler.config), sort_keys=True, default=str)
    try:
        combos = linear_schedule(type(scheduler), config, scheduler.num_inference_steps, begin, len(timesteps))
    except Exception:  # a "default" scheduler class that cannot be probed alone: its own step is always right
        log.debug("scheduler %s not probed", type(scheduler).__name__, exc_info=True)
        combos = None
    return LinearSteps(combos) if combos is not None else DiffusersSteps(scheduler, timesteps, generators)


@functools.lru_cache(maxsize=64)
def linear_schedule(cls, config: str, steps: int, begin: int, calls: int) -> tuple[Combination, ...] | None:
    """The combinations of `calls` steps of `cls` (configured by `config`, JSON) from timestep index `begin`, read off
    a probe run; None when the scheduler is not linear there.

    The probe batch has one row per input of the whole run -- the initial sample and each step's model output --
    each row that input set to 1 and the others to 0, so row r of every sample the scheduler returns holds the
    coefficient of input r in it. Two more rows check linearity: all inputs 0 must give 0 (no noise is drawn), and
    random inputs in the hundreds must give their combination of the unit rows (nothing clamps)."""
    import torch  # here, as diffusers above: the CLI imports this module for SCHEDULERS before it needs torch

    sched = cls.from_config(json.loads(config))
    sched.set_timesteps(steps)
    if begin and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin)
    timesteps = sched.timesteps[begin:begin + calls]
    n = calls + 1  # inputs: x[0], then e[0] .. e[calls - 1]
    g = torch.Generator().manual_seed(0)
    mixed = torch.randn(n, generator=g, dtype=torch.float64) * 300
    inputs = torch.cat([torch.eye(n, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64), mixed[None]])
    samples = [inputs[:, 0]]  # x[i] per probe row: coefficients (unit rows), then the two check rows
    scales = []
    kwargs = _step_kwargs(sched, None)
    with torch.random.fork_rng(devices=[]):  # a sampler that draws noise must not move the global RNG
        for i, t in enumerate(timesteps):
            x = samples[-1].float().reshape(-1, 1, 1, 1)
            scaled = sched.scale_model_input(x, t).double().flatten()
            scales.append(float(scaled[-1] / x[-1, 0, 0, 0]))  # the row of random inputs: never 0
            if not torch.allclose(scaled, scales[-1] * x.double().flatten(), rtol=1e-5, atol=1e-6):
                return None
            eps = inputs[:, i + 1].float().reshape(-1, 1, 1, 1)
            samples.append(sched.step(eps, t, x, **kwargs, return_dict=False)[0].double().flatten())
    coef = torch.stack(samples)[:, :n]  # (calls + 1, n): x[i] = coef[i] @ inputs
    for s in samples[1:]:
        expected = s[:n] @ mixed
        if s[n] != 0 or not torch.isclose(s[n + 1], expected, rtol=1e-4, atol=1e-3 * float(mixed.abs().max())):
            return None
    combos = []
    for i in range(calls):
        fit = _window(coef, i)
        if fit is None:
            return None
        combos.append(Combination(scales[i], *fit))
    return tuple(combos)


def _window(coef, i: int):
    """x[i+1] as a combination of the fewest recent samples and model outputs (least squares on the coefficient
    vectors; exact up to float32 rounding, or None)."""
    import torch  # as in linear_schedule

    n = coef.shape[1]
    target = coef[i + 1]
    for k in range(1, MAX_WINDOW + 1):
        js = list(range(max(0, i - k + 1), i + 1))
        basis = torch.stack([coef[j] for j in js] + [torch.eye(n, dtype=coef.dtype)[j + 1] for j in js], dim=1)
        # SVD-based: early on the samples and outputs of the window are linearly dependent (x[1] = a x[0] + b e[0])
        sol = torch.linalg.lstsq(basis, target[:, None], driver="gelsd").solution.flatten()
        sol[sol.abs() < 1e-7 * sol.abs().max()] = 0  # rounding noise of the probe: a multiply-add saved
        if torch.linalg.norm(basis @ sol - target) <= 1e-5 * max(float(torch.linalg.norm(target)), 1e-12):
            xs = tuple((j, float(a)) for j, a in zip(js, sol[:len(js)]) if a != 0)
            es = tuple((j, float(a)) for j, a in zip(js, sol[len(js):]) if a != 0)
            return (xs, es) if xs or es else None
    return None
