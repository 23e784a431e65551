"""`movielm-fast make` end to end: the scripted OpenAI-compatible server on 127.0.0.1 and the demo model."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai_server import FakeOpenAIServer, Reply, error, ok  # noqa: E402
from helpers import load_png  # noqa: E402

from movielm_fast.cli.main import cli  # noqa: E402

THEMES = ["a love story", "a heist", "a storm at sea"]
DOOMED = "a doomed theme"  # its plan never validates
QA_DOOMED = "A Storm At Sea 2"  # this movie's QA never validates
FRAMES = 2
MOVIES = [f"{t.replace(' ', '-')}-0{k}" for t in THEMES for k in (1, 2)]  # the plan files' names


# The image model every run here uses: the tiny random SD model (set by `_tiny_model`), the fastest to render.
MODEL: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _tiny_model(tiny_sd):
    MODEL["path"] = str(tiny_sd)


def make_args(out: Path, url: str, cache: Path, *extra: str) -> list[str]:
    if "--model" not in extra:
        extra = ("--model", MODEL["path"], *extra)
    return ["make", *THEMES, DOOMED, "-n", "2", "--frames", str(FRAMES), "--characters", "2", "--out", str(out),
            "--width", "64", "--height", "64", "--steps", "2", "--plot-questions", "2", "--base-url", url,
            "--api-key", "t", "--llm-model", "scripted", "--cache-dir", str(cache), "--max-retries", "3",
            "--timeout", "60", *extra]


def _user(body) -> str:
    return "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")


def is_qa(body) -> bool:
    return "question-answer" in body["messages"][0]["content"]


def theme_of(body) -> str:
    """The theme a request is about (plans name it; QA requests name the movie title, made from it)."""
    text = _user(body)
    match = re.search(r'theme "([^"]+)"', text)
    if match:
        return match.group(1)
    title = re.search(r"Movie: (.+)", text).group(1)
    return title.rsplit(" ", 1)[0].lower()


def plan_answer(body) -> Reply:
    text = _user(body)
    theme = theme_of(body)
    version = int(re.search(r"version (\d+) of", text).group(1))
    if theme == DOOMED:  # different each repair, so all tries are used
        return ok(f"I cannot plan that ({len(body['messages'])})")
    if theme == "a heist" and version == 1 and len(body["messages"]) == 2:
        return ok('{"title": "Broken", "frames": [')  # malformed; the repair round trip gets a valid one
    names = ["Rosa", "Hugo"]
    return ok({"title": f"{theme.title()} {version}",
               "overview": f"Version {version} of {theme}: <b>tags</b> & quotes \" stay text.",
               "style": {"name": "Gothic", "description": "soft sepia"},
               "characters": [{"name": n, "appearance": f"a person called {n} in a coat"} for n in names],
               "frames": [{"description": f"Scene {i}: {names[i % 2]} in the hall of {theme}.",
                           "dialogue": f"Line {i} of {theme}.", "shot": "wide", "camera": "static",
                           "speaker": names[i % 2]} for i in range(FRAMES)]})


def qa_answer(body) -> Reply:
    title = re.search(r"Movie: (.+)", _user(body)).group(1)
    if title == QA_DOOMED:
        return ok({"overview_qa": [], "plot_qa": f"nothing ({len(body['messages'])})"})
    return ok({"overview_qa": [{"question": f"What is {title} about?", "answer": f"{title} is <about> love."}],
               "plot_qa": [{"question": f"Plot {i} of {title}?", "answer": f"Answer {i}."} for i in range(2)],
               "temporal_qa": [{"question": "What happens first?", "answer": "Scene 0."}]})


class ScriptedLLM:
    """Answers as a pure function of the request (so two jobs get the same answers), plus one 429 on the 3rd
    request. Records every request and whether its answer was sent; can hold matching requests (for kills)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.hold = None  # predicate: requests it matches wait until `release` is set
        self.held = threading.Event()
        self.release = threading.Event()
        self.answered: list[str] = []
        self.unanswered: list[str] = []
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, body, n) -> Reply:
        key = json.dumps(body["messages"], sort_keys=True)
        with self.lock:
            self.n += 1
            if self.n == 3:
                return error(429, "slow down")
        if self.hold is not None and self.hold(body):
            self.held.set()
            self.release.wait(60)
            self.unanswered.append(key)  # its client was killed meanwhile
            return ok("{}")
        if self.delay:
            time.sleep(self.delay)
        reply = qa_answer(body) if is_qa(body) else plan_answer(body)
        self.answered.append(key)
        return reply


def retried_on_rerun(key: str) -> bool:
    """Requests a rerun is meant to repeat: items that failed (their answers are dropped from the cache)."""
    return DOOMED in key or QA_DOOMED in key


def frame_mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "movies").glob("*/frames/*.png")}


def recorded_frames(out: Path) -> dict[str, int]:
    """Frames whose manifest entry (manifest.json or its journal) is on disk: a rerun must not render them."""
    from movielm_fast.run.manifest import read_manifest

    done = {}
    for m in (out / "movies").glob("*/manifest.json"):
        for entry in (read_manifest(m) or {}).get("frames", []):
            path = m.parent / entry["file"]
            done[str(path.relative_to(out))] = path.stat().st_mtime_ns
    for j in (out / "movies").glob("*/manifest.journal.jsonl"):
        for line in j.read_text().splitlines():
            if line.strip():
                path = j.parent / json.loads(line)["file"]
                done[str(path.relative_to(out))] = path.stat().st_mtime_ns
    return done


def assert_same_frames(a: Path, b: Path) -> None:
    """The same frames, with pixels within 2/255 -- not bit for bit: runs cut their batches differently (movies stream
    in as their plans arrive, and a Ray worker runs torch on its own threads), and a float sum in another order can
    round a pixel the other way (seen: one value of one frame in twelve, off by 1)."""
    assert frame_mtimes(a).keys() == frame_mtimes(b).keys()
    for name in frame_mtimes(a):
        assert np.abs(load_png(a / name) - load_png(b / name)).max() <= 2, name


def dataset_of(out: Path) -> tuple:
    """What must be identical between runs: the dataset, the QA, and every frame's pixels (by hash)."""
    from movielm_fast.run.manifest import read_manifest

    hashes = {m.parent.name: [(f["id"], f["sha256"]) for f in read_manifest(m)["frames"]]
              for m in sorted((out / "movies").glob("*/manifest.json"))}
    return ((out / "dataset" / "dataset.json").read_text(), (out / "dataset" / "qa.json").read_text(), hashes)


@pytest.fixture(scope="module")
def made(tmp_path_factory, _tiny_model):
    """One full job (style training on); tests below read its output or rerun it."""
    root = tmp_path_factory.mktemp("make")
    llm = ScriptedLLM()
    with FakeOpenAIServer(llm) as server:
        result = CliRunner().invoke(cli, make_args(root / "out", server.url, root / "llm-cache", "--quiet"))
        n_first = len(server.requests)
        yield {"root": root, "out": root / "out", "result": result, "server": server, "llm": llm,
               "n_first": n_first}


def test_make_end_to_end_with_failures_isolated(made):
    out, result = made["out"], made["result"]
    assert result.exit_code == 1, result.output  # something failed, everything else completed
    report = json.loads((out / "make.json").read_text())
    failures = sorted((f["stage"], f.get("theme", ""), f.get("version", 0), f.get("movie", ""))
                      for f in report["failures"])
    assert failures == [("plan", DOOMED, 1, ""), ("plan", DOOMED, 2, ""), ("qa", "", 0, "a-storm-at-sea-02")]
    assert "no valid answer" in " ".join(f["reason"] for f in report["failures"])
    assert "FAILED plan theme 'a doomed theme'" in result.stderr and "FAILED qa a-storm-at-sea-02" in result.stderr
    finished = [m for m in MOVIES if m != "a-storm-at-sea-02"]
    assert report["finished"] == finished
    st = report["stages"]
    assert (st["plan"]["done"], st["plan"]["failed"]) == (6, 2)
    assert (st["render"]["done"], st["render"]["frames_rendered"]) == (6, 6 * FRAMES)
    assert st["render"]["images_per_second"] > 0 and st["style"]["done"] == 6
    assert (st["qa"]["done"], st["qa"]["failed"], st["dataset"]["done"]) == (5, 1, 5)
    assert report["llm"]["requests"] == made["n_first"] - 1, "the 429 is no answered request"
    assert report["llm"]["repairs"] >= 1 and report["llm"]["prompt_tokens"] > 0
    # The layout of issue 12.
    assert sorted(p.name for p in (out / "plans").glob("*.json")) == sorted(f"{m}.json" for m in MOVIES)
    for m in MOVIES:
        folder = out / "movies" / m
        assert (folder / "manifest.json").is_file() and (folder / "storyboard.png").is_file()
        assert len(list((folder / "frames").glob("*.png"))) == FRAMES
        assert (folder / "qa.json").is_file() == (m in finished)
    records = json.loads((out / "dataset" / "dataset.json").read_text())
    assert {r["id"].rsplit("-", 2)[0] for r in records} == set(finished)
    assert all(Path(out / "dataset" / f).is_file() for r in records for f in r["frames"])
    assert any(r["conversations"][1]["value"] == "A Heist 1 is <about> love." for r in records)
    assert any("character" in r["id"] for r in records), "derived QA is merged in"
    # Gallery: every finished movie, text escaped, images by relative path.
    page = (out / "index.html").read_text()
    assert page.count("<section class=movie") == 5 and "a-storm-at-sea-02" in page
    assert "&lt;b&gt;tags&lt;/b&gt; &amp; quotes &quot; stay text." in page and "<b>tags</b>" not in page
    assert "src='movies/a-heist-01/frames/001.png'" in page and "src='movies/a-heist-01/storyboard.png'" in page
    assert "http" not in page and "<script" not in page


def test_rerun_makes_no_llm_request_and_renders_nothing(made):
    out, server = made["out"], made["server"]
    before, mtimes = len(server.requests), frame_mtimes(out)
    dataset = dataset_of(out)
    result = CliRunner().invoke(cli, make_args(out, server.url, made["root"] / "llm-cache", "--json"))
    assert result.exit_code == 1, result.output
    again = [json.dumps(b["messages"], sort_keys=True) for b in server.requests[before:]]
    assert again and all(retried_on_rerun(k) for k in again), "only the failed items are asked again"
    assert frame_mtimes(out) == mtimes
    assert dataset_of(out) == dataset
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["stages"]["render"]["frames_rendered"] == 0 and report["stages"]["plan"]["kept"] == 6
    assert report["stages"]["qa"]["kept"] == 5


def test_user_errors_exit_2_before_any_request(tmp_path):
    llm = ScriptedLLM()
    with FakeOpenAIServer(llm) as server:
        runner = CliRunner()
        no_themes = runner.invoke(cli, ["make", "--out", str(tmp_path / "o"), "--base-url", server.url])
        bad_model = runner.invoke(cli, make_args(tmp_path / "o", server.url, tmp_path / "c", "--model",
                                                 str(tmp_path / "no-such-model")))
        assert len(server.requests) == 0
    assert no_themes.exit_code == 2 and "no themes given" in no_themes.stderr
    assert bad_model.exit_code == 2 and "Traceback" not in bad_model.output, bad_model.output


def _key(body) -> str:
    return json.dumps(body["messages"], sort_keys=True)


def _wait_for(condition, proc, what: str, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"make exited ({proc.returncode}) before {what}")
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def test_kill_9_at_four_points_then_rerun_resumes(tmp_path):
    """Killed during an LLM call, mid-render, during QA and during the export, each time rerun with the same
    command: no answered LLM request is asked again, no recorded frame is rendered again, and the final dataset
    equals an uninterrupted run's."""
    out, video = tmp_path / "out", ("--video", "--concurrency", "2")
    with FakeOpenAIServer(ScriptedLLM()) as ref_server:  # the uninterrupted run, with its own cache
        ref = CliRunner().invoke(cli, make_args(tmp_path / "ref", ref_server.url, tmp_path / "ref-cache", "--quiet",
                                                *video))
    assert ref.exit_code == 1, ref.output
    llm = ScriptedLLM()
    env = dict(os.environ)
    with FakeOpenAIServer(llm) as server:
        argv = [sys.executable, "-m", "movielm_fast.cli.main",
                *make_args(out, server.url, tmp_path / "cache", "--quiet", *video)]
        runs: list[dict] = []

        def start():
            log = open(tmp_path / f"run{len(runs) + 1}.log", "w")
            runs.append({"n": len(server.requests), "answered": set(llm.answered), "frames": recorded_frames(out)})
            return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)

        def kill(proc, settle: bool = True) -> None:
            if settle:
                # Hold every request from now on, and give answers already sent a moment to reach the client's
                # cache: an answer the server sent but the killed client never read is no answer it "has".
                llm.hold = lambda b: True
                time.sleep(0.3)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            llm.release.set()  # held requests answer a dead client
            time.sleep(0.05)
            llm.hold, llm.held, llm.release = None, threading.Event(), threading.Event()

        def check_resumed(run: dict) -> None:
            repeated = [k for k in map(_key, server.requests[run["n"]:])
                        if k in run["answered"] and not retried_on_rerun(k)]
            assert not repeated, f"{len(repeated)} answered LLM request(s) asked again"
            now = frame_mtimes(out)
            assert {p: now.get(p) for p in run["frames"]} == run["frames"], "a recorded frame was rendered again"

        # 1. during an LLM call: a plan request held at the server
        llm.hold = lambda b: not is_qa(b) and theme_of(b) == "a storm at sea" and "version 2 of" in _user(b)
        proc = start()
        _wait_for(llm.held.is_set, proc, "the held plan request")
        kill(proc)
        assert not list((out / "movies").glob("*/qa.json"))
        # 2. mid-render: some frames recorded, not all. Every LLM request is held, so no answer is in flight at the
        # kill (no settling needed, which would let a fast machine render every frame meanwhile), and the movie
        # whose plan is held cannot be rendered at all.
        llm.hold = lambda b: True
        proc = start()
        _wait_for(lambda: len(recorded_frames(out)) > len(runs[-1]["frames"]), proc, "a rendered frame")
        kill(proc, settle=False)
        assert 0 < len(recorded_frames(out)) < 6 * FRAMES
        check_resumed(runs[-1])
        # 3. during QA: QA requests held at the server
        llm.hold = is_qa
        proc = start()
        _wait_for(llm.held.is_set, proc, "a QA request")
        kill(proc)
        check_resumed(runs[-1])
        # 4. during the export: its QA file is written, the run report is not
        proc = start()
        _wait_for(lambda: (out / "dataset" / "qa.json").exists(), proc, "the export")
        kill(proc, settle=False)  # no LLM request is left to settle, and the export is short
        assert not (out / "make.json").exists(), "the kill came after the export"
        check_resumed(runs[-1])
        # 5. to the end
        proc = start()
        assert proc.wait(timeout=300) == 1, (tmp_path / f"run{len(runs)}.log").read_text()
        check_resumed(runs[-1])
    assert dataset_of(out)[:2] == dataset_of(tmp_path / "ref")[:2], "the same dataset and QA"
    assert_same_frames(out, tmp_path / "ref")
    assert json.loads((out / "make.json").read_text())["finished"] == [m for m in MOVIES if m != "a-storm-at-sea-02"]


def test_ray_cluster_gives_the_same_files(made, tmp_path):
    if importlib.util.find_spec("ray") is None:  # not importorskip: importing Ray here would fix its bind address
        pytest.skip("ray is not installed (the [cluster] extra)")
    with FakeOpenAIServer(ScriptedLLM()) as server:
        result = CliRunner().invoke(cli, make_args(tmp_path / "out", server.url, tmp_path / "cache", "--quiet",
                                                   "--cluster", "ray", "--address", "local", "--workers", "2"))
    assert result.exit_code == 1, result.output
    ray_data, local_data = dataset_of(tmp_path / "out"), dataset_of(made["out"])
    assert ray_data[:2] == local_data[:2], "the same dataset and QA"
    assert_same_frames(tmp_path / "out", made["out"])
    assert (tmp_path / "out" / "index.html").read_text() == (made["out"] / "index.html").read_text() \
        .replace(str(made["out"]), str(tmp_path / "out"))


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


# Appended to a copy of the gallery by the test only (the gallery itself has no script): after the page has
# loaded, it reports which images failed to load and the page's rendered text.
_PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
  const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({images: imgs.length, broken: broken, text: document.body.innerText});
  document.body.appendChild(pre);
});</script>"""


@pytest.mark.skipif(_browser() is None, reason="no headless browser installed (apt-get install chromium)")
def test_gallery_in_a_headless_browser(made, tmp_path):
    out = made["out"]
    probe = out / "probe.html"
    probe.write_text((out / "index.html").read_text().replace("</body>", _PROBE + "</body>"))
    try:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        dom = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000",
                              "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    finally:
        probe.unlink()
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    import html

    result = json.loads(html.unescape(found.group(1)))
    # Per finished movie: a storyboard and every frame.
    assert result["images"] == 5 * (1 + FRAMES) and result["broken"] == []
    text = result["text"]
    for title in ("A Love Story 1", "A Heist 2", "A Storm At Sea 1"):
        assert title in text
    assert "A Heist 1 is <about> love." in text and "Line 1 of a heist." in text
    assert "Version 1 of a heist: <b>tags</b> & quotes \" stay text." in text
    assert "Rosa: a person called Rosa in a coat" in text and "Gothic" in text
    assert "a doomed theme" in text and "no valid answer" in text
