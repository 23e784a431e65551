"""The denoise loop's stepping: precomputed linear combinations (LinearSteps) against diffusers' own step
(DiffusersSteps), the slow twin they are read off."""

import pytest
import torch

from movielm_fast.engine.schedulers import DiffusersSteps, LinearSteps, linear_schedule, make_scheduler, make_steps

# SD 1.x's scheduler config (PNDM, as in its model folders).
SD_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
             "prediction_type": "epsilon", "timestep_spacing": "leading", "skip_prk_steps": True,
             "set_alpha_to_one": False, "clip_sample": False}


def _loop(name, steps, linear, config=SD_CONFIG, spacing=None, begin_fraction=0.0, guidance=3.0, reuse_buffer=False):
    """Final latents of a denoise loop driven by a fixed, nonlinear stand-in for the UNet, and the stepper used.
    `reuse_buffer`: the stand-in returns the same tensor every call, as a CUDA-graph backend does."""
    scheduler = make_scheduler(name, config, spacing)
    scheduler.set_timesteps(steps)
    begin = int(len(scheduler.timesteps) * begin_fraction)
    if begin:
        scheduler.set_begin_index(begin)
    timesteps = scheduler.timesteps[begin:]
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    stepper = make_steps(scheduler, timesteps, begin, generators) if linear else \
        DiffusersSteps(scheduler, timesteps, generators)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g) * scheduler.init_noise_sigma
    mix = torch.randn(4, 4, generator=g) * 0.3
    out = torch.empty(4 if guidance else 2, 4, 8, 8)
    for i, t in enumerate(timesteps):
        x = torch.cat([latents, latents]) if guidance else latents
        x = stepper.scale(x, i)
        noise = torch.einsum("ij,bjhw->bihw", mix, x) + torch.sin(x) * (t / 1000)
        if reuse_buffer:
            noise = out.copy_(noise)
        eps = torch.lerp(*noise.chunk(2), guidance) if guidance else noise
        latents = stepper.step(eps, i, latents, fresh=bool(guidance) or not reuse_buffer)
    return latents, stepper


def _assert_same(name, steps, **kw):
    ref, slow = _loop(name, steps, linear=False, **kw)
    ours, fast = _loop(name, steps, linear=True, **kw)
    assert isinstance(slow, DiffusersSteps) and isinstance(fast, LinearSteps)
    # float32 rounding of the same arithmetic done in another order: ~1e-7 of the latents' scale
    assert (ours - ref).abs().max() <= 2e-6 * ref.abs().max(), (ours - ref).abs().max()
    assert not fast.xs and not fast.es  # history let go by the last step


@pytest.mark.parametrize("name", ["dpmpp", "euler", "ddim", "unipc", "pndm", "default"])
@pytest.mark.parametrize("steps", [4, 20])
def test_linear_samplers_match_diffusers(name, steps):
    _assert_same(name, steps)


@pytest.mark.parametrize("name", ["dpmpp", "euler", "unipc"])
def test_v_prediction_trailing_spacing_and_karras_sigmas(name):
    _assert_same(name, 8, config={**SD_CONFIG, "prediction_type": "v_prediction"})
    _assert_same(name, 8, spacing="trailing")
    if name != "unipc":
        _assert_same(name, 12, config={**SD_CONFIG, "use_karras_sigmas": True})


def test_third_order_dpm_and_no_guidance():
    _assert_same("dpmpp", 20, config={**SD_CONFIG, "solver_order": 3})
    _assert_same("dpmpp", 6, guidance=0.0)


@pytest.mark.parametrize("name", ["dpmpp", "unipc", "euler"])
def test_a_refiner_run_from_the_middle_of_the_schedule(name):
    """The refiner's scheduler starts at the switch index (set_begin_index), with no history of the base's steps."""
    _assert_same(name, 25, begin_fraction=0.8)


def test_a_reused_output_buffer_is_copied_when_kept():
    _assert_same("dpmpp", 10, guidance=0.0, reuse_buffer=True)
    _assert_same("pndm", 10, guidance=0.0, reuse_buffer=True)


@pytest.mark.parametrize("name,config", [
    ("euler_a", SD_CONFIG), ("dpmpp_sde", SD_CONFIG), ("lcm", SD_CONFIG),  # draw noise
    ("ddim", {**SD_CONFIG, "clip_sample": True}), ("dpmpp", {**SD_CONFIG, "thresholding": True}),  # clamp x0
])
def test_samplers_that_are_not_linear_are_stepped_by_diffusers(name, config):
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(10)
    before = torch.get_rng_state()
    assert isinstance(make_steps(scheduler, scheduler.timesteps), DiffusersSteps)
    assert torch.equal(before, torch.get_rng_state())  # the probe's noise came from a forked RNG
    # ... and their loop is diffusers' own, bit for bit
    a, _ = _loop(name, 6, linear=True, config=config)
    b, _ = _loop(name, 6, linear=False, config=config)
    assert torch.equal(a, b)


def test_a_schedule_is_probed_once():
    linear_schedule.cache_clear()
    for _ in range(3):
        scheduler = make_scheduler("dpmpp", SD_CONFIG)
        scheduler.set_timesteps(20)
        make_steps(scheduler, scheduler.timesteps)
    info = linear_schedule.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_each_batch_gets_its_own_scheduler():
    """Schedulers keep per-run state: the copies handed out must not share it (nor their tensors)."""
    a, b = make_scheduler("dpmpp", SD_CONFIG), make_scheduler("dpmpp", SD_CONFIG)
    assert a is not b and a.betas is not b.betas
    a.set_timesteps(4)
    b.set_timesteps(9)
    assert len(a.timesteps) == 4 and len(b.timesteps) == 9
    assert make_scheduler("dpmpp", SD_CONFIG, "trailing").config.timestep_spacing == "trailing"
    assert make_scheduler("dpmpp", SD_CONFIG).config.timestep_spacing == "leading"
