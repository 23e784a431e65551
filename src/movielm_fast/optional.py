"""Optional dependencies: import one, or stop with a single line that names the extra to install.

A base ``pip install movielm-fast`` has no `openai`, `av`, `onnxruntime`, ... ; a command that needs one must say
which extra brings it instead of ending in a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from movielm_fast.errors import UserError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or raise a UserError: "<purpose> needs <package>", fix: pip install 'movielm-fast[extra]'."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # Only the package itself missing is an install problem; a broken install below it is reported as it is.
        if exc.name is not None and exc.name.split(".")[0] != module.split(".")[0]:
            raise
        raise UserError(f"{purpose} needs the '{module.split('.')[0]}' package, which is not installed",
                        f"pip install 'movielm-fast[{extra}]'") from None


def require_onnx() -> ModuleType:
    """The onnx package (export, the weight map of ONNX Runtime sessions), or the one-line error naming its extra."""
    return require("onnx", "onnx", "exporting to ONNX")
