"""CUDA-graph bucketing: keys on CPU; capture and replay parity on CUDA only."""

import pytest
import torch

from movielm_fast.engine.backends.cuda_graph import GraphedCallable, bucket_key


def test_bucket_key_separates_shapes_and_dtypes_not_values():
    a = torch.zeros(2, 4, 8, 8)
    assert bucket_key((a, None)) == bucket_key((torch.ones(2, 4, 8, 8), None))
    assert bucket_key((a, None)) != bucket_key((torch.zeros(4, 4, 8, 8), None))
    assert bucket_key((a, None)) != bucket_key((a.half(), None))
    assert bucket_key((a, None)) != bucket_key((a, a))


@pytest.mark.gpu
def test_graph_replay_matches_eager_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=16).cuda().eval()

    def step(x, t, h):
        return unet(x, t, encoder_hidden_states=h, return_dict=False)[0]

    graphed = GraphedCallable(step)
    with torch.inference_mode():
        for seed in range(3):  # new values, same bucket: replay must follow the inputs
            g = torch.Generator("cuda").manual_seed(seed)
            x = torch.randn(2, 4, 16, 16, device="cuda", generator=g)
            h = torch.randn(2, 77, 32, device="cuda", generator=g)
            t = torch.tensor(500.0 + seed, device="cuda")
            assert torch.allclose(graphed(x, t, h).clone(), step(x, t, h), atol=1e-5)
    assert len(graphed.graphs) == 1
