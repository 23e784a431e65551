"""The attention processors `--attention` installs (through diffusers' own set_attn_processor)."""

from __future__ import annotations

import pytest

from movielm_fast.kernels.attention import AttentionChoiceError, attention_processor


def test_attention_processor_names():
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.utils import is_xformers_available

    assert isinstance(attention_processor("sdpa"), AttnProcessor2_0)
    with pytest.raises(AttentionChoiceError, match="unknown attention") as info:
        attention_processor("triton")  # removed: slower than SDPA at every size measured on an H200
    assert "sdpa, xformers" in info.value.hint
    if not is_xformers_available():
        with pytest.raises(AttentionChoiceError, match="xformers is not installed") as info:
            attention_processor("xformers")
        assert "--attention sdpa" in info.value.hint


def test_torch_backend_reports_a_bad_attention_choice_as_a_user_error(tiny_sd):
    # kernels/ knows nothing of the engine: the backend that installs the processor turns its error into the
    # message + fix the CLI prints.
    from movielm_fast.engine.backends.base import create_backend
    from movielm_fast.engine.config import BackendConfig
    from movielm_fast.engine.models import load_model
    from movielm_fast.errors import UserError

    with pytest.raises(UserError, match="--attention: unknown value 'flash3'") as info:
        create_backend("torch", load_model(tiny_sd), BackendConfig(attention="flash3"))
    assert "sdpa, xformers" in info.value.hint
