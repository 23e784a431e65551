"""One shape/IO declaration per exported component (docs/design.md, "The main interfaces").

Export (input/output names, dynamic axes, sample inputs), graph optimization, the TensorRT engine build
(min/opt/max profiles) and the runtimes (output buffer shapes, coverage checks) all read a `ModelSpec`; nothing
else in export/ or the ONNX/TensorRT backends hard-codes a shape.

Symbolic dimensions:
  B  batch of the component (text encoders: prompt windows; UNet: frames, doubled under CFG; VAE: frames)
  S  UNet cross-attention tokens (77 per prompt window)
  h, w  latent height/width;  H, W  image height/width (= latent * the VAE's scale factor)
  N  a transformer's image tokens, one per 2x2 latent patch ((h / 2) * (w / 2))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from movielm_fast.errors import UserError

TOKENS = 77  # CLIP window: BOS + 75 tokens + EOS
UNET = "unet"
TRANSFORMER = "transformer"  # the denoiser of the transformer families (FLUX.1, FLUX.2 [klein])
VAE_DECODER = "vae_decoder"
DYNAMO_COMPONENTS = (TRANSFORMER,)
"""Components exported with torch's dynamo exporter. FLUX's attention (diffusers' FluxAttnProcessor, Flux2's) splits
heads with `unflatten(-1, (-1, head_dim))` and its rotary embedding reshapes with the sizes it reads: the TorchScript
tracer records those sizes as constants, so its graph runs at the traced batch and token count only, while
torch.export keeps them symbolic. diffusers' own processors are exported as they are, so nothing here re-implements
their attention."""
DIT_TEXT_TOKENS = 512
"""T5's (FLUX.1) and Qwen3's (FLUX.2 [klein]) text length: diffusers' max_sequence_length default in FluxPipeline and
Flux2KleinPipeline; prompts are padded to it, longer ones cut."""
DIT_SAMPLE_SIZE = 128  # the transformer families' native latent size (diffusers' default_sample_size): 1024 px
QWEN3_LAYERS = (9, 18, 27)  # the Qwen3 hidden states FLUX.2 [klein] conditions on (Flux2KleinPipeline's default)


def text_encoder_component(index: int) -> str:
    """The component name of text encoder `index`: "text_encoder", "text_encoder_2" (diffusers' folder names)."""
    return "text_encoder" if index == 0 else f"text_encoder_{index + 1}"


def component_dtype(model, component: str, dtype: str) -> str:
    """The dtype a component runs in when `dtype` is asked for: some VAEs (SDXL's) overflow in fp16 and say so in
    their config (`force_upcast`), so their decoder stays fp32. Every backend and the exporter ask here."""
    if dtype == "fp16" and component == VAE_DECODER and getattr(model.vae.config, "force_upcast", False):
        return "fp32"
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float"
    """"float": the artifact's float type (fp32 or fp16); otherwise a fixed type ("float32", "int64") that stays
    so in every artifact (timesteps and size conditions stay fp32: their sinusoidal embeddings lose accuracy in
    fp16)."""


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """"512x512,768x512" -> ((512, 512), (768, 512)) as (width, height)."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            w, h = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise UserError(f"bad size {part!r}", "write sizes as WIDTHxHEIGHT, e.g. 512x512,768x512") from None
        if w < 64 or h < 64 or w % 8 or h % 8:
            raise UserError(f"bad size {part!r}: width and height must be multiples of 8, at least 64",
                            "e.g. 512x512 or 768x512")
        sizes.append((w, h))
    if not sizes:
        raise UserError("no sizes given", "write sizes as WIDTHxHEIGHT, e.g. 512x512,768x512")
    return tuple(sizes)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise UserError(f"bad batch sizes {text!r}", "write comma-separated integers such as 1,4,8") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"bad batch sizes {text!r}", "batch sizes are positive integers, e.g. 1,4,8")
    return sizes


@dataclass(frozen=True)
class ShapeProfile:
    """What an artifact must serve, in the user's terms: frames per batch, image sizes, prompt windows.

    `dynamic=False` means exactly these (batch, size) buckets (a TensorRT engine per bucket, CUDA-graph friendly);
    `dynamic=True` means every batch and size inside the min/max rectangle.
    """

    batch_sizes: tuple[int, ...] = (1,)
    sizes: tuple[tuple[int, int], ...] = ((512, 512),)  # (width, height)
    max_chunks: int = 3
    cfg: bool = True
    dynamic: bool = True

    def __post_init__(self):
        object.__setattr__(self, "batch_sizes", tuple(sorted(set(self.batch_sizes))))
        object.__setattr__(self, "sizes", tuple(dict.fromkeys(tuple(s) for s in self.sizes)))

    @property
    def id(self) -> str:
        """A readable name usable in folder names, e.g. "dyn-b1-4-512x512-768x512-c3"."""
        sizes = "-".join(f"{w}x{h}" for w, h in self.sizes)
        batches = "-".join(map(str, self.batch_sizes))
        return (f"{'dyn' if self.dynamic else 'static'}-b{batches}-{sizes}-c{self.max_chunks}"
                f"{'' if self.cfg else '-nocfg'}")

    def buckets(self) -> list[ShapeProfile]:
        """One static profile per (batch, size) pair."""
        return [ShapeProfile((b,), (s,), self.max_chunks, self.cfg, dynamic=False)
                for b in self.batch_sizes for s in self.sizes]

    def describe(self) -> str:
        sizes = ", ".join(f"{w}x{h}" for w, h in self.sizes)
        batches = ", ".join(map(str, self.batch_sizes))
        if self.dynamic:
            return (f"any batch of {min(self.batch_sizes)}-{max(self.batch_sizes)} frames and any size within "
                    f"{sizes} (up to {self.max_chunks} prompt windows)")
        return f"batch sizes {batches} at sizes {sizes} exactly (up to {self.max_chunks} prompt windows)"

    def as_dict(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "sizes": [f"{w}x{h}" for w, h in self.sizes],
                "max_chunks": self.max_chunks, "cfg": self.cfg, "dynamic": self.dynamic}

    @classmethod
    def from_dict(cls, d: dict) -> ShapeProfile:
        return cls(tuple(d["batch_sizes"]), parse_sizes(",".join(d["sizes"])), d["max_chunks"], d["cfg"],
                   d["dynamic"])


@dataclass(frozen=True)
class ModelSpec:
    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_role: str
    """How B relates to the request: "chunks" (text encoders), "cfg_frames" (UNet), "frames" (VAE decoder)."""
    scale: int = 8  # image pixels per latent pixel
    consts: dict[str, int] = field(default_factory=dict)  # fixed sizes, for the record (hidden sizes, channels)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in self.inputs + self.outputs if any(isinstance(d, str) for d in t.shape)}

    def dims(self, frames: int, width: int, height: int, chunks: int = 1, cfg: bool = True) -> dict[str, int]:
        """Concrete symbolic dimensions for one request."""
        batch = {"chunks": chunks, "cfg_frames": frames * (2 if cfg else 1), "frames": frames}[self.batch_role]
        return {"B": batch, "S": TOKENS * chunks, "h": height // self.scale, "w": width // self.scale,
                "H": height, "W": width, "N": (height // self.scale // 2) * (width // self.scale // 2)}

    def dims_of(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """Symbolic dimensions read back from actual input shapes (the runtime's view)."""
        dims: dict[str, int] = {}
        for t in self.inputs:
            for d, n in zip(t.shape, shapes[t.name]):
                if isinstance(d, str):
                    dims[d] = int(n)
        if "h" in dims:
            dims.setdefault("H", dims["h"] * self.scale)
            dims.setdefault("W", dims["w"] * self.scale)
        return dims

    def shapes(self, dims: dict[str, int], which: str = "all") -> dict[str, tuple[int, ...]]:
        tensors = {"inputs": self.inputs, "outputs": self.outputs, "all": self.inputs + self.outputs}[which]
        return {t.name: tuple(dims[d] if isinstance(d, str) else d for d in t.shape) for t in tensors}

    def dim_ranges(self, profile: ShapeProfile) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of every symbolic dimension; opt is the first size and largest batch requested."""
        lo = self.dims(min(profile.batch_sizes), *min_size(profile.sizes), 1, cfg=profile.cfg)
        if profile.cfg and self.batch_role == "cfg_frames" and profile.dynamic:
            # Guidance 1.0 runs the UNet without the doubled batch; a dynamic profile serves that too.
            lo["B"] = min(profile.batch_sizes)
        opt = self.dims(max(profile.batch_sizes), *profile.sizes[0], 1, cfg=profile.cfg)
        hi = self.dims(max(profile.batch_sizes), *max_size(profile.sizes), profile.max_chunks, cfg=profile.cfg)
        if self.batch_role == "chunks":
            lo["B"], opt["B"] = 1, 1
        return {d: (lo[d], opt[d], hi[d]) for d in lo}

    def input_profiles(self, profile: ShapeProfile) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT-style optimization profile: input name -> (min shape, opt shape, max shape)."""
        ranges = self.dim_ranges(profile)
        picks = [{d: r[i] for d, r in ranges.items()} for i in range(3)]
        per = [self.shapes(p, "inputs") for p in picks]
        return {name: (per[0][name], per[1][name], per[2][name]) for name in self.input_names}

    def torch_dtype(self, t: TensorSpec, float_dtype: torch.dtype) -> torch.dtype:
        return float_dtype if t.dtype == "float" else getattr(torch, t.dtype)

    def sample_inputs(self, dims: dict[str, int], float_dtype: torch.dtype = torch.float32, seed: int = 0
                      ) -> dict[str, torch.Tensor]:
        """Random inputs of plausible scale (used for tracing and for parity tests)."""
        g = torch.Generator().manual_seed(seed)
        shapes = self.shapes(dims, "inputs")
        out = {}
        for t in self.inputs:
            shape, dtype = shapes[t.name], self.torch_dtype(t, float_dtype)
            if t.name == "eos_index":
                value = torch.randint(1, TOKENS, shape, generator=g)
            elif t.name == "timestep":
                value = torch.full(shape, 999.0)
            elif t.name == "guidance":
                value = torch.full(shape, 3.5)
            elif t.name in ("txt_ids", "img_ids"):  # rotary positions: small whole numbers
                value = torch.randint(0, 8, shape, generator=g).float()
            elif t.name == "lengths":
                value = torch.randint(1, DIT_TEXT_TOKENS + 1, shape, generator=g)
            elif t.name == "time_ids":  # original size, crop top-left, target size (refiner: aesthetic score)
                row = [dims["H"], dims["W"], 0, 0, dims["H"], dims["W"]] if shape[1] == 6 else \
                    [dims["H"], dims["W"], 0, 0, 6.0]
                value = torch.tensor([row] * shape[0], dtype=torch.float32)
            elif t.name == "inputs_embeds":  # CLIP token embeddings are small (std ~0.02)
                value = torch.randn(shape, generator=g) * 0.02
            else:
                value = torch.randn(shape, generator=g)
            out[t.name] = value.to(dtype)
        return out


def min_size(sizes) -> tuple[int, int]:
    return min(w for w, _ in sizes), min(h for _, h in sizes)


def max_size(sizes) -> tuple[int, int]:
    return max(w for w, _ in sizes), max(h for _, h in sizes)


def text_encoder_spec(encoder, name: str = "text_encoder") -> ModelSpec:
    cfg = encoder.config
    if getattr(cfg, "model_type", "") in ("t5", "qwen3"):
        return _dit_text_encoder_spec(encoder, name)
    pooled = getattr(cfg, "projection_dim", None) if hasattr(encoder, "text_projection") else None
    d, p = int(cfg.hidden_size), int(pooled or cfg.hidden_size)
    return ModelSpec(
        name,
        inputs=(TensorSpec("inputs_embeds", ("B", TOKENS, d)), TensorSpec("eos_index", ("B",), "int64")),
        outputs=(TensorSpec("last_hidden", ("B", TOKENS, d)), TensorSpec("penultimate", ("B", TOKENS, d)),
                 TensorSpec("pooled", ("B", p))),
        batch_role="chunks", consts={"hidden": d, "pooled": p})


def _dit_text_encoder_spec(encoder, name: str) -> ModelSpec:
    """T5 (FLUX.1): (inputs_embeds) -> hidden; Qwen3 (FLUX.2 [klein]): (inputs_embeds, lengths) -> the hidden states
    of QWEN3_LAYERS side by side. Both at the fixed DIT_TEXT_TOKENS."""
    cfg = encoder.config
    d = int(getattr(cfg, "d_model", None) or cfg.hidden_size)
    qwen = cfg.model_type == "qwen3"
    inputs = (TensorSpec("inputs_embeds", ("B", DIT_TEXT_TOKENS, d)),) + \
        ((TensorSpec("lengths", ("B",), "int64"),) if qwen else ())
    out = d * len(QWEN3_LAYERS) if qwen else d
    return ModelSpec(name, inputs, (TensorSpec("hidden", ("B", DIT_TEXT_TOKENS, out)),), batch_role="chunks",
                     consts={"hidden": out, "tokens": DIT_TEXT_TOKENS})


def transformer_spec(transformer, scale: int) -> ModelSpec:
    """A flow-matching transformer on packed latents: (hidden_states, timestep, encoder_hidden_states[,
    pooled_projections][, guidance], txt_ids, img_ids) -> velocity, in the order of export/graphs.TransformerGraph.
    Position ids are (tokens, 3) for FLUX.1 and (tokens, 4) for FLUX.2."""
    cfg = transformer.config
    c, j = int(cfg.in_channels), int(cfg.joint_attention_dim)
    axes = len(cfg.axes_dims_rope)
    inputs = [TensorSpec("hidden_states", ("B", "N", c)), TensorSpec("timestep", (1,), "float32"),
              TensorSpec("encoder_hidden_states", ("B", DIT_TEXT_TOKENS, j))]
    consts = {"in_channels": c, "joint_attention_dim": j, "text_tokens": DIT_TEXT_TOKENS}
    if getattr(cfg, "pooled_projection_dim", None):
        inputs.append(TensorSpec("pooled_projections", ("B", int(cfg.pooled_projection_dim))))
        consts["pooled"] = int(cfg.pooled_projection_dim)
    if cfg.guidance_embeds:
        inputs.append(TensorSpec("guidance", (1,), "float32"))
    inputs += [TensorSpec("txt_ids", (DIT_TEXT_TOKENS, axes), "float32"), TensorSpec("img_ids", ("N", axes), "float32")]
    out = int(cfg.out_channels or c)
    return ModelSpec(TRANSFORMER, tuple(inputs), (TensorSpec("noise", ("B", "N", out)),), batch_role="cfg_frames",
                     scale=scale, consts=consts)


def unet_spec(unet, scale: int, time_ids: int = 6) -> ModelSpec:
    """`time_ids`: SDXL's size conditioning numbers, 6 for a base model, 5 for the refiner (original size, crop,
    aesthetic score), whose UNet is therefore a graph of its own."""
    cfg = unet.config
    if getattr(cfg, "time_cond_proj_dim", None) is not None:
        # Such a UNet traced without its guidance embedding would export, run, and render the wrong images.
        raise UserError("guidance-distilled (LCM) UNets are not exported: the exported UNet has no timestep_cond "
                        "input", "render this model with --backend torch")
    inputs = [TensorSpec("sample", ("B", int(cfg.in_channels), "h", "w")), TensorSpec("timestep", (1,), "float32"),
              TensorSpec("encoder_hidden_states", ("B", "S", int(cfg.cross_attention_dim)))]
    consts = {"in_channels": int(cfg.in_channels), "out_channels": int(cfg.out_channels),
              "cross_attention_dim": int(cfg.cross_attention_dim)}
    if cfg.addition_embed_type == "text_time":
        # SDXL: pooled text embedding + 6 (refiner: 5) size/crop numbers, each embedded with addition_time_embed_dim.
        pooled = int(cfg.projection_class_embeddings_input_dim) - time_ids * int(cfg.addition_time_embed_dim)
        inputs += [TensorSpec("text_embeds", ("B", pooled)), TensorSpec("time_ids", ("B", time_ids), "float32")]
        consts.update(pooled=pooled, time_ids=time_ids)
    return ModelSpec(UNET, tuple(inputs), (TensorSpec("noise", ("B", int(cfg.out_channels), "h", "w")),),
                     batch_role="cfg_frames", scale=scale, consts=consts)


def vae_decoder_spec(vae, scale: int) -> ModelSpec:
    """FLUX.2's VAE takes its latents 2x2-patchified (export/graphs.Flux2VaeDecoderGraph): 4x the channels at half
    the size."""
    c = int(vae.config.latent_channels)
    if hasattr(vae, "bn"):
        c, scale = c * 4, scale * 2
    return ModelSpec(VAE_DECODER, (TensorSpec("latents", ("B", c, "h", "w")),),
                     (TensorSpec("images", ("B", 3, "H", "W")),), batch_role="frames", scale=scale,
                     consts={"latent_channels": c})


def model_specs(model) -> dict[str, ModelSpec]:
    """Every exported component of a ModelBundle, by name (SD: 3 components, SDXL: 4; a refiner bundle has no VAE
    decoder, a swapped VAE only that)."""
    scale = model.vae_scale_factor
    specs = {}
    for i, enc in enumerate(model.text_encoders):
        name = text_encoder_component(i)
        specs[name] = text_encoder_spec(enc, name)
    if model.unet is not None:
        specs[UNET] = unet_spec(model.unet, scale, getattr(model, "time_ids", 6))
    if getattr(model, "transformer", None) is not None:
        specs[TRANSFORMER] = transformer_spec(model.transformer, scale)
    if model.vae is not None:
        specs[VAE_DECODER] = vae_decoder_spec(model.vae, scale)
    return specs


def default_profile(model, batch_sizes=None, sizes=None, dynamic: bool = True) -> ShapeProfile:
    """The model's native size (UNet sample_size x VAE scale) and batch 1-4 unless told otherwise."""
    unet = model.unet if model.unet is not None else model.vae  # a VAE-only bundle: the VAE's own sample size
    native = int(getattr(unet.config, "sample_size", 512)) * (model.vae_scale_factor if unet is model.unet else 1)
    if getattr(model, "transformer", None) is not None:
        native = DIT_SAMPLE_SIZE * model.vae_scale_factor
    return ShapeProfile(tuple(batch_sizes or (1, 4)), tuple(sizes or ((native, native),)), dynamic=dynamic)
