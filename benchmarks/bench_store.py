"""Artifact store at scale: put and get latency with 100, 1,000, 10,000 and 100,000 small artifacts stored.

What it shows: put and get cost does not grow with the number of stored artifacts (the local tier keeps
sizes and access times in a SQLite index instead of rescanning manifests). The ratio of the median at
100,000 to the median at 100 must stay under 2. With ``--baseline`` (default) the store as it was before
the index (the single-module version in git history) is measured at 100 and 1,000 artifacts beside it.

How: one store directory grows through the sizes. Between sizes it is filled fast -- the same blob files
and index rows `put` writes, batched in large transactions -- and at each size `--ops` fresh artifacts are
put and `--ops` random stored ones are got (a verified read of the file) through the public API; the
figures are per-operation medians and 90th percentiles. Eviction is on (the limit is just above what the
run stores), so every put runs the after-put eviction check.

    .venv/bin/python benchmarks/bench_store.py                 # ~3 min here
    .venv/bin/python benchmarks/bench_store.py --sizes 100,1000 --no-baseline   # smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import platform
import random
import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import diskcache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.store import ArtifactStore, artifact_key  # noqa: E402
from services.store.local import blob_key  # noqa: E402
from services.store.model import FileEntry, Manifest  # noqa: E402

PAYLOAD = 256  # bytes per artifact: "small" (a JSON result, a tiny upload)


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{platform.platform()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, diskcache {diskcache.__version__}; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def rounded(r: dict[str, float]) -> str:
    return json.dumps({k: round(v, 3) for k, v in r.items()})


def key(i: int) -> str:
    return artifact_key("bench", {"i": i})


def fill(store: ArtifactStore, start: int, stop: int, batch: int = 2000) -> None:
    """Store artifacts start..stop-1 as `put` would (blob file, then index row), in big transactions."""
    local = store.local
    for lo in range(start, stop, batch):
        rows = []
        with local.cache.transact():
            for i in range(lo, min(stop, lo + batch)):
                k, nonce, data = key(i), secrets.token_hex(8), os.urandom(PAYLOAD)
                local.cache.set(blob_key(k, nonce, "a.bin"), io.BytesIO(data), read=True)
                entry = FileEntry(len(data), hashlib.sha256(data).hexdigest(), "application/octet-stream")
                m = Manifest("bench", k, time.time(), {}, {"a.bin": entry}, "a.bin")
                rows.append(
                    (k, "bench", nonce, m.total_size, time.time_ns(), '["a.bin"]', m.to_json().decode())
                )
        with local._transaction() as db:
            db.executemany(
                "INSERT INTO artifacts (key, kind, nonce, size, atime, names, manifest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )


def measure(store: Any, stored: int, ops: int, next_id: int, rng: random.Random) -> dict[str, float]:
    puts, gets = [], []
    for j in range(ops):
        k = key(next_id + j)
        data = os.urandom(PAYLOAD)
        t = time.perf_counter()
        store.put("bench", k, {"a.bin": data})
        puts.append(time.perf_counter() - t)
    for _ in range(ops):
        k = key(rng.randrange(stored))
        t = time.perf_counter()
        art = store.get(k)
        assert art is not None, "a stored artifact was missing"
        art.read("a.bin")
        gets.append(time.perf_counter() - t)
    q = statistics.quantiles
    return {
        "put_p50_ms": 1e3 * statistics.median(puts),
        "put_p90_ms": 1e3 * q(puts, n=10)[-1],
        "get_p50_ms": 1e3 * statistics.median(gets),
        "get_p90_ms": 1e3 * q(gets, n=10)[-1],
    }


def old_store_module() -> ModuleType | None:
    """The single-module store from before the index (git history), or None if git cannot give it."""
    try:
        commit = subprocess.run(
            ["git", "log", "--diff-filter=D", "--format=%H", "-1", "--", "services/store.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        source = subprocess.run(
            ["git", "show", f"{commit}~1:services/store.py"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    if not commit:
        return None
    path = Path(tempfile.mkdtemp()) / "store_before_index.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("store_before_index", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,1000,10000,100000")
    p.add_argument("--ops", type=int, default=300, help="puts and gets measured at each size")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dir", default=None, help="where to build the store (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(0)
    print("machine:", machine(), flush=True)
    results: dict[str, Any] = {"machine": machine(), "payload_bytes": PAYLOAD, "ops": args.ops, "store": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        limit = (max(sizes) + args.ops * (len(sizes) + 1)) * PAYLOAD * 2
        store = ArtifactStore(Path(tmp) / "indexed", size_limit=limit)
        stored, next_id = 0, 10**9
        fill(store, 0, min(sizes))
        stored = min(sizes)
        measure(store, stored, 50, next_id - 10**6, rng)  # warm-up (imports, page cache), not counted
        for n in sizes:
            t = time.perf_counter()
            fill(store, stored, n)
            stored = n
            fill_s = time.perf_counter() - t
            r = measure(store, stored, args.ops, next_id, rng)
            next_id += args.ops
            results["store"][n] = {**r, "fill_seconds": fill_s}
            print(
                f"indexed store, {n:>7} artifacts: {rounded(r)}",
                flush=True,
            )
        store.close()
        if args.baseline:
            old = old_store_module()
            if old is None:
                print("baseline: skipped (no git history)")
            else:
                results["before_index"] = {}
                s = old.ArtifactStore(Path(tmp) / "before", size_limit=limit)
                stored = 0
                for n in (100, 1000):
                    for i in range(stored, n):
                        s.put("bench", key(i), {"a.bin": os.urandom(PAYLOAD)})
                    stored = n
                    r = measure(s, stored, min(args.ops, 100), next_id, rng)
                    next_id += args.ops
                    results["before_index"][n] = r
                    print(
                        f"store before the index, {n:>5} artifacts: {rounded(r)}",
                        flush=True,
                    )
                s.close()
    lo, hi = results["store"][min(sizes)], results["store"][max(sizes)]
    results["ratio_put"] = hi["put_p50_ms"] / lo["put_p50_ms"]
    results["ratio_get"] = hi["get_p50_ms"] / lo["get_p50_ms"]
    results["machine_at_end"] = machine()
    print()
    print(f"| stored artifacts | put p50 | put p90 | get p50 | get p90 |  (ms, {PAYLOAD}-byte artifacts)")
    print("|---:|---:|---:|---:|---:|")
    for n, r in results["store"].items():
        print(
            f"| {n:,} | {r['put_p50_ms']:.2f} | {r['put_p90_ms']:.2f} | "
            f"{r['get_p50_ms']:.2f} | {r['get_p90_ms']:.2f} |"
        )
    for n, r in results.get("before_index", {}).items():
        print(
            f"| {n:,} (before the index) | {r['put_p50_ms']:.2f} | {r['put_p90_ms']:.2f} | "
            f"{r['get_p50_ms']:.2f} | {r['get_p90_ms']:.2f} |"
        )
    print(
        f"\nratio {max(sizes):,} / {min(sizes):,} artifacts (medians): put {results['ratio_put']:.2f}x, "
        f"get {results['ratio_get']:.2f}x (must stay under 2)"
    )
    print("machine at the end:", results["machine_at_end"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if max(results["ratio_put"], results["ratio_get"]) < 2 else 1


if __name__ == "__main__":
    sys.exit(main())
