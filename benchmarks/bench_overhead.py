#!/usr/bin/env python
"""Overhead of the services: the same edit through `--services all` against the library, side by side.

    python benchmarks/bench_overhead.py [--frames 16 --size 128x128 --steps 50 --inversion-steps 50]
                                        [--rounds 2] [--json FILE]

One process holds both sides: the library (`invert_video` + `render_edit`, what `tokenflow edit` runs) on
the main thread, and an embedded server with every service on loopback, driven by `clients.TokenFlowClient`
from the same thread. Each round uses a fresh clip (so "cold" is cold on both sides) and measures, in an
order that alternates from round to round so that a drift in the machine's load hits both sides alike:

  * cold edit: library `invert_video` + `render_edit` to an mp4, against the server's upload + invert +
    edit + download of the mp4 (the server also stores the inversion, which the library does not);
  * warm edit, another prompt on the same clip: library `Inversion.load` of the saved inversion +
    `render_edit`, against the server's edit with its inversion a cache hit + download.

The library and the server get the same specs: the proto specs the client sends, converted to library specs
by the server's own converters. Prints the machine, each measurement, the ratios server / library per round
and over all rounds, then one JSON object (also written to --json when given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
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
from tokenflow.threads import loaded_libgomp_path, release_openmp_team  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures were measured on (they mean little without it)."""
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "openmp_runtime": loaded_libgomp_path() or "not libgomp",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def voluntary_switches() -> int:
    """The process's voluntary context switches so far: OpenMP workers that sleep between parallel
    regions instead of spinning (libgomp's throttled mode) show up here by the ten thousand."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


class InversionWatch:
    """on_event callback remembering whether the Editor's inversion was a cache hit."""

    def __init__(self) -> None:
        self.cache_hit: bool | None = None

    def __call__(self, event: Any) -> None:
        if event.edit_index < 0 and event.WhichOneof("event") == "result":
            self.cache_hit = event.result.cache_hit


def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.config import ServerConfig
    from services.convert import decode_spec_from_proto, edit_spec_from_proto, inversion_spec_from_proto
    from services.server import build_server
    from tokenflow.inversion import Inversion
    from tokenflow.models import load_model
    from tokenflow.pipeline import invert_video, render_edit
    from tokenflow.synthetic import make_clip

    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "model": args.model,
            "frames": args.frames,
            "size": f"{args.size[0]}x{args.size[1]}",
            "steps": args.steps,
            "inversion_steps": args.inversion_steps,
            "rounds": args.rounds,
        },
    }
    decode_msg = decode_spec(size=args.size)
    inversion_msg = inversion_spec(steps=args.inversion_steps, edit_steps=args.steps, reconstruct=False)
    prompts = (edit_spec("a watercolor painting of shapes", seed=1), edit_spec("a marble sculpture", seed=1))
    decode, inv_spec = decode_spec_from_proto(decode_msg), inversion_spec_from_proto(inversion_msg)
    lib_specs = [edit_spec_from_proto(p) for p in prompts]

    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="tokenflow-overhead-") as tmp_dir:
        tmp = Path(tmp_dir)
        config = ServerConfig(
            services="all",
            host="127.0.0.1",
            port=0,
            metrics_port=None,
            cache_dir=tmp / "cache",
            model=args.model,
        )
        server = build_server(config)
        client = TokenFlowClient(f"127.0.0.1:{server.port}")
        try:
            client.wait_ready(30)
            model = load_model(args.model, device="cpu", dtype="float32")

            # Warm-up of both sides on a small clip: model load, first-call kernels and allocations.
            warm_clip = make_clip(tmp / "warm-up.mp4", frames=2, size=args.size, fps=8, seed=99)
            tiny_inv = inversion_spec(steps=2, edit_steps=1, reconstruct=False)
            client.edit(str(warm_clip), "warm-up", decode=decode_msg, inversion=tiny_inv)
            tiny = invert_video(model, warm_clip, decode, inversion_spec_from_proto(tiny_inv))
            render_edit(model, tiny, lib_specs[0], tmp / "warm-up-lib.mp4")
            release_openmp_team()  # the main thread computed: park no team beside the server's workers

            for r in range(args.rounds):
                clip = make_clip(tmp / f"clip{r}.mp4", frames=args.frames, size=args.size, fps=8, seed=r)
                saved = tmp / f"inversion{r}"

                def lib_cold(clip: Path = clip, saved: Path = saved, r: int = r) -> None:
                    inversion = invert_video(model, clip, decode, inv_spec)
                    render_edit(model, inversion, lib_specs[0], tmp / f"lib-cold{r}.mp4", audio_source=clip)
                    inversion.save(saved)  # for the warm edit; the server stores its inversion too

                def lib_warm(clip: Path = clip, saved: Path = saved, r: int = r) -> None:
                    inversion = Inversion.load(saved)
                    render_edit(model, inversion, lib_specs[1], tmp / f"lib-warm{r}.mp4", audio_source=clip)

                def srv(which: int, clip: Path = clip, r: int = r) -> bool | None:
                    watch = InversionWatch()
                    results = client.edit(
                        str(clip), prompts[which], decode=decode_msg, inversion=inversion_msg, on_event=watch
                    )
                    if results[0].cache_hit:
                        raise RuntimeError("the server's edit was a cache hit: nothing was measured")
                    client.download(results[0].digest, tmp / f"srv{which}-{r}.mp4")
                    return watch.cache_hit

                def library(fn: Callable[[], None]) -> float:
                    seconds, _ = timed(fn)
                    release_openmp_team()
                    return seconds

                measured: dict[str, float] = {}
                library_first = r % 2 == 0
                for kind, lib_fn, which in (("cold", lib_cold, 0), ("warm", lib_warm, 1)):
                    for side in ("library", "server") if library_first else ("server", "library"):
                        switches = voluntary_switches()
                        if side == "library":
                            seconds = library(lib_fn)
                        else:
                            seconds, hit = timed(lambda w=which: srv(w))
                            if hit is not (kind == "warm"):
                                raise RuntimeError(f"{kind} edit: the server's inversion cache hit was {hit}")
                        measured[f"{kind}_{side}_s"] = round(seconds, 3)
                        measured[f"{kind}_{side}_voluntary_switches"] = voluntary_switches() - switches
                        log(
                            f"round {r} {kind} {side}: {seconds:.2f} s, "
                            f"{measured[f'{kind}_{side}_voluntary_switches']} voluntary context switches "
                            f"(load {os.getloadavg()[0]:.2f})"
                        )
                measured["cold_ratio"] = round(measured["cold_server_s"] / measured["cold_library_s"], 4)
                measured["warm_ratio"] = round(measured["warm_server_s"] / measured["warm_library_s"], 4)
                rounds.append(measured)
        finally:
            client.close()
            server.stop(5)

    def total(key: str) -> float:
        return sum(m[key] for m in rounds)

    report["rounds"] = rounds
    report["results"] = {
        "cold_server_over_library": round(total("cold_server_s") / total("cold_library_s"), 4),
        "warm_server_over_library": round(total("warm_server_s") / total("warm_library_s"), 4),
        # robust to a load spike that hits one measurement of one round (other jobs on the machine)
        "cold_median_ratio": round(statistics.median(m["cold_ratio"] for m in rounds), 4),
        "warm_median_ratio": round(statistics.median(m["warm_ratio"] for m in rounds), 4),
    }
    report["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return report


def print_table(report: dict[str, Any]) -> None:
    m, s = report["machine"], report["settings"]
    print(
        f"machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads, "
        f"OpenMP {m['openmp_runtime']}, Python {m['python']}, {m['platform']}"
    )
    print(f"load average: {m['load_average_at_start']} at start, {m['load_average_at_end']} at end")
    print(
        f"input: {s['frames']} frames {s['size']}, {s['inversion_steps']} inversion + {s['steps']} edit "
        f"steps, model {s['model']}, {s['rounds']} rounds"
    )
    head = ("round", "cold lib", "cold srv", "ratio", "warm lib", "warm srv", "ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (5, 9, 9, 6, 9, 9, 6), strict=True)))
    for i, r in enumerate(report["rounds"]):
        print(
            f"{i:>5} {r['cold_library_s']:>8.2f}s {r['cold_server_s']:>8.2f}s {r['cold_ratio']:>6.3f} "
            f"{r['warm_library_s']:>8.2f}s {r['warm_server_s']:>8.2f}s {r['warm_ratio']:>6.3f}"
        )
    res = report["results"]
    print(
        f"server / library over all rounds: cold {res['cold_server_over_library']:.3f}x, "
        f"warm {res['warm_server_over_library']:.3f}x; median of the rounds' ratios: "
        f"cold {res['cold_median_ratio']:.3f}x, warm {res['warm_median_ratio']:.3f}x"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=_size, default=(128, 128), help="WxH (default 128x128)")
    p.add_argument("--steps", type=int, default=50, help="edit steps (default 50)")
    p.add_argument("--inversion-steps", type=int, default=50, help="inversion steps (default 50)")
    p.add_argument("--rounds", type=int, default=2, help="cold+warm pairs per side (default 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    report = run(args)
    print_table(report)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
