"""Each Triton kernel against its PyTorch `*_ref` twin.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest) on small shapes; with CUDA the same
tests run on the GPU, and the `gpu`-marked ones add full Stable Diffusion sizes and bf16.
"""

from __future__ import annotations

import pytest
import torch

from movielm_fast.kernels import KernelUnavailable, triton_available
from movielm_fast.kernels.attention import (
    AttentionChoiceError,
    TritonFlashAttnProcessor,
    attention_processor,
    install_attention,
)
from movielm_fast.kernels.flash_attention import flash_attention, flash_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Attention runs in bf16 only in the GPU tests: bf16 tl.dot is wrong under the interpreter (raw uint16 there).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="Triton cannot run here")


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    tol = TOL[dtype] * scale
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
@pytest.mark.parametrize("keys", [None, 77], ids=["self", "cross77"])
def test_flash_attention_matches_ref(head_dim, keys):
    g = torch.Generator().manual_seed(7)
    queries = 70  # not a multiple of any block size
    keys = queries if keys is None else keys
    q = torch.randn(2, 2, queries, head_dim, generator=g).to(DEVICE)
    k = torch.randn(2, 2, keys, head_dim, generator=g).to(DEVICE)
    v = torch.randn(2, 2, keys, head_dim, generator=g).to(DEVICE)
    _close(flash_attention(q, k, v), flash_attention_ref(q, k, v), torch.float32)


def test_flash_attention_fp16_and_scale():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, n, 40, generator=g).to(DEVICE, torch.float16) for n in (48, 77, 77))
    _close(flash_attention(q, k, v, scale=0.3), flash_attention_ref(q, k, v, scale=0.3), torch.float16)


def test_flash_attention_strided_views():
    # What an attention processor hands over: (B, N, heads, d) projections viewed as (B, heads, N, d).
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, n, 3, 24, generator=g).to(DEVICE).transpose(1, 2) for n in (33, 77, 77))
    assert not q.is_contiguous()
    out = flash_attention(q, k, v)
    _close(out, flash_attention_ref(q, k, v), torch.float32)
    assert out.transpose(1, 2).is_contiguous()  # so merging heads back into tokens is free


def test_flash_attention_rejects_unsupported_head_dim():
    q = torch.randn(1, 1, 4, 512, device=DEVICE)
    with pytest.raises(ValueError, match="d <= 256"):
        flash_attention(q, q, q)


def test_kernels_refuse_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(KernelUnavailable, match="CUDA tensors"):
        flash_attention(x, x, x)
    assert not triton_available("cpu")


# --------------------------------------------------------------------------------- processors on a tiny UNet


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).to(DEVICE).eval()


@pytest.fixture(scope="module")
def unet_and_inputs():
    unet = _tiny_unet()
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=g).to(DEVICE)
    text = torch.randn(2, 77, 32, generator=g).to(DEVICE)  # 77 text tokens: the ragged key block
    with torch.no_grad():
        unet.set_attn_processor(attention_processor("sdpa"))
        reference = unet(sample, 10, encoder_hidden_states=text).sample
    return unet, (sample, text), reference


def test_triton_processor_matches_sdpa_on_unet(unet_and_inputs, monkeypatch):
    from movielm_fast.kernels import _flash_attention_triton as impl

    unet, (sample, text), reference = unet_and_inputs
    calls = []
    real_launch = impl.launch
    monkeypatch.setattr(impl, "launch", lambda *a: calls.append(a[0].shape) or real_launch(*a))
    install_attention(unet, "triton")
    try:
        assert all(isinstance(p, TritonFlashAttnProcessor) for p in unet.attn_processors.values())
        with torch.no_grad():
            out = unet(sample, 10, encoder_hidden_states=text).sample
    finally:
        install_attention(unet, "sdpa")
    # every transformer block's self- and cross-attention went through the kernel, none fell back
    assert len(calls) == len(unet.attn_processors)
    _close(out, reference, torch.float32, scale=5)


def test_attention_processor_names():
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.utils import is_xformers_available

    assert isinstance(attention_processor("sdpa"), AttnProcessor2_0)
    assert isinstance(attention_processor("triton"), TritonFlashAttnProcessor)
    with pytest.raises(AttentionChoiceError, match="unknown attention") as info:
        attention_processor("flash3")
    assert "sdpa, triton, xformers" in info.value.hint
    if not is_xformers_available():
        with pytest.raises(AttentionChoiceError, match="xformers is not installed") as info:
            attention_processor("xformers")
        assert "--attention sdpa" in info.value.hint


def test_torch_backend_reports_a_bad_attention_choice_as_a_user_error(tiny_sd):
    # kernels/ knows nothing of the engine: the backend that installs the processor turns its error into the
    # message + fix the CLI prints.
    from movielm_fast.engine.backends.base import create_backend
    from movielm_fast.engine.config import EngineConfig
    from movielm_fast.engine.models import load_model
    from movielm_fast.errors import UserError

    with pytest.raises(UserError, match="unknown attention implementation 'flash3'") as info:
        create_backend("torch", load_model(tiny_sd), EngineConfig(attention="flash3"))
    assert "sdpa, triton, xformers" in info.value.hint


# ------------------------------------------------------------------------------------- full size, GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, heads, queries", [(40, 8, 4096), (80, 8, 1024), (160, 8, 256), (64, 10, 4096)])
@pytest.mark.parametrize("keys", [None, 77], ids=["self", "cross77"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_flash_attention_sd(head_dim, heads, queries, keys, dtype):
    keys = queries if keys is None else keys
    q = torch.randn(2, heads, queries, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(2, heads, keys, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(2, heads, keys, head_dim, device="cuda", dtype=dtype)
    _close(flash_attention(q, k, v), flash_attention_ref(q, k, v), dtype, scale=2)
