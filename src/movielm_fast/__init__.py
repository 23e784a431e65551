"""movielm-fast: movie plans -> consistent Stable Diffusion keyframes -> long-video instruction data, fast.

One import root holds the parts of the design, in layers (docs/design.md): `cli`; `bench`, `data` (LLM, QA,
datasets, the gallery) and `serve`; `run` (plans -> files: the one driver) and `testing` (tiny models for tests);
`style` (style immobilization); `engine` (the render core: one batch -> pixels); `export` (ONNX / TensorRT
artifacts); `kernels` (attention choice, the FP8 matmul, each kernel with a `*_ref` twin); and the shared leaves
`plan`, `settings`, `paths`, `optional` and `errors`. The parts live under this one name because generic top-level
names are taken: `kernels` is Hugging Face's package, which transformers imports.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("movielm-fast")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
