"""The TensorRT backend: engines built from the exported ONNX files (export/tensorrt.py), run from torch.

Each engine gets one execution context and, per input-shape signature, preallocated input/output buffers; with
static shapes the call is captured once as a CUDA graph and replayed (config.cuda_graphs), which removes the
per-layer launch overhead. Engines are looked up per request shape: when no cached engine covers it, one for
exactly that (batch, size) bucket is built on first use (minutes, once; `movielm-fast export --backend tensorrt`
builds them ahead of time).
"""

from __future__ import annotations

import torch

from movielm_fast.errors import UserError
from movielm_fast.export.onnx_export import export_component, graph_module
from movielm_fast.export.specs import (
    TRANSFORMER,
    UNET,
    VAE_DECODER,
    ShapeProfile,
    default_profile,
    model_specs,
    text_encoder_component,
)
from movielm_fast.export.tensorrt import TrtBuildConfig, engine_artifact, refit_engine, refit_plan, require_tensorrt
from movielm_fast.export.weight_map import load_weight_map

from .base import DiTCond, UNetCond, denoise_feeds, refuse_anchors, register, text_feeds


def check_within(cfg, shapes: dict[str, tuple[int, ...]], covers: str) -> int:
    """The profile index serving `shapes`, or the error saying what the engine covers and how to re-export."""
    index = cfg.covers(shapes)
    if index is None:
        got = ", ".join(f"{k}{list(v)}" for k, v in shapes.items())
        raise UserError(f"the TensorRT engine for {cfg.component} does not cover the input shapes {got}; "
                        f"it covers {covers}",
                        "re-export with: movielm-fast export --backend tensorrt --batch-sizes B --sizes WxH "
                        "(the batch sizes and sizes you render), or let render build the bucket on first use")
    return index


class TrtRunner:
    """One engine: context, preallocated buffers per shape signature, optional CUDA-graph replay."""

    def __init__(self, artifact, spec, model, device: torch.device, cuda_graphs: bool):
        import tensorrt as trt  # optional dependency (the tensorrt extra); checked when the backend was made

        artifact.check_model(model)
        self.spec, self.device, self.artifact = spec, device, artifact
        bc = artifact.manifest["build_config"]
        self.cfg = TrtBuildConfig(bc["component"], bc["fp16"], tuple(
            {k: tuple(tuple(s) for s in v) for k, v in p.items()} for p in bc["profiles"]), bc["static"],
            refit=bc.get("refit", False))
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(artifact.file().read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device)
        self.cuda_graphs = cuda_graphs
        self.dtypes = {self.engine.get_tensor_name(i): _torch_dtype(trt, self.engine.get_tensor_dtype(
            self.engine.get_tensor_name(i))) for i in range(self.engine.num_io_tensors)}
        self.slots: dict[tuple, dict] = {}

    def _slot(self, shapes: dict[str, tuple[int, ...]]) -> dict:
        sig = tuple(sorted(shapes.items()))
        if sig not in self.slots:
            index = check_within(self.cfg, shapes, self.artifact.manifest.get("covers", "its build profile"))
            self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
            dims = self.spec.dims_of(shapes)
            all_shapes = {**shapes, **self.spec.shapes(dims, "outputs")}
            bufs = {n: torch.empty(s, dtype=self.dtypes[n], device=self.device) for n, s in all_shapes.items()}
            self.slots[sig] = {"bufs": bufs, "graph": None, "profile": index}
        return self.slots[sig]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        shapes = {t.name: tuple(inputs[t.name].shape) for t in self.spec.inputs}
        slot = self._slot(shapes)
        bufs = slot["bufs"]
        for t in self.spec.inputs:  # copy into the static buffers (what a captured graph reads)
            bufs[t.name].copy_(inputs[t.name])
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            if slot["graph"] is not None:
                slot["graph"].replay()
            else:
                for name, s in shapes.items():
                    self.context.set_input_shape(name, s)
                for name, buf in bufs.items():
                    self.context.set_tensor_address(name, buf.data_ptr())
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError(f"TensorRT execution of {self.spec.component} failed")
                if self.cuda_graphs and self.cfg.static:
                    # The first run did TensorRT's lazy per-shape setup; now capture the same launches once.
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        self.context.execute_async_v3(self.stream.cuda_stream)
                    slot["graph"] = graph
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        # Outputs are cloned: the buffers are overwritten by the next call while the scheduler may still hold them.
        return {t.name: bufs[t.name].clone() for t in self.spec.outputs}


def _image_size(spec, dims: dict[str, int], inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(width, height) of the images a request renders: a UNet's latents say it; a transformer's packed tokens do
    not, its image position ids do ((0, row, column[, 0]) per token of a 2x2 latent patch)."""
    if "W" in dims:
        return dims["W"], dims["H"]
    ids = inputs["img_ids"]  # (N, axes)
    rows, columns = (int(ids[:, axis].max()) + 1 for axis in (1, 2))
    return columns * 2 * spec.scale, rows * 2 * spec.scale


def _torch_dtype(trt, dt) -> torch.dtype:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
            trt.int32: torch.int32}[dt]


@register("tensorrt")
def make_tensorrt_backend(model, config):
    require_tensorrt()  # before anything else: the clear "install tensorrt" message
    return TensorRTBackend(model, config)


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, model, config):
        self.model, self.config = model, config
        self.device = config.torch_device
        if self.device.type != "cuda":
            raise UserError("the tensorrt backend runs on CUDA only", "use --device cuda, or --backend onnxruntime "
                                                                      "on the CPU")
        self.dtype = config.torch_dtype
        self.specs = model_specs(model)
        self.denoiser = UNET if UNET in self.specs else TRANSFORMER  # a UNet's, or a transformer family's
        self.runners: dict[str, list[TrtRunner]] = {c: [] for c in self.specs}
        self._default = default_profile(model)
        # Prompt windows one text-encoder call may carry (PromptEncoder splits a batch's prompts to fit): what the
        # default text engine covers, so batching prompts never builds a wider engine in the middle of a render.
        self.text_rows = self._default.max_chunks
        self.loras: tuple = ()
        self.lora_values: dict[str, dict] = {}  # component -> weight name -> value every engine of it must hold
        self._lora_maps: dict[str, tuple] = {}  # component -> (weight map, exported values read so far, onnx)

    def set_loras(self, loras, library) -> None:
        """Refit every engine built so far; engines built later are refit when they are made (`_run`)."""
        if loras == self.loras:
            return
        deltas: dict[str, dict] = {}
        for (component, param), delta in library.deltas(loras).items():
            deltas.setdefault(component, {})[param] = delta
        for component in sorted(set(self.lora_values) | set(deltas)):
            wm, originals, onnx_path = self._lora_map(component)
            plan = refit_plan(wm, deltas.get(component, {}), onnx_path, component, originals,
                              set(self.lora_values.get(component, {})))
            for runner in self.runners[component]:
                refit_engine(runner.engine, plan, component)
            changed = {wm[p]["initializer"] for p in deltas.get(component, {})}
            self.lora_values[component] = {n: plan[n] for n in changed}
        self.lora_values = {c: v for c, v in self.lora_values.items() if v}
        self.loras = loras

    def _lora_map(self, component: str):
        if component not in self._lora_maps:
            # The engines are built from the plain "trt-onnx" export, whose weight map names their weights.
            art = export_component(self.model, component, "trt-onnx", "fp32", optimize_graph=False)
            self._lora_maps[component] = (load_weight_map(art, graph_module(self.model, component)), {}, art.file())
        return self._lora_maps[component]

    def _run(self, component: str, **inputs) -> dict[str, torch.Tensor]:
        spec = self.specs[component]
        shapes = {t.name: tuple(inputs[t.name].shape) for t in spec.inputs}
        for runner in self.runners[component]:
            if runner.cfg.covers(shapes) is not None:
                return runner(**inputs)
        dims = spec.dims_of(shapes)
        if spec.batch_role == "chunks":  # one dynamic engine for 1..N prompt windows
            d = self._default
            profile = ShapeProfile(d.batch_sizes, d.sizes, max(d.max_chunks, dims["B"]), d.cfg, dynamic=True)
        else:
            # An engine for exactly this bucket. The denoiser's batch already includes CFG's doubling: ask for it
            # as is.
            profile = ShapeProfile((dims["B"],), (_image_size(spec, dims, inputs),), max(1, dims.get("S", 77) // 77),
                                   cfg=False, dynamic=False)
        art = engine_artifact(self.model, component, self.config.dtype_name, profile)
        runner = TrtRunner(art, spec, self.model, self.device, self.config.cuda_graphs)
        check_within(runner.cfg, shapes, art.manifest.get("covers", ""))
        if self.lora_values.get(component):  # a bucket built after the LoRA set was merged into the others
            refit_engine(runner.engine, self.lora_values[component], component)
        self.runners[component].append(runner)
        return runner(**inputs)

    @torch.inference_mode()
    def encode_text(self, encoder_index, inputs_embeds, eos_index):
        component = text_encoder_component(encoder_index)
        spec = self.specs[component]
        out = self._run(component, **text_feeds(spec.input_names, inputs_embeds.to(self.device),
                                                eos_index.to(self.device)))
        return tuple(out[name] for name in spec.output_names)

    @torch.inference_mode()
    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: UNetCond | DiTCond) -> torch.Tensor:
        # cond.timestep_cond is always None: guidance-distilled UNets have no exported spec, so no backend here
        refuse_anchors(cond, self.name)
        return self._run(self.denoiser, **denoise_feeds(latents, t, cond))["noise"]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run(VAE_DECODER, latents=latents)["images"].float().cpu()
