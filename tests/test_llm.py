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

from movielm_fast.cli.llm_cmds import plan_cmd, qa_cmd  # noqa: E402
from movielm_fast.data.llm.client import (  # noqa: E402
    LLMClient,
    LLMConfig,
    Usage,
    complete_json,
    default_cache_dir,
    extract_json,
    resolve_config,
)
from movielm_fast.data.llm.planner import (  # noqa: E402
    PLAN_SCHEMA,
    PlanRequest,
    build_requests,
    generate_plans,
    slugify,
)
from movielm_fast.data.llm.qa import QAJob, check_llm_qa, generate_qa  # noqa: E402
from movielm_fast.errors import UserError  # noqa: E402
from movielm_fast.plan import (  # noqa: E402
    SAFE_ID,
    SHOTS,  # noqa: E402
    load_plan,
)

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
    assert movie.id == "a-love-story-01" and SAFE_ID.match(movie.id)  # the request's, not the title's (issue 37)
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
    # Each mode is given up once per client (the JSON schema with array bounds, then without them); the second
    # plan goes straight to plain JSON.
    assert kinds == ["json_schema", "json_schema", "json_object", None, None]
    bounded, loose = (json.dumps(b["response_format"]) for b in server.requests[:2])
    assert "minItems" in bounded and "minItems" not in loose


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
        # strict_counts: exactly plot_count pairs (by default 1 of 2 is within the slack plans get: issue 28)
        job = QAJob("llm", plot_count=2, raw_dir=tmp_path / "failed", strict_counts=True)
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


# --- replies from real models: sizes, cuts, timeouts, repeats (issue 16) ----------------------------------------


def kinds_of(server):
    return [b.get("response_format", {}).get("type") for b in server.requests]


def test_max_tokens_is_sized_from_the_request_and_a_flag_overrides_it(tmp_path):
    with FakeOpenAIServer(scripted(ok(plan_reply()))) as server:
        generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "a")
        generate_plans(client_for(server, tmp_path, max_tokens=321, cache_dir=None), one_request(), tmp_path / "b")
    sized, forced = (b["max_tokens"] for b in server.requests)
    assert sized == 400 + FRAMES * 150 + CHARACTERS * 80
    assert forced == 321
    bigger = PlanRequest("x", None, frames=30, characters=3)
    assert bigger.max_tokens > sized


def test_timeout_in_a_structured_mode_falls_back_after_one_attempt(tmp_path):
    def handler(body, n):
        if body.get("response_format", {}).get("type") == "json_schema":
            return slow(1.0, plan_reply())  # a model rambling under the grammar
        return ok(plan_reply())

    with FakeOpenAIServer(handler) as server:
        client = client_for(server, tmp_path, timeout=0.3, max_retries=3)
        report = generate_plans(client, one_request(), tmp_path / "plans")
        assert not report.failures
        assert kinds_of(server) == ["json_schema", "json_object"], "one timeout gives the mode up, not four"
        generate_plans(client, one_request("another theme"), tmp_path / "plans")
        assert kinds_of(server)[2:] == ["json_object"], "the mode stays given up for the rest of the run"
    assert any("json_schema timed out" in note and "json_object" in note for note in client.usage.notes)


def test_rate_limit_in_a_structured_mode_is_retried_in_that_mode(tmp_path):
    with FakeOpenAIServer(scripted(error(429), error(503), ok(plan_reply()))) as server:
        report = generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "plans")
    assert not report.failures and kinds_of(server) == ["json_schema"] * 3


def test_timeout_in_plain_mode_is_a_clear_error(tmp_path):
    with FakeOpenAIServer(scripted(slow(1.0))) as server:
        with pytest.raises(UserError, match=r"failed after 2 attempt\(s\): timed out") as info:
            client_for(server, tmp_path, timeout=0.2, max_retries=1).chat([{"role": "user", "content": "hi"}])
        assert len(server.requests) == 2
    assert "--timeout" in info.value.hint


def test_cut_reply_is_asked_again_shorter_not_repaired_as_malformed_json(tmp_path):
    with FakeOpenAIServer(scripted(cut(plan_reply()), ok(plan_reply()))) as server:
        client = client_for(server, tmp_path)
        report = generate_plans(client, one_request(), tmp_path / "plans")
    assert not report.failures and len(server.requests) == 2
    first, second = (b["messages"] for b in server.requests)
    # The cut text is not fed back; the first question is asked again with a request to stay under the limit.
    assert len(second) == len(first) and second[0] == first[0]
    assert "cut off at 1010 tokens" in second[-1]["content"] and second[-1]["content"].startswith(
        first[-1]["content"])
    assert "not valid JSON" not in json.dumps(second)
    assert (client.usage.cut, client.usage.repairs) == (1, 1)
    assert "1 reply(ies) cut at max_tokens" in client.usage.summary()


def test_reply_cut_every_time_says_so_and_how_to_fix_it(tmp_path):
    with FakeOpenAIServer(lambda body, n: cut(plan_reply(title=f"T{n}"))) as server:
        report = generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "plans", max_tries=2)
    [failure] = report.failures
    assert "cut off at max_tokens=1010" in failure.error and "raise --max-tokens" in failure.error
    assert "not valid JSON" not in failure.error


def test_identical_invalid_replies_stop_the_repairs_early(tmp_path):
    bad = plan_reply(frames=9)  # far outside the accepted counts
    with FakeOpenAIServer(scripted(ok(bad))) as server:
        report = generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "plans", max_tries=5)
        assert len(server.requests) == 2, "the second identical answer ends it; tries 3-5 would be the same"
    [failure] = report.failures
    assert "same invalid answer twice" in failure.error and "--temperature" in failure.error
    raw = tmp_path / "plans" / "failed" / "a-love-story-01.raw.txt"
    assert raw.read_text().count("===== try") == 2


def test_replies_that_differ_only_in_whitespace_count_as_identical(tmp_path):
    replies = [ok(json.dumps(plan_reply(frames=9))), ok(json.dumps(plan_reply(frames=9), indent=2))]
    with FakeOpenAIServer(scripted(*replies, ok(plan_reply()))) as server:
        report = generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "plans", max_tries=3)
        assert len(server.requests) == 2
    assert "same invalid answer twice" in report.failures[0].error


# --- counts within tolerance ------------------------------------------------------------------------------------


def test_counts_within_tolerance_are_accepted_with_a_warning(tmp_path):
    with FakeOpenAIServer(scripted(ok(plan_reply(frames=FRAMES + 2, characters=CHARACTERS - 1)))) as server:
        report = generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "plans")
        assert len(server.requests) == 1, "no repair round trip for counts within the tolerance"
    [outcome] = report.outcomes
    assert outcome.path.is_file() and not outcome.error
    assert outcome.warnings == [
        f"{FRAMES + 2} frames instead of {FRAMES} (accepted within 25%, at least 2; --strict-counts asks for "
        "exact counts)",
        f"{CHARACTERS - 1} characters instead of {CHARACTERS} (accepted within 25%, at least 2; --strict-counts "
        "asks for exact counts)"]


def test_counts_outside_tolerance_are_repaired(tmp_path):
    with FakeOpenAIServer(scripted(ok(plan_reply(frames=FRAMES + 3)), ok(plan_reply()))) as server:
        report = generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "plans")
    assert not report.failures and not report.outcomes[0].warnings and len(server.requests) == 2
    assert "has 6 entries, 3 were asked for: give exactly 3 (1 to 5 are accepted)" in \
        server.requests[1]["messages"][-1]["content"]


def test_count_tolerance_is_25_percent_and_at_least_2():
    from movielm_fast.data.llm.planner import count_range

    assert count_range(4, False) == (2, 6)
    assert count_range(1, False) == (1, 3), "never zero frames or characters"
    assert count_range(30, False) == (23, 37)
    assert count_range(30, True) == (30, 30)


def test_strict_counts_flag_restores_exact_counts(tmp_path):
    with FakeOpenAIServer(scripted(ok(plan_reply(frames=4)), ok(plan_reply()))) as server:
        result = CliRunner().invoke(plan_cmd, [
            "a heist", "--frames", "3", "--characters", "2", "--strict-counts", "--out", str(tmp_path / "p"),
            "--base-url", server.url, "--no-cache"])
    assert result.exit_code == 0, result.output
    assert len(server.requests) == 2 and "exactly 3 are required" in server.requests[1]["messages"][-1]["content"]


def test_plan_command_prints_count_warnings_and_a_json_summary(tmp_path):
    with FakeOpenAIServer(scripted(ok(plan_reply(frames=4)))) as server:
        result = CliRunner().invoke(plan_cmd, [
            "a heist", "--frames", "3", "--characters", "2", "--json", "--out", str(tmp_path / "p"),
            "--base-url", server.url, "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "warning: 4 frames instead of 3" in result.stderr
    assert "1 with counts other than asked" in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["written"], summary["failed"], summary["requests"], summary["repairs"]) == (1, 0, 1, 0)
    assert summary["plans"][0]["warnings"] and summary["plans"][0]["path"].endswith("a-heist-01.json")


# --- shots, cameras and speakers in LLM plans -------------------------------------------------------------------


def test_plan_prompt_and_schema_ask_for_shot_camera_and_speaker(tmp_path):
    frame_schema = PLAN_SCHEMA["properties"]["frames"]["items"]
    assert {"shot", "camera", "speaker"} <= set(frame_schema["required"])
    assert frame_schema["properties"]["shot"]["enum"] == list(SHOTS)
    with FakeOpenAIServer(scripted(ok(plan_reply()))) as server:
        generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "plans")
    body = server.requests[0]
    sent = body["response_format"]["json_schema"]["schema"]["properties"]["frames"]["items"]["properties"]
    assert set(sent) == {"description", "dialogue", "shot", "camera", "speaker"}
    system = body["messages"][0]["content"]
    assert all(f'"{word}"' in system for word in ("shot", "camera", "speaker", *SHOTS))


def test_llm_plan_shots_are_normalised_and_silent_speakers_dropped(tmp_path):
    reply = plan_reply()
    reply["frames"][0].update(shot="Close_Up shot", camera="low angle", speaker="Rosamund")  # no dialogue
    reply["frames"][1].update(shot="wide", speaker="Edmund")
    with FakeOpenAIServer(scripted(ok(reply))) as server:
        report = generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "plans")
        assert len(server.requests) == 1
    [loaded] = load_plan(report.outcomes[0].path)
    first, second = loaded.movie.frames[:2]
    assert (first.shot, first.camera, first.speaker) == ("close-up", "low angle", "")
    assert (second.shot, second.speaker, second.dialogue) == ("wide", "Edmund", "Hello.")
    assert json.loads(report.outcomes[0].path.read_text())["frames"][0]["shot"] == "close-up"


def test_llm_plan_with_an_unknown_speaker_or_shot_is_repaired(tmp_path):
    bad = plan_reply()
    bad["frames"][1].update(speaker="Edmond", shot="dutch tilt")
    with FakeOpenAIServer(scripted(ok(bad), ok(plan_reply()))) as server:
        report = generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "plans")
    assert not report.failures and len(server.requests) == 2
    problems = server.requests[1]["messages"][-1]["content"]
    assert "$.frames[1].shot: unknown shot 'dutch tilt': use one of extreme wide, wide" in problems


# --- QA answers in the shapes real models give ------------------------------------------------------------------


def test_qa_answers_are_normalised_before_validation():
    movielm_shape = {"movie_title": "M", "QA": {
        "Overview_QA": {"Question": "What is it about?", "Answer": "Love."},
        "plot_qa": [{"QUESTION": f"Plot {i}?", "Answer": f"A{i}."} for i in range(7)],
        "temporalQA": [{"question": "First?", "answer": "The ball."}]}}
    qa = check_llm_qa(movielm_shape, plot_count=3)
    assert qa["overview_qa"] == [{"question": "What is it about?", "answer": "Love."}]
    assert [p["question"] for p in qa["plot_qa"]] == [f"Plot {i}?" for i in range(6)], "extras kept up to 2x"
    assert qa["temporal_qa"] == [{"question": "First?", "answer": "The ball."}]


def test_qa_missing_group_still_needs_repair():
    with pytest.raises(ValueError, match=r"\$\.temporal_qa: missing or not a list"):
        check_llm_qa({"QA": {"overview_qa": [{"question": "q", "answer": "a"}],
                             "plot_qa": [{"question": "q", "answer": "a"}]}}, plot_count=1)
    with pytest.raises(ValueError, match="has 1 pair"):
        check_llm_qa({"overview_qa": {"question": "q", "answer": "a"}, "plot_qa": {"question": "q", "answer": "a"},
                      "temporal_qa": [{"question": "q", "answer": "a"}]}, plot_count=4)  # 2 of 4 accepted


def test_llm_qa_request_is_sized_and_wrapped_answers_need_no_repair(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"id": "m1", "style": {"name": "s"}, "frames": [{"id": "1", "description": "a"}]}))
    [loaded] = load_plan(plan)
    wrapped = {"movie_title": "m1", "QA": {k.upper(): v for k, v in qa_reply(plot=2).items()}}
    with FakeOpenAIServer(scripted(ok(wrapped))) as server:
        records, failures = generate_qa([loaded.movie], QAJob("llm", plot_count=2, raw_dir=tmp_path / "f"),
                                        client_for(server, tmp_path))
    assert not failures and len(server.requests) == 1
    assert server.requests[0]["max_tokens"] == 200 + (2 + 2) * 120
    assert len(records[0]["QA"]["plot_qa"]) == 2


def test_qa_prompt_names_the_speaker(tmp_path):
    from movielm_fast.data.llm.qa import qa_messages
    from movielm_fast.plan import parse_plan

    movie = parse_plan({"id": "m", "style": {"name": "s"}, "characters": [{"name": "Ann", "appearance": "a"}],
                        "frames": [{"id": "1", "description": "Ann waves.", "dialogue": "Hi", "speaker": "Ann"}]}
                       )[0].movie
    assert 'Dialogue (Ann): "Hi"' in qa_messages(movie, 1)[1]["content"]


# --- the cache folder -------------------------------------------------------------------------------------------


def test_response_cache_honours_movielm_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOVIELM_CACHE", str(tmp_path / "mc"))
    assert default_cache_dir() == tmp_path / "mc" / "llm"
    with FakeOpenAIServer(scripted(ok({"a": 1}))) as server:
        LLMClient(LLMConfig(base_url=server.url, api_key="t")).chat([{"role": "user", "content": "hi"}])
    assert list((tmp_path / "mc" / "llm").rglob("*.json"))


def test_unwritable_out_folders_are_clean_errors(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with FakeOpenAIServer(scripted(ok(plan_reply()))) as server:
        result = CliRunner().invoke(plan_cmd, ["a heist", "--out", str(blocker / "plans"), "--base-url", server.url,
                                               "--no-cache"])
        assert isinstance(result.exception, UserError) and "cannot create" in result.exception.message
        assert not server.requests, "checked before any request is made"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"id": "m", "style": {"name": "s"}, "frames": [{"id": "1", "description": "a"}]}))
    result = CliRunner().invoke(qa_cmd, [str(plan), "--source", "derived", "--out", str(blocker / "qa.json")])
    assert isinstance(result.exception, UserError) and "cannot write" in result.exception.message


def test_plan_schema_bounds_the_counts_and_a_server_refusing_bounds_gets_the_schema_without(tmp_path):
    def handler(body, n):
        if "minItems" in json.dumps(body.get("response_format", {})):
            return error(400, "'minItems' is not permitted")
        return ok(plan_reply())

    with FakeOpenAIServer(handler) as server:
        client = client_for(server, tmp_path)
        report = generate_plans(client, one_request(), tmp_path / "plans")
        generate_plans(client, one_request("second"), tmp_path / "plans")
    assert not report.failures
    sent = [b["response_format"]["json_schema"]["schema"]["properties"] for b in server.requests]
    assert (sent[0]["frames"]["minItems"], sent[0]["frames"]["maxItems"]) == (FRAMES, FRAMES)
    assert (sent[0]["characters"]["minItems"], sent[0]["characters"]["maxItems"]) == (CHARACTERS, CHARACTERS)
    assert all("minItems" not in json.dumps(s) for s in sent[1:]) and len(sent) == 3
    assert [b["response_format"]["type"] for b in server.requests] == ["json_schema"] * 3
    assert any("json_schema was refused" in n and "json_schema_loose" in n for n in client.usage.notes)


def test_the_schema_asks_for_the_exact_counts():
    from movielm_fast.data.llm.planner import plan_schema

    schema = plan_schema(PlanRequest("x", frames=4, characters=1))["properties"]
    assert (schema["frames"]["minItems"], schema["frames"]["maxItems"]) == (4, 4)
    assert (schema["characters"]["minItems"], schema["characters"]["maxItems"]) == (1, 1)
    assert "minItems" not in PLAN_SCHEMA["properties"]["frames"], "the shared schema is not modified"


def test_a_copy_of_the_prompt_example_is_sent_back(tmp_path):
    from movielm_fast.data.llm.planner import EXAMPLE_FRAME, EXAMPLE_TITLE, plan_messages

    system = plan_messages(one_request()[0])[0]["content"]
    assert EXAMPLE_TITLE in system and EXAMPLE_FRAME in system, "the check must match the prompt's example"
    copied = plan_reply(title=EXAMPLE_TITLE)
    copied["frames"][0]["description"] = EXAMPLE_FRAME
    with FakeOpenAIServer(scripted(ok(copied), ok(plan_reply()))) as server:
        report = generate_plans(client_for(server, tmp_path), one_request(), tmp_path / "plans")
    assert not report.failures and len(server.requests) == 2
    problems = server.requests[1]["messages"][-1]["content"]
    assert "is the example from the instructions: write a new movie on the theme 'a love story'" in problems
    assert "$.frames[0].description: copied from the example" in problems
