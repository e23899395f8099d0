"""Fleet benchmark: a multi-prompt Edit on two propagation replicas against one, as a wall-time ratio.

    python benchmarks/bench_fleet.py [--prompts 4 --frames 10 --size 64x64 --steps 4 --rounds 1 --json F]

Starts propagation replicas as real processes (`python -m services.server --services propagation` on
127.0.0.1, 127.0.0.2, ...), all on one shared volume tier, and an Editor in this process (hosting the
inversion and keyframes stages too) whose propagation target is ``ipv4:`` the replicas. The clip is
inverted once before timing. Then, for 1 and for 2 replicas, one Edit with `--prompts` distinct prompts
(fresh seeds per configuration, so nothing is a cache hit) is timed end to end through the client; the
Editor runs the edits concurrently, one per replica (--edit-parallelism defaults to the replica count).
`--rounds R` repeats both measurements R times in alternating order (1-2, 2-1, ...) and reports every
round's ratio and their median, so a load that drifts during the run (other jobs) hits both sides.

The ratio two/one is what matters: on a machine with one accelerator per replica it approaches 0.5 for
many prompts. On a CPU-only machine with few cores the replicas share the same cores, so the ratio mostly
shows the fleet's overhead (two processes, gRPC hops, contention), not a speed-up: read it as such.
Prints the machine, a table and one JSON object (also written to --json).

Measured (2 CPU cores, no GPU, tiny preset, 4 prompts, 10 frames 64x64, 4 inversion steps, other agents'
jobs loading the machine): `--rounds 2` at load average 8.7-9.4: 39.1 s / 20.6 s (0.53) then, in the other
order, 32.3 s / 26.3 s (1.23), median 0.88; a single round at load 15: 51.8 s / 129.2 s (2.49); an earlier
single round at load 12: 278.0 s / 120.6 s (0.43). The spread is the other jobs' load moving, not the
fleet: both configurations share the same two cores, so on this machine the ratio is about 1 at best, and
only one accelerator per replica turns it into a speed-up (towards 1/replicas for many prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from clients import TokenFlowClient, decode_spec, edit_spec, inversion_spec  # noqa: E402

_LINE = re.compile(r"serving \S+ on (\S+):(\d+) ")


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def start_replica(
    index: int, root: Path, shared: Path, model: str, device: str
) -> tuple[subprocess.Popen[str], str]:
    host = f"127.0.0.{index + 1}"
    command = [
        sys.executable, "-m", "services.server", "--services", "propagation", "--host", host, "--port", "0",
        "--metrics-port", "-1", "--cache-dir", str(root / f"cache-{index}"), "--cache-size", "2GB",
        "--shared-store", str(shared), "--model", model, "--device", device, "--log-level", "WARNING",
    ]  # fmt: skip
    log = open(root / f"replica-{index}.log", "wb")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    found: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if (m := _LINE.match(line)) is not None:
                found.append(f"{m.group(1)}:{m.group(2)}")
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(300)
    if not found:
        process.kill()
        raise RuntimeError(f"replica {index} did not start; see {root / f'replica-{index}.log'}")
    return process, found[0]


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--size", type=_size, default=(64, 64))
    p.add_argument("--steps", type=int, default=4, help="inversion steps (edit steps: 2)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=1, help="measurements of each configuration, alternating")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from services.config import ServerConfig
    from services.server import build_server
    from tokenflow.synthetic import make_clip

    root = Path(tempfile.mkdtemp(prefix="tokenflow-bench-fleet-"))
    shared = root / "shared"
    clip = make_clip(root / "clip.mp4", frames=a.frames, size=a.size, fps=10, audio=False)
    decode = decode_spec(size=a.size)
    inversion = inversion_spec(steps=a.steps, edit_steps=2, reconstruct=False)
    replicas = [start_replica(i, root, shared, a.model, a.device) for i in range(2)]
    timings: dict[int, list[float]] = {1: [], 2: []}
    loads: list[float] = []
    try:
        for round_ in range(a.rounds):
            # Alternate the order (1, 2), (2, 1), ...: a load that drifts during the run hits both alike.
            for count in (1, 2) if round_ % 2 == 0 else (2, 1):
                target = "ipv4:" + ",".join(address for _, address in replicas[:count])
                config = ServerConfig(
                    services="editor,inversion,keyframes", host="127.0.0.1", port=0, metrics_port=None,
                    cache_dir=root / f"editor-{round_}-{count}", cache_size_bytes=2 << 30,
                    shared_store=shared, model=a.model, device=a.device, propagation_addr=target,
                )  # fmt: skip
                with build_server(config) as server, TokenFlowClient(server.target, timeout=3600) as client:
                    deadline = time.monotonic() + 300
                    while client.health() != "SERVING" and time.monotonic() < deadline:
                        time.sleep(0.2)
                    video = client.upload(clip)
                    client.invert(video, decode=decode, inversion=inversion)  # not timed (cached for all)
                    seeds = [1000 * round_ + 100 * count + i for i in range(a.prompts)]  # never a cache hit
                    edits = [edit_spec(f"prompt {i}", seed=seed) for i, seed in enumerate(seeds)]
                    loads.append(os.getloadavg()[0])
                    started = time.perf_counter()
                    results = client.edit(video, edits, decode=decode, inversion=inversion)
                    timings[count].append(time.perf_counter() - started)
                    assert len(results) == a.prompts and not any(r.cache_hit for r in results)
    finally:
        for process, _ in replicas:
            process.kill()
            process.wait(30)
    import torch

    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0],
        },
        "workload": {
            "prompts": a.prompts,
            "frames": a.frames,
            "size": list(a.size),
            "steps": a.steps,
            "model": a.model,
            "device": a.device,
        },  # fmt: skip
        "one_replica_seconds": [round(t, 2) for t in timings[1]],
        "two_replicas_seconds": [round(t, 2) for t in timings[2]],
        "ratio_two_over_one": [round(two / one, 3) for one, two in zip(timings[1], timings[2], strict=True)],
        "median_ratio": round(
            statistics.median(t2 / t1 for t1, t2 in zip(timings[1], timings[2], strict=True)), 3
        ),
        "load_average_1m_at_each_start": [round(x, 2) for x in loads],
    }
    print(f"machine: {out['machine']}")
    print(f"{'round':>5}  {'1 replica s':>11}  {'2 replicas s':>12}  {'ratio':>6}")
    for r, (one, two) in enumerate(zip(timings[1], timings[2], strict=True)):
        print(f"{r:>5}  {one:>11.2f}  {two:>12.2f}  {two / one:>6.3f}")
    print(f"median ratio two/one: {out['median_ratio']:.3f}")
    print(json.dumps(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    run()
