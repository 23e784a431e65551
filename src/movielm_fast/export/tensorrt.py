"""TensorRT engines, built from the same ONNX files ONNX Runtime uses (the plain "trt-onnx" variant).

Profiles come from the ModelSpec: either one static profile per (batch, size) bucket -- an engine per bucket,
which TensorRT tunes best and whose fixed shapes allow CUDA-graph replay -- or one dynamic min/opt/max profile.
Layer timings are kept in a persistent timing cache per GPU, so a rebuild (new bucket, new version) takes seconds
per tactic instead of minutes. Everything here except `build_engine` is plain Python and unit-tested without
TensorRT.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from movielm_fast.errors import UserError

from . import cache
from .onnx_export import export_component
from .specs import UNET, ModelSpec, ShapeProfile, component_dtype, model_specs
from .weight_map import _initializers, initializer_values

log = logging.getLogger("movielm_fast")

ENGINE_FILE = "engine.plan"
INSTALL_HINT = ("pip install 'movielm-fast[tensorrt]' (TensorRT 10.x, matching your CUDA) on a CUDA machine, or use "
                "--backend onnxruntime")


def require_tensorrt():
    """The tensorrt module, or the error a user can act on."""
    try:
        import tensorrt  # optional dependency (the tensorrt extra)
    except ImportError:
        raise UserError("TensorRT is not installed", INSTALL_HINT) from None
    return tensorrt


def gpu_tag() -> str:
    """Engines only run on the GPU model (and compute capability) they were built for."""
    if not torch.cuda.is_available():
        raise UserError("TensorRT engines need a CUDA GPU, and torch sees none",
                        "run on a CUDA machine with a CUDA build of torch, or use --backend onnxruntime")
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + f"-sm{major}{minor}"


@dataclass(frozen=True)
class TrtBuildConfig:
    component: str
    fp16: bool
    profiles: tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]], ...]
    """One dict per optimization profile: input name -> (min shape, opt shape, max shape)."""
    static: bool
    keep_fp32_attention: bool = False
    """Pin attention scores (Q·K^T, softmax) to fp32: models that need upcast attention (SD 2.x) overflow in fp16."""
    bf16: bool = False
    """bf16 kernels allowed (the transformer families: FLUX's activations overflow fp16). The engine's inputs and
    outputs keep the ONNX file's fp32 either way."""
    builder_optimization_level: int = 3
    workspace_bytes: int | None = None
    timing_cache: str | None = None
    refit: bool = True
    """Refittable engine: LoRA sets are merged by replacing weights (`refit_plan`, trt.Refitter) instead of a
    rebuild. Costs TensorRT a few weight-constant fusions (bench on your GPU if that matters)."""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["profiles"] = [{k: [list(s) for s in v] for k, v in p.items()} for p in self.profiles]
        return d

    def covers(self, shapes: dict[str, tuple[int, ...]]) -> int | None:
        """Index of the first profile whose min/max bound every input shape, or None."""
        for i, prof in enumerate(self.profiles):
            if all(all(lo <= n <= hi for lo, n, hi in zip(prof[name][0], shapes[name], prof[name][2]))
                   for name in prof):
                return i
        return None


def timing_cache_path() -> Path:
    return cache.artifacts_root() / f"trt-timing-{gpu_tag()}.cache"


def build_config(model, spec: ModelSpec, profile: ShapeProfile, dtype: str, timing_cache: str | None = None
                 ) -> TrtBuildConfig:
    """The whole build recipe for one engine, from the ModelSpec and the requested profile."""
    precision = component_dtype(model, spec.component, dtype)
    fp16 = precision == "fp16"
    upcast = spec.component == UNET and bool(getattr(model.unet.config, "upcast_attention", False))
    if profile.dynamic or spec.batch_role == "chunks":
        # Text encoders are cheap and their batch is the prompt's window count: one dynamic profile serves all.
        profiles = (spec.input_profiles(ShapeProfile(profile.batch_sizes, profile.sizes, profile.max_chunks,
                                                      profile.cfg, dynamic=True)),)
        static = False
    else:
        profiles = tuple(spec.input_profiles(b) for b in profile.buckets())
        static = True
    return TrtBuildConfig(spec.component, fp16, profiles, static, keep_fp32_attention=upcast and fp16,
                          bf16=precision == "bf16", timing_cache=timing_cache)


def engine_profiles(spec: ModelSpec, profile: ShapeProfile) -> list[ShapeProfile]:
    """The engines to build for `profile`: one per bucket when static (text encoders: always one dynamic)."""
    if profile.dynamic or spec.batch_role == "chunks":
        return [ShapeProfile(profile.batch_sizes, profile.sizes, profile.max_chunks, profile.cfg, dynamic=True)]
    return profile.buckets()


def build_engine(onnx_path: Path, engine_path: Path, cfg: TrtBuildConfig) -> None:
    """Parse the ONNX file and build a serialized engine (needs TensorRT and a GPU)."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from file: external weights are found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = cfg.builder_optimization_level
    if cfg.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)
    if cfg.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if cfg.bf16:
        config.set_flag(trt.BuilderFlag.BF16)
    if cfg.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if cfg.keep_fp32_attention:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.SOFTMAX:
                layer.precision = trt.float32
                producer = _producer(network, layer.get_input(0))
                while producer is not None and producer.type != trt.LayerType.MATRIX_MULTIPLY:
                    producer.precision = trt.float32
                    producer = _producer(network, producer.get_input(0))
                if producer is not None:
                    producer.precision = trt.float32
    for prof in cfg.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    timing = None
    if cfg.timing_cache:
        blob = Path(cfg.timing_cache).read_bytes() if Path(cfg.timing_cache).exists() else b""
        timing = config.create_timing_cache(blob)
        config.set_timing_cache(timing, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing is not None:
        tmp = Path(cfg.timing_cache + ".tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        tmp.replace(cfg.timing_cache)


def refit_plan(weight_map: dict, deltas: dict, onnx_path: Path, component: str, originals: dict,
               previous: set[str]) -> dict:
    """Weight name -> new value for `Refitter.set_named_weights`: TensorRT names the weights it parsed from ONNX by
    their initializer names, so this is the ONNX Runtime override (export/weight_map.py) plus, for weights the
    previous set changed and this one does not, their exported values back. Plain Python: tested without TensorRT."""
    values = initializer_values(weight_map, deltas, onnx_path, component, originals)
    back = previous - set(values)
    if back - set(originals):
        originals.update({n: a for n, (a, _) in _initializers(onnx_path).items() if n in back})
    return {**values, **{n: originals[n] for n in sorted(back)}}


def refit_engine(engine, values: dict, component: str) -> None:
    """Replace weights of a deserialized engine in place (needs TensorRT and an engine built with REFIT)."""
    trt = require_tensorrt()
    if not engine.refittable:
        raise UserError(f"the cached TensorRT engine for {component} was built without REFIT, so LoRAs cannot be "
                        "merged into it", "rebuild it: movielm-fast export --clear, then render again (engines are "
                        "now built refittable)")
    refitter = trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))
    for name, value in values.items():  # the arrays must outlive refit_cuda_engine: `values` holds them
        if not refitter.set_named_weights(name, trt.Weights(value)):
            raise RuntimeError(f"TensorRT refused new weights for {name} of {component}")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"TensorRT could not refit the {component} engine (missing: "
                           f"{', '.join(refitter.get_missing_weights()[:5])})")


def _producer(network, tensor):
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if any(layer.get_output(j).name == tensor.name for j in range(layer.num_outputs)):
            return layer
    return None


def engine_artifact(model, component: str, dtype: str, profile: ShapeProfile) -> cache.Artifact:
    """One engine (for one bucket, or one dynamic profile) from the cache, built from the ONNX if missing."""
    require_tensorrt()
    spec = model_specs(model)[component]
    cdtype = component_dtype(model, component, dtype)
    key = cache.make_key(model, component, f"trt-{gpu_tag()}", cdtype, profile.id)
    hit = cache.lookup(key)
    if hit is not None:
        hit.check_model(model)
        return hit
    onnx_art = export_component(model, component, "trt-onnx", "fp32", optimize_graph=False)
    cfg = build_config(model, spec, profile, dtype, str(timing_cache_path()))
    log.info("building a TensorRT engine for %s (%s, %s); this takes minutes once per bucket", component, cdtype,
             profile.describe())
    t0 = time.perf_counter()
    with cache.writing(key) as tmp:
        build_engine(onnx_art.file(), tmp / ENGINE_FILE, cfg)
        cache.commit(tmp, key, ENGINE_FILE, {"profile": profile.as_dict(), "covers": profile.describe(),
                                             "build_config": cfg.as_dict(), "onnx": str(onnx_art.path),
                                             "build_seconds": round(time.perf_counter() - t0, 1)})
    art = cache.lookup(key)
    assert art is not None
    return art


def build_engines(model, dtype: str, profile: ShapeProfile) -> dict[str, cache.Artifact]:
    """Every engine `profile` asks for: "<component>" or "<component>@<profile id>" when there are several."""
    require_tensorrt()
    out = {}
    for component, spec in model_specs(model).items():
        profiles = engine_profiles(spec, profile)
        for p in profiles:
            out[component if len(profiles) == 1 else f"{component}@{p.id}"] = engine_artifact(model, component,
                                                                                             dtype, p)
    return out

