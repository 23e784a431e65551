"""LLM orchestration against a real local chat-completions server (tests/fake_openai_server.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai_server import FakeOpenAIServer, cut, error, ok, scripted, slow  # noqa: E402

from engine.errors import UserError  # noqa: E402
from engine.llm.client import (LLMClient, LLMConfig, Usage, complete_json, default_cache_dir, extract_json,  # noqa: E402
                               resolve_config)
from engine.llm.planner import PLAN_SCHEMA, PlanRequest, build_requests, generate_plans, slugify  # noqa: E402
from engine.llm.qa import QAJob, check_llm_qa, generate_qa  # noqa: E402
from engine.plan import SHOTS  # noqa: E402
from engine.plan import SAFE_ID, load_plan  # noqa: E402
from movielm_cli.llm_cmds import plan_cmd, qa_cmd  # noqa: E402

FRAMES, CHARACTERS = 3, 2


def plan_reply(title="The Duchess & the Commoner", frames=FRAMES, characters=CHARACTERS, **extra):
    names = ["Rosamund", "Edmund", "Clara", "Hugo"][:characters]
    return {
        "title": title,
        "overview": "A scandalous romance shakes Victorian England.",
        "style": {"name": "Gothic", "description": "((Victorian elegance)), soft sepia"},
        "characters": [{"name": n, "appearance": f"a person called {n} in a dark coat"} for n in names],
        "frames": [{"description": f"Scene {i}: {names[i % characters]} walks through the hall.",
                    "dialogue": "Hello." if i % 2 else ""} for i in range(frames)],
        **extra,
    }


def client_for(server, tmp_path, **overrides):
    config = LLMConfig(base_url=server.url, api_key="test", model="gpt-4o-mini", timeout=2.0, max_retries=2,
                       concurrency=4, cache_dir=tmp_path / "cache")
    for key, value in overrides.items():
        setattr(config, key, value)
    return LLMClient(config)


def one_request(theme="a love story", strict=False):
    return [PlanRequest(theme, "romance", FRAMES, CHARACTERS, strict_counts=strict)]


def user_text(body):
    return "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")


# --- plans ------------------------------------------------------------------------------------------------------


def test_plan_success_writes_a_valid_plan(tmp_path):
    with FakeOpenAIServer(scripted(ok(plan_reply()))) as server:
        client = client_for(server, tmp_path)
        report = generate_plans(client, one_request(), tmp_path / "plans")
    assert not report.failures
    [outcome] = report.outcomes
    [loaded] = load_plan(outcome.path)
    movie = loaded.movie
    assert movie.id == "the-duchess-the-commoner" and SAFE_ID.match(movie.id)
    assert movie.theme == "a love story"
    assert [f.id for f in movie.frames] == ["001", "002", "003"]
    assert movie.style.description.startswith("((Victorian elegance))")
    body = server.requests[0]
    assert body["response_format"]["type"] == "json_schema"
    assert "a love story" in user_text(body) and "romance" in user_text(body)
    assert (client.usage.requests, client.usage.prompt_tokens, client.usage.completion_tokens) == (1, 100, 50)


def test_invalid_then_valid_is_repaired_with_the_errors_fed_back(tmp_path):
    bad = plan_reply(frames=2)
    bad["style"]["colour"] = "red"
    with FakeOpenAIServer(scripted(ok(bad), ok(plan_reply()))) as server:
        report = generate_plans(client_for(server, tmp_path), one_request(strict=True), tmp_path / "plans")
    assert not report.failures and report.outcomes[0].path.is_file()
    assert len(server.requests) == 2
    repair = server.requests[1]["messages"]
    assert repair[-2]["role"] == "assistant" and json.loads(repair[-2]["content"]) == bad
    assert "exactly 3 are required" in repair[-1]["content"]
    assert "unknown key 'colour'" in repair[-1]["content"]


def test_malformed_json_is_repaired(tmp_path):
    valid = "Here you go:\n```json\n" + json.dumps(plan_reply()) + "\n```"
    with FakeOpenAIServer(scripted(ok('{"title": "Broken", "frames": ['), ok(valid))) as server:
        report = generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "plans")
    assert not report.failures
    assert "not valid JSON" in server.requests[1]["messages"][-1]["content"]


def test_failure_after_tries_saves_raw_replies_and_forgets_them(tmp_path):
    # Different invalid replies each time: identical ones end the tries early (tested below).
    with FakeOpenAIServer(lambda body, n: ok(f"no json here ({n})")) as server:
        client = client_for(server, tmp_path)
        report = generate_plans(client, one_request(), tmp_path / "plans", max_tries=3)
        assert len(server.requests) == 3
        [failure] = report.failures
        raw = tmp_path / "plans" / "failed" / "a-love-story-01.raw.txt"
        assert "no valid answer after 3 tries" in failure.error and str(raw) in failure.error
        assert raw.read_text().count("no json here") == 3
        assert not list((tmp_path / "plans").glob("*.json"))
        # A rerun asks again instead of replaying the cached bad answers.
        generate_plans(client, one_request(), tmp_path / "plans", max_tries=3)
        assert len(server.requests) == 6


def test_rerun_is_served_from_cache(tmp_path):
    with FakeOpenAIServer(scripted(ok(plan_reply()))) as server:
        generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "run1")
        second = client_for(server, tmp_path)
        report = generate_plans(second, one_request(), tmp_path / "run2")
    assert len(server.requests) == 1
    assert (second.usage.requests, second.usage.cached, second.usage.prompt_tokens) == (0, 1, 0)
    assert json.loads(report.outcomes[0].path.read_text())["title"] == "The Duchess & the Commoner"


def test_batch_partial_failure_then_resume(tmp_path):
    broken = {"theme": "a war story"}

    def handler(body, n):
        text = user_text(body)
        if broken["theme"] and broken["theme"] in text:
            return error(500, "model crashed")
        return ok(plan_reply(title=text.split('"')[1].title()))

    requests = build_requests(["a love story", "a war story", "a heist"], None, FRAMES, CHARACTERS, 2)
    out = tmp_path / "plans"
    with FakeOpenAIServer(handler) as server:
        client = client_for(server, tmp_path)
        report = generate_plans(client, requests, out)
        assert len(report.failures) == 2 and len(report.written) == 4
        assert all("failed after 3 attempt(s)" in f.error for f in report.failures)
        assert sorted(p.name for p in out.glob("*.json")) == [
            "a-heist-01.json", "a-heist-02.json", "a-love-story-01.json", "a-love-story-02.json"]
        before = len(server.requests)
        broken["theme"] = None
        resumed = generate_plans(client, requests, out)
        # Only the two failed plans are asked again; the written ones are kept.
        assert len(server.requests) - before == 2
    assert not resumed.failures and len(resumed.written) == 2
    ids = [json.loads(p.read_text())["id"] for p in sorted(out.glob("*.json"))]
    assert len(set(ids)) == 6, "each movie id must be unique across the folder"


def test_versions_of_a_theme_ask_for_different_movies(tmp_path):
    with FakeOpenAIServer(scripted(ok(plan_reply()))) as server:
        generate_plans(client_for(server, tmp_path, concurrency=1), build_requests(["a heist"], None, 3, 2, 2),
                       tmp_path / "plans")
    prompts = sorted(user_text(b) for b in server.requests)
    assert len(prompts) == 2 and prompts[0] != prompts[1]
    assert "version 1 of 2" in prompts[0] and "version 2 of 2" in prompts[1]


# --- transport --------------------------------------------------------------------------------------------------


def test_429_and_500_are_retried_by_the_openai_client(tmp_path):
    with FakeOpenAIServer(scripted(error(429, "slow down"), error(500), ok({"a": 1}))) as server:
        result = client_for(server, tmp_path).chat([{"role": "user", "content": "hi"}])
    assert json.loads(result.content) == {"a": 1} and len(server.requests) == 3


def test_retry_after_header_is_honoured(tmp_path):
    with FakeOpenAIServer(scripted(error(429, retry_after="0.4"), ok("{}"))) as server:
        client = client_for(server, tmp_path)
        start = time.perf_counter()
        client.chat([{"role": "user", "content": "hi"}])
        waited = time.perf_counter() - start
    assert len(server.requests) == 2 and waited >= 0.38


def test_timeout_is_retried(tmp_path):
    with FakeOpenAIServer(scripted(slow(1.5), ok({"fine": True}))) as server:
        client = client_for(server, tmp_path, timeout=0.3)
        result = client.chat([{"role": "user", "content": "hi"}])
    assert json.loads(result.content) == {"fine": True} and len(server.requests) == 2


def test_persistent_5xx_fails_with_a_clear_message(tmp_path):
    with FakeOpenAIServer(scripted(error(503, "overloaded"))) as server:
        with pytest.raises(UserError, match=r"failed after 3 attempt\(s\): server error 503"):
            client_for(server, tmp_path).chat([{"role": "user", "content": "hi"}])
        assert len(server.requests) == 3


def test_bad_key_fails_at_once(tmp_path):
    with FakeOpenAIServer(scripted(error(401, "invalid api key"))) as server:
        with pytest.raises(UserError) as info:
            client_for(server, tmp_path).chat([{"role": "user", "content": "hi"}])
    assert "rejected the API key" in info.value.message and "OPENAI_API_KEY" in info.value.hint
    assert len(server.requests) == 1


def test_unreachable_server(tmp_path):
    with FakeOpenAIServer(scripted(ok("{}"))) as server:
        url = server.url
    client = LLMClient(LLMConfig(base_url=url, api_key="t", timeout=0.5, max_retries=1, cache_dir=None))
    with pytest.raises(UserError, match="connection error"):
        client.chat([{"role": "user", "content": "hi"}])


def test_rejected_response_format_falls_back_to_plain_json(tmp_path):
    def handler(body, n):
        if "response_format" in body:
            return error(400, f"response_format {body['response_format']['type']} not supported")
        return ok(plan_reply())

    with FakeOpenAIServer(handler) as server:
        client = client_for(server, tmp_path)
        report = generate_plans(client, one_request("first"), tmp_path / "plans")
        generate_plans(client, one_request("second"), tmp_path / "plans")
    assert not report.failures
    kinds = [b.get("response_format", {}).get("type") for b in server.requests]
    # Each mode is given up once per client; the second plan goes straight to plain JSON.
    assert kinds == ["json_schema", "json_object", None, None]


def test_missing_endpoint_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(UserError) as info:
        resolve_config()
    assert "\n" not in info.value.message
    assert "OPENAI_API_KEY" in info.value.hint and "--base-url" in info.value.hint


def test_local_server_needs_no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = resolve_config(base_url="http://127.0.0.1:9/v1", model="llama3")
    assert config.api_key and config.model == "llama3"


def test_extract_json_and_slugify():
    assert extract_json('Sure!\n```json\n{"a": [1]}\n```') == {"a": [1]}
    assert extract_json('prefix {"b": 2} suffix') == {"b": 2}
    with pytest.raises(ValueError, match="not valid JSON"):
        extract_json("[1, 2")
    assert slugify("Amélie's  Café: Part II!") == "amelie-s-cafe-part-ii"
    assert SAFE_ID.match(slugify("???"))


def test_complete_json_gives_up_after_max_tries(tmp_path):
    def never(data):
        raise ValueError("- $.x: always wrong")

    with FakeOpenAIServer(scripted(ok({"x": 1}))) as server:
        with pytest.raises(UserError, match="always wrong"):
            complete_json(client_for(server, tmp_path), [{"role": "user", "content": "q"}], never, None,
                          tmp_path / "raw.txt", "thing", max_tries=2)
        assert len(server.requests) == 2
    assert "always wrong" in (tmp_path / "raw.txt").read_text()


# --- QA from the LLM --------------------------------------------------------------------------------------------


def qa_reply(plot=2):
    return {"overview_qa": [{"question": "What is it about?", "answer": "Love."}],
            "plot_qa": [{"question": f"Plot {i}?", "answer": f"Answer {i}."} for i in range(plot)],
            "temporal_qa": [{"question": "What happens first?", "answer": "The ball."}]}


def test_llm_qa_is_validated_and_repaired(tmp_path):
    plan = tmp_path / "plan.json"
    movie = {"id": "m1", "title": "M One", "style": {"name": "s"},
             "frames": [{"id": "1", "description": "a"}, {"id": "2", "description": "b"}]}
    plan.write_text(json.dumps(movie))
    [loaded] = load_plan(plan)
    with FakeOpenAIServer(scripted(ok(qa_reply(plot=1)), ok(qa_reply(plot=2)))) as server:
        job = QAJob("llm", plot_count=2, raw_dir=tmp_path / "failed")
        records, failures = generate_qa([loaded.movie], job, client_for(server, tmp_path))
    assert not failures and len(server.requests) == 2
    assert "exactly 2 are required" in server.requests[1]["messages"][-1]["content"]
    [record] = records
    assert record["movie_id"] == "m1" and record["movie_title"] == "M One"
    assert [len(record["QA"][k]) for k in ("overview_qa", "plot_qa", "temporal_qa")] == [1, 2, 1]


# --- commands ---------------------------------------------------------------------------------------------------


def test_plan_and_qa_commands(tmp_path):
    def handler(body, n):
        return ok(qa_reply(5)) if "question-answer" in body["messages"][0]["content"] else ok(plan_reply(frames=4))

    runner = CliRunner()
    themes = tmp_path / "themes.txt"
    themes.write_text("a love story\n# skipped\n\na heist\n")
    with FakeOpenAIServer(handler) as server:
        common = ["--base-url", server.url, "--api-key", "t", "--cache-dir", str(tmp_path / "cache")]
        result = runner.invoke(plan_cmd, ["--themes-file", str(themes), "--frames", "4", "--characters", "2",
                                          "--out", str(tmp_path / "plans"), *common])
        assert result.exit_code == 0, result.output
        plans = sorted((tmp_path / "plans").glob("*.json"))
        assert [p.name for p in plans] == ["a-heist-01.json", "a-love-story-01.json"]
        assert "2 request(s)" in result.stderr and "200 prompt + 100 completion tokens" in result.stderr
        assert "$" not in result.stderr, "no prices: they differ per provider and change"
        out = tmp_path / "qa.json"
        result = runner.invoke(qa_cmd, [*map(str, plans), "--out", str(out), *common])
        assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    assert len(records) == 2 and all(len(r["QA"]["plot_qa"]) == 5 for r in records)
    assert all(r["QA"]["character_qa"] for r in records), "--source both adds derived questions"


def test_plan_command_reports_partial_failure(tmp_path):
    def handler(body, n):
        return ok("garbage") if "a war story" in user_text(body) else ok(plan_reply())

    with FakeOpenAIServer(handler) as server:
        result = CliRunner().invoke(plan_cmd, [
            "a love story", "a war story", "--frames", "3", "--characters", "2", "--max-tries", "2",
            "--out", str(tmp_path / "plans"), "--base-url", server.url, "--api-key", "t", "--no-cache"])
    assert isinstance(result.exception, UserError)
    assert "1 of 2 plan(s) failed" in result.exception.message
    assert "FAILED a-war-story-01" in result.stderr
    assert (tmp_path / "plans" / "a-love-story-01.json").is_file()


def test_plan_command_without_endpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    result = CliRunner().invoke(plan_cmd, ["a love story", "--out", str(tmp_path)])
    assert isinstance(result.exception, UserError) and "no LLM endpoint" in result.exception.message



def test_usage_summary_reports_tokens_not_money():
    usage = Usage("gpt-4o")
    usage.add({"prompt_tokens": 1_000_000, "completion_tokens": 100_000}, cached=False)
    usage.add(None, cached=True)
    assert "1 request(s), 1 from cache" in usage.summary()
    assert "1,000,000 prompt + 100,000 completion tokens" in usage.summary() and "$" not in usage.summary()
    local = Usage("my-local-model")
    local.add({"prompt_tokens": 10, "completion_tokens": 5}, cached=False)
    assert "10 prompt + 5 completion tokens" in local.summary()
