#!/usr/bin/env python
"""Memory and CPU of decoding hostile uploads with the library's limits (tokenflow.video + tokenflow.limits).

    python benchmarks/bench_hostile_video.py [--threads 1 2] [--real] [--json FILE]

Each case is generated (fuzz.hostile_inputs) and decoded the way a service decodes an upload (probe, then
iter_frames with the default DecodeSpec) in a fresh child interpreter, which reports its peak-RSS growth
(VmHWM of /proc/self/status after minus before the call), its CPU seconds (getrusage) and the outcome.
`--real` adds the issue's own shape, a real libx264 encode at 16000x16000 after a 64x64 stream (about
12 s and 1.1 GB to encode, in this process, before measuring). Prints a table and one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fuzz import hostile_inputs as hostile  # noqa: E402

CHILD = """
import json, resource, sys
from tokenflow import video
from tokenflow.limits import DecodeLimits

def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

path, threads = sys.argv[1], int(sys.argv[2])
limits = DecodeLimits(decoder_threads=threads)
before, start = peak_mb(), resource.getrusage(resource.RUSAGE_SELF)
frames, outcome = 0, "decoded"
try:
    video.probe(path, None, limits)
    for _ in video.iter_frames(path, limits=limits):
        frames += 1
except Exception as exc:
    outcome = type(exc).__name__ + (f"({exc.limit_name})" if getattr(exc, "limit_name", None) else "")
end = resource.getrusage(resource.RUSAGE_SELF)
cpu = end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime
print(json.dumps({"growth_mb": round(peak_mb() - before), "cpu_s": round(cpu, 2), "frames": frames,
                  "outcome": outcome}))
"""


def cases(real: bool) -> dict[str, bytes]:
    out = {
        "sps 64x64 -> 16000x16000 (mp4)": hostile.switching_mp4(16000, 16000),
        "sps 64x64 -> 16000x16000 (raw h264)": hostile.switching_h264(16000, 16000),
        "sps 64x64 -> 8192x8192 (mp4)": hostile.switching_mp4(8192, 8192),
        "y4m claiming 20000x20000": hostile.y4m(20000, 20000, frames=1, payload=bytes(4096)),
        "mkv claiming 10^7 frames": hostile.claiming_frames(10**7),
        "1,000 frames of 16x16, no count": hostile.encode(1000, (16, 16), fmt="h264", still=True),
        "random bytes": hostile.random_bytes(20_000),
        "truncated mp4": hostile.truncated(hostile.encode(12, (64, 48)), 0.5),
        "audio only": hostile.audio_only(),
    }
    if real:
        small = hostile.encode(3, (64, 64), fmt="h264")
        out["real encode 64x64 -> 16000x16000 (mp4)"] = hostile.as_mp4(
            small + hostile.encode(1, (16000, 16000), fmt="h264"), small
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="decoder_threads to measure")
    parser.add_argument("--real", action="store_true", help="add the real 16000x16000 encode (slow)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; {sys.version.split()[0]}; one child interpreter per case")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in cases(args.real).items():
            path = Path(tmp) / "upload"
            path.write_bytes(data)
            for threads in args.threads:
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), str(threads)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    timeout=600,
                    check=True,
                )
                row = {"case": name, "bytes": len(data), "threads": threads, **json.loads(proc.stdout)}
                results.append(row)
                print(
                    f"{name:42} {len(data):>8} B  threads={threads}  +{row['growth_mb']:>4} MB  "
                    f"{row['cpu_s']:>6.2f} s CPU  {row['frames']:>5} frames  {row['outcome']}"
                )
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
