"""The ONNX Runtime backend: the exported graphs (export/) run on the CPU or CUDA execution provider.

Artifacts come from the cache and are exported on first use. Each component's session is created once and reused
for every call. Tensors are handed to ONNX Runtime by pointer through IO binding, on the CPU as on CUDA, so on a
GPU the latents never leave the device between steps and on the CPU no copies are made; outputs are written
straight into torch tensors whose shapes the component's ModelSpec gives.

LoRAs are merged without re-export: the merged weights replace the initializers that hold them (export/weight_map.py)
as initializers handed to the session (`add_external_initializers`, see `session_source`) when the component's
session is created again; other components keep theirs.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from movielm_fast.errors import UserError
from movielm_fast.export.artifacts import export_onnx_set, require_ort_provider
from movielm_fast.export.onnx_export import META_MODEL_HASH, graph_module
from movielm_fast.export.specs import (
    TRANSFORMER,
    UNET,
    VAE_DECODER,
    component_dtype,
    model_specs,
    text_encoder_component,
)
from movielm_fast.export.weight_map import initializer_values, load_weight_map, session_source

from .base import DiTCond, UNetCond, denoise_feeds, refuse_anchors, register, text_feeds

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
log = logging.getLogger("movielm_fast")


class OrtGraph:
    """One exported component: a session created once, called with torch tensors, returning torch tensors."""

    def __init__(self, artifact, spec, model, providers: list[str], device: torch.device, float_dtype: torch.dtype,
                 overrides: dict[str, np.ndarray] | None = None, threads: int = 1):
        """`overrides`: initializer name -> value replacing the exported one (merged LoRA weights); `threads`:
        intra-op threads on the CPU."""
        import onnxruntime as ort  # optional dependency (the onnx extra); require_ort_provider checked it

        artifact.check_model(model)
        self.spec, self.device, self.float_dtype = spec, device, float_dtype
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        provider_list: list = list(providers)
        if device.type == "cpu":
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            # ORT's idle threads otherwise busy-wait after each call and slow the torch scheduler step that runs
            # between UNet calls (measured side by side on the demo model).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        else:
            # Run on torch's stream so ORT sees the inputs torch just wrote and torch sees ORT's outputs in order.
            opts = {"device_id": device.index or 0,
                    "user_compute_stream": str(torch.cuda.current_stream(device).cuda_stream)}
            provider_list = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
        # ONNX Runtime reads these when the session is created; they must stay alive as long as the session.
        self.overrides = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in (overrides or {}).items()}
        source, external = session_source(artifact.file(), set(self.overrides)) if overrides else \
            (str(artifact.file()), set())
        if external:
            so.add_external_initializers(sorted(external), [self.overrides[n] for n in sorted(external)])
        for name in set(self.overrides) - external:
            so.add_initializer(name, self.overrides[name])
        self.session = ort.InferenceSession(source, sess_options=so, providers=provider_list)
        theirs = self.session.get_modelmeta().custom_metadata_map.get(META_MODEL_HASH)
        if theirs != model.content_hash:
            raise UserError(f"{artifact.file()} was exported from another model (hash {theirs}; this model's is "
                            f"{model.content_hash})", "clear the stale artifact with movielm-fast export --clear, "
                                                      "then export again for this model")
        self.device_type = "cuda" if device.type == "cuda" else "cpu"
        self.device_id = (device.index or 0) if device.type == "cuda" else 0

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.spec
        feeds = {t.name: inputs[t.name].to(self.device, spec.torch_dtype(t, self.float_dtype)).contiguous()
                 for t in spec.inputs}
        dims = spec.dims_of({n: tuple(v.shape) for n, v in feeds.items()})
        out_shapes = spec.shapes(dims, "outputs")
        outputs = {t.name: torch.empty(out_shapes[t.name], dtype=spec.torch_dtype(t, self.float_dtype),
                                       device=self.device) for t in spec.outputs}
        binding = self.session.io_binding()
        for name, x in list(feeds.items()) + list(outputs.items()):
            bind = binding.bind_input if name in feeds else binding.bind_output
            bind(name, self.device_type, self.device_id, _NP[x.dtype], tuple(x.shape), x.data_ptr())
        self.session.run_with_iobinding(binding)
        return outputs


@register("onnxruntime")
class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model, config):
        # The provider check comes first: "no CUDA EP" is the more useful message on a CPU-only onnxruntime build.
        providers = require_ort_provider(config.device)
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        if self.dtype not in (torch.float32, torch.float16):
            raise UserError(f"the onnxruntime backend runs fp32 or fp16, not {config.dtype_name}",
                            "use --dtype fp32 (or, on CUDA, --dtype fp16 for a model that runs in fp16)")
        artifacts = export_onnx_set(model, config.device, config.dtype_name)
        specs = model_specs(model)
        self.model, self.artifacts, self.specs, self.providers = model, artifacts, specs, providers
        self.threads = torch.get_num_threads()  # as many as torch's: create_backend set them from --threads
        self.float_dtypes = {c: torch.float16 if component_dtype(model, c, config.dtype_name) == "fp16"
                             else torch.float32 for c in artifacts}
        self.graphs = {c: self._session(c) for c in artifacts}
        self.denoiser = UNET if UNET in artifacts else TRANSFORMER  # a UNet's, or a transformer family's
        self.loras: tuple = ()
        self.lora_touched: set[str] = set()  # components whose sessions hold merged weights
        self.weight_maps: dict[str, dict] = {}
        self.originals: dict[str, dict[str, np.ndarray]] = {}  # exported values of the initializers LoRAs change
        self.lora_seconds = 0.0  # time spent applying LoRA sets (recreating the affected sessions)

    def _session(self, component: str, overrides: dict[str, np.ndarray] | None = None) -> OrtGraph:
        return OrtGraph(self.artifacts[component], self.specs[component], self.model, self.providers, self.device,
                        self.float_dtypes[component], overrides, self.threads)

    @property
    def text_graphs(self):
        return [self.graphs[text_encoder_component(i)] for i in range(len(self.model.text_encoders))]

    def set_loras(self, loras, library) -> None:
        if loras == self.loras:
            return
        t0 = time.perf_counter()
        deltas: dict[str, dict[str, torch.Tensor]] = {}
        for (component, param), delta in library.deltas(loras).items():
            deltas.setdefault(component, {})[param] = delta
        for component in sorted(self.lora_touched | set(deltas)):
            art = self.artifacts[component]
            if component not in self.weight_maps:
                self.weight_maps[component] = load_weight_map(art, graph_module(self.model, component))
            values = initializer_values(self.weight_maps[component], deltas.get(component, {}), art.file(),
                                        component, self.originals.setdefault(component, {}))
            self.graphs[component] = self._session(component, values)
        self.lora_touched = set(deltas)
        self.loras = loras
        seconds = time.perf_counter() - t0
        self.lora_seconds += seconds
        log.info("LoRA set of %d file(s) applied to %s in %.2f s (no re-export)", len(loras),
                 ", ".join(sorted(deltas)) or "nothing (plain weights back)", seconds)

    def encode_text(self, encoder_index, inputs_embeds, eos_index):
        graph = self.text_graphs[encoder_index]
        out = graph(**text_feeds(graph.spec.input_names, inputs_embeds, eos_index))
        return tuple(out[name] for name in graph.spec.output_names)

    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: UNetCond | DiTCond) -> torch.Tensor:
        # cond.timestep_cond is always None: guidance-distilled UNets have no exported spec, so no backend here
        refuse_anchors(cond, self.name)
        return self.graphs[self.denoiser](**denoise_feeds(latents, t, cond))["noise"]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.graphs[VAE_DECODER](latents=latents)["images"].float().cpu()
