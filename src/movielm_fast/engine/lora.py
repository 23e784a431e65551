"""LoRA files: read, recognised, converted with diffusers' own functions, merged into the weights.

A LoRA adds a low-rank product to some weights: W' = W + scale * (alpha / r) * up @ down. Nothing runs LoRA layers
at render time: every backend merges the products into the weights it already holds (torch in place, ONNX Runtime
by overriding initializers when its sessions are created, TensorRT by refitting), so a merged LoRA costs nothing per
step and no graph is re-exported.

    1. read      safetensors only; the kind is told from the key names: kohya/A1111 (`lora_unet_...`,
                 `lora_te_`/`lora_te1_`/`lora_te2_` with `.lora_down`/`.lora_up`/`.alpha`) or diffusers/PEFT
                 (`unet.`, `text_encoder.`, `text_encoder_2.` with `lora_A`/`lora_B`, or the older `.lora.down`);
                 for the transformer families (engine.families) their own prefixes (`transformer.`, kohya's
                 `lora_unet_double_blocks_...`); LoHa, LoKr, DoRA, OFT, ... are refused by name
    2. convert   diffusers' `lora_state_dict` of the model's family (kohya -> diffusers, SDXL's sgm block names,
                 kohya FLUX's fused qkv split per projection) and `convert_unet_state_dict_to_peft` /
                 `convert_state_dict_to_peft`: one PEFT name per layer
    3. resolve   each layer against the model: (component, parameter name in the component's graph module,
                 export/graphs.py) with its (down, up, alpha / r); a layer the model lacks, or a shape that differs,
                 means the LoRA was made for another model
    4. merge     `merged_weights(layers_per_lora, set)`: {(component, parameter): W + sum of scale * alpha/r * up@down}

A LoRA *set* is an ordered tuple of `LoraRef(path, sha256, scale)`; it is part of the batch settings, so frames
with different sets never share a batch, and of each frame's resume key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from movielm_fast.errors import UserError
from movielm_fast.paths import sha256_files

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")
DENOISERS = ("unet", "transformer")  # LoRA components that are the denoiser (graph component names)
# Marker in a key -> what kind of file it is. Checked before anything else: these are not plain LoRAs.
UNSUPPORTED_KINDS = (("hada_", "a LoHa (LyCORIS Hadamard product)"), ("lokr_", "a LoKr (LyCORIS Kronecker product)"),
                     ("dora_scale", "a DoRA (weight-decomposed LoRA)"), ("lora_magnitude_vector", "a DoRA"),
                     ("lora_mid", "a LoCon with a CP/Tucker middle factor"), ("oft_", "an OFT"),
                     ("boft_", "a BOFT"), (".diff", "a full weight difference (LyCORIS 'full')"),
                     ("ia3", "an (IA)^3 adapter"), ("glora", "a GLoRA"), ("lora_A.bias", "a LoRA with biases"),
                     ("lora_B.bias", "a LoRA with biases"))
_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", ".lora.down", ".lora.up", "lora_linear_layer", "_lora.down",
            "_lora.up", ".alpha")


class LoraRef(NamedTuple):
    """One LoRA of a set: the file (absolute path), its content hash and the strength it is merged with."""

    path: str
    sha256: str
    scale: float

    @property
    def key(self) -> dict[str, Any]:
        """What resume keys and manifests record: the content, not where the file lies."""
        return {"file": Path(self.path).name, "sha256": self.sha256, "scale": self.scale}


LoraSet = tuple[LoraRef, ...]


def set_key(loras: LoraSet) -> list[dict[str, Any]]:
    return [r.key for r in loras]


@dataclass(frozen=True)
class LoraLayer:
    """One weight a LoRA changes. `param` names the weight in the component's graph module (export/graphs.py), the
    module the torch backend runs and the ONNX exporter traces. down: (r, in[, kh, kw]); up: (out, r[, 1, 1])."""

    component: str  # "unet" | "transformer" | "text_encoder" | "text_encoder_2"
    param: str
    shape: tuple[int, ...]
    down: torch.Tensor
    up: torch.Tensor
    factor: float  # alpha / r

    def delta(self) -> torch.Tensor:
        """(alpha / r) * up @ down in float32, shaped as the weight (a conv LoRA's factors are 1x1 or kxk convs)."""
        prod = self.up.flatten(1).float() @ self.down.flatten(1).float()  # (out, in * kh * kw)
        return (prod * self.factor).reshape(self.shape)


# --- 1. read ---------------------------------------------------------------------------------------------------------

def _problem(path: Path, what: str, message: str, hint: str) -> UserError:
    return UserError(f"{what} {path}: {message}", hint)


def read_header(path: Path, what: str = "LoRA") -> tuple[list[str], dict[str, str]]:
    """The tensor names and metadata of a .safetensors file, without reading the tensors."""
    from safetensors import safe_open

    if not path.is_file():
        where = "--lora paths are relative to the working directory" if what.startswith("--lora") else \
            "plan paths are relative to the plan file"
        raise _problem(path, what, "file not found", f"fix the path ({where})")
    if path.suffix != ".safetensors":
        raise _problem(path, what, "not a .safetensors file", "LoRAs are read from safetensors only (pickled .pt/"
                                                              ".ckpt files can run code); convert it to safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as exc:
        raise _problem(path, what, f"cannot be read as safetensors ({str(exc).splitlines()[0][:160]})",
                       "the file is truncated or not a safetensors file: download it again") from None


def lora_format(path: Path, keys: list[str], what: str = "LoRA", family=None) -> str:
    """"kohya" or "diffusers", or the UserError saying what else the file is. `family` (engine.families): the
    model's, whose key names are a LoRA; None: any family's (a plan checked before the model is known)."""
    for marker, kind in UNSUPPORTED_KINDS:
        hit = next((k for k in keys if marker in k), None)
        if hit is not None:
            raise _problem(path, what, f"is {kind} (key {hit!r}), not a plain LoRA",
                           "only plain LoRA (low-rank up/down pairs, also as conv LoRA/LoCon) is supported; use a "
                           "LoRA version of it, or merge it into the model with its own tools")
    if not keys:
        raise _problem(path, what, "holds no tensors", "this is not a LoRA file")
    from .families import all_families

    for fam in [family] if family is not None else all_families():
        kohya, diffusers = fam.lora_prefixes
        if all(k.startswith(kohya) for k in keys) and any("lora_down" in k for k in keys):
            return "kohya"
        if all(k.startswith(diffusers) for k in keys) and all(any(m in k for m in _MARKERS) for k in keys):
            return "diffusers"
    sample = ", ".join(sorted(keys)[:3])
    if any(m in k for k in keys for m in _MARKERS):
        return _raise_other_arch(path, what, sample, family)
    raise _problem(path, what, f"is not a LoRA (keys such as {sample})",
                   "pass a LoRA in kohya/A1111 (lora_unet_..., lora_te_...) or diffusers/PEFT (unet..., "
                   "text_encoder...) format")


def _raise_other_arch(path: Path, what: str, sample: str, family=None):
    made_for = f"{family.name} (the model's family)" if family is not None else \
        "Stable Diffusion 1.x/2.x, SDXL, FLUX.1 or FLUX.2 [klein] (this engine renders those)"
    raise _problem(path, what, f"is a LoRA for another kind of model (keys such as {sample})",
                   f"use a LoRA made for {made_for}")


def check_lora_file(path: Path, what: str = "LoRA", family=None) -> str:
    """Before any model loads: the file exists, is safetensors and is a LoRA of a supported kind (of `family`, the
    model's, where it is known). Returns the format. Whether it fits the model is checked once the model is loaded
    (`resolve`)."""
    keys, _ = read_header(path, what)
    return lora_format(path, keys, what, family)


def lora_ref(path: str | Path, scale: float) -> LoraRef:
    """A LoRA of a set, its content hashed (memoised by paths.sha256_files: a file rewritten in place is hashed
    again)."""
    p = Path(path).resolve()
    return LoraRef(str(p), sha256_files([p])[0], float(scale))


def combine(entries: list[tuple[str | Path, float]]) -> LoraSet:
    """The effective set from (file, scale) entries in order: the same file (by content) given twice is merged once
    with the scales added (merging is additive, so that is what applying it twice would do); a LoRA whose scales
    add up to 0 is left out, so its frames keep the plain key."""
    refs: dict[str, LoraRef] = {}
    for path, scale in entries:
        r = lora_ref(path, scale)
        old = refs.get(r.sha256)
        refs[r.sha256] = r if old is None else old._replace(scale=old.scale + r.scale)
    return tuple(r for r in refs.values() if r.scale != 0.0)


# --- 2. convert ------------------------------------------------------------------------------------------------------

def _peft_layers(path: Path, model, what: str) -> dict[str, dict[str, tuple]]:
    """component -> module name -> (down, up, alpha or None), names as PEFT gives them (diffusers' converters)."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from safetensors.torch import load_file

    family = model.family
    keys, metadata = read_header(path, what)
    fmt = lora_format(path, keys, what, family)
    raw = load_file(str(path))
    alphas: dict[int, float] = {}  # id(down tensor) -> alpha: diffusers' converters move the tensor objects
    if fmt == "kohya" and not family.lora_folds_alphas:
        for k in keys:
            if k.endswith(".lora_down.weight") and k.replace(".lora_down.weight", ".alpha") in raw:
                alphas[id(raw[k])] = float(raw[k.replace(".lora_down.weight", ".alpha")])
    try:
        state, named_alphas = family.lora_state_dict(dict(raw), model)
        out: dict[str, dict[str, tuple]] = {}
        for comp in (*DENOISERS, "text_encoder", "text_encoder_2"):
            part = {k[len(comp) + 1:]: v for k, v in state.items() if k.startswith(comp + ".")}
            if not part:
                continue
            if comp in DENOISERS:
                peft = part if any("lora_A" in k for k in part) else convert_unet_state_dict_to_peft(part)
            else:
                peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            for name, alpha in named_alphas.items():  # alphas diffusers returned by module name (FLUX)
                down = peft.get(name.removeprefix(comp + ".") + ".lora_A.weight")
                if name.startswith(comp + ".") and down is not None:
                    alphas[id(down)] = alpha
            out[comp] = _pairs(peft, alphas, _metadata_alphas(metadata, comp))
    except UserError:
        raise
    except Exception as exc:  # diffusers raises ValueError/KeyError for keys it cannot place
        raise _problem(path, what, f"diffusers cannot convert it ({str(exc).splitlines()[0][:200]})",
                       f"the file is not a LoRA for {family.name}, or uses a naming this version of diffusers does "
                       "not know") from None
    return out


def _pairs(peft: dict[str, torch.Tensor], alphas: dict[int, float], meta_alpha) -> dict[str, tuple]:
    layers: dict[str, tuple] = {}
    for k, down in peft.items():
        if not k.endswith(".lora_A.weight"):
            continue
        module = k[: -len(".lora_A.weight")]
        up = peft.get(module + ".lora_B.weight")
        if up is None:
            raise ValueError(f"layer {module} has lora_A but no lora_B")
        alpha = alphas.get(id(down))
        if alpha is None and meta_alpha is not None:
            alpha = meta_alpha(module, down.shape[0])
        layers[module] = (down, up, alpha)
    if not layers:
        raise ValueError("no lora_A/lora_B pairs")
    return layers


def _metadata_alphas(metadata: dict[str, str], comp: str):
    """diffusers' `lora_adapter_metadata` (the LoraConfig a PEFT-trained LoRA was saved with): module -> alpha, with
    PEFT's alpha_pattern/rank_pattern rules; None when the file has none (then alpha = r: scale 1, PEFT's own
    convention for files without alphas)."""
    try:
        meta = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        return None
    conf = meta.get(comp) if isinstance(meta.get(comp), dict) else \
        {k[len(comp) + 1:]: v for k, v in meta.items() if k.startswith(comp + ".")}
    if not conf or "lora_alpha" not in conf:
        return None

    def pattern(patterns: dict, module: str):
        for pat, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({pat.lstrip('^')})$", module):
                return value
        return None

    def alpha(module: str, r: int) -> float:
        a = pattern(conf.get("alpha_pattern"), module) or conf["lora_alpha"]
        if conf.get("use_rslora"):  # PEFT's rank-stabilised scaling alpha / sqrt(r), written as alpha' / r
            return float(a) * r / (r ** 0.5)
        return float(a)

    return alpha


# --- 3. resolve ------------------------------------------------------------------------------------------------------

def _graph_names(model) -> dict[int, tuple[str, str]]:
    """id(parameter) -> (component, its name in the component's graph module)."""
    from movielm_fast.export.graphs import graph_modules

    return {id(p): (comp, name) for comp, g in graph_modules(model).items()
            for name, p in g.named_parameters(remove_duplicate=False)}


def _submodule(root: torch.nn.Module, name: str):
    # Recent transformers flatten CLIPTextModel; older LoRAs still say text_model.* (diffusers handles both too).
    for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def resolve(model, path: str | Path, what: str = "LoRA") -> list[LoraLayer]:
    """Every weight the LoRA file changes in `model`, checked: a layer the model lacks or a shape that differs is a
    UserError naming the file (a LoRA for another model, e.g. an SDXL LoRA on SD 1.5)."""
    path = Path(path)
    layers = _peft_layers(path, model, what)
    roots = {"unet": model.unet, "transformer": model.transformer}
    roots.update({("text_encoder" if i == 0 else f"text_encoder_{i + 1}"): enc for i, enc in
                  enumerate(model.text_encoders)})
    names = _graph_names(model)
    arch = {"sdxl": "SDXL", "sd": "SD 1.x/2.x"}.get(model.kind, model.family.name)
    other = f"this model is {arch}: use a LoRA made for it"
    out = []
    for comp, mods in layers.items():
        if roots.get(comp) is None:
            raise _problem(path, what, f"has {comp} layers, and this {arch} model has no {comp}", other)
        for module_name, (down, up, alpha) in mods.items():
            module = _submodule(roots[comp], module_name)
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.nn.Parameter) or not isinstance(module, (torch.nn.Linear,
                                                                                      torch.nn.Conv2d)):
                raise _problem(path, what, f"changes {comp}.{module_name}, which this model does not have as a "
                                           "linear or conv layer", other)
            r = down.shape[0]
            fits = (down.ndim == up.ndim == weight.ndim and up.shape[0] == weight.shape[0] and up.shape[1] == r
                    and down.shape[1] == weight.shape[1]
                    # a conv LoRA (kohya LoCon): down is a kxk conv like the weight, up a 1x1 conv
                    and (weight.ndim == 2 or (down.shape[2:] == weight.shape[2:] and tuple(up.shape[2:]) == (1, 1))))
            if not fits:
                raise _problem(path, what, f"layer {comp}.{module_name} has shape up {tuple(up.shape)} x down "
                                           f"{tuple(down.shape)}; the model's weight is {tuple(weight.shape)}", other)
            comp_name, param = names[id(weight)]
            factor = (alpha / r) if alpha is not None else 1.0
            out.append(LoraLayer(comp_name, param, tuple(weight.shape), down, up, factor))
    return out


class LoraLibrary:
    """Resolved LoRA files of one model, each read once (by content hash) however many movies use it."""

    def __init__(self, model):
        self.model = model
        self._layers: dict[str, list[LoraLayer]] = {}

    def layers(self, ref: LoraRef, what: str = "LoRA") -> list[LoraLayer]:
        if ref.sha256 not in self._layers:
            self._layers[ref.sha256] = resolve(self.model, ref.path, what)
        return self._layers[ref.sha256]

    def deltas(self, loras: LoraSet) -> dict[tuple[str, str], torch.Tensor]:
        """(component, parameter) -> sum over the set of scale * alpha/r * up @ down, float32, in set order."""
        out: dict[tuple[str, str], torch.Tensor] = {}
        for ref in loras:
            for layer in self.layers(ref):
                d = layer.delta() * ref.scale
                key = (layer.component, layer.param)
                out[key] = out[key] + d if key in out else d
        return out


# --- 4. merge (torch) ------------------------------------------------------------------------------------------------

class TorchMerger:
    """Merges a LoRA set into live torch modules in place, and undoes it exactly.

    Only the weights a set touches are copied (to the CPU, once, when first touched); switching sets restores every
    weight the old set changed from those copies, so the plain model comes back bit for bit and nothing is reloaded.
    In-place writes keep the tensors' addresses, so captured CUDA graphs and compiled steps see the new weights."""

    def __init__(self, library: LoraLibrary, graphs: dict[str, torch.nn.Module]):
        self.library, self.graphs = library, graphs
        self.pristine: dict[tuple[str, str], torch.Tensor] = {}
        self.current: LoraSet = ()
        self.switches = 0

    def apply(self, loras: LoraSet, library: LoraLibrary | None = None) -> None:
        if loras == self.current:
            return
        deltas = (library or self.library).deltas(loras)
        touched = set(deltas) | {k for k in self.pristine}
        with torch.no_grad():
            for key in touched:
                comp, name = key
                param = self.graphs[comp].get_parameter(name)
                if key not in self.pristine:
                    self.pristine[key] = param.detach().to("cpu", copy=True)
                base = self.pristine[key]
                if key in deltas:
                    param.copy_((base.float() + deltas[key]).to(param.dtype))
                else:
                    param.copy_(base)
            for graph in self.graphs.values():
                refresh_fused_projections(graph)
        self.pristine = {k: v for k, v in self.pristine.items() if k in deltas}  # restored ones need no copy
        self.current = loras
        self.switches += 1


def refresh_fused_projections(root: torch.nn.Module) -> None:
    """diffusers' fused QKV projections (fuse_qkv_projections) hold copies of to_q/to_k/to_v: rewrite them in place
    from the (merged or restored) separate weights."""
    for m in root.modules():
        if not getattr(m, "fused_projections", False):
            continue
        for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v"))):
            f = getattr(m, fused, None)
            if f is not None:
                f.weight.copy_(torch.cat([getattr(m, p).weight for p in parts]))
