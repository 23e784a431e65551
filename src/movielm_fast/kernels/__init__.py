"""Low-level compute choices, each importable without the rest of the project (kernels are leaves):

    attention   which attention kernel runs: the processor `--attention` installs through diffusers' own API, and
                the SDPA backend `--sdpa-backend` pins for the UNet's calls
    scaled_mm   the row-wise scaled FP8 matmul behind `--quantize fp8`, and `fp8_matmul_ref`, its plain-PyTorch twin

The rule for any kernel that ships here: a plain-PyTorch `*_ref` twin and a test that compares them. A Triton
flash-attention kernel lived here once and was removed: PyTorch's SDPA was faster at every size measured on a GPU
(bench/RESULTS.md), so `--attention sdpa` with its backends is the fast path.
"""
