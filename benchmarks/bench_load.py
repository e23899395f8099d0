"""Load benchmark: more concurrent clients than the queue admits, against the embedded server.

    python benchmarks/bench_load.py [--clients 16 --seconds 60 --max-queue 2 --json out.json]

Starts `tokenflow serve --services all --model tiny` as a real process on 127.0.0.1 (its own cache
directory), waits until it is SERVING, then runs `--clients` threads for `--seconds`. Each client loops:
an Invert of a small clip with a prompt of its own (so every request is distinct work: no dedupe, no
cache hit), and every fourth request a Propagate with a fresh prompt on a shared inversion. With one
worker per stage and `--max-queue` waiting jobs, most requests are refused with RESOURCE_EXHAUSTED
(QUEUE_FULL); a client that is refused waits the RetryInfo delay scaled down by `--backoff-scale`
(a load test wants pressure, not politeness) and goes on. A prober checks grpc.health.v1 every 0.2 s.

It reports: requests completed, refused with RESOURCE_EXHAUSTED carrying a RetryInfo, and failed
otherwise (must be 0); p50/p95 latency of completed requests (end to end, queueing included); health
latency under the load (p50, p95, max); the server's peak memory (VmHWM) over its resident size once
warm (VmRSS). Bounded in time and count, loopback only. Prints the machine, a table and one JSON
object (also written to --json).

This is a benchmark, not a test: run it once and read the figures with the machine's load in mind.

Measured once with the defaults (2 CPU cores, no GPU, while other jobs held the load average at 8-12):
8 completed, 1,700 refused with RESOURCE_EXHAUSTED + RetryInfo, 0 failed otherwise; latency p50 129 s,
p95 152 s (queueing on an over-subscribed CPU); health p50 30 ms, p95 112 ms, max 245 ms over 248
checks, all SERVING; server peak RSS +53 MB over its warm 479 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from tokenflow.synthetic import make_clip  # noqa: E402
from tokenflow_pb.v1 import (  # noqa: E402
    artifacts_pb2,
    artifacts_pb2_grpc,
    common_pb2,
    inversion_pb2,
    inversion_pb2_grpc,
    propagation_pb2,
    propagation_pb2_grpc,
)

SERVING_LINE = re.compile(r"^serving (\S+) on (\S+):(\d+) ")


def vm_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Server:
    def __init__(self, cache: Path, max_queue: int, log: Path) -> None:
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        args = [
            sys.executable, "-m", "tokenflow.cli", "serve", "--services", "all", "--model", "tiny",
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--cache-dir", str(cache),
            "--max-queue", str(max_queue),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert self.process.stdout is not None
        deadline = time.monotonic() + 180
        for line in self.process.stdout:
            match = SERVING_LINE.match(line)
            if match:
                self.target = f"127.0.0.1:{match.group(3)}"
                break
            if time.monotonic() > deadline:
                break
        else:
            raise SystemExit(f"the server did not start; see {log}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def outcome_of(error: grpc.RpcError) -> tuple[str, float | None]:
    """(label, retry delay) of a failed call: 'refused' = RESOURCE_EXHAUSTED with a RetryInfo."""
    status = rpc_status.from_call(error)
    delay = None
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.ToTimedelta().total_seconds()
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None:
        return "refused", delay
    return f"failed:{error.code().name}:{(error.details() or '')[:120]}", None


def upload(stub: Any, data: bytes) -> str:
    def requests() -> Iterator[Any]:
        yield artifacts_pb2.UploadRequest(
            header=artifacts_pb2.UploadHeader(
                kind=common_pb2.ARTIFACT_KIND_VIDEO,
                filename="clip.mp4",
                total_size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        yield artifacts_pb2.UploadRequest(chunk=data)

    return stub.Upload(requests(), timeout=60).digest


def invert_request(video: str, prompt: str, frames: int, steps: int) -> Any:
    return inversion_pb2.InvertRequest(
        video_digest=video,
        decode=common_pb2.DecodeSpec(max_frames=frames, width=64, height=64),
        inversion=common_pb2.InversionSpec(prompt=prompt, steps=steps, edit_steps=steps, reconstruct=False),
    )


def finish(responses: Iterator[Any]) -> None:
    for event in responses:
        if event.WhichOneof("event") == "result":
            return
    raise RuntimeError("the stream ended without a result")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-queue", type=int, default=2)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--backoff-scale", type=float, default=0.05, help="fraction of RetryInfo's delay to wait")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    clip = make_clip(tmp / "clip.mp4", frames=args.frames, size=(64, 64), fps=10, audio=False).read_bytes()
    server = Server(tmp / "cache", args.max_queue, tmp / "server.log")
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 180
    while (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        != health_pb2.HealthCheckResponse.SERVING
    ):
        if time.monotonic() > deadline:
            raise SystemExit("the server never turned SERVING")
        time.sleep(0.2)
    artifacts = artifacts_pb2_grpc.ArtifactsStub(channel)
    video = upload(artifacts, clip)
    inversion = inversion_pb2_grpc.InversionStub(channel)
    propagation = propagation_pb2_grpc.PropagationStub(channel)
    shared = None
    for event in inversion.Invert(invert_request(video, "shared", args.frames, args.steps), timeout=300):
        if event.WhichOneof("event") == "result":
            shared = event.result.digest
    assert shared is not None
    baseline_mb = vm_mb(server.process.pid, "VmRSS")

    lock = threading.Lock()
    outcomes: dict[str, int] = {}
    latencies: list[float] = []
    health_latencies: list[float] = []
    health_failures: list[str] = []
    stop_at = time.monotonic() + args.seconds

    def record(label: str, seconds: float | None = None) -> None:
        with lock:
            outcomes[label] = outcomes.get(label, 0) + 1
            if seconds is not None:
                latencies.append(seconds)

    def client(index: int) -> None:
        rng = random.Random(index)
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            prompt = f"client {index} request {n}"
            started = time.monotonic()
            try:
                if n % 4 == 0:
                    edit = common_pb2.EditSpec(prompt=prompt, keyframe_interval=4)
                    request = propagation_pb2.PropagateRequest(inversion_digest=shared, edit=edit)
                    finish(propagation.Propagate(request, timeout=300))
                else:
                    finish(
                        inversion.Invert(invert_request(video, prompt, args.frames, args.steps), timeout=300)
                    )
                record("completed", time.monotonic() - started)
            except grpc.RpcError as e:
                label, delay = outcome_of(e)
                record(label)
                if delay is not None:
                    time.sleep(delay * args.backoff_scale * rng.uniform(0.5, 1.5))

    def prober() -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                seconds = time.monotonic() - started
                with lock:
                    health_latencies.append(seconds)
                    if status != health_pb2.HealthCheckResponse.SERVING:
                        health_failures.append(f"status {status}")
            except grpc.RpcError as e:
                with lock:
                    health_failures.append(e.code().name)
            time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    threads.append(threading.Thread(target=prober, daemon=True))
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + 600)
    wall = time.monotonic() - began
    peak_mb = vm_mb(server.process.pid, "VmHWM")
    server.stop()

    failed = {k: v for k, v in outcomes.items() if k.startswith("failed")}
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "settings": vars(args),
        "wall_seconds": round(wall, 1),
        "completed": outcomes.get("completed", 0),
        "refused_resource_exhausted_with_retry_info": outcomes.get("refused", 0),
        "failed_otherwise": sum(failed.values()),
        "failures": failed,
        "latency_seconds": {
            "p50": percentile(latencies, 0.5),
            "p95": percentile(latencies, 0.95),
            "mean": statistics.fmean(latencies) if latencies else None,
        },
        "health_latency_seconds": {
            "p50": percentile(health_latencies, 0.5),
            "p95": percentile(health_latencies, 0.95),
            "max": max(health_latencies) if health_latencies else None,
            "checks": len(health_latencies),
            "not_serving_or_failed": len(health_failures),
        },
        "server_memory_mb": {
            "rss_warm": round(baseline_mb, 1),
            "peak": round(peak_mb, 1),
            "peak_over_warm": round(peak_mb - baseline_mb, 1),
        },
    }
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    print(f"{args.clients} clients for {args.seconds:g} s, max-queue {args.max_queue}, tiny preset")
    print(
        f"completed {report['completed']}, refused (RESOURCE_EXHAUSTED + RetryInfo) "
        f"{report['refused_resource_exhausted_with_retry_info']}, "
        f"failed otherwise {report['failed_otherwise']}"
    )
    lat, hl, mem = report["latency_seconds"], report["health_latency_seconds"], report["server_memory_mb"]
    print(
        f"latency p50 {lat['p50']}, p95 {lat['p95']} s; health p50 {hl['p50']}, p95 {hl['p95']}, "
        f"max {hl['max']} s over {hl['checks']} checks; peak RSS +{mem['peak_over_warm']} MB over warm"
    )
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["failed_otherwise"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
