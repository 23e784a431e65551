"""Test-wide settings: offline, deterministic, CPU-friendly."""

import os

# Nothing in the suite may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The demo model and hash memo go to a per-session folder, never the user's cache."""
    os.environ["MOVIELM_CACHE"] = str(tmp_path_factory.mktemp("movielm-cache"))
    yield


@pytest.fixture(scope="session", autouse=True)
def _writes_stay_in_temporary_folders():
    """Nothing in the suite writes outside its temporary folders: the working directory (the repo root, where a
    forgotten --out or --dest would land) gains no entries, and the cache is the session's own (above)."""
    from pathlib import Path

    cwd = Path.cwd()
    before = set(os.listdir(cwd))
    yield
    new = set(os.listdir(cwd)) - before - {".pytest_cache", "__pycache__"}
    assert not new, f"tests wrote {sorted(new)} into the working directory {cwd}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): tiny models' tensors are too small
    for intra-op threads to help, and on a shared CPU OpenMP threads that spin-wait for each other make such runs
    5-20x slower. Restored afterwards for the rest of the session."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _save_tiny(tmp_path_factory, kind: str, **kwargs):
    from movielm_fast.testing import build_tiny_pipeline

    path = tmp_path_factory.mktemp(f"tiny-{kind}")
    build_tiny_pipeline(kind, **kwargs).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny SD 1.x-architecture model folder (random weights)."""
    return _save_tiny(tmp_path_factory, "sd")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    """A tiny SD 2.x-style v-prediction model folder."""
    return _save_tiny(tmp_path_factory, "sd", seed=1, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL-architecture model folder (two text encoders, added conditions)."""
    return _save_tiny(tmp_path_factory, "sdxl")


def _save_built(tmp_path_factory, name: str, build):
    path = tmp_path_factory.mktemp(name)
    build().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_flux_dev(tmp_path_factory):
    """A tiny FLUX.1 [dev]-like folder (guidance embedding, dynamic shift; random weights)."""
    from movielm_fast.testing import build_tiny_flux

    return _save_built(tmp_path_factory, "tiny-flux-dev", lambda: build_tiny_flux(guidance_embeds=True))


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory):
    """A tiny FLUX.1 [schnell]-like folder (no guidance input, fixed shift)."""
    from movielm_fast.testing import build_tiny_flux

    return _save_built(tmp_path_factory, "tiny-flux-schnell", lambda: build_tiny_flux(guidance_embeds=False, seed=1))


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory):
    """A tiny FLUX.2 [klein] base folder (CFG with a negative prompt)."""
    from movielm_fast.testing import build_tiny_flux2_klein

    return _save_built(tmp_path_factory, "tiny-klein", lambda: build_tiny_flux2_klein(distilled=False))


@pytest.fixture(scope="session")
def tiny_klein_distilled(tmp_path_factory):
    """A tiny step-distilled FLUX.2 [klein] folder (no guidance)."""
    from movielm_fast.testing import build_tiny_flux2_klein

    return _save_built(tmp_path_factory, "tiny-klein-distilled", lambda: build_tiny_flux2_klein(True, seed=1))
