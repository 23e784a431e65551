"""`movielm-fast serve`: how soon a plan sent to a warm server has its first frame on disk.

    python -m movielm_fast.bench.serve [--plan examples/plan.json] [--plans 3] [--model demo] [--device cpu]

Starts `movielm-fast serve` as its own process on 127.0.0.1 (a free port, a temporary output root), waits until it
answers /health (the model loaded: the start-up a `render` pays every time), then sends `--plans` copies of the plan
one after another (each into its own output folder, so none resumes another) and times, for each, submission -> its
first frame file on disk and submission -> its record says done. The first plan after start-up is the one the issue's
goal names ("a second plan sent to serve": every plan after the server started is one). Only HTTP and the files are
used: what a user of the server sees. Results go to bench/results/serve-<stamp>.json.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .args import bench_parser
from .formats import Section, load_note, save_result
from .hardware import load_average
from .startup import first_frame

SERVE_FORMAT = "movielm-bench-serve/1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: bytes | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def wait_for(check, timeout: float, poll: float = 0.005, what: str = ""):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        got = check()
        if got:
            return got
        time.sleep(poll)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def healthy(base: str, proc: subprocess.Popen) -> dict[str, Any] | None:
    if proc.poll() is not None:
        raise SystemExit(f"serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
    try:
        return call(f"{base}/health")
    except OSError:
        return None


def send(base: str, out: Path, plan: dict[str, Any], name: str, timeout: float) -> dict[str, Any]:
    """One plan: POST it, rendered into OUT/name (a folder of its own: nothing to resume), then time its first
    frame file and its finish."""
    body = json.dumps(plan).encode()
    t0 = time.perf_counter()
    job = call(f"{base}/plans?out={name}", body)
    first = wait_for(lambda: first_frame(out / name) and time.perf_counter(), timeout, what=f"{name}'s first frame")
    rec = wait_for(lambda: (r := call(f"{base}/plans/{job['id']}"))["state"] in ("done", "failed") and r, timeout,
                   poll=0.02, what=f"{name} to finish")
    if rec["state"] != "done":
        raise SystemExit(f"{name} failed: {rec.get('error')}")
    return {"first_frame_seconds": round(first - t0, 3), "done_seconds": round(time.perf_counter() - t0, 3),
            "frames": rec["total"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = bench_parser("serve", __doc__, model="demo", device=True, results="--results")
    ap.add_argument("--plan", type=Path, default=Path("examples/plan.json"))
    ap.add_argument("--plans", type=int, default=3, help="plans sent one after another to the warm server")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for any one step")
    args = ap.parse_args(argv)
    plan = json.loads(args.plan.read_text())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="mlf-serve-bench-") as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "movielm_fast.cli.main", "serve", "--out", str(out), "--port", str(port),
               "--model", args.model, "--device", args.device, "--no-style-training"]
        la_start = load_average()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            health = wait_for(lambda: healthy(base, proc), args.timeout, poll=0.05, what="the server to start")
            ready = time.perf_counter() - t0
            plans = [send(base, out, plan, f"bench-{i:02d}", args.timeout) for i in range(args.plans)]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    firsts = [p["first_frame_seconds"] for p in plans]
    result = {"format": SERVE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "plan": str(args.plan),
              "model": args.model, "device": args.device, "cpu_count": os.cpu_count(),
              "load_average": {"start": la_start, "end": load_average()},
              "server_ready_seconds": round(ready, 3), "server_startup": health.get("startup"),
              "plans": plans, "first_frame_seconds": {"best": min(firsts), "median": statistics.median(firsts)}}
    print(f"server ready after {ready:.2f} s; submission -> first frame: " +
          ", ".join(f"{s:.2f} s" for s in firsts))
    save_result(args.results, "serve", result)
    return result


def serve_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    firsts = ", ".join(f"{p['first_frame_seconds']:.2f}" for p in res["plans"])
    dones = ", ".join(f"{p['done_seconds']:.2f}" for p in res["plans"])
    return ["## A warm server (`python -m movielm_fast.bench.serve`)", "",
            f"`movielm-fast serve --model {res['model']} --device {res['device']}` on 127.0.0.1, then "
            f"{len(res['plans'])} copies of `{res['plan']}` ({res['plans'][0]['frames']} frames each) POSTed one "
            f"after another; {res['cpu_count']} CPUs; {load_note(res)}; {res['created']}. The server answered /health "
            f"{res['server_ready_seconds']:.2f} s after its process started (the model load every `render` pays). "
            f"Submission to the plan's first frame file on disk: **{firsts} s**; to the plan done: {dones} s.", ""]


SECTIONS = (Section(SERVE_FORMAT, serve_section),)


if __name__ == "__main__":
    main()
