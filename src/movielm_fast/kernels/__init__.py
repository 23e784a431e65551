"""Attention for the UNet and the VAE: the processors that `--attention` installs through diffusers' own API.

The rule for any kernel that ships here: a plain-PyTorch `*_ref` twin and a test that compares them. The Triton
flash-attention kernel that lived here was removed: on an H200 it was slower than PyTorch's SDPA at every measured
size (bench/results/h200-20261204/), so `--attention sdpa` with its backends (`--sdpa-backend`) is the fast path.
"""
