"""Prompts -> text conditioning for the transformer families (FLUX.1: CLIP-L pooled + T5; FLUX.2 [klein]: Qwen3).

The same contract as engine.text.PromptEncoder -- token embeddings looked up here, in tables that textual-inversion
rows are appended to, so one exported encoder serves any number of style tokens; each unique prompt encoded once per
run; the new prompts of a batch encoded together -- with each encoder's tokens as diffusers' pipelines make them: a
fixed length (CLIP 77, T5 and Qwen3 DIT_TEXT_TOKENS), padded, longer prompts cut with a warning that says how much
was lost. Qwen3 reads the prompt wrapped in its tokenizer's chat template. A1111 emphasis is not parsed here: the
brackets reach the encoders as text, as they do in diffusers (docs/models.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..text import Conditioning, PromptEncoder, Windows

log = logging.getLogger("movielm_fast")


@dataclass(frozen=True)
class TextRole:
    """What one text encoder of a transformer family reads and gives."""

    name: str  # for messages: "CLIP", "T5", "Qwen3"
    length: int  # the tokens it always sees (padded to, cut at)
    pooled: bool = False  # conditions on its pooled output at the EOS token (FLUX.1's CLIP), not its hidden states
    chat: bool = False  # the prompt goes in wrapped in the tokenizer's chat template (Qwen3)


class DiTPromptEncoder(PromptEncoder):
    """`roles`: one TextRole per text encoder of the model, in its order."""

    def __init__(self, model, backend, roles: tuple[TextRole, ...], tokenizers=None):
        super().__init__(model, backend, tokenizers)
        self.roles = roles
        # The tables in the weights' own dtype: Qwen3's and T5's are large (float32 copies would cost gigabytes),
        # and a lookup in the dtype the encoder runs in is what its own embedding layer computes.
        self.tables = [enc.get_input_embeddings().weight.detach().cpu() for enc in model.text_encoders]
        self._cut_warned: set[tuple[int, str]] = set()

    def _dit_ids(self, index: int, prompt: str) -> tuple[list[int], int]:
        """(token ids at the encoder's length, real tokens among them) of `prompt` for encoder `index`, as the
        diffusers pipeline tokenizes it (memoised in PromptEncoder's `_ids`, which binding a token clears)."""
        key = (index, prompt)
        if key not in self._ids:
            tok, role = self.tokenizers[index], self.roles[index]
            text = self._expand_tokens(prompt)
            if role.chat:
                text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
            ids = tok(text, padding="max_length", max_length=role.length, truncation=True).input_ids
            full = len(tok(text, verbose=False).input_ids)
            if full > role.length and key not in self._cut_warned:
                self._cut_warned.add(key)
                log.warning("a prompt of %d %s tokens is cut to the encoder's %d: %d tokens are lost (%r...)", full,
                            role.name, role.length, full - role.length, prompt[:60])
            self._ids[key] = ids, min(full, role.length)
        return self._ids[key]

    def chunk_count(self, prompt: str) -> int:
        """Always one "window" (the fixed length); tokenizing here warns about a cut prompt when the movie is
        planned, before any frame renders."""
        for index in range(len(self.tokenizers)):
            self._dit_ids(index, prompt)
        return 1

    def windows(self, prompt: str, min_chunks: int = 1) -> list[Windows]:
        out = []
        for index, role in enumerate(self.roles):
            ids, real = self._dit_ids(index, prompt)
            # CLIP pools at its EOS, the last real token; Qwen3 masks what follows its real tokens; T5 reads neither.
            mark = real - 1 if role.pooled else real
            out.append(Windows(torch.tensor([ids]), torch.tensor([mark]), torch.ones(1, len(ids))))
        return out

    def _encode_group(self, group) -> dict[str, Conditioning]:
        hidden = pooled = None
        for index, (table, role) in enumerate(zip(self.tables, self.roles)):
            ids = torch.cat([wins[index].ids for _, _, wins in group])  # (n, length)
            marks = torch.cat([wins[index].eos for _, _, wins in group])  # (n,)
            outputs = self.backend.encode_text(index, table[ids], marks)
            if role.pooled:
                pooled = outputs[2].float()  # (n, P)
            else:
                hidden = outputs[0].float()  # (n, length, D)
        return {key: Conditioning(hidden[i:i + 1], None if pooled is None else pooled[i:i + 1], 1)
                for i, (key, _, _) in enumerate(group)}
