"""Untrusted input, round 2 (issue 37): each numbered case of the issue, reproduced as written. Servers bind to
127.0.0.1, LLMs are fake servers, and no real device node is touched (a FIFO, a symlink and a file in a temporary
folder stand in for them)."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from movielm_fast.cli.main import cli
from movielm_fast.engine.config import ModelConfig
from movielm_fast.errors import UserError
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import render
from movielm_fast.run.executors import LocalExecutor
from movielm_fast.run.renderer import Renderer
from tests.helpers import movie, write_plan

sys.path.insert(0, str(Path(__file__).parent))  # fake_openai_server, as tests/test_llm.py imports it

SMALL = {"width": 64, "height": 64, "steps": 2, "guidance": 7.5, "seed": 4}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def null_renderer():
    return Renderer(ModelConfig(model="demo", backend="null"))


@pytest.fixture
def rendered(tmp_path, null_renderer):
    out = tmp_path / "out"
    plan = write_plan(tmp_path / "plan.json", [movie("one", 2), movie("two", 2)], SMALL)
    render(RunConfig(out=out, style_training=False), [plan], executor=LocalExecutor(renderer=null_renderer))
    return out


# --- 1. an atomic write never replaces what is not a regular file -------------------------------------------------

def test_a_symlink_destination_is_refused_and_its_target_kept(rendered, tmp_path):
    target = tmp_path / "real.json"
    target.write_text("mine")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    res = CliRunner().invoke(cli, ["dataset", str(rendered), "--dest", str(link)])
    assert res.exit_code == 2 and "symbolic link" in res.output and str(target) in res.output, res.output
    assert link.is_symlink() and target.read_text() == "mine"
    plan = write_plan(tmp_path / "p.json", [movie("q", 2)])
    res = CliRunner().invoke(cli, ["qa", str(plan), "--source", "derived", "--out", str(link)])
    assert res.exit_code == 2 and "symbolic link" in res.output, res.output
    assert link.is_symlink() and target.read_text() == "mine"


def test_a_fifo_destination_is_refused_not_replaced(rendered, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    res = CliRunner().invoke(cli, ["dataset", str(rendered), "--dest", str(fifo)])
    assert res.exit_code == 2 and "named pipe" in res.output, res.output
    assert fifo.is_fifo()


def test_a_regular_file_destination_is_still_replaced(rendered, tmp_path):
    dest = tmp_path / "old.json"
    dest.write_text("old")
    res = CliRunner().invoke(cli, ["dataset", str(rendered), "--dest", str(dest)])
    assert res.exit_code == 0, res.output
    assert len(json.loads(dest.read_text())) > 0


# --- 2. the dataset file never lands in a movie folder ------------------------------------------------------------

@pytest.mark.parametrize("inside", ["one/manifest.json", "one/frames/000.png", "two/new.json"])
def test_dataset_refuses_a_destination_inside_a_movie_folder(rendered, inside):
    before = {p: p.read_bytes() for p in rendered.rglob("*") if p.is_file()}
    res = CliRunner().invoke(cli, ["dataset", str(rendered), "--dest", str(rendered / inside)])
    assert res.exit_code == 2 and "inside the rendered movie folder" in res.output, res.output
    assert {p: p.read_bytes() for p in rendered.rglob("*") if p.is_file()} == before


# --- 3. serve under connection abuse; its render loop outlives any failure ----------------------------------------

def _serve_app(tmp_path, **kw):
    """An in-process server (the demo model on the null backend) and a starlette test client of its app."""
    from starlette.testclient import TestClient

    from movielm_fast.serve.app import Server, create_app

    server = Server(ModelConfig(model="demo", backend="null"), RunConfig(out=tmp_path / "root", style_training=False),
                    **kw)
    return server, TestClient(create_app(server))


def _plan_body(movie_id: str, frames: int = 2, **render) -> bytes:
    return json.dumps({"version": 1, "defaults": {**SMALL, **render}, "movies": [movie(movie_id, frames)]}).encode()


def _wait(server, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (rec := server.queue.get(job_id))["state"] not in states:
        assert time.monotonic() < deadline, rec
        time.sleep(0.05)
    return rec


def test_serve_survives_connections_that_never_finish_their_headers(tmp_path):
    from tests.test_serve import ROOT, _http, _port

    port = _port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:  # a process allowed 128 files: without the guards, 300 connections exhaust it
        proc = subprocess.Popen(
            [sys.executable, "-m", "movielm_fast.cli.main", "serve", "--out", str(tmp_path / "root"), "--port",
             str(port), "--no-style-training", "--batch-size", "1", "--max-connections", "8", "--header-timeout", "1"],
            cwd=ROOT, stdout=err, stderr=err,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)))
    url = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: _http(f"{url}/health")[0] == 200, 300)
        held = []
        for _ in range(300):  # each sends half a request and never the rest
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
                s.sendall(b"POST /plans HTTP/1.1\r\nHost: x\r\n")
                held.append(s)
            except OSError:
                pass  # refused or reset: the server sheds them
        _until(lambda: _http(f"{url}/health")[0] == 200, 30)  # served again within the header timeout
        status, rec = _http(f"{url}/plans", _plan_body("abused"))
        assert status == 202
        _until(lambda: _http(f"{url}/plans/{rec['id']}")[1]["state"] == "done", 300)
        for s in held:  # every half-sent request was closed by the server
            s.settimeout(5)
            try:
                assert s.recv(16) == b""
            except ConnectionResetError:
                pass
            s.close()
        assert _http(f"{url}/health")[1]["renderer"]["alive"]
    finally:
        proc.terminate()
        proc.wait(60)
    text = log.read_text()
    assert len(text) < 5000 and text.count("Traceback") <= 1, text


def _until(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_the_render_loop_survives_records_that_cannot_be_saved_and_loop_errors(tmp_path):
    server, client = _serve_app(tmp_path)
    first = server.queue.add(_plan_body("a").decode(), None, 2)
    record = server.queue.dir / f"{first['id']}.json"
    record.unlink()
    record.mkdir()  # every save of this record now fails, as with no file handles or a full disk
    failures = iter([OSError(24, "Too many open files")] * 2)
    take = server.queue.next

    def flaky_next(timeout=None):  # the loop's own step fails twice, then works
        if (exc := next(failures, None)) is not None:
            raise exc
        return take(timeout)

    server.queue.next = flaky_next
    server.start()
    try:
        assert _wait(server, first["id"])["state"] == "done"
        second = client.post("/plans", content=_plan_body("b")).json()
        assert _wait(server, second["id"])["state"] == "done"
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["renderer"]["state"] == "idle"
    finally:
        server.stop()
    server.thread.join(10)
    health = client.get("/health")  # a render thread that has ended is reported, not hidden behind "ok"
    assert health.status_code == 503 and health.json()["renderer"]["state"] == "dead"


# --- 4. a plan written by an LLM never names files ----------------------------------------------------------------

def _llm_client(server, tmp_path, **overrides):
    from movielm_fast.data.llm.client import LLMClient, LLMConfig

    config = LLMConfig(base_url=server.url, api_key="test", model="m", timeout=5.0, max_retries=0, concurrency=2,
                       cache_dir=tmp_path / "llm-cache")
    for key, value in overrides.items():
        setattr(config, key, value)
    return LLMClient(config)


def _plan_reply(title: str = "The Long Night", frames: int = 3, **extra) -> dict:
    return {"title": title, "overview": "A night.", "style": {"name": "Noir", "description": "dark"},
            "characters": [{"name": "Ann", "appearance": "a woman"}, {"name": "Bo", "appearance": "a man"}],
            "frames": [{"description": f"Ann waits {i}", "dialogue": "", "shot": "wide", "camera": "", "speaker": ""}
                       for i in range(frames)], **extra}


def test_an_llm_reply_that_names_files_is_stripped_and_says_so(tmp_path):
    from fake_openai_server import FakeOpenAIServer, ok, scripted

    from movielm_fast.data.llm.planner import build_requests, generate_plans
    from movielm_fast.plan import absolute_plan_paths, load_plan

    reply = _plan_reply(loras=[{"file": "/etc/hostname", "scale": 100}], render={"vae": "/etc"})
    reply["style"].update(loras=[{"file": "/etc/shadow", "scale": 100}], embedding="/etc/passwd", token="<t>")
    with FakeOpenAIServer(scripted(ok(reply))) as server:
        report = generate_plans(_llm_client(server, tmp_path), build_requests(["a night"], None, 3, 2, 1),
                                tmp_path / "plans")
    [outcome] = report.outcomes
    data = json.loads(outcome.path.read_text())
    assert absolute_plan_paths(data, tmp_path)[1] == [] and "/etc" not in outcome.path.read_text()
    assert data["style"] == {"name": "Noir", "description": "dark", "embedding": None}
    assert load_plan(outcome.path)[0].lora_files() == []
    [note] = [w for w in outcome.warnings if "never names files" in w]
    assert "$.style.loras" in note and "$.style.embedding" in note and "$.loras" in note and "$.render" in note


def test_make_plans_again_a_plan_file_that_names_files(tmp_path):
    from movielm_fast.data.make import _names_files

    plan = write_plan(tmp_path / "p.json", [movie("m", 1, loras=[{"file": "/etc/shadow", "scale": 100}])])
    assert _names_files(plan)
    assert not _names_files(write_plan(tmp_path / "q.json", [movie("m", 1)]))


# --- 5. --allow-files is checked as each file is opened, every time -----------------------------------------------

def _plan_naming(path: Path, movie_id: str) -> bytes:
    m = movie(movie_id, 2)
    m["style"]["embedding"] = str(path)
    return json.dumps({"version": 1, "defaults": SMALL, "movies": [m]}).encode()


def test_a_file_swapped_for_a_link_after_acceptance_is_refused_when_it_renders(tmp_path):
    allowed, secret = tmp_path / "allowed", tmp_path / "secret.safetensors"
    allowed.mkdir()
    secret.write_bytes(b"not for the server")
    emb = allowed / "style.safetensors"
    emb.write_bytes(b"placeholder")
    server, client = _serve_app(tmp_path, allow_files=(allowed,))
    accepted = client.post("/plans", content=_plan_naming(emb, "swapped"))
    assert accepted.status_code == 202, accepted.json()
    emb.unlink()
    emb.symlink_to(secret)  # after the check at submission, before the render
    server.start()
    try:
        rec = _wait(server, accepted.json()["id"])
    finally:
        server.stop()
    assert rec["state"] == "failed" and "outside the folders" in rec["error"]["error"], rec
    assert str(allowed) in rec["error"]["error"]


def test_a_plan_resumed_after_a_restart_is_checked_against_the_new_roots(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "style.safetensors").write_bytes(b"placeholder")
    server, client = _serve_app(tmp_path, allow_files=(first,))
    accepted = client.post("/plans", content=_plan_naming(first / "style.safetensors", "resumed")).json()
    server, _ = _serve_app(tmp_path, allow_files=(second,))  # "restarted" with other roots: the plan is resumed
    server.start()
    try:
        rec = _wait(server, accepted["id"])
    finally:
        server.stop()
    assert rec["state"] == "failed" and "outside the folders" in rec["error"]["error"], rec


def test_a_link_inside_an_allowed_folder_is_followed_before_it_is_trusted(tmp_path):
    from movielm_fast.plan import load_plan

    allowed = tmp_path / "allowed"
    (allowed / "vae").mkdir(parents=True)
    (allowed / "vae" / "diffusion_pytorch_model.safetensors").symlink_to(tmp_path / "elsewhere.bin")
    plan = write_plan(tmp_path / "p.json", [movie("m", 1)], {"vae": str(allowed / "vae")})
    lm = load_plan(plan)[0].model_copy(update={"file_roots": (allowed.resolve(),)})
    with pytest.raises(UserError, match="through .*diffusion_pytorch_model"):
        lm.confined_folders(lm.settings)


# --- 6. and 7. an LLM reply is capped in size and in time ---------------------------------------------------------

class _RawLLM:
    """A chat-completions endpoint on 127.0.0.1 that answers 200 and then sends its body as `body(write, request)`
    does (`request`: the JSON the client sent)."""

    def __init__(self, body, length: int | None = None):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    body(self.wfile.write, request)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: what the test wants

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_llm_reply_over_the_size_limit_stops_being_read(tmp_path, monkeypatch):
    from movielm_fast.data.llm.client import ReplyTooLarge

    monkeypatch.setenv("MOVIELM_MAX_REPLY_BYTES", str(2**20))
    sent = []

    def megabytes(write, request):  # announces 400 MB; sends until the client hangs up
        for _ in range(400):
            write(b" " * 2**20)
            sent.append(1)

    server = _RawLLM(megabytes, length=400 * 2**20)
    try:
        client = _llm_client(server, tmp_path, max_retries=3)
        with pytest.raises(ReplyTooLarge, match="larger than 1,048,576 bytes") as err:
            client.chat([{"role": "user", "content": "hi"}])
        assert "MOVIELM_MAX_REPLY_BYTES" in err.value.hint
    finally:
        server.close()
    assert len(sent) < 50  # it was not read to the end, nor asked again


def test_llm_timeout_is_a_deadline_for_a_trickling_reply(tmp_path):
    from movielm_fast.data.llm.planner import build_requests, generate_plans

    def trickle(write, request):  # a byte a second, forever: no single read ever waits the timeout out
        while True:
            write(b" ")
            time.sleep(1)

    server = _RawLLM(trickle)
    try:
        t0 = time.monotonic()
        report = generate_plans(_llm_client(server, tmp_path, timeout=2.0), build_requests(["x"], None, 3, 2, 1),
                                tmp_path / "plans")
        seconds = time.monotonic() - t0
    finally:
        server.close()
    [failure] = report.failures
    assert "timed out" in failure.error and seconds < 30, (failure.error, seconds)


def test_an_oversized_image_is_refused_and_an_extreme_shape_stays_small(tmp_path, monkeypatch):
    from PIL import Image

    from movielm_fast.style.images import load_images

    Image.new("RGB", (150_000, 1), "red").save(tmp_path / "strip.png")  # a few hundred bytes as PNG
    probe = ("import resource; from movielm_fast.style.images import load_images; "
             "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; before = peak(); "
             f"load_images({str(tmp_path)!r}, 64); print(peak() - before)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[-1]) < 100_000, res.stdout  # KB added to the peak (resizing to 9600000x64 first: GBs)
    monkeypatch.setenv("MOVIELM_MAX_IMAGE_PIXELS", "100000")
    with pytest.raises(UserError, match="150000x1: 150,000 pixels, over the limit of 100,000") as err:
        load_images(tmp_path, 64)
    assert "MOVIELM_MAX_IMAGE_PIXELS" in err.value.hint
    monkeypatch.setenv("MOVIELM_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(UserError, match="MOVIELM_MAX_IMAGE_PIXELS='lots' is not a positive whole number"):
        load_images(tmp_path, 64)


# --- 8. serve: cancel, and limits on the work of a plan -----------------------------------------------------------

def test_cancel_a_queued_and_a_running_plan_and_neither_resumes(tmp_path):
    server, client = _serve_app(tmp_path)
    running = client.post("/plans", content=_plan_body("long", frames=200, steps=100)).json()
    queued = client.post("/plans", content=_plan_body("later")).json()
    server.start()
    try:
        deadline = time.monotonic() + 120
        while server.queue.get(running["id"])["done"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.delete(f"/plans/{queued['id']}").json()["state"] == "cancelled"
        answer = client.delete(f"/plans/{running['id']}")
        assert answer.status_code == 202 and answer.json()["state"] == "running"
        rec = _wait(server, running["id"])
    finally:
        server.stop()
    assert rec["state"] == "cancelled" and 2 <= rec["done"] < 200
    frames = sorted((tmp_path / "root" / "long" / "frames").glob("*.png"))
    manifest = json.loads((tmp_path / "root" / "long" / "manifest.json").read_text())
    assert len(frames) == len(manifest["frames"]) >= 2  # what was rendered before the cancel is kept, and recorded
    assert not (tmp_path / "root" / "later").exists()
    assert client.delete(f"/plans/{running['id']}").status_code == 409
    assert client.delete("/plans/nope").status_code == 404
    restarted, _ = _serve_app(tmp_path)  # a restart resumes neither
    assert {r["state"] for r in restarted.queue.all()} == {"cancelled"}


@pytest.mark.parametrize("render,flag", [({"width": 4096, "height": 4096, "steps": 1000}, "--max-frame-pixels"),
                                         ({"steps": 1000}, "--max-plan-megapixel-steps")])
def test_a_plan_over_the_servers_work_limits_is_refused(tmp_path, render, flag):
    server, client = _serve_app(tmp_path)
    answer = client.post("/plans", content=_plan_body("huge", frames=100, **render))
    assert answer.status_code == 422 and flag in answer.json()["hint"], answer.json()
    assert server.queue.all() == []


def test_work_limits_are_flags_with_defaults_from_the_model(tmp_path):
    from movielm_fast.serve.config import ServeLimits

    assert ServeLimits().for_model(512, 512).max_frame_pixels == 1024 * 1024
    assert ServeLimits().for_model(512, 512).max_plan_megapixel_steps == 13107.2
    assert ServeLimits(max_frame_pixels=10**7).for_model(64, 64).max_frame_pixels == 10**7
    with pytest.raises(UserError, match="--max-connections"):
        ServeLimits(max_connections=0)


# --- 9. the content hash memo is keyed on what a copy cannot keep -------------------------------------------------

def test_weights_rewritten_in_place_with_the_same_size_and_mtime_hash_anew(tmp_path):
    from movielm_fast.engine.models import content_hash

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"A" * 1000)
    before = content_hash(weights)
    st = weights.stat()
    weights.write_bytes(b"B" * 1000)  # as rsync -a, cp -p or tar leave a file: same size, same mtime
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_mtime_ns == st.st_mtime_ns and weights.stat().st_size == st.st_size
    assert content_hash(weights) != before
    assert content_hash(weights) == content_hash(weights)  # and the memo still answers an unchanged file


def test_an_artifact_damaged_without_changing_its_size_is_not_used(tmp_path):
    from types import SimpleNamespace

    from movielm_fast.export import cache

    key = cache.make_key(SimpleNamespace(model_id="m", content_hash="h"), "unet", "ort-cpu", "fp32")
    with cache.writing(key, tmp_path) as tmp:
        (tmp / "model.onnx").write_bytes(b"graph")
        cache.commit(tmp, key, "model.onnx", {})
    art = cache.lookup(key, tmp_path)
    assert art is not None
    (art.path / "model.onnx").write_bytes(b"GRAPH")  # same size
    assert cache.lookup(key, tmp_path) is None


# --- 10. wrong results: QA joins, movie ids, the LLM cache, eval's NaN ----------------------------------------------

def test_dataset_attaches_qa_only_to_the_movie_it_was_written_for(rendered, tmp_path):
    from movielm_fast.data.llm.qa import QAJob, generate_qa, write_qa
    from movielm_fast.plan import load_plan

    other = load_plan(write_plan(tmp_path / "other.json", [movie("one", 2, title="Another Film")]))[0].movie
    same = load_plan(write_plan(tmp_path / "same.json", [movie("two", 2)]))[0].movie
    records, _ = generate_qa([other, same], QAJob(source="derived"), None)
    write_qa(tmp_path / "qa.json", records)
    res = CliRunner().invoke(cli, ["dataset", str(rendered), "--qa", str(tmp_path / "qa.json")])
    assert res.exit_code == 1 and "skipped movie one" in res.output and "another movie" in res.output, res.output
    ids = {r["id"].rsplit("-", 2)[0] for r in json.loads((rendered / "dataset.json").read_text())}
    assert ids == {"two"}
    write_qa(tmp_path / "dup.json", [records[1], records[1]])
    res = CliRunner().invoke(cli, ["dataset", str(rendered), "--qa", str(tmp_path / "dup.json")])
    assert res.exit_code == 2 and "entries 0 and 1 are both QA for movie 'two'" in res.output, res.output


def test_plan_ids_do_not_depend_on_which_answer_arrives_first(tmp_path):
    from fake_openai_server import FakeOpenAIServer, ok

    from movielm_fast.data.llm.planner import build_requests, generate_plans

    def same_title(body, n):  # every theme gets the same title; the first request answers last
        if n == 0:
            time.sleep(1.0)
        return ok(_plan_reply("Same Title"))

    ids = []
    for run in ("a", "b"):
        with FakeOpenAIServer(same_title) as server:
            out = tmp_path / run
            generate_plans(_llm_client(server, tmp_path, concurrency=2, cache_dir=None),
                           build_requests(["first theme", "second theme"], None, 3, 2, 1), out)
        ids.append({p.name: json.loads(p.read_text())["id"] for p in out.glob("*.json")})
    assert ids[0] == ids[1] == {"first-theme-01.json": "first-theme-01", "second-theme-01.json": "second-theme-01"}


def test_the_llm_cache_is_per_server(tmp_path):
    from fake_openai_server import FakeOpenAIServer, ok, scripted

    messages = [{"role": "user", "content": "hi"}]
    with FakeOpenAIServer(scripted(ok({"from": "a"}))) as a, FakeOpenAIServer(scripted(ok({"from": "b"}))) as b:
        assert json.loads(_llm_client(a, tmp_path).chat(messages).content) == {"from": "a"}
        second = _llm_client(b, tmp_path).chat(messages)
    assert not second.cached and json.loads(second.content) == {"from": "b"}


def _tiny_clip(folder: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel

    from movielm_fast.engine.demo import clip_tokenizer

    cfg = CLIPConfig(text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 37,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "image_size": 32, "patch_size": 8}, projection_dim=16)
    model = CLIPModel(cfg)
    with torch.no_grad():
        model.visual_projection.weight.fill_(float("nan"))  # every image score is NaN
    model.save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    return folder


def test_eval_json_never_holds_a_bare_nan(rendered, tmp_path):
    clip = _tiny_clip(tmp_path / "clip")
    res = CliRunner().invoke(cli, ["eval", str(rendered), "--clip", str(clip), "--json"])
    assert res.exit_code == 0, res.output
    text = (rendered / "eval.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    report = json.loads(text)
    assert all(m["clip_t"] is None and m["non_finite_scores"] > 0 for m in report["movies"])


# --- 11. tracebacks become clean errors, and nothing already produced is lost -------------------------------------

def test_a_5000_digit_seed_is_a_clean_error(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(movie("s", 1)).replace('"frames"', '"render": {"seed": ' + "5" * 5000 + '}, "frames"'))
    res = CliRunner().invoke(cli, ["render", str(plan), "--backend", "null", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "a seed has at most 19 digits" in res.output, res.output


def _garbled_for(word: str):
    """A server that answers requests naming `word` with a 200 whose body is not JSON, and the others properly."""
    def body(write, request):
        if word in json.dumps(request).lower():
            write(b"<html>this is not a chat completion</html>")
            return
        reply = _plan_reply(frames=3) if "theme" in json.dumps(request) else \
            {"overview_qa": [{"question": "q?", "answer": "a."}], "temporal_qa": [{"question": "q?", "answer": "a."}],
             "plot_qa": [{"question": f"q{i}?", "answer": "a."} for i in range(2)]}
        write(json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": json.dumps(reply)}}]}).encode())
    return _RawLLM(body)


def test_an_llm_answering_200_with_invalid_json_loses_only_that_item(tmp_path):
    server = _garbled_for("broken")
    llm = ["--base-url", server.url, "--api-key", "k", "--cache-dir", str(tmp_path / "cache"), "--max-retries", "0"]
    try:
        res = CliRunner().invoke(cli, ["plan", "fine theme", "broken theme", "--frames", "3", "--characters", "2",
                                       "--out", str(tmp_path / "plans"), *llm])
        assert res.exit_code == 2 and "not a chat completion" in res.output, res.output
        assert [p.name for p in (tmp_path / "plans").glob("*.json")] == ["fine-theme-01.json"]
        plans = [write_plan(tmp_path / f"{m}.json", [movie(m, 2, title=m.title())]) for m in ("kept", "broken")]
        res = CliRunner().invoke(cli, ["qa", *map(str, plans), "--plot-questions", "2", "--out",
                                       str(tmp_path / "qa.json"), *llm])
    finally:
        server.close()
    assert res.exit_code == 2 and "FAILED broken" in res.output, res.output
    assert [r["movie_id"] for r in json.loads((tmp_path / "qa.json").read_text())] == ["kept"]


def test_a_themes_file_that_is_not_utf8_is_a_clean_error(tmp_path):
    (tmp_path / "themes.txt").write_bytes(b"caf\xe9 noir\n")
    res = CliRunner().invoke(cli, ["plan", "--themes-file", str(tmp_path / "themes.txt"), "--base-url",
                                   "http://127.0.0.1:9/v1"])
    assert res.exit_code == 2 and "not UTF-8" in res.output, res.output


def test_a_submission_on_a_full_disk_is_503_and_leaves_nothing(tmp_path, monkeypatch):
    import movielm_fast.serve.queue as queue_mod

    server, client = _serve_app(tmp_path)
    write = queue_mod.atomic_write_text

    def full(path, text):
        if not path.name.endswith(".plan.json"):  # the plan file fits, its record does not
            raise UserError(f"disk full while writing {path}", "free some space")
        write(path, text)

    monkeypatch.setattr(queue_mod, "atomic_write_text", full)
    answer = client.post("/plans", content=_plan_body("full"))
    assert answer.status_code == 503 and "disk full" in answer.json()["error"], answer.json()
    assert list(server.queue.dir.iterdir()) == [] and server.queue.all() == []


def test_stray_files_in_the_queue_folder_do_not_stop_the_server(tmp_path):
    from movielm_fast.serve.queue import PlanQueue

    folder = tmp_path / "root" / ".movielm-serve"
    folder.mkdir(parents=True)
    (folder / "notes.json").write_text("[1, 2]")
    (folder / "other.json").write_text(json.dumps({"id": "../../x", "out": "", "state": "queued", "submitted": 1,
                                                   "done": 0, "total": 1}))
    (folder / "half.json").write_text('{"id": ')
    assert PlanQueue(tmp_path / "root").all() == []
    server, client = _serve_app(tmp_path)
    assert client.get("/plans").json() == {"plans": []}


def test_a_second_serve_on_a_busy_port_fails_before_loading_the_model(tmp_path):
    from tests.test_serve import ROOT

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "movielm_fast.cli.main", "serve", "--out", str(tmp_path),
                              "--port", str(port), "--model", str(tmp_path / "no-such-model")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    # The port is checked first: a model that does not exist is never even looked at.
    assert res.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in res.stderr, res.stderr
    assert "model not found" not in res.stderr


@pytest.mark.parametrize("url", ["http://[::1", "http://host:port", "ftp://x", "nonsense"])
def test_render_server_with_a_malformed_url_is_a_clean_error(tmp_path, url):
    plan = write_plan(tmp_path / "p.json", [movie("m", 1)])
    res = CliRunner().invoke(cli, ["render", str(plan), "--server", url])
    assert res.exit_code == 2 and "URL" in res.output, res.output


def test_eval_refuses_a_config_larger_than_its_weights_before_allocating(tmp_path):
    clip = _tiny_clip(tmp_path / "clip")
    config = json.loads((clip / "config.json").read_text())
    config["text_config"]["hidden_size"] = 2**20  # tens of GB of parameters the weights do not hold
    (clip / "config.json").write_text(json.dumps(config))
    (tmp_path / "out").mkdir()
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "out"), "--clip", str(clip)])
    assert res.exit_code == 2 and "describes a CLIP model of" in res.output, res.output
    config["text_config"]["hidden_size"], config["text_config"]["num_hidden_layers"] = 32, 100_000
    (clip / "config.json").write_text(json.dumps(config))
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "out"), "--clip", str(clip)])
    assert res.exit_code == 2 and "asks for 100000 text layers; the weights hold 2" in res.output, res.output


def test_style_training_at_an_absurd_resolution_is_refused_first(tmp_path):
    res = CliRunner().invoke(cli, ["style", "train", "--name", "Noir", "--resolution", "100000", "--out",
                                   str(tmp_path / "lib")])
    assert res.exit_code == 2 and "more than twice this model's native size 64" in res.output, res.output


def test_a_malformed_meta_json_in_the_style_library_is_left_out(tmp_path):
    from movielm_fast.style.library import STYLE_FORMAT, list_styles, write_index

    lib = tmp_path / "lib"
    for name, meta in (("a", [1]), ("b", {"format": STYLE_FORMAT, "file": "embedding.safetensors"}),
                       ("c", {"format": STYLE_FORMAT, "file": "../../etc/hostname"})):
        (lib / name).mkdir(parents=True)
        (lib / name / "embedding.safetensors").write_bytes(b"x")
        (lib / name / "meta.json").write_text(json.dumps(meta))
    assert list_styles(lib) == []
    write_index(lib)  # what a finished training does: it must not fail on another entry
    res = CliRunner().invoke(cli, ["style", "list", "--out", str(lib)])
    assert res.exit_code == 0 and "no styles" in res.output, res.output


# --- Also ---------------------------------------------------------------------------------------------------------

def test_themes_are_checked_before_any_request(tmp_path):
    from fake_openai_server import FakeOpenAIServer, ok, scripted

    with FakeOpenAIServer(scripted(ok(_plan_reply()))) as server:
        llm = ["--base-url", server.url, "--api-key", "k", "--out", str(tmp_path / "plans")]
        res = CliRunner().invoke(cli, ["plan", "x" * 200_000, *llm])
        assert res.exit_code == 2 and "200,000 characters" in res.output, res.output
        res = CliRunner().invoke(cli, ["plan", "A love story", "a love story!", *llm])
        assert res.exit_code == 2 and "'A love story' and 'a love story!'" in res.output, res.output
        assert server.requests == []


def test_export_list_and_clear_see_a_killed_exports_folder(tmp_path, monkeypatch):
    from movielm_fast.cli.export_cmds import export_cmd
    from movielm_fast.export import cache

    monkeypatch.setenv("MOVIELM_CACHE", str(tmp_path / "cache"))
    old, young = cache.artifacts_root() / "m-1234" / ".tmp-unet.x-ab", cache.artifacts_root() / "m-1234" / ".tmp-vae.y"
    for folder in (old, young):
        folder.mkdir(parents=True)
        (folder / "model.onnx.data").write_bytes(b"\0" * 4096)
    hours_ago = time.time() - 2 * cache.UNFINISHED_SECONDS
    for path in (old / "model.onnx.data", old):
        os.utime(path, (hours_ago, hours_ago))
    res = CliRunner().invoke(export_cmd, ["--list"])
    assert res.exit_code == 0 and res.output.count("unfinished export (4.0 KB") == 2, res.output
    res = CliRunner().invoke(export_cmd, ["--clear"])
    assert res.exit_code == 0 and "1 unfinished export(s)" in res.output and "kept 1" in res.output, res.output
    assert not old.exists() and young.exists()


def test_a_lower_case_bearer_is_accepted(tmp_path):
    server, client = _serve_app(tmp_path, token="s3cret")
    assert client.get("/plans", headers={"Authorization": "bearer s3cret"}).status_code == 200
    assert client.get("/plans", headers={"Authorization": "BEARER wrong"}).status_code == 403
    assert client.get("/plans", headers={"Authorization": "Basic s3cret"}).status_code == 401


def test_a_huge_seconds_per_frame_is_a_clean_error(rendered):
    res = CliRunner().invoke(cli, ["dataset", str(rendered), "--video", "--seconds-per-frame", "1e9"])
    assert res.exit_code == 2 and "--seconds-per-frame" in res.output and "Traceback" not in res.output, res.output


def test_a_bad_model_config_is_one_line_not_a_pydantic_dump(tmp_path):
    import shutil

    from movielm_fast.engine.demo import demo_model_path

    model = tmp_path / "model"
    shutil.copytree(demo_model_path(), model)
    (model / "movielm_defaults.json").write_text(json.dumps({"steps": "many"}))
    plan = write_plan(tmp_path / "p.json", [movie("m", 1)])
    res = CliRunner().invoke(cli, ["render", str(plan), "--model", str(model), "--backend", "null", "--out",
                                   str(tmp_path / "out"), "--no-style-training"])
    assert res.exit_code == 2 and "movielm_defaults.json: steps 'many'" in res.output, res.output
    assert "pydantic" not in res.output and "validation error" not in res.output
