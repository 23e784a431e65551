"""movielm-fast: movie plans -> consistent Stable Diffusion keyframes -> long-video instruction data, fast.

One import root holds the parts of the design (DESIGN.md): `engine` (plans, backends, the one driver), `kernels`
(Triton kernels and their `*_ref` twins), `export` (ONNX / TensorRT artifacts), `data` (LLM, QA, datasets, the
gallery), `cli` and `bench`; `errors`, `paths` and `optional` are the shared leaves below them all. The parts live
under this one name because generic top-level names are taken: `kernels` is Hugging Face's package, which
transformers imports.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("movielm-fast")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
