"""`movielm-fast serve` over real HTTP on 127.0.0.1: submit and follow, files identical to `render`'s, bad requests,
tokens, and a server killed with SIGKILL mid-plan that resumes on restart without rendering a frame twice."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import movie, write_plan

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).parents[1]
SMALL = {"width": 64, "height": 64, "steps": 3, "guidance": 7.5, "seed": 5}
FLAGS = ["--no-style-training", "--batch-size", "1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, data: bytes | None = None, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class _Server:
    def __init__(self, out: Path, *extra: str):
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "movielm_fast.cli.main", "serve", "--out", str(out), "--port", str(self.port),
               *FLAGS, *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                if _http(f"{self.url}/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the server did not start")

    def wait(self, job_id: str, token: str | None = None, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, rec = _http(f"{self.url}/plans/{job_id}", token=token)
            assert status == 200, rec
            if rec["state"] in ("done", "failed"):
                return rec
            time.sleep(0.2)
        raise AssertionError(f"plan {job_id} did not finish")

    def kill(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The folder whose files the module's server may read (--allow-files)."""
    return tmp_path_factory.mktemp("serve-files")


@pytest.fixture(scope="module")
def server(tmp_path_factory, files):
    s = _Server(tmp_path_factory.mktemp("serve-root"), "--allow-files", str(files))
    yield s
    s.kill()


def test_submit_follow_and_files_identical_to_render(tmp_path, server):
    plan = write_plan(tmp_path / "plan.json", [movie("srv", 3)], SMALL)
    status, rec = _http(f"{server.url}/plans?out=a", plan.read_bytes())
    assert status == 202 and rec["state"] == "queued" and rec["total"] == 3
    done = server.wait(rec["id"])
    assert done["state"] == "done" and done["done"] == 3 and done["summary"]["rendered"] == 3
    startup = done["summary"]["startup"]  # counted from the submission; the warm model is no phase of it
    assert startup["time_to_first_image"] >= startup["phases"]["queued"] >= 0
    assert "model_load" not in startup["phases"] and "imports" not in startup["phases"]
    served = Path(done["summary"]["storyboards"][0]).parent
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "movielm_fast.cli.main", "render", str(plan), "--out", str(ref), "--quiet",
                    *FLAGS], cwd=ROOT, check=True, capture_output=True)
    for i in range(3):
        name = f"frames/{i:03d}.png"
        assert (served / name).read_bytes() == (ref / "srv" / name).read_bytes()
    entries = [[{k: v for k, v in f.items() if k != "seconds"} for f in json.loads((d / "manifest.json").read_text(
    ))["frames"]] for d in (served, ref / "srv")]
    assert entries[0] == entries[1]
    # The same plan again: the warm server skips what is on disk, as `render` does.
    status, again = _http(f"{server.url}/plans?out=a", plan.read_bytes())
    assert server.wait(again["id"])["summary"]["skipped"] == 3


@pytest.mark.parametrize("body,query,status,words", [
    (b"{not json", "", 400, "not valid JSON"),
    (json.dumps({"id": "x", "frames": []}).encode(), "", 422, "frames"),
    (json.dumps({"id": "../evil", "title": "t", "style": {"name": "s"}, "frames": [{"id": "1", "description": "d"}]}
                ).encode(), "", 422, "id"),
    (b"{}", "?out=../../etc", 400, "outside"),
    (b"{}", "?out=/tmp/x", 400, "outside"),
])
def test_bad_requests_get_4xx_with_the_fix(server, body, query, status, words):
    got, rec = _http(f"{server.url}/plans{query}", body)
    assert got == status and words in rec["error"] and "hint" in rec
    assert _http(f"{server.url}/health")[0] == 200  # still serving
    assert _http(f"{server.url}/plans/nope")[0] == 404


def test_oversized_body_is_refused_before_it_is_read(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/plans")
    conn.putheader("Content-Length", str(8 * 2**20 + 1))  # announced, never sent: the answer must not wait for it
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "larger" in json.loads(resp.read())["error"]
    conn.close()
    assert _http(f"{server.url}/health")[0] == 200


def test_token_missing_wrong_and_right(tmp_path):
    s = _Server(tmp_path / "root", "--token", "s3cret")
    try:
        plan = write_plan(tmp_path / "plan.json", [movie("tok", 1)], SMALL)
        assert _http(f"{s.url}/plans", plan.read_bytes())[0] == 401
        assert _http(f"{s.url}/plans", plan.read_bytes(), token="s3cres")[0] == 403
        assert _http(f"{s.url}/plans", token="wrong")[0] == 403
        status, rec = _http(f"{s.url}/plans", plan.read_bytes(), token="s3cret")
        assert status == 202 and s.wait(rec["id"], token="s3cret")["state"] == "done"
    finally:
        s.kill()


def test_other_bind_address_needs_a_token(tmp_path):
    res = subprocess.run([sys.executable, "-m", "movielm_fast.cli.main", "serve", "--host", "0.0.0.0", "--out",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "MOVIELM_SERVE_TOKEN"})
    assert res.returncode == 2 and "--token" in res.stderr


def test_killed_server_resumes_the_queue_without_rendering_twice(tmp_path):
    root = tmp_path / "root"
    plan = write_plan(tmp_path / "plan.json", [movie("kill", 6)], {**SMALL, "steps": 8})
    s = _Server(root)
    status, rec = _http(f"{s.url}/plans", plan.read_bytes())
    assert status == 202
    frames, journal = root / "kill" / "frames", root / "kill" / "manifest.journal.jsonl"
    deadline = time.monotonic() + 600
    while not (journal.is_file() and journal.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    s.kill(signal.SIGKILL)
    recorded = []  # frames whose journal line was complete: on disk and in the manifest when the server died
    for line in journal.read_text().splitlines():
        try:
            recorded.append(json.loads(line)["id"])
        except ValueError:
            pass
    before = {f: ((frames / f"{f}.png").stat().st_ino, (frames / f"{f}.png").stat().st_mtime_ns) for f in recorded}
    assert 1 <= len(before) < 6  # killed mid-plan
    s = _Server(root)
    try:
        done = s.wait(rec["id"])  # the accepted plan resumed by itself
    finally:
        s.kill()
    assert done["state"] == "done"
    assert done["done"] == done["total"] == 6  # progress counts the plan's frames, those done before the kill too
    assert done["summary"]["skipped"] >= len(before) and done["summary"]["rendered"] == 6 - done["summary"]["skipped"]
    after = {p.stem: (p.stat().st_ino, p.stat().st_mtime_ns) for p in frames.glob("*.png")}
    assert len(after) == 6 and all(after[n] == v for n, v in before.items())  # none written twice
    manifest = json.loads((root / "kill" / "manifest.json").read_text())
    assert len(manifest["frames"]) == 6


def test_render_server_submits_and_follows(tmp_path, server):
    from tests.helpers import cli_json

    plan = write_plan(tmp_path / "plan.json", [movie("cli", 2)], SMALL)
    rec = cli_json(["render", str(plan), "--server", server.url, "--out", "viacli", "--json"])
    assert rec["state"] == "done" and rec["out"] == "viacli" and rec["summary"]["rendered"] == 2
    assert Path(rec["summary"]["storyboards"][0]).parent.parent.name == "viacli"


def test_render_server_unreachable_is_a_clean_error(tmp_path):
    from click.testing import CliRunner

    from movielm_fast.cli.main import cli

    plan = write_plan(tmp_path / "plan.json", [movie("x", 1)], SMALL)
    res = CliRunner().invoke(cli, ["render", str(plan), "--server", f"http://127.0.0.1:{_port()}"])
    assert res.exit_code == 2 and "cannot reach the server" in res.output


def _embedding_plan(folder: Path, movie_id: str, embedding: str) -> Path:
    """A plan whose style names a textual-inversion file (demo text encoder: 64 wide) by `embedding`."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    vectors = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    save_file({"<ink>": vectors}, str(folder / "ink.safetensors"))
    m = movie(movie_id, 1)
    m["style"] = {"name": "Ink", "embedding": embedding}
    return write_plan(folder / "plan.json", [m], SMALL)


def test_plan_paths_resolve_against_the_plan_folder_and_stay_under_allowed_roots(tmp_path, server, files):
    from click.testing import CliRunner

    from movielm_fast.cli.main import cli
    from tests.helpers import cli_json

    plan = _embedding_plan(files / "plans", "rel", "ink.safetensors")  # relative to the plan file, as for `render`
    rec = cli_json(["render", str(plan), "--server", server.url, "--out", "rel", "--json"])
    assert rec["state"] == "done" and rec["summary"]["rendered"] == 1, rec
    manifest = json.loads((Path(rec["summary"]["storyboards"][0]).parent / "manifest.json").read_text())
    assert manifest["frames"][0]["prompt"].startswith("<ink>")  # the embedding was found and bound
    # The same plan from a folder the server may not read: refused with the path and the fix.
    outside = _embedding_plan(tmp_path / "elsewhere", "out1", "ink.safetensors")
    res = CliRunner().invoke(cli, ["render", str(outside), "--server", server.url])
    assert res.exit_code == 2 and "outside the folders this server reads" in res.output and "--allow-files" in \
        res.output
    # Another client's relative paths are relative to the first root; '..' cannot leave it.
    data = json.loads(plan.read_text())
    data["movies"][0]["style"]["embedding"] = "plans/ink.safetensors"
    assert _http(f"{server.url}/plans?out=rel2", json.dumps(data).encode())[0] == 202
    data["movies"][0]["style"]["embedding"] = "../elsewhere/ink.safetensors"
    status, err = _http(f"{server.url}/plans", json.dumps(data).encode())
    assert status == 422 and "$.movies[0].style.embedding" in err["error"] and "outside" in err["error"]
    status, err = _http(f"{server.url}/plans", json.dumps({"plan": json.loads(plan.read_text()), "options": {
        "render": {"vae": str(tmp_path)}}}).encode())
    assert status == 422 and "options.render.vae" in err["error"]
    status, err = _http(f"{server.url}/plans", json.dumps({"plan": {}, "options": {"device": "cuda"}}).encode())
    assert status == 422 and "options.device" in err["error"] and err["hint"]


def test_render_server_forwards_render_settings(tmp_path, server):
    from tests.helpers import cli_json

    plan = write_plan(tmp_path / "plan.json", [movie("fwd", 2)], SMALL)
    flags = ["--steps", "2", "--seed", "9", "--image-format", "jpg", "--quality", "80"]
    rec = cli_json(["render", str(plan), "--server", server.url, "--out", "fwd", "--json", *flags])
    assert rec["state"] == "done" and rec["summary"]["rendered"] == 2, rec
    served = Path(rec["summary"]["storyboards"][0]).parent
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "movielm_fast.cli.main", "render", str(plan), "--out", str(ref), "--quiet",
                    *FLAGS, *flags], cwd=ROOT, check=True, capture_output=True)
    for name in ("frames/000.jpg", "frames/001.jpg"):  # the flags reached the render: the same bytes as `render`'s
        assert (served / name).read_bytes() == (ref / "fwd" / name).read_bytes()
    entry = json.loads((served / "manifest.json").read_text())["frames"][0]
    assert entry["file"].endswith(".jpg")


@pytest.mark.parametrize("flag", [["--device", "cpu"], ["--lora", "x.safetensors"], ["--force"],
                                  ["--consistency", "none"], ["--workers", "2"], ["--batch-size", "2"],
                                  ["--no-cuda-graphs"]])
def test_render_server_refuses_flags_it_cannot_honour(tmp_path, flag):
    from click.testing import CliRunner

    from movielm_fast.cli.main import cli

    plan = write_plan(tmp_path / "plan.json", [movie("x", 1)], SMALL)
    res = CliRunner().invoke(cli, ["render", str(plan), "--server", f"http://127.0.0.1:{_port()}", *flag])
    assert res.exit_code == 2 and flag[0].replace("--no-", "--") in res.output, res.output
    assert "cannot reach" not in res.output  # refused before anything is sent


def test_every_render_flag_has_a_server_rule():
    """Each render flag is sent with the plan (as a render setting or an option), used by the client, or refused
    with its reason; the rules, the server's PlanOptions and the flags all come from the settings' declarations."""
    from movielm_fast.cli.main import render_cmd
    from movielm_fast.cli.options import RENDER_SETTINGS, server_rule, setting_flags
    from movielm_fast.serve.options import PlanOptions
    from movielm_fast.settings import CLIENT, PER_PLAN

    flags = setting_flags(*RENDER_SETTINGS)
    assert {p.name for p in render_cmd.params} - {"plans", "out", "server", "token", "as_json", "verbose"} == \
        {name for _, name in flags}  # every render flag is a declared setting
    rules = {name: server_rule(model, name) for model, name in flags}
    for name, rule in rules.items():
        assert rule in ("render", PER_PLAN, CLIENT) or (isinstance(rule, tuple) and all(rule)), name
    assert set(PlanOptions.model_fields) == {"render"} | {n for n, r in rules.items() if r == PER_PLAN}
    assert {n for n, r in rules.items() if r == PER_PLAN} == {"image_format", "quality", "replace", "style_training"}
