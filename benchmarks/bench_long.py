"""Long clips: memory flat in the frame count, time linear with window:W. A benchmark, not a test.

    .venv/bin/python benchmarks/bench_long.py                       # the issue's settings (long on CPU)
    .venv/bin/python benchmarks/bench_long.py --size 32 --steps 2 --frames 64 256 1024

For each frame count N (default 64, 512, 2048; tiny preset, 256x256, 4 steps, generated clips):

- peak RSS of a whole ``tokenflow edit`` process (decode, encode, invert, edit, decode, encode the mp4)
  with ``--keyframe-attention window:2``, from the kernel's own accounting of the child (wait4
  ru_maxrss), and the ratio of the largest N to the smallest (the issue's bound: <= 1.15);
- peak RSS (VmHWM) of a fresh ``tokenflow serve`` process after one upload + invert + propagate of the
  clip through the client (same settings);
- seconds per frame per step of the edit (keyframe pass + propagation, as the edit command reports
  them), for ``window:2`` at every N and for ``all`` up to `--all-up-to` frames (512), where its
  quadratic attention term shows; the ``all`` runs report their peak RSS too;
- bytes per frame of the inversion artifact the server published (its store index's size over N).

The runs are independent processes. With ``--lanes 2`` (the default on two or more cores) two run at
once, each pinned to its own core with one thread, so every timing is taken in the same conditions
(one core, a neighbour busy); ``--lanes 1`` runs them one after the other with all threads. Prints one
JSON object (also to --json, rewritten after every run).

It is long: at the defaults a 2,048-frame edit takes 2 to 3 hours of one core on the 2-core machines
here, about 6 core-hours in all; `--frames 64 2048 --skip all` (the bound's two ends) takes about 3 hours.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_overhead import machine  # noqa: E402  (benchmarks/ is the script's own folder)


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("tokenflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tokenflow.cli"]


def _child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _pinned(cpu: int | None) -> Any:
    """preexec_fn pinning a child to one CPU (None: no pinning)."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def _run_measured(
    command: list[str], timeout: float, cpu: int | None, threads: int | None
) -> tuple[int, float, float, str]:
    """(exit code, peak RSS MiB, seconds, stdout) of a child process, peak from the kernel (wait4)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            command, stdout=out, stderr=err, env=_child_env(threads), preexec_fn=_pinned(cpu)
        )
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        out.seek(0)
        err.seek(0)
        if code != 0:
            sys.stderr.write(err.read().decode(errors="replace")[-2000:])
        stdout = out.read().decode(errors="replace")
        return code, usage.ru_maxrss / 1024, time.perf_counter() - started, stdout


@dataclass(frozen=True)
class Run:
    """One measured run: the clip, the settings, and where it runs (a CPU to pin to, a thread count)."""

    clip: Path
    n: int
    size: int
    steps: int
    attention: str
    batch: int
    timeout: float
    cpu: int | None
    threads: int | None


def cli_edit(r: Run, out: Path) -> dict[str, Any]:
    """Peak RSS of one whole `tokenflow edit` process, and its edit's seconds per frame per step."""
    command = [
        *_cli(), "edit", str(r.clip), "-o", str(out), "-p", "a watercolor painting",
        "--model", "tiny", "--device", "cpu", "--size", f"{r.size}x{r.size}",
        "--steps", str(r.steps), "--inversion-steps", str(r.steps), "--keyframe-attention", r.attention,
        "--chunk-size", str(r.batch), "--inversion-batch-size", str(r.batch), "-q", "-y",
    ]  # fmt: skip
    code, rss, seconds, stdout = _run_measured(command, r.timeout, r.cpu, r.threads)
    run: dict[str, Any] = {"exit_code": code, "peak_rss_mib": round(rss, 1), "seconds": round(seconds, 1)}
    if code == 0:
        stages = json.loads(stdout)["seconds"]
        edit_seconds = stages["keyframes"] + stages["propagation"]
        run["stage_seconds"] = stages
        run["seconds_per_frame_per_step"] = round(edit_seconds / (r.n * r.steps), 5)
        run["keyframe_pass_share"] = round(stages["keyframes"] / edit_seconds, 3)
    out.unlink(missing_ok=True)
    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _inversion_bytes(cache_dir: Path) -> int:
    """Size of the inversion artifact the server published, from its store's index."""
    from services.inversion import KIND

    with closing(sqlite3.connect(cache_dir / "index.db")) as db:
        sizes = [row[0] for row in db.execute("SELECT size FROM artifacts WHERE kind = ?", (KIND,))]
    if len(sizes) != 1:
        raise RuntimeError(f"expected one inversion artifact in {cache_dir}, found {len(sizes)}")
    return int(sizes[0])


def server_edit(r: Run, tmp: Path) -> dict[str, Any]:
    """One fresh server, one edit through the client; the server's peak RSS afterwards."""
    from clients import TokenFlowClient, decode_spec, edit_spec, inversion_spec

    port = _free_port()
    cache = tmp / "cache"
    command = [
        *_cli(), "serve", "--services=all", "--model=tiny", "--host=127.0.0.1",
        f"--port={port}", f"--cache-dir={cache}", "--metrics-port=-1",
        "--max-connection-age-seconds=0",  # one Edit stream of a 2,048-frame clip outlasts age + grace
    ]  # fmt: skip
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_child_env(r.threads),
        preexec_fn=_pinned(r.cpu),
    )  # fmt: skip
    started = time.perf_counter()
    try:
        client = TokenFlowClient(f"127.0.0.1:{port}")
        try:
            client.wait_ready(120)
            spec = edit_spec("a watercolor painting", chunk_size=r.batch)
            spec.keyframe_attention = r.attention
            client.edit(
                str(r.clip),
                spec,
                decode=decode_spec(size=(r.size, r.size)),
                inversion=inversion_spec(
                    steps=r.steps, edit_steps=r.steps, reconstruct=False, batch_size=r.batch
                ),
                timeout=r.timeout,
            )
        finally:
            client.close()
        rss = _vm_hwm_mib(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return {
        "peak_rss_mib": round(rss, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "inversion_bytes_per_frame": round(_inversion_bytes(cache) / r.n, 1),
    }


def _expected_cost(job: tuple[int, str, str]) -> float:
    """A rough relative cost of one run, to start the longest first.

    Longest first keeps both lanes busy to the end (the 2,048-frame runs would otherwise start last
    and run alone). ``all`` adds its quadratic keyframe term (about 2x window:2 at 512 frames here);
    the server adds its upload and download.
    """
    n, what, attention = job
    quadratic = n / 256 if attention == "all" else 0.0
    return n * (1.0 + quadratic) * (1.2 if what == "server_edit" else 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="propagation chunk and inversion batch (frames)")
    parser.add_argument("--all-up-to", type=int, default=512, help="time `all` only up to this many frames")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="per run, seconds")
    parser.add_argument("--skip", nargs="*", default=[], choices=("cli", "server", "all"))
    parser.add_argument(
        "--lanes", type=int, choices=(1, 2), default=2 if len(os.sched_getaffinity(0)) >= 2 else 1,
        help="runs at once (2: each pinned to its own core with one thread)",
    )  # fmt: skip
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from tokenflow.synthetic import make_clip

    window = f"window:{args.window}"
    cpus = sorted(os.sched_getaffinity(0))[: args.lanes] if args.lanes > 1 else [None]
    threads = 1 if args.lanes > 1 else None
    report: dict[str, Any] = {
        "settings": {
            "model": "tiny",
            "size": args.size,
            "steps": args.steps,
            "window": args.window,
            "batch": args.batch,
            "lanes": args.lanes,
            "threads_per_run": threads or "torch default",
        },
        "machine": machine(),
        "runs": {str(n): {} for n in args.frames},
    }
    lock = threading.Lock()

    def dump() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    with tempfile.TemporaryDirectory(prefix="tokenflow-bench-long-") as tmp_dir:
        tmp = Path(tmp_dir)
        clips = {
            n: make_clip(tmp / f"clip{n}.mp4", frames=n, size=(args.size, args.size), fps=24, audio=True)
            for n in args.frames
        }
        planned: list[tuple[int, str, str]] = []  # (N, report entry, attention)
        for n in args.frames:
            if "cli" not in args.skip:
                planned.append((n, "cli_edit", window))
            if "server" not in args.skip:
                planned.append((n, "server_edit", window))
            if "all" not in args.skip and n <= args.all_up_to:
                planned.append((n, "cli_edit_all", "all"))
        jobs: queue.Queue[tuple[int, str, str]] = queue.Queue()
        for job in sorted(planned, key=_expected_cost, reverse=True):
            jobs.put(job)

        def lane(cpu: int | None) -> None:
            while True:
                try:
                    n, what, attention = jobs.get_nowait()
                except queue.Empty:
                    return
                run = Run(
                    clips[n], n, args.size, args.steps, attention, args.batch, args.timeout, cpu, threads
                )
                try:
                    if what == "server_edit":
                        (tmp / f"srv{n}").mkdir()
                        result = server_edit(run, tmp / f"srv{n}")
                    else:
                        result = cli_edit(run, tmp / f"{what}{n}.mp4")
                except Exception as exc:  # noqa: BLE001 - reported, the other figures still count
                    result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                with lock:
                    report["runs"][str(n)][what] = result
                    dump()

        workers = [threading.Thread(target=lane, args=(cpu,)) for cpu in cpus]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    runs = report["runs"]
    lo, hi = str(min(args.frames)), str(max(args.frames))
    for what in ("cli_edit", "server_edit"):
        a, b = runs.get(lo, {}).get(what, {}), runs.get(hi, {}).get(what, {})
        if "peak_rss_mib" in a and "peak_rss_mib" in b:
            report[f"{what}_rss_ratio_{hi}_over_{lo}"] = round(b["peak_rss_mib"] / a["peak_rss_mib"], 3)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    dump()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
