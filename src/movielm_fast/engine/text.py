"""Prompt -> text-encoder conditioning, with token embeddings looked up outside the encoder graph.

The encoder graph (torch module, ONNX file or TensorRT engine) starts at `inputs_embeds`: the token-embedding
lookup happens here, on the host, in a table that textual-inversion vectors are appended to. So one exported
encoder serves any number of learned style tokens without re-export.

Prompt syntax (AUTOMATIC1111 conventions): ``(x)`` weights x by 1.1, ``((x))`` by 1.21, ``[x]`` by 1/1.1,
``(x:1.3)`` by 1.3; ``\\(`` is a literal parenthesis. Prompts longer than the encoder window (75 tokens + BOS/EOS)
are split into 75-token chunks, each encoded on its own and concatenated along the sequence axis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from movielm_fast.errors import UserError
from movielm_fast.export.specs import TOKENS
from movielm_fast.plan import limit, limit_hint

CHUNK = TOKENS - 2  # tokens per window, without BOS/EOS
# Encoded prompts kept per encoder (least recently used dropped first): they live on the UNet's device, 77 x D x 4
# bytes a window (SDXL: 0.6 MB); the negative prompt, reused by every batch, always stays.
CACHE_ENTRIES = 256
_EMPHASIS_TOKENS = re.compile(r"\\[()\[\]\\]|\(|\)|\[|\]|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|[^\\()\[\]:]+|:")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) fragments. Unbalanced brackets are closed at the end of the prompt."""
    out: list[tuple[str, float]] = []
    stack: list[tuple[int, float]] = []  # (index in `out` where the group starts, multiplier)

    def close(multiplier: float) -> None:
        start, _ = stack.pop()
        for i in range(start, len(out)):
            out[i] = (out[i][0], out[i][1] * multiplier)

    for m in _EMPHASIS_TOKENS.finditer(text):
        tok = m.group(0)
        if tok.startswith("\\"):
            out.append((tok[1:], 1.0))
        elif tok == "(":
            stack.append((len(out), 1.1))
        elif tok == "[":
            stack.append((len(out), 1 / 1.1))
        elif m.group(1) is not None and stack:
            close(float(m.group(1)))
        elif tok == ")" and stack:
            close(1.1)
        elif tok == "]" and stack:
            close(1 / 1.1)
        else:  # plain text, or "x:1.2)" / ")" / "]" without an open bracket: kept literally
            out.append((tok, 1.0))
    while stack:
        close(stack[-1][1])
    # Merge neighbours of equal weight so plain prompts stay one fragment (tokenised exactly as diffusers does).
    merged: list[tuple[str, float]] = []
    for frag, w in out:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + frag, w)
        else:
            merged.append((frag, w))
    return [(t, w) for t, w in merged if t] or [("", 1.0)]


def is_vocab_word(tok, name: str) -> bool:
    """True if `name` is one of the tokenizer's own words (tokens added for embeddings do not count), so binding
    a learned vector to it would change what the word means."""
    if name in tok.get_vocab() and name not in tok.get_added_vocab():
        return True
    ids = tok(name, add_special_tokens=False).input_ids
    return len(ids) == 1 and ids[0] != tok.unk_token_id and tok.convert_ids_to_tokens(ids[0]) == name + "</w>"


def select_outputs(kind: str, enc_index: int, n_encoders: int, outputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled or None) that a model of `kind` conditions on, from one text encoder's
    (last, penultimate, pooled): SD 1.x/2.x use the last layer; SDXL the penultimate layer of both encoders and the
    pooled output of the second."""
    last, penultimate, pooled = outputs
    if kind != "sdxl":
        return last, None
    return penultimate, (pooled if enc_index == n_encoders - 1 else None)


@dataclass
class Windows:
    """A prompt tokenised for one encoder: ids (chunks, 77) with BOS/EOS/padding, eos (chunks,) positions of EOS,
    weights (chunks, 77) emphasis weight per token."""

    ids: torch.Tensor
    eos: torch.Tensor
    weights: torch.Tensor


@dataclass
class Conditioning:
    """One prompt's encoding. hidden: (1, 77 * chunks, D); pooled: (1, P) for SDXL, else None."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None
    chunks: int


class PromptEncoder:
    """Tokenises, looks up embeddings (with textual-inversion rows), calls `backend.encode_text`, applies
    emphasis weights. Each unique prompt is encoded once per run (while among the last CACHE_ENTRIES used), and the
    new prompts of a batch all at once."""

    def __init__(self, model, backend, tokenizers=None):
        self.kind = model.kind
        self.backend = backend
        self.tokenizers = tokenizers or model.tokenizers  # binding a token adds it to these
        # Host-side copies of the token-embedding tables; textual-inversion rows are appended here only.
        self.tables = [enc.get_input_embeddings().weight.detach().float().cpu() for enc in model.text_encoders]
        self.force_zeros_for_empty_prompt = model.force_zeros_for_empty_prompt
        self.token_sources: dict[str, str] = {}
        self.multi_vector: dict[str, list[str]] = {}
        self._cache: dict[str, Conditioning] = {}  # in use order, oldest first
        # Token ids per (tokenizer, prompt): batching asks for a prompt's window count before it is encoded, and
        # the slow tokenizers cost render-thread time per fragment.
        self._ids: dict[tuple[int, str], tuple[list[int], list[float]]] = {}

    # --- textual inversion ---------------------------------------------------------------------------------
    def add_token(self, token: str, vectors: list[torch.Tensor], source: str) -> None:
        """Bind `token` to one (n, D_i) tensor per text encoder. Re-adding the same source is a no-op."""
        if token in self.token_sources:
            if self.token_sources[token] == source:
                return
            raise UserError(f"token {token!r} is already bound to {self.token_sources[token]}; cannot bind it "
                            f"again to {source}", "give each style embedding its own token (style.token)")
        if len(vectors) != len(self.tables):
            raise UserError(f"{source} has vectors for {len(vectors)} text encoder(s); this model has "
                            f"{len(self.tables)}", "use an embedding trained for this model family")
        for vec, table in zip(vectors, self.tables):
            if vec.shape[-1] != table.shape[1]:
                raise UserError(f"{source}: embedding dimension {vec.shape[-1]} does not match the text encoder's "
                                f"{table.shape[1]}", "use an embedding trained for this model family "
                                                     "(768: SD 1.x, 1024: SD 2.x, 768+1280: SDXL)")
        n = vectors[0].shape[0]
        names = [token] + [f"{token}_{i}" for i in range(1, n)]
        for tok in self.tokenizers:
            for name in names:
                if is_vocab_word(tok, name):
                    raise UserError(f"token {name!r} is already a word in the tokenizer's vocabulary",
                                    "pick a token that is not a real word, e.g. <gothic-style>")
        for i, (tok, vec) in enumerate(zip(self.tokenizers, vectors)):
            tok.add_tokens(names)
            ids = tok.convert_tokens_to_ids(names)
            old = self.tables[i]
            # Always a new table: the first one may share storage with the model's own embedding weights.
            table = torch.zeros(max(max(ids) + 1, old.shape[0]), old.shape[1], dtype=old.dtype)
            table[: old.shape[0]] = old
            table[ids] = vec.detach().float().cpu()
            self.tables[i] = table
        self.token_sources[token] = source
        if n > 1:
            self.multi_vector[token] = names
        self.clear_cache()

    def _expand_tokens(self, prompt: str) -> str:
        for token, names in self.multi_vector.items():
            # Plain substring replacement, as diffusers does: added tokens match wherever they appear.
            prompt = re.sub(rf"{re.escape(token)}(?!_\d)", " ".join(names), prompt)
        return prompt

    # --- encoding ------------------------------------------------------------------------------------------
    def _token_ids(self, index: int, prompt: str) -> tuple[list[int], list[float]]:
        """Prompt -> (token ids, emphasis weight per id) for tokenizer `index`, without BOS/EOS/padding."""
        key = (index, prompt)
        if key not in self._ids:
            ids: list[int] = []
            weights: list[float] = []
            for text, w in parse_emphasis(self._expand_tokens(prompt)):
                frag_ids = self.tokenizers[index](text, add_special_tokens=False).input_ids if text.strip() else []
                ids += frag_ids
                weights += [w] * len(frag_ids)
            self._ids[key] = ids, weights
        return self._ids[key]

    def windows(self, prompt: str, min_chunks: int = 1) -> list[Windows]:
        """The prompt as encoder windows, one `Windows` per tokenizer (all with the same number of windows)."""
        out = []
        for index, tok in enumerate(self.tokenizers):
            ids, weights = self._token_ids(index, prompt)
            chunks = max(min_chunks, (len(ids) + CHUNK - 1) // CHUNK)
            rows_ids, rows_w, eos_at = [], [], []
            for c in range(chunks):
                part, part_w = ids[c * CHUNK:(c + 1) * CHUNK], weights[c * CHUNK:(c + 1) * CHUNK]
                pad = CHUNK - len(part)
                rows_ids.append([tok.bos_token_id] + part + [tok.eos_token_id] + [tok.pad_token_id] * pad)
                rows_w.append([1.0] + part_w + [1.0] * (pad + 1))
                eos_at.append(len(part) + 1)
            out.append(Windows(torch.tensor(rows_ids), torch.tensor(eos_at), torch.tensor(rows_w)))
        return out

    def _encode_group(self, group: list[tuple[str, str, list[Windows]]]) -> dict[str, Conditioning]:
        """(cache key, prompt, windows) of prompts with the same window count -> their conditionings, with one
        `encode_text` call per encoder for all of them. The states stay where the backend made them (the UNet's
        device): they go on to the UNet from there, without a round trip through the host."""
        n, chunks = len(group), group[0][2][0].ids.shape[0]
        hidden_parts, pooled = [], None
        for enc_index, table in enumerate(self.tables):
            ids = torch.cat([wins[enc_index].ids for _, _, wins in group])  # (n * chunks, 77)
            eos = torch.cat([wins[enc_index].eos for _, _, wins in group])  # (n * chunks,)
            outputs = self.backend.encode_text(enc_index, table[ids], eos)
            hidden, pool = select_outputs(self.kind, enc_index, len(self.tables), outputs)
            hidden_parts.append(hidden.float())
            if pool is not None:
                pooled = pool.float().reshape(n, chunks, -1)[:, 0]  # (n, P): SDXL pools each first window only
        hidden = torch.cat(hidden_parts, dim=-1).reshape(n, chunks, TOKENS, -1)  # (n, chunks, 77, D_total)
        out = {}
        for i, (key, prompt, wins) in enumerate(group):
            h = _weighted(hidden[i], wins[-1].weights, prompt)
            out[key] = Conditioning(h.reshape(1, -1, h.shape[-1]), None if pooled is None else pooled[i:i + 1], chunks)
        return out

    def chunk_count(self, prompt: str) -> int:
        """Windows the prompt needs; more than the limit is an error (each costs a text-encoder pass and widens
        every cross-attention of every step)."""
        ids, _ = self._token_ids(0, prompt)
        chunks = max(1, (len(ids) + CHUNK - 1) // CHUNK)
        if chunks > limit("prompt_windows"):
            raise UserError(f"a prompt of {len(ids)} tokens needs {chunks} windows of {CHUNK}, over the limit of "
                            f"{limit('prompt_windows')}: {prompt[:60]!r}...",
                            f"shorten the frame's description, its characters' appearance or the style, "
                            f"{limit_hint('prompt_windows')}")
        return chunks

    def pair_chunks(self, prompt: str, negative: str) -> int:
        """Windows a (prompt, negative) pair is encoded with; frames batch together only if theirs agree."""
        return max(self.chunk_count(prompt), self.chunk_count(negative))

    def clear_cache(self) -> None:
        """Forget encoded prompts and their token ids (binding a token changes both; benchmarks: every run pays
        its own encoding, as a fresh process does)."""
        self._cache.clear()
        self._ids.clear()

    def encode(self, prompt: str, min_chunks: int = 1, loras: tuple = ()) -> Conditioning:
        """`loras`: the LoRA set merged into the text encoders now (a LoRA may change them: its own cache entry)."""
        return self.encode_many([(prompt, min_chunks)], loras)[0]

    def encode_many(self, requests: list[tuple[str, int]], loras: tuple = ()) -> list[Conditioning]:
        """(prompt, min windows) each -> its conditioning. The prompts not in the cache are encoded together: one
        `encode_text` call per encoder and window count (split where the backend takes fewer rows at once)."""
        keys = [f"{c}\x00{p}\x00" + "".join(f"{r.sha256}:{r.scale!r};" for r in loras) for p, c in requests]
        groups: dict[int, list[tuple[str, str, list[Windows]]]] = {}
        for key, (prompt, min_chunks) in dict(zip(keys, requests)).items():
            if key not in self._cache:
                wins = self.windows(prompt, min_chunks)
                groups.setdefault(wins[0].ids.shape[0], []).append((key, prompt, wins))
        fresh: dict[str, Conditioning] = {}
        rows = getattr(self.backend, "text_rows", None)
        for chunks, group in groups.items():
            per_call = max(1, rows // chunks) if rows else len(group)
            for i in range(0, len(group), per_call):
                fresh.update(self._encode_group(group[i:i + per_call]))
        out = [fresh[k] if k in fresh else self._cache[k] for k in keys]
        for k in keys:
            self._cache[k] = fresh.get(k) or self._cache.pop(k)  # (re)inserted last: the most recently used
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        return out

    def encode_pair(self, prompt: str, negative: str, loras: tuple = ()) -> tuple[Conditioning, Conditioning]:
        """(negative, positive), padded to the same number of windows so they batch together."""
        return self.encode_pairs([(prompt, negative)], loras)[0]

    def encode_pairs(self, pairs: list[tuple[str, str]], loras: tuple = ()) -> list[tuple[Conditioning, Conditioning]]:
        """`encode_pair` for each (prompt, negative) of a batch, all new prompts encoded together."""
        chunks = [self.pair_chunks(p, n) for p, n in pairs]
        # SDXL convention (as in diffusers): an empty negative prompt means zero conditioning.
        zeros = [n == "" and self.force_zeros_for_empty_prompt for _, n in pairs]
        requests = [(p, c) for (p, _), c in zip(pairs, chunks)]
        requests += [(n, c) for (_, n), c, z in zip(pairs, chunks, zeros) if not z]
        conds = self.encode_many(requests, loras)
        negatives = iter(conds[len(pairs):])
        out = []
        for pos, zero in zip(conds[:len(pairs)], zeros):
            neg = Conditioning(torch.zeros_like(pos.hidden), None if pos.pooled is None else
                               torch.zeros_like(pos.pooled), pos.chunks) if zero else next(negatives)
            out.append((neg, pos))
        return out


def _weighted(hidden: torch.Tensor, weights: torch.Tensor, prompt: str) -> torch.Tensor:
    """One prompt's (chunks, 77, D) states with its emphasis `weights` (chunks, 77) applied."""
    if not bool((weights != 1.0).any()):  # host tensors: no device sync for plain prompts
        return hidden
    weights = weights.to(hidden.device)
    # Scale token states by their weight, then restore each window's mean so overall magnitude is kept.
    before = hidden.mean(dim=(1, 2), keepdim=True)
    hidden = hidden * weights[..., None]
    after = hidden.mean(dim=(1, 2), keepdim=True)
    # A window whose mean is ~0 (LayerNorm output without bias) has no magnitude to restore; dividing by it would
    # blow up.
    scale = hidden.abs().mean(dim=(1, 2), keepdim=True)
    safe = after.abs() > 1e-4 * scale
    hidden = hidden * torch.where(safe, before / torch.where(safe, after, torch.ones_like(after)), 1.0)
    if not bool(torch.isfinite(hidden).all()):  # in any dtype: the states are fp32 here
        strongest = max(weights.abs().max().item(), 1 / max(weights.abs().min().item(), 1e-30))
        raise UserError(f"the prompt's emphasis overflowed: a weight of {strongest:.3g} makes its text "
                        f"encoding infinite ({prompt[:60]!r}...)",
                        "use emphasis weights near 1, e.g. (word:1.3) or ((word)); 2 is already strong")
    return hidden
