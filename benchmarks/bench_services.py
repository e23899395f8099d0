"""Service-level benchmark: what a caller sees through the client on this machine.

    python benchmarks/bench_services.py [--frames 16 --size 128x128 --steps 50 --inversion-steps 50]

Starts an in-process server with every service (tiny model unless --model says otherwise, a temporary
cache directory), then measures through `clients.TokenFlowClient`:
  * cold edit: upload + invert + propagate a fresh clip under prompt A;
  * warm re-edit: the same clip under prompt B (the inversion is a cache hit), and the ratio warm/cold --
    the product's economic core is that this ratio is small;
  * repeat: the first request again (everything cached);
  * upload and download throughput (MiB/s) of a random blob through the chunked Artifacts streams.
Prints the machine first, then a table, then one JSON object (also written to --json when given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from clients import TokenFlowClient, decode_spec, edit_spec, inversion_spec  # noqa: E402
from tokenflow_pb.v1 import common_pb2, editor_pb2  # noqa: E402

MiB = 1 << 20


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def machine() -> dict[str, Any]:
    """What the figures were measured on (they mean little without it)."""
    import torch

    processor = platform.processor()
    if not processor and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        processor = names[0] if names else ""
    return {
        "processor": processor or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


class InversionWatch:
    """on_event callback remembering whether the Editor's inversion was a cache hit."""

    def __init__(self) -> None:
        self.cache_hit: bool | None = None

    def __call__(self, event: editor_pb2.EditResponse) -> None:
        if event.edit_index < 0 and event.WhichOneof("event") == "result":
            self.cache_hit = event.result.cache_hit


def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.config import ServerConfig
    from services.server import build_server
    from tokenflow.synthetic import make_clip

    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "model": args.model,
            "frames": args.frames,
            "size": f"{args.size[0]}x{args.size[1]}",
            "steps": args.steps,
            "inversion_steps": args.inversion_steps,
            "blob_mib": args.blob_mib,
        },
    }

    with tempfile.TemporaryDirectory(prefix="tokenflow-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        config = ServerConfig(
            services="all",
            host="127.0.0.1",
            port=0,
            metrics_port=None,
            cache_dir=tmp / "cache",
            cache_size_bytes=max(4 << 30, 4 * args.blob_mib * MiB),
            model=args.model,
        )
        server = build_server(config)
        client = TokenFlowClient(f"127.0.0.1:{server.port}")
        try:
            client.wait_ready(30)
            decode = decode_spec(size=args.size)
            inversion = inversion_spec(steps=args.inversion_steps, edit_steps=args.steps, reconstruct=False)

            # Warm-up on another clip: loads the model and the kernels so "cold" means a cold *clip*.
            warmup_clip = make_clip(tmp / "warmup.mp4", frames=2, size=args.size, fps=8, seed=1)
            warmup_inversion = inversion_spec(steps=2, edit_steps=1, reconstruct=False)
            warmup_seconds, _ = timed(
                lambda: client.edit(str(warmup_clip), "warm-up", decode=decode, inversion=warmup_inversion)
            )

            clip = make_clip(tmp / "clip.mp4", frames=args.frames, size=args.size, fps=8, seed=0)
            prompt_a = edit_spec("a watercolor painting of shapes", seed=1)
            prompt_b = edit_spec("a marble sculpture of shapes", seed=1)

            cold_watch = InversionWatch()

            def cold() -> list[common_pb2.Result]:
                digest = client.upload(str(clip))
                return client.edit(digest, prompt_a, decode=decode, inversion=inversion, on_event=cold_watch)

            cold_seconds, cold_results = timed(cold)
            video_digest = client.upload(str(clip))  # already stored: returns at once

            warm_watch = InversionWatch()
            warm_seconds, warm_results = timed(
                lambda: client.edit(
                    video_digest, prompt_b, decode=decode, inversion=inversion, on_event=warm_watch
                )
            )
            repeat_seconds, repeat_results = timed(
                lambda: client.edit(video_digest, prompt_a, decode=decode, inversion=inversion)
            )

            blob = os.urandom(args.blob_mib * MiB)
            upload_seconds, blob_digest = timed(
                lambda: client.upload(blob, kind="video", filename="blob.bin")
            )
            download_seconds, blob_path = timed(lambda: client.download(blob_digest, tmp / "blob.out"))
            assert Path(blob_path).stat().st_size == len(blob)
        finally:
            client.close()
            server.stop(5)

    report["results"] = {
        "warmup_seconds": round(warmup_seconds, 3),
        "cold_edit_seconds": round(cold_seconds, 3),
        "cold_inversion_cache_hit": cold_watch.cache_hit,
        "warm_reedit_seconds": round(warm_seconds, 3),
        "warm_inversion_cache_hit": warm_watch.cache_hit,
        "warm_over_cold": round(warm_seconds / cold_seconds, 4),
        "repeat_edit_seconds": round(repeat_seconds, 3),
        "repeat_cache_hit": repeat_results[0].cache_hit,
        "upload_mib_per_s": round(args.blob_mib / upload_seconds, 1),
        "download_mib_per_s": round(args.blob_mib / download_seconds, 1),
        "test_model": cold_results[0].test_model,
        "cold_is_not_cache_hit": not cold_results[0].cache_hit,
        "warm_result_computed": not warm_results[0].cache_hit,
    }
    return report


def print_table(report: dict[str, Any]) -> None:
    r = report["results"]
    s = report["settings"]
    rows = [
        (
            "settings",
            f"{s['model']} model, {s['frames']} frames {s['size']}, T={s['steps']}, S={s['inversion_steps']}",
        ),
        ("cold edit (upload+invert+propagate)", f"{r['cold_edit_seconds']:.2f} s"),
        (
            "warm re-edit, new prompt",
            f"{r['warm_reedit_seconds']:.2f} s (inversion cache hit: {r['warm_inversion_cache_hit']})",
        ),
        ("warm / cold", f"{r['warm_over_cold']:.3f}"),
        ("repeat, same request", f"{r['repeat_edit_seconds']:.3f} s (cache hit: {r['repeat_cache_hit']})"),
        (f"upload {s['blob_mib']} MiB", f"{r['upload_mib_per_s']:.1f} MiB/s"),
        (f"download {s['blob_mib']} MiB", f"{r['download_mib_per_s']:.1f} MiB/s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=_size, default=(128, 128))
    parser.add_argument("--steps", type=int, default=50, help="editing steps T")
    parser.add_argument("--inversion-steps", type=int, default=50, help="DDIM inversion steps S")
    parser.add_argument("--blob-mib", type=int, default=64, help="size of the transfer-throughput blob")
    parser.add_argument("--json", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)

    m = machine()
    print(
        f"machine: {m['processor']} | {m['cpu_count']} CPUs | torch {m['torch']} with {m['torch_threads']} "
        f"threads | python {m['python']}"
    )
    report = run(args)
    print_table(report)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
