"""ONNX export of each component, checked, graph-optimized for its target, converted to fp16 for GPUs.

Every graph is declared by its `ModelSpec` (export/specs.py): names, dynamic axes and the sample inputs used for
tracing. Two exporters of torch's, chosen per component (`DYNAMO_COMPONENTS`): the TorchScript one (`dynamo=False`)
for the UNet families' graphs, which it traces cleanly and quickly; the dynamo one (torch.export + onnxscript) for
the transformer families' denoiser, whose attention reshapes the TorchScript tracer freezes (`dynamo_export`).

Targets:
  ort-cpu   fp32, ONNX Runtime transformer fusions that have CPU kernels (attention, LayerNorm, GELU)
  ort-cuda  fp32 or fp16, plus the CUDA-only fusions (GroupNorm, NhwcConv, BiasSplitGelu, BiasAdd, packed QKV)
  trt-onnx  fp32 plain ONNX for TensorRT's parser (TensorRT does its own fusions and cannot read contrib ops)

onnx and onnxruntime are optional (the onnx extra), so they are imported inside the functions that use them: the
backend registry imports this module whether or not they are installed.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from movielm_fast.errors import UserError
from movielm_fast.optional import require, require_onnx

from . import cache
from .graphs import graph_modules
from .specs import DYNAMO_COMPONENTS, TRANSFORMER, UNET, VAE_DECODER, ModelSpec, ShapeProfile, model_specs
from .weight_map import build_weight_map, save_weight_map

log = logging.getLogger("movielm_fast")

OPSET = 17
DYNAMO_OPSET = 18  # the first opset onnxscript's torch library writes natively (older ones go through a converter)
# Protobuf cannot hold more than 2 GB; above this we write weights to one external file beside the graph.
EXTERNAL_DATA_BYTES = 1 << 30
ONNX_FILE = "model.onnx"
META_MODEL_HASH = "movielm.model_hash"


def graph_module(model, component: str) -> nn.Module:
    """The fp32 torch module whose graph is exported for `component` (also the parity reference): the very module
    the torch backend runs (export/graphs.py)."""
    return graph_modules(model)[component].float().eval()


def trace_dims(spec: ModelSpec, unet_up_blocks: int = 0) -> dict[str, int]:
    """Small shapes to trace with. The UNet is traced at a latent size that is NOT a multiple of its total
    upsampling factor: diffusers then takes its general path (upsample to the skip connection's size), so the
    exported graph is right for every size, not only for multiples of 2**up_blocks."""
    factor = 2 ** unet_up_blocks
    side = factor + 1 if spec.component == UNET else 8
    dims = spec.dims(frames=1, width=side * spec.scale, height=side * spec.scale, chunks=1, cfg=True)
    dims["B"] = 2  # batch 1 can be specialised away by the tracer (broadcasts); 2 keeps it symbolic
    return dims


def _up_blocks(model) -> int:
    return len(model.unet.config.block_out_channels) - 1 if model.unet is not None else 0


# --- export / optimize / convert --------------------------------------------------------------------------------
def graph_args(module: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple:
    """`inputs` (by spec name) as the positional arguments of the graph module's forward: None for an optional
    input the spec leaves out (FLUX.2's transformer has no pooled projections), trailing ones dropped."""
    args = [inputs.get(name) for name in inspect.signature(module.forward).parameters]
    while args and args[-1] is None:
        args.pop()
    return tuple(args)


def opset(spec: ModelSpec) -> int:
    return DYNAMO_OPSET if spec.component in DYNAMO_COMPONENTS else OPSET


def dynamo_export(module: nn.Module, spec: ModelSpec, inputs: dict[str, torch.Tensor], path: Path) -> None:
    """Export through torch.export: each symbolic dimension of the spec is one `torch.export.Dim`, shared by every
    input that has it (the batch of the latents and of the text states is one B), so the graph serves any batch and
    image token count. The inputs go in by name; those a variant lacks (FLUX.2's pooled projections) stay out."""
    require("onnxscript", "onnx", f"exporting the {spec.component} of a transformer family to ONNX")
    # min=1: a batch of one frame (no CFG) and any size are valid; the trace itself runs at batch 2 (trace_dims)
    dims = {d: torch.export.Dim(d, min=1) for t in spec.inputs for d in t.shape if isinstance(d, str)}
    shapes = {t.name: {i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} or None
              for t in spec.inputs}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation notes of torch.export's internals: nothing a user can act on
        program = torch.onnx.export(module, (), kwargs=inputs, dynamic_shapes=shapes, input_names=spec.input_names,
                                    output_names=spec.output_names, opset_version=DYNAMO_OPSET, dynamo=True,
                                    optimize=True, verbose=False)
    program.save(str(path))  # weights beside the graph in one .data file when they pass protobuf's 2 GB


def torch_export(module: nn.Module, spec: ModelSpec, inputs: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.component in DYNAMO_COMPONENTS:
        dynamo_export(module, spec, inputs, path)
        return
    args = graph_args(module, inputs)  # the exporter names the non-None ones in order: the spec's input names
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings about Python-side shape checks are expected: the shapes they test are static per request.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), opset_version=OPSET, dynamo=False)


def _weights_bytes(model_proto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in model_proto.graph.initializer)


def save_onnx(model_proto, path: Path) -> None:
    """Save with the weights inline, or in one `<name>.data` file when the graph would pass protobuf's 2 GB."""
    onnx = require_onnx()

    path.parent.mkdir(parents=True, exist_ok=True)
    if _weights_bytes(model_proto) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model_proto, str(path))


def check_onnx(path: Path) -> None:
    onnx = require_onnx()

    # The path form checks models with external data too (the proto form refuses > 2 GB).
    onnx.checker.check_model(str(path))


def stamp(model_proto, meta: dict[str, str]) -> None:
    """Record which model a graph came from, inside the ONNX file itself (checked when a session is created)."""
    for k, v in meta.items():
        entry = next((p for p in model_proto.metadata_props if p.key == k), None) or model_proto.metadata_props.add()
        entry.key, entry.value = k, v


def to_fp16(model_proto, spec: ModelSpec, upcast_attention: bool):
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    m = OnnxModel(model_proto)
    fixed_io = [t.name for t in spec.inputs + spec.outputs if t.dtype != "float"]
    m.convert_float_to_float16(keep_io_types=fixed_io, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                               node_block_list=fp32_nodes(m.model, upcast_attention))
    m.topological_sort()  # the converter appends Casts for kept-fp32 inputs at the end of the node list
    return m.model


def python_fusions_help(spec: ModelSpec, target: str) -> bool:
    """Whether onnxruntime.transformers' graph fusions are worth running.

    On CUDA they are (fused attention, GroupNorm, NhwcConv...). On the CPU, the fusions with CPU kernels
    (LayerNorm, GELU, MatMul+bias) are also done by ONNX Runtime itself when a session loads the graph, the UNet
    attention matcher fails on current diffusers graphs, and for an SD UNet the pass holds two copies of a 3.4 GB
    model in memory for minutes (it was OOM-killed on a 23 GB machine): so on the CPU only the small text encoders
    go through it (SkipLayerNorm/BiasGelu fusions). The transformer families' graphs are left to ONNX Runtime's own
    session optimizations: its MMDiT fusions are not checked against them yet, and its CLIP patterns fail on T5
    and Qwen3 (RMS norms).
    """
    component = spec.component
    if component == TRANSFORMER or "pooled" not in spec.output_names:  # a transformer, T5, Qwen3
        return False
    if target == "ort-cuda":
        return True
    return target == "ort-cpu" and component.startswith("text_encoder")


def _ort_model_type(component: str) -> str:
    """onnxruntime.transformers' name for the kind of graph (it picks the fusion patterns)."""
    return {UNET: "unet", VAE_DECODER: "vae"}.get(component, "clip")


def _fusion_options(component: str, target: str):
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions(_ort_model_type(component))
    if target != "ort-cuda":
        # These fusions emit contrib ops that only have CUDA/ROCm kernels (GroupNorm, SkipGroupNorm, NhwcConv,
        # BiasSplitGelu, BiasAdd) or whose packed layouts the CPU attention kernel does not take.
        for name in ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                     "enable_bias_add", "enable_packed_qkv", "enable_packed_kv"):
            setattr(opts, name, False)
    return opts


def fp32_nodes(model_proto, upcast_attention: bool) -> list[str]:
    """Nodes that must stay fp32 in an fp16 graph.

    - sinusoidal time/size embeddings (`time_proj`, `add_time_proj`): sin/cos of arguments up to ~1000 are
      meaningless at fp16's resolution (0.5 there);
    - attention scores when the model asks for upcast attention (SD 2.x): Q·K^T overflows fp16.
    """
    names = [n.name for n in model_proto.graph.node if "time_proj" in n.name]
    if upcast_attention:
        producers = {o: n for n in model_proto.graph.node for o in n.output}
        consumers: dict[str, list] = {}
        for n in model_proto.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        for n in model_proto.graph.node:
            if n.op_type != "Softmax":
                continue
            names.append(n.name)
            frontier = list(n.input)
            for _ in range(3):  # Softmax <- (Mul/Div/Add scale) <- MatMul(Q, K^T)
                nxt = []
                for t in frontier:
                    p = producers.get(t)
                    if p is not None and p.op_type in ("MatMul", "Mul", "Div", "Add"):
                        names.append(p.name)
                        if p.op_type != "MatMul":
                            nxt += list(p.input)
                frontier = nxt
            names += [c.name for c in consumers.get(n.output[0], []) if c.op_type == "MatMul"]  # softmax @ V
    return sorted(set(filter(None, names)))


def optimize(src: Path, dst: Path, spec: ModelSpec, target: str, fp16: bool, upcast_attention: bool = False,
             meta: dict[str, str] | None = None) -> dict:
    """Graph fusions for the target (and fp16 conversion); returns a summary of what was fused."""
    onnx = require_onnx()
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = _ort_model_type(spec.component)
    opts = _fusion_options(spec.component, target)
    notes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            m = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=opts, use_gpu=target == "ort-cuda")
        except Exception as exc:
            # The attention pattern matcher is the most fragile part (it trips over some diffusers/numpy
            # versions' graphs); the other fusions still pay off, so retry without it.
            notes["attention_fusion_failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            opts.enable_attention = False
            m = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=opts, use_gpu=target == "ort-cuda")
    fused = {**{k: v for k, v in m.get_fused_operator_statistics().items() if v}, **notes}
    m.prune_graph()
    proto = to_fp16(m.model, spec, upcast_attention) if fp16 else m.model
    del m
    if any(n.domain == "com.microsoft" for n in proto.graph.node) and \
            not any(o.domain == "com.microsoft" for o in proto.opset_import):
        # Fused contrib ops need their domain declared, or neither the checker nor ONNX Runtime loads the graph.
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    stamp(proto, meta or {})
    save_onnx(proto, dst)
    del proto
    onnx.checker.check_model(str(dst))
    return fused


def ort_session(path: Path, providers: list[str], threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3  # warnings about unused initializers etc. are noise to a user
    return ort.InferenceSession(str(path), sess_options=so, providers=providers)


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|: the parity measure (fp32 bar: 1e-4)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def parity(model, spec: ModelSpec, path: Path, dims: dict[str, int], providers=("CPUExecutionProvider",),
           seed: int = 0) -> dict[str, float]:
    """Run the exported graph and the torch module on the same random inputs; per output relative difference."""
    inputs = spec.sample_inputs(dims, torch.float32, seed)
    with torch.no_grad():
        module = graph_module(model, spec.component)
        ref = module(*graph_args(module, inputs))
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    sess = ort_session(path, list(providers))
    out = sess.run(spec.output_names, {n: v.numpy() for n, v in inputs.items()})
    return {n: relative_diff(torch.from_numpy(o), r) for n, o, r in zip(spec.output_names, out, ref)}


def export_component(model, component: str, target: str, dtype: str = "fp32",
                     profile: ShapeProfile | None = None, optimize_graph: bool = True) -> cache.Artifact:
    """The ONNX artifact for one component: from the cache, or exported, checked, optimized and cached."""
    if dtype not in ("fp32", "fp16"):
        raise UserError(f"ONNX artifacts are fp32 or fp16, not {dtype}", "use --dtype fp32 or --dtype fp16")
    if dtype == "fp16" and target == "ort-cpu":
        raise UserError("fp16 ONNX graphs need a GPU: ONNX Runtime's CPU kernels for them are slow or missing",
                        "use --dtype fp32 on CPU, or --device cuda")
    spec = model_specs(model)[component]
    key = cache.make_key(model, component, target, dtype, "dynamic")
    hit = cache.lookup(key)
    if hit is not None:
        hit.check_model(model)
        return hit
    onnx = require_onnx()

    log.info("exporting %s of %s for %s (%s)...", component, model.model_id, target, dtype)
    t0 = time.perf_counter()
    with cache.writing(key) as tmp:
        raw = tmp / "raw" / ONNX_FILE
        module = graph_module(model, component)
        dims = trace_dims(spec, _up_blocks(model))
        torch_export(module, spec, spec.sample_inputs(dims, torch.float32), raw)
        del module
        export_s = time.perf_counter() - t0
        meta = {META_MODEL_HASH: model.content_hash, "movielm.component": component,
                "movielm.model_id": model.model_id}
        upcast = component == UNET and bool(getattr(model.unet.config, "upcast_attention", False))
        fused: dict = {}
        final = tmp / ONNX_FILE
        plain_only = not (optimize_graph and python_fusions_help(spec, target))
        check: dict = {}
        for attempt in ("optimized", "plain"):
            if attempt == "optimized" and plain_only:
                continue
            for f in tmp.glob(ONNX_FILE + "*"):
                f.unlink()
            try:
                if attempt == "optimized":
                    fused = optimize(raw, final, spec, target, dtype == "fp16", upcast, meta)
                else:
                    fused = {}
                    proto = onnx.load(str(raw), load_external_data=True)
                    if dtype == "fp16":
                        proto = to_fp16(proto, spec, upcast)
                    stamp(proto, meta)
                    save_onnx(proto, final)
                    del proto
                    check_onnx(final)
                if target != "ort-cuda" and dtype == "fp32":
                    # A cheap self-check at the small trace shape (it also proves every op has a CPU kernel):
                    # a broken fusion must never reach the cache.
                    check = parity(model, spec, final, trace_dims(spec, _up_blocks(model)), seed=1)
                    if max(check.values()) > 1e-3:
                        raise RuntimeError(f"exported {component} disagrees with torch (relative difference "
                                           f"{max(check.values()):.2e})")
                break
            except Exception as exc:
                if attempt == "plain":
                    raise
                # The optimizer is best-effort: the unfused graph is correct, only slower.
                log.warning("graph optimization of %s failed (%s); using the unoptimized graph",
                            component, str(exc).splitlines()[0][:200])
        shutil.rmtree(raw.parent)
        # Which initializer holds each weight: LoRAs are merged into these at session creation, never re-exported.
        weight_map = build_weight_map(graph_module(model, component), final)
        save_weight_map(tmp, weight_map)
        total_s = time.perf_counter() - t0
        extra = {"spec": {"inputs": {t.name: [list(t.shape), t.dtype] for t in spec.inputs},
                          "outputs": {t.name: [list(t.shape), t.dtype] for t in spec.outputs},
                          "dynamic_axes": {k: {str(a): d for a, d in v.items()}
                                           for k, v in spec.dynamic_axes().items()},
                          **spec.consts},
                 "covers": "any batch and any size (multiple of 8 pixels): all axes are dynamic",
                 "requested_profile": (profile.as_dict() if profile else None),
                 "opset": opset(spec), "fused_ops": fused, "self_check_relative_diff": check,
                 "weight_map": {"file": "weights.json", "weights": len(weight_map)},
                 "export_seconds": round(export_s, 2), "total_seconds": round(total_s, 2)}
        manifest = cache.commit(tmp, key, ONNX_FILE, extra)
    log.info("exported %s in %.1f s (%s)", component, total_s, cache.human_bytes(manifest["total_bytes"]))
    art = cache.lookup(key)
    assert art is not None
    return art
