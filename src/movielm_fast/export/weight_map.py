"""The parameter -> initializer map: which ONNX initializer holds each torch weight, so merged (LoRA) weights can be
put into an exported graph without re-exporting it.

The exporters rename weights (`onnx::MatMul_1234`), fold them (a Linear without bias becomes MatMul with the weight
transposed), convert them to fp16 and, in graph fusions, pack several into one (Q, K and V of an attention layer in
one initializer). So weights are matched by value: a digest of each initializer's bytes against digests of every
Linear/Conv weight, as is and transposed, in the graph's dtype; a weight found inside a packed initializer is
recorded with its slice. One entry per parameter::

    {"initializer": "onnx::MatMul_1234", "transpose": true, "dtype": "float32", "slice": null | [axis, start, stop]}

Written beside the graph at export (weights.json). For artifacts exported before the map existed it is rebuilt from
the torch model when a LoRA is first applied (the same matching, in memory; the cache entry is not touched).

ONNX Runtime takes the values as external initializers of its session (`session_source`) and TensorRT through `Refitter
.set_named_weights`, both by initializer name: `initializer_values` gives the arrays for either.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from movielm_fast.errors import UserError
from movielm_fast.optional import require_onnx

log = logging.getLogger("movielm_fast")

WEIGHT_MAP_FILE = "weights.json"
_NP_DTYPES = {1: "float32", 10: "float16"}  # onnx.TensorProto element types we map


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def mappable_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a LoRA can change: Linear and Conv2d weights, by their name in `module`."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out[f"{name}.weight" if name else "weight"] = m.weight
    return out


def _initializers(onnx_path: Path) -> dict[str, tuple[np.ndarray, str]]:
    from onnx import numpy_helper

    onnx = require_onnx()
    proto = onnx.load(str(onnx_path), load_external_data=True)
    out = {}
    for init in proto.graph.initializer:
        if init.data_type in _NP_DTYPES and len(init.dims) >= 2:
            out[init.name] = (numpy_helper.to_array(init), _NP_DTYPES[init.data_type])
    return out


def build_weight_map(module: nn.Module, onnx_path: Path) -> dict[str, dict[str, Any]]:
    """Match every Linear/Conv weight of `module` (the traced graph module) to the initializer holding it."""
    inits = _initializers(onnx_path)
    by_digest: dict[str, list[str]] = {}
    for name, (arr, _) in inits.items():
        by_digest.setdefault(_digest(arr), []).append(name)
    dtypes = sorted({dt for _, dt in inits.values()})
    out: dict[str, dict[str, Any]] = {}
    unmatched = {}
    for pname, p in mappable_params(module).items():
        w = p.detach().float().cpu().numpy()
        found = None
        for dt in dtypes:
            cast = w.astype(dt)
            for transpose, candidate in ((False, cast), (True, cast.T if cast.ndim == 2 else None)):
                if candidate is None:
                    continue
                names = by_digest.get(_digest(candidate))
                if names:
                    found = {"initializer": names[0], "transpose": transpose, "dtype": dt, "slice": None}
                    break
            if found:
                break
        if found:
            out[pname] = found
        else:
            unmatched[pname] = w
    if unmatched:
        out.update(_packed(unmatched, inits))
    return out


def _packed(unmatched: dict[str, np.ndarray], inits: dict[str, tuple[np.ndarray, str]]) -> dict[str, dict]:
    """2-D weights found as a block of a packed initializer (fused QKV: (in, 3*out) = [Wq^T | Wk^T | Wv^T])."""
    out = {}
    for pname, w in unmatched.items():
        if w.ndim != 2:
            continue
        rows, cols = w.shape  # (out, in)
        for iname, (arr, dt) in inits.items():
            if arr.ndim != 2:
                continue
            for transpose, block in ((True, w.T.astype(dt)), (False, w.astype(dt))):
                axis = 1 if transpose else 0
                if arr.shape[1 - axis] != block.shape[1 - axis] or arr.shape[axis] <= block.shape[axis]:
                    continue
                n = block.shape[axis]
                for start in range(0, arr.shape[axis] - n + 1, n):
                    part = arr[:, start:start + n] if axis == 1 else arr[start:start + n]
                    if np.array_equal(part, block):
                        out[pname] = {"initializer": iname, "transpose": transpose, "dtype": dt,
                                      "slice": [axis, start, start + n]}
                        break
                if pname in out:
                    break
            if pname in out:
                break
        del rows, cols
    return out


def save_weight_map(folder: Path, weight_map: dict[str, dict[str, Any]]) -> None:
    (folder / WEIGHT_MAP_FILE).write_text(json.dumps(weight_map, indent=0, sort_keys=True) + "\n")


def load_weight_map(artifact, module: nn.Module) -> dict[str, dict[str, Any]]:
    """The artifact's map, or (an artifact exported before maps existed) the same map rebuilt from `module`."""
    f = artifact.path / WEIGHT_MAP_FILE
    if f.is_file():
        return json.loads(f.read_text())
    log.info("%s has no %s (exported by an older version): matching its weights now", artifact.path,
             WEIGHT_MAP_FILE)
    return build_weight_map(module, artifact.file())


def initializer_values(weight_map: dict[str, dict[str, Any]], deltas: dict[str, torch.Tensor], onnx_path: Path,
                       component: str, originals: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """initializer name -> its new value: the exported value plus `deltas` {parameter name: delta in torch layout,
    float32}. The base is read from the graph itself, not from a torch model that may hold merged weights; a packed
    initializer keeps its other blocks as exported. `originals` (name -> exported array) is filled and reused, so
    the file is read once per component however often sets switch."""
    missing = [p for p in deltas if p not in weight_map]
    if missing:
        raise UserError(f"the exported {component} graph has no initializer holding {missing[0]}, so a LoRA cannot "
                        "change it there (the exporter folded or fused it)",
                        "render this LoRA with --backend torch, or re-export: movielm-fast export --clear")
    names = {weight_map[p]["initializer"] for p in deltas}
    shared = [n for n in names if sum(e["initializer"] == n and not e["slice"] for e in weight_map.values()) > 1]
    if shared:
        raise UserError(f"the exported {component} graph shares initializer {shared[0]} between several weights, so "
                        "a LoRA cannot change one of them alone", "render this LoRA with --backend torch")
    originals = {} if originals is None else originals
    if not names <= set(originals):
        originals.update({n: a for n, (a, _) in _initializers(onnx_path).items() if n in names})
    out = {n: originals[n].astype(np.float32) for n in names}  # (copies) merged in float32, cast at the end
    for pname, delta in deltas.items():
        entry = weight_map[pname]
        d = delta.detach().float().cpu().numpy()
        d = d.T if entry["transpose"] else d
        full = out[entry["initializer"]]
        if entry["slice"] is None:
            full += d
        elif entry["slice"][0] == 1:
            full[:, entry["slice"][1]:entry["slice"][2]] += d
        else:
            full[entry["slice"][1]:entry["slice"][2]] += d
    return {n: np.ascontiguousarray(a.astype(originals[n].dtype)) for n, a in out.items()}


def session_source(onnx_path: Path, names: set[str]) -> tuple[str | bytes, set[str]]:
    """(model to create the session from, the override names to hand over as external initializers).

    `SessionOptions.add_initializer` values are ignored by ONNX Runtime's CPU NCHWc pass, which reorders Conv
    weights from the file's own bytes (onnxruntime 1.32: the session silently computes with the exported weights);
    initializers given with `add_external_initializers` are in place before any optimization. So the overridden
    initializers must be external-data references: in a graph saved with external data they already are; in an
    inline graph (< 1 GB by construction, see onnx_export.EXTERNAL_DATA_BYTES) they are turned into references in
    an in-memory copy of the graph -- the artifact on disk is never touched."""
    onnx = require_onnx()
    from onnx import TensorProto

    proto = onnx.load(str(onnx_path), load_external_data=False)
    external = {t.name for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    inline = {t.name for t in proto.graph.initializer} & names - external
    if not inline:
        return str(onnx_path), names & external
    if external:
        # A mixed graph (small tensors inline, large ones external): ours keep tensors under 1 KB inline, which no
        # LoRA changes; anything else would need the external files' folder passed along. Not a case we make.
        raise UserError(f"{onnx_path} keeps {sorted(inline)[0]} inline beside external data; cannot override it",
                        "re-export the model: movielm-fast export --clear")
    for t in proto.graph.initializer:
        if t.name in inline:
            nbytes = len(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", "movielm-override"), ("offset", "0"), ("length", str(nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    return proto.SerializeToString(), names

