"""Prompt building, emphasis, long-prompt chunking and textual inversion (against diffusers' loader)."""

import pytest
import torch
from safetensors.torch import save_file

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.text import CHUNK, parse_emphasis
from movielm_fast.engine.textual_inversion import load_embedding, vectors_for_model
from movielm_fast.errors import UserError
from movielm_fast.plan import parse_plan
from movielm_fast.run.prompts import frame_prompt, substitute_characters
from movielm_fast.run.renderer import Renderer


def test_parse_emphasis_a1111_rules():
    assert parse_emphasis("a cat") == [("a cat", 1.0)]
    frags = dict((t, round(w, 4)) for t, w in parse_emphasis("a (red) ((big)) [small] (cat:1.5) dog"))
    assert frags["red"] == 1.1 and frags["big"] == 1.21 and frags["small"] == round(1 / 1.1, 4)
    assert frags["cat"] == 1.5 and frags[" dog"] == 1.0
    assert parse_emphasis(r"a \(literal\) x") == [("a (literal) x", 1.0)]
    # Unbalanced brackets are closed at the end instead of failing.
    assert [round(w, 2) for _, w in parse_emphasis("a (open")] == [1.0, 1.1]
    # An explicit weight of 1.0 is the plain prompt.
    assert parse_emphasis("a (cat:1.0)") == [("a cat", 1.0)]


def test_character_substitution_whole_words_longest_first():
    plan = parse_plan({"id": "m", "style": {"name": "Noir", "description": "rain"},
                       "characters": [{"name": "Ann", "appearance": "a woman in red"},
                                      {"name": "Anna Lee", "appearance": "a girl with a kite"}],
                       "frames": [{"id": "1", "description": "Anna Lee waves at Ann; Annabel and ann watch. {Ann}."}]})
    movie = plan[0].movie
    text = substitute_characters(movie.frames[0].description, movie)
    assert text == "a girl with a kite waves at a woman in red; Annabel and ann watch. a woman in red."
    assert frame_prompt(movie, movie.frames[0]).startswith("Noir style, rain, a girl with a kite")
    assert frame_prompt(movie, movie.frames[0], "<noir>").startswith("<noir>, a girl")


@pytest.fixture(scope="module")
def sd_renderer(tiny_sd):
    return Renderer(ModelConfig(model=str(tiny_sd)))


def test_plain_prompt_equals_diffusers_encode_prompt(tiny_sd, sd_renderer):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    ref, _ = pipe.encode_prompt("a castle in the fog", "cpu", 1, False)
    ours = sd_renderer.encoder.encode("a castle in the fog")
    assert ours.hidden.shape == ref.shape == (1, 77, 32)
    assert torch.allclose(ours.hidden, ref, atol=1e-5)


def test_weighted_token_changes_only_relative_emphasis(sd_renderer):
    enc = sd_renderer.encoder
    plain = enc.encode("a castle in the fog").hidden
    same = enc.encode("a castle in the (fog:1.0)").hidden
    heavy = enc.encode("a castle in the (fog:1.5)").hidden
    assert torch.equal(plain, same)
    # "fog" is token 5 (BOS a castle in the fog): its state grows relative to the others.
    ratio = heavy[0, 5].norm() / plain[0, 5].norm()
    ratio_other = heavy[0, 2].norm() / plain[0, 2].norm()
    assert ratio / ratio_other == pytest.approx(1.5, rel=1e-3)


def test_long_prompt_is_chunked_not_truncated(sd_renderer):
    enc = sd_renderer.encoder
    words = " ".join(f"word{i}" for i in range(60))  # each "wordN" is 2+ tokens: > 75 tokens in all
    cond = enc.encode(words)
    assert cond.chunks >= 2 and cond.hidden.shape[1] == 77 * cond.chunks
    # Negative and positive are padded to the same number of windows so they batch together.
    neg, pos = enc.encode_pair(words, "ugly")
    assert neg.hidden.shape == pos.hidden.shape
    # The first window equals encoding exactly its first 75 tokens on their own.
    ids = enc.tokenizers[0](words, add_special_tokens=False).input_ids[:CHUNK]
    first = enc.tokenizers[0].decode(ids)
    assert torch.allclose(cond.hidden[:, :77], enc.encode(first).hidden, atol=1e-5)


class _CountingBackend:
    """A backend that records each encode_text call's (encoder, rows) and passes everything on."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def encode_text(self, encoder_index, inputs_embeds, eos_index):
        self.calls.append((encoder_index, inputs_embeds.shape[0]))
        return self.backend.encode_text(encoder_index, inputs_embeds, eos_index)


_LONG = " ".join(f"word{i}" for i in range(60))  # > 75 tokens: several windows
_BATCH = [("a castle in the fog", "ugly"), ("a (red:1.4) door, ((rain))", "ugly"), (_LONG, "blurry, [dark]"),
          ("<bt> a harbour at night", "")]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_batched_encoding_equals_one_prompt_at_a_time(kind, tiny_sd, tiny_sdxl):
    from movielm_fast.engine.text import PromptEncoder

    r = Renderer(ModelConfig(model=str(tiny_sd if kind == "sd" else tiny_sdxl)))
    torch.manual_seed(3)
    vectors = [torch.randn(2, t.shape[1]) for t in r.encoder.tables]  # a two-vector textual-inversion token
    encoders = [PromptEncoder(r.model, _CountingBackend(r.backend)) for _ in range(2)]
    for enc in encoders:
        enc.add_token("<bt>", vectors, "bt.safetensors")
    one_by_one = [encoders[0].encode_pair(p, n) for p, n in _BATCH]
    batched = encoders[1].encode_pairs(_BATCH)
    # Plain and weighted prompts share one call per encoder; the two-window pair another (window counts differ).
    assert len(encoders[1].backend.calls) == 2 * len(r.encoder.tables)
    assert len(encoders[0].backend.calls) > len(encoders[1].backend.calls)
    for (neg_a, pos_a), (neg_b, pos_b) in zip(one_by_one, batched):
        for a, b in ((neg_a, neg_b), (pos_a, pos_b)):
            assert a.chunks == b.chunks and a.hidden.shape == b.hidden.shape
            assert torch.allclose(a.hidden, b.hidden, atol=1e-5)
            assert (a.pooled is None) == (b.pooled is None) == (kind == "sd")
            if a.pooled is not None:
                assert a.pooled.shape == b.pooled.shape == (1, a.pooled.shape[1])
                assert torch.allclose(a.pooled, b.pooled, atol=1e-5)
    assert one_by_one[2][1].chunks > 1
    # The weighted prompt is not the plain one (emphasis applied per prompt inside the batch).
    plain = encoders[0].encode("a red door, rain", 1).hidden
    assert not torch.allclose(plain, batched[1][1].hidden, atol=1e-3)
    if kind == "sdxl":  # an empty negative is zero conditioning, as diffusers' SDXL pipeline makes it
        assert not batched[3][0].hidden.any() and not batched[3][0].pooled.any()


def test_batch_of_new_prompts_is_one_call_per_encoder(sd_renderer):
    from movielm_fast.engine.text import PromptEncoder

    counting = _CountingBackend(sd_renderer.backend)
    enc = PromptEncoder(sd_renderer.model, counting)
    pairs = [(f"frame {i} of the storm", "neg") for i in range(6)]
    enc.encode_pairs(pairs)
    assert counting.calls == [(0, 7)]  # six prompts and their shared negative, one window each
    for _ in range(3):
        enc.encode_pair("frame 0 of the storm", "neg")
    assert counting.calls == [(0, 7)]  # each prompt is encoded once, whatever the number of frames
    enc.encode_pairs(pairs[:3] + [("a new frame", "neg")])
    assert counting.calls == [(0, 7), (0, 1)]  # only the new prompt: the others come from the cache
    # A backend that takes fewer windows per call (TensorRT's text engine) gets the batch in pieces.
    counting.text_rows = 3
    enc.clear_cache()
    enc.encode_pairs(pairs)
    assert counting.calls[2:] == [(0, 3), (0, 3), (0, 1)]


# --- textual inversion -------------------------------------------------------------------------------------

def _diffusers_sd(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, local_files_only=True)


@pytest.mark.parametrize("fmt", ["diffusers", "a1111"])
def test_sd1_textual_inversion_matches_diffusers(tiny_sd, tmp_path, fmt):
    torch.manual_seed(0)
    vectors = torch.randn(2, 32)
    if fmt == "diffusers":
        file = tmp_path / "learned_embeds.safetensors"
        save_file({"<gothic>": vectors}, str(file))
    else:
        file = tmp_path / "gothic.pt"
        torch.save({"string_to_param": {"*": vectors}, "name": "gothic"}, file)
    pipe = _diffusers_sd(tiny_sd)
    pipe.load_textual_inversion(str(file), token="<gothic>")
    prompt = "a ballroom, <gothic>, candles"
    ref, _ = pipe.encode_prompt(prompt, "cpu", 1, False)

    r = Renderer(ModelConfig(model=str(tiny_sd)))
    emb = load_embedding(file)
    r.encoder.add_token("<gothic>", vectors_for_model(emb, "sd"), str(file))
    ours = r.encoder.encode(prompt).hidden
    assert torch.allclose(ours, ref, atol=1e-5)
    # The encoder itself was not modified: its embedding table has no new rows.
    assert r.model.text_encoders[0].get_input_embeddings().weight.shape[0] == 49408


def test_sdxl_textual_inversion_matches_diffusers(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(1)
    l, g = torch.randn(1, 32), torch.randn(1, 32)
    file = tmp_path / "style.safetensors"
    save_file({"clip_l": l, "clip_g": g}, str(file))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.load_textual_inversion(l, token="<sx>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(g, token="<sx>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    prompt = "<sx> a harbour at night"
    ref, _, ref_pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)

    r = Renderer(ModelConfig(model=str(tiny_sdxl)))
    r.encoder.add_token("<sx>", vectors_for_model(load_embedding(file), "sdxl"), str(file))
    ours = r.encoder.encode(prompt)
    assert torch.allclose(ours.hidden, ref, atol=1e-5)
    assert torch.allclose(ours.pooled, ref_pooled, atol=1e-5)


def test_textual_inversion_errors(tiny_sd, tmp_path, sd_renderer):
    enc = sd_renderer.encoder
    with pytest.raises(UserError, match="dimension 64"):
        enc.add_token("<wide>", [torch.randn(1, 64)], "wide.safetensors")
    with pytest.raises(UserError, match="already a word"):
        enc.add_token("castle", [torch.randn(1, 32)], "castle.safetensors")
    enc.add_token("<dup>", [torch.randn(1, 32)], "a.safetensors")
    enc.add_token("<dup>", [torch.randn(1, 32)], "a.safetensors")  # same file again: fine
    with pytest.raises(UserError, match="already bound"):
        enc.add_token("<dup>", [torch.randn(1, 32)], "b.safetensors")
    bad = tmp_path / "truncated.safetensors"
    save_file({"<x>": torch.randn(1, 32)}, str(bad))
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(UserError, match="cannot read embedding"):
        load_embedding(bad)
    with pytest.raises(UserError, match="SDXL"):
        vectors_for_model(load_embedding(_xl_file(tmp_path)), "sd")


def _xl_file(tmp_path):
    f = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, str(f))
    return f


def _framed_movie(**frame):
    return parse_plan({"id": "m", "style": {"name": "Noir", "description": "rain"},
                       "characters": [{"name": "Ann", "appearance": "a woman in red"}],
                       "frames": [{"id": "1", "description": "Ann waits at the station.", **frame}]})[0].movie


def test_frame_prompt_order_style_shot_camera_description():
    movie = _framed_movie(shot="close-up", camera="low angle, 35mm")
    assert frame_prompt(movie, movie.frames[0]) == \
        "Noir style, rain, close-up shot, low angle, 35mm, a woman in red waits at the station."
    assert frame_prompt(movie, movie.frames[0], "<noir>") == \
        "<noir>, close-up shot, low angle, 35mm, a woman in red waits at the station."
    only_camera = _framed_movie(camera="over {Ann}'s shoulder")
    assert frame_prompt(only_camera, only_camera.frames[0]) == \
        "Noir style, rain, over a woman in red's shoulder, a woman in red waits at the station."
    only_shot = _framed_movie(shot="Extreme_Wide")
    assert frame_prompt(only_shot, only_shot.frames[0]).startswith("Noir style, rain, extreme wide shot, a woman")


def test_frame_prompt_without_framing_is_unchanged():
    # The exact prompt from before shot/camera existed: resume keys of rendered movies depend on it.
    plain = _framed_movie(dialogue="Late again.", speaker="Ann")
    assert frame_prompt(plain, plain.frames[0]) == "Noir style, rain, a woman in red waits at the station."
    assert frame_prompt(plain, plain.frames[0], "<noir>") == "<noir>, a woman in red waits at the station."
