"""Each Triton kernel against its PyTorch `*_ref` twin.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest) on small shapes; with CUDA the same
tests run on the GPU, and the `gpu`-marked ones add full Stable Diffusion sizes and bf16.
"""

from __future__ import annotations

import pytest
import torch

from kernels import KernelUnavailable, triton_available
from kernels.flash_attention import flash_attention, flash_attention_ref
from kernels.geglu import FusedGEGLU, geglu, geglu_ref, replace_geglu
from kernels.group_norm_silu import group_norm_silu, group_norm_silu_ref, replace_group_norm_silu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 tl.dot is wrong under the interpreter (bf16 is stored as raw uint16 there); GPU only for attention.
INTERP_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="Triton cannot run here")


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    tol = TOL[dtype] * scale
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------- GroupNorm+SiLU


@pytest.mark.parametrize("shape, groups", [
    ((2, 32, 8, 8), 8),
    ((1, 20, 5, 7), 4),  # odd spatial size, 5 channels per group
    ((2, 16, 3, 3), 16),  # one channel per group
])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_silu_matches_ref(shape, groups, channels_last):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEVICE)
    w = torch.randn(shape[1], generator=g).to(DEVICE)
    b = torch.randn(shape[1], generator=g).to(DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = group_norm_silu(x, groups, w, b, eps=1e-6)
    _close(y, group_norm_silu_ref(x, groups, w, b, eps=1e-6), torch.float32)
    # the output keeps the input's layout, so the next conv sees what it would have seen
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_silu_half(dtype, channels_last):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 6, 6, generator=g).to(DEVICE, dtype)
    w = torch.randn(32, generator=g).to(DEVICE, dtype)
    b = torch.randn(32, generator=g).to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    # reference in fp32 then rounded: the kernel computes in fp32 too
    expected = group_norm_silu_ref(x.float(), 8, w.float(), b.float()).to(dtype)
    _close(group_norm_silu(x, 8, w, b), expected, dtype, scale=2)


@pytest.mark.parametrize("split", [2, 8])
def test_group_norm_silu_split_statistics(split):
    # A group's statistics merged from several programs (what large SD activations use) equal one pass.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 8, 40, 40, generator=g).to(DEVICE)
    _close(group_norm_silu(x, 2, split=split), group_norm_silu_ref(x, 2), torch.float32)


# masked tail lanes load 0, 6000 standard deviations from the mean: exp() overflows in SiLU before the
# masked store drops them
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_group_norm_silu_large_mean_is_stable():
    # |mean| >> std: a naive fp32 sum / sum-of-squares variance would lose most digits here.
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(2, 8, 16, 16, generator=g, dtype=torch.float64) * 0.05 + 300.0
    expected = group_norm_silu_ref(x64, 4).float()
    _close(group_norm_silu(x64.float().to(DEVICE), 4, split=4).cpu(), expected, torch.float32, scale=50)


def test_group_norm_silu_3d_and_defaults():
    x = torch.randn(2, 12, 30).to(DEVICE)  # (N, C, L)
    _close(group_norm_silu(x, 3), group_norm_silu_ref(x, 3), torch.float32)


def test_group_norm_silu_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        group_norm_silu(torch.randn(1, 10, 2, 2).to(DEVICE), 3)


# ------------------------------------------------------------------------------------------------------- GEGLU


@pytest.mark.parametrize("shape", [(4, 2 * 8), (2, 7, 2 * 40), (3, 5, 2 * 300)])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_geglu_matches_ref(shape, with_bias):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE)
    bias = torch.randn(shape[-1], generator=g).to(DEVICE) if with_bias else None
    _close(geglu(x, bias), geglu_ref(x, bias), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_geglu_half(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 9, 2 * 96, generator=g) * 3).to(DEVICE, dtype)
    bias = torch.randn(2 * 96, generator=g).to(DEVICE, dtype)
    expected = geglu_ref(x.float(), bias.float()).to(dtype)
    _close(geglu(x, bias), expected, dtype, scale=5)


def test_fused_geglu_module_matches_diffusers():
    from diffusers.models.activations import GEGLU

    torch.manual_seed(6)
    module = GEGLU(24, 40).to(DEVICE).eval()
    x = torch.randn(2, 11, 24, device=DEVICE)
    with torch.no_grad():
        _close(FusedGEGLU(module.proj)(x), module(x), torch.float32, scale=5)


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
    for call in (lambda: group_norm_silu(x, 2), lambda: geglu(x), lambda: flash_attention(x, x, x)):
        with pytest.raises(KernelUnavailable, match="CUDA tensors"):
            call()
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


from kernels.attention import TritonFlashAttnProcessor, attention_processor, install_attention  # noqa: E402


def test_triton_processor_matches_sdpa_on_unet(unet_and_inputs, monkeypatch):
    from kernels import _flash_attention_triton as impl

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


def test_replace_geglu_and_group_norm_silu_keep_unet_output(unet_and_inputs):
    import copy

    unet, (sample, text), reference = unet_and_inputs
    fused = copy.deepcopy(unet)
    assert replace_geglu(fused) == 4  # one feed-forward per transformer block: 1 down + 1 mid + 2 up
    assert replace_group_norm_silu(fused) == 1
    assert not any(type(m).__name__ == "GEGLU" for m in fused.modules())
    with torch.no_grad():
        out = fused(sample, 10, encoder_hidden_states=text).sample
    _close(out, reference, torch.float32, scale=5)


def test_attention_processor_names():
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.utils import is_xformers_available

    from engine.errors import UserError

    assert isinstance(attention_processor("sdpa"), AttnProcessor2_0)
    assert isinstance(attention_processor("triton"), TritonFlashAttnProcessor)
    with pytest.raises(UserError, match="unknown attention"):
        attention_processor("flash3")
    if not is_xformers_available():
        with pytest.raises(UserError, match="xformers is not installed") as info:
            attention_processor("xformers")
        assert "--attention sdpa" in info.value.hint


# ------------------------------------------------------------------------------------- full size, GPU only

SD15_GROUP_NORM = [((2, 320, 64, 64), 32), ((2, 640, 32, 32), 32), ((2, 1280, 16, 16), 32), ((2, 1280, 8, 8), 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, groups", SD15_GROUP_NORM)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_group_norm_silu_sd15(shape, groups, dtype, channels_last):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    w = torch.randn(shape[1], device="cuda", dtype=dtype)
    b = torch.randn(shape[1], device="cuda", dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    expected = group_norm_silu_ref(x.float(), groups, w.float(), b.float()).to(dtype)
    _close(group_norm_silu(x, groups, w, b), expected, dtype, scale=2)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, dim", [(4096, 320), (1024, 640), (256, 1280), (64, 1280)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_geglu_sd15(tokens, dim, dtype):
    inner = 4 * dim  # SD's feed-forward: GEGLU(dim -> 2 * 4 * dim)
    x = torch.randn(2, tokens, 2 * inner, device="cuda", dtype=dtype)
    bias = torch.randn(2 * inner, device="cuda", dtype=dtype)
    _close(geglu(x, bias), geglu_ref(x.float(), bias.float()).to(dtype), dtype, scale=5)


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
