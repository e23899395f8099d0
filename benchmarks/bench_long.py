"""Long clips: memory flat in the frame count, time linear with window:W. A benchmark, not a test.

    .venv/bin/python benchmarks/bench_long.py                       # the issue's settings (long on CPU)
    .venv/bin/python benchmarks/bench_long.py --size 32 --steps 2 --frames 64 256 1024

For each frame count N (default 64, 512, 2048; tiny preset, 256x256, 4 steps, generated clips):

- peak RSS of a whole ``tokenflow edit`` process (decode, encode, invert, edit, decode, encode the mp4)
  with ``--keyframe-attention window:2``, from the kernel's own accounting of the child (wait4
  ru_maxrss), and the ratio of the largest N to the smallest (the issue's bound: <= 1.15);
- peak RSS (VmHWM) of a fresh ``tokenflow serve`` process after one upload + invert + propagate of the
  clip through the client (same settings);
- seconds per frame per step of the edit in this process, for ``window:2`` at every N and for ``all``
  up to `--all-up-to` frames (512), where its quadratic attention term shows;
- bytes per frame of the inversion artifact (all its files over N).

Prints one JSON object (also to --json). Runs one N after the other; other agents' load on a shared
machine slows everything alike, so the ratios within one run stay meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("tokenflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tokenflow.cli"]


def _run_measured(command: list[str], timeout: float) -> tuple[int, float, float]:
    """(exit code, peak RSS MiB, seconds) of a child process, peak from the kernel (wait4)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 and proc.stderr is not None:
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-2000:])
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - started


def cli_edit_rss(
    clip: Path, out: Path, size: int, steps: int, attention: str, batch: int, timeout: float
) -> dict[str, Any]:
    command = [
        *_cli(), "edit", str(clip), "-o", str(out), "-p", "a watercolor painting", "--model", "tiny",
        "--device", "cpu", "--steps", str(steps), "--inversion-steps", str(steps), "--size", f"{size}x{size}",
        "--keyframe-attention", attention, "--chunk-size", str(batch), "--inversion-batch-size", str(batch),
        "-q", "-y",
    ]  # fmt: skip
    code, rss, seconds = _run_measured(command, timeout)
    return {"exit_code": code, "peak_rss_mib": round(rss, 1), "seconds": round(seconds, 1)}


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


def server_edit_rss(
    clip: Path, tmp: Path, size: int, steps: int, attention: str, batch: int, timeout: float
) -> dict[str, Any]:
    """One fresh server, one edit through the client; the server's peak RSS afterwards."""
    from clients import TokenFlowClient, decode_spec, edit_spec, inversion_spec

    port = _free_port()
    command = [
        *_cli(), "serve", "--services=all", "--model=tiny", "--host=127.0.0.1",
        f"--port={port}", f"--cache-dir={tmp / 'cache'}", "--metrics-port=-1",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = time.perf_counter()
    try:
        client = TokenFlowClient(f"127.0.0.1:{port}")
        try:
            client.wait_ready(120)
            spec = edit_spec("a watercolor painting", chunk_size=batch)
            spec.keyframe_attention = attention
            client.edit(
                str(clip),
                spec,
                decode=decode_spec(size=(size, size)),
                inversion=inversion_spec(steps=steps, edit_steps=steps, reconstruct=False, batch_size=batch),
                timeout=timeout,
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
    return {"peak_rss_mib": round(rss, 1), "seconds": round(time.perf_counter() - started, 1)}


def library_timing(clip: Path, size: int, steps: int, attentions: list[str], batch: int) -> dict[str, Any]:
    """Seconds per frame per step of the edit (keyframe pass + propagation) in this process."""
    from tokenflow.editing import edit
    from tokenflow.models import load_model
    from tokenflow.pipeline import invert_video
    from tokenflow.specs import DecodeSpec, EditSpec, InversionSpec

    model = load_model("tiny", device="cpu", dtype="float32")
    spec = InversionSpec(steps=steps, edit_steps=steps, reconstruct=False, batch_size=batch)
    inv = invert_video(model, clip, DecodeSpec.sized((size, size)), spec)
    n = inv.n_frames
    artifact_bytes = sum(os.stat(p).st_size for p in inv.paths.values())
    out: dict[str, Any] = {"inversion_bytes_per_frame": round(artifact_bytes / n, 1)}
    for attention in attentions:
        spec_e = EditSpec(prompt="a watercolor painting", keyframe_attention=attention, chunk_size=batch)
        result = edit(model, inv, spec_e)
        seconds = result.seconds["keyframes"] + result.seconds["propagation"]
        out[attention] = {
            "seconds_per_frame_per_step": round(seconds / (n * steps), 5),
            "keyframe_pass_share": round(result.seconds["keyframes"] / seconds, 3),
        }
        del result
    del inv, model
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="propagation chunk and inversion batch (frames)")
    parser.add_argument("--all-up-to", type=int, default=512, help="time `all` only up to this many frames")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="per run, seconds")
    parser.add_argument("--skip", nargs="*", default=[], choices=("cli", "server", "timing"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from tokenflow.synthetic import make_clip

    attention = f"window:{args.window}"
    report: dict[str, Any] = {
        "settings": {
            "model": "tiny",
            "size": args.size,
            "steps": args.steps,
            "window": args.window,
            "batch": args.batch,
        },
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": list(os.getloadavg())},
        "runs": {},
    }

    def dump() -> None:
        text = json.dumps(report, indent=1)
        if args.json:
            Path(args.json).write_text(text)
        return None

    with tempfile.TemporaryDirectory(prefix="tokenflow-bench-long-") as tmp_dir:
        tmp = Path(tmp_dir)
        for n in args.frames:
            run: dict[str, Any] = {}
            report["runs"][str(n)] = run
            clip = make_clip(tmp / f"clip{n}.mp4", frames=n, size=(args.size, args.size), fps=24, audio=True)
            if "cli" not in args.skip:
                run["cli_edit"] = cli_edit_rss(
                    clip, tmp / f"out{n}.mp4", args.size, args.steps, attention, args.batch, args.timeout
                )
                dump()
            if "server" not in args.skip:
                (tmp / f"srv{n}").mkdir()
                try:
                    run["server_edit"] = server_edit_rss(
                        clip, tmp / f"srv{n}", args.size, args.steps, attention, args.batch, args.timeout
                    )
                except Exception as exc:  # noqa: BLE001 - reported, the other figures still count
                    run["server_edit"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                dump()
            if "timing" not in args.skip:
                attentions = [attention] + (["all"] if n <= args.all_up_to else [])
                run["timing"] = library_timing(clip, args.size, args.steps, attentions, args.batch)
                dump()
            clip.unlink()
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
