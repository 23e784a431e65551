"""Consistent characters: anchor-cached shared attention, training-free.

StoryDiffusion and ConsiStory make characters consistent by letting the images of one forward pass attend to each
other's self-attention tokens -- which ties an image to its batch (seeds stop reproducing, work cannot be sharded).
Here each character gets one *anchor* render instead (style prefix + the character's appearance, a seed derived
from the movie seed and the character's name). While the anchor denoises, the input tokens of every self-attention
layer of the UNet's up blocks are recorded at every active step (a fixed, seeded subset of them: `token_fraction`).
A frame that names characters then attends, in those layers and steps, to its own tokens plus the recorded tokens of
exactly its characters (keys and values from both; the query is its own). Classifier-free guidance halves attend to
their own half of the anchor's record.

So a frame depends only on its prompt, its seed and its characters' anchors -- not on its batch, the render order or
the worker -- and a frame that names no character is computed exactly as without the mode. Anchors are recomputed
wherever they are needed (deterministically) and their images are saved once as OUT/<movie>/anchors/<name>.png.

Cost (lossy by design: it changes what frames with characters look like): one anchor render per character per
worker, and per anchored frame one extra attention in each up-block self-attention layer with (1 + fraction x
characters) times the keys. The record takes, per character, layers x active steps x CFG halves x fraction x tokens
x channels values; `max_layer_tokens`, `start_step`/`end_step` and `token_fraction` bound it, `offload` keeps it in
host memory and moves it per use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from movielm_fast.plan import ConsistencySettings

from .jobs import AnchorSpec

_INDEX_CACHE: dict[tuple[int, float], torch.Tensor] = {}


def token_subset(n: int, fraction: float) -> torch.Tensor:
    """The tokens of an n-token layer that are recorded: a sorted random subset from a generator seeded by n alone
    (never the global RNG), the same in every process."""
    key = (n, fraction)
    if key not in _INDEX_CACHE:
        g = torch.Generator().manual_seed(n)
        _INDEX_CACHE[key] = torch.randperm(n, generator=g)[:max(1, round(n * fraction))].sort().values
    return _INDEX_CACHE[key]


class AnchorRecord:
    """One anchor's recorded tokens: (layer, timestep) -> (halves, tokens, channels)."""

    def __init__(self, spec: AnchorSpec):
        self.spec = spec
        self.tokens: dict[tuple[str, int], torch.Tensor] = {}
        self.image = None  # (H, W, 3) uint8, once rendered

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tokens.values())


@dataclass
class AnchorBatch:
    """The anchors of one denoise call (UNetCond.anchors): either record into `record` (an anchor render), or
    give row i of the UNet batch the records rows[i] to attend to, each with the row of the record to use (CFG: 0
    the unconditional half, 1 the conditional one; without CFG records have one row, 0). `active`: the timesteps at
    which the mode is on."""

    active: frozenset[int]
    settings: ConsistencySettings
    record: AnchorRecord | None = None
    rows: list[list[tuple[AnchorRecord, int]]] = field(default_factory=list)


@dataclass
class Anchors:
    """What a batch does with anchors (engine.pipeline.render_batch): record one, or attend to each job's."""

    settings: ConsistencySettings
    record: AnchorRecord | None = None
    per_job: list[list[AnchorRecord]] = field(default_factory=list)

    def for_unet(self, timesteps, cfg: bool) -> AnchorBatch:
        s = self.settings
        active = frozenset(int(t) for t in timesteps[s.start_step:s.end_step])
        if self.record is not None:
            return AnchorBatch(active, s, record=self.record)
        cond = [[(rec, 1 if cfg else 0) for rec in recs] for recs in self.per_job]
        uncond = [[(rec, 0) for rec in recs] for recs in self.per_job] if cfg else []
        return AnchorBatch(active, s, rows=uncond + cond)  # negatives first, as the CFG batch is laid out


class AnchorState:
    """What the processors read during one UNet call; set by the backend around it."""

    def __init__(self):
        self.batch: AnchorBatch | None = None
        self.t: int | None = None


class AnchorAttnProcessor:
    """Wraps the processor of one up-block self-attention layer: records the anchor's tokens, or lets anchored rows
    attend to their characters' tokens too. Rows without anchors keep exactly the wrapped processor's output."""

    def __init__(self, base, name: str, state: AnchorState):
        self.base, self.name, self.state = base, name, state
        self.extended = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        b, st = self.state.batch, self.state
        if b is None or st.t not in b.active or hidden_states.ndim != 3:
            return out
        n = hidden_states.shape[1]
        if b.settings.max_layer_tokens is not None and n > b.settings.max_layer_tokens:
            return out
        idx = token_subset(n, b.settings.token_fraction).to(hidden_states.device)
        key = (self.name, st.t)
        if b.record is not None:  # (halves, tokens, C): negatives first, as the CFG batch is laid out
            kept = hidden_states[:, idx].detach()
            b.record.tokens[key] = kept.cpu() if b.settings.offload else kept.clone()
            return out
        if not any(b.rows):
            return out
        rows = []
        for i, anchors in enumerate(b.rows):
            extra = [rec.tokens[key][half:half + 1] for rec, half in anchors if key in rec.tokens]
            if not extra:
                rows.append(out[i:i + 1])
                continue
            h = hidden_states[i:i + 1]  # (1, N, C): keys and values from its own tokens and its characters'
            kv = torch.cat([h, *(e.to(h.device, h.dtype) for e in extra)], dim=1)
            rows.append(self.extended(attn, h, encoder_hidden_states=kv))
        return torch.cat(rows)


def install(unet, state: AnchorState) -> None:
    """Wrap every up-block self-attention processor (diffusers' processor mechanism; nothing is patched)."""
    procs = dict(unet.attn_processors)
    for name, proc in procs.items():
        if name.startswith("up_blocks.") and ".attn1." in name and not isinstance(proc, AnchorAttnProcessor):
            procs[name] = AnchorAttnProcessor(proc, name, state)
    unet.set_attn_processor(procs)
