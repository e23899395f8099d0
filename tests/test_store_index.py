"""The local tier's SQLite index: no scans on put/get, exact totals, LRU from the index, crash-safe deletes,
listing, pins seen by Delete, and the old layout's upgrade.

Speed itself is measured by benchmarks/bench_store.py; here the *shape* of the work is checked: the
statements a put or get runs are the same at 10 and at 1,000 artifacts, and none scans a table.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import diskcache
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.store import ArtifactInUse, ArtifactStore, artifact_key
from services.store.tier import MAX_PAGE_SIZE
from tokenflow.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent


def key_of(i: int | str) -> str:
    return artifact_key("test", {"i": i})


def blob_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.val"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArtifactStore]:
    s = ArtifactStore(tmp_path / "c", size_limit=10**9)
    yield s
    s.close()


def fill(s: ArtifactStore, n: int, start: int = 0, size: int = 16) -> list[str]:
    keys = [key_of(i) for i in range(start, start + n)]
    for k in keys:
        s.put("test", k, {"a.bin": os.urandom(size)})
    return keys


class Statements:
    """Records the SQL the local tier's index connection runs (sqlite3's trace hook)."""

    def __init__(self, s: ArtifactStore) -> None:
        self.db: sqlite3.Connection = s.local._db
        self.seen: list[str] = []

    def __enter__(self) -> Statements:
        self.db.set_trace_callback(self.seen.append)
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.set_trace_callback(None)

    def shapes(self) -> list[str]:
        """Statements with literals blanked (the trace expands bound values)."""
        import re

        return [re.sub(r"'[^']*'|\b\d+\b", "?", s) for s in self.seen]

    def plans(self) -> list[str]:
        out = []
        for sql in self.seen:
            if not sql.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT")):
                continue
            self.db.set_trace_callback(None)
            rows = self.db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
            out += [f"{r[-1]}  <- {sql[:60]}" for r in rows]
        return out


def test_put_and_get_run_the_same_indexed_statements_at_any_size(store: ArtifactStore) -> None:
    def profile(label: str) -> tuple[list[str], list[str], list[str], list[str]]:
        key = key_of(f"probe-{label}")
        # The periodic orphan sweep (every 30 s of puts) is not part of a put's own cost: keep it out.
        store.local._last_expire = time.monotonic()
        with Statements(store) as put:
            store.put("test", key, {"a.bin": b"probe" * 10})
        with Statements(store) as get:
            art = store.get(key)
            assert art is not None and art.read("a.bin") == b"probe" * 10
        return put.shapes(), get.shapes(), put.plans(), get.plans()

    fill(store, 10)
    small = profile("small")
    fill(store, 1000, start=10)
    large = profile("large")
    assert small[0] == large[0] and small[1] == large[1]  # same statements, whatever the count
    for plan in large[2] + large[3]:
        # SQLite says SCAN for a full table walk and SEARCH for an index lookup.
        assert not plan.startswith("SCAN"), plan


def test_totals_follow_every_change(tmp_path: Path) -> None:
    m = SimpleNamespace(cache_bytes=Gauge("g", "g", registry=CollectorRegistry()))
    s = ArtifactStore(tmp_path / "c", size_limit=5_000, metrics=m)
    keys = fill(s, 10, size=400)
    assert s.total_bytes() == 4_000 and s.count() == 10
    s.delete(keys[0])
    fill(s, 5, start=100, size=400)  # 5 600 > 5 000: the oldest go
    with sqlite3.connect(s.directory / "index.db") as db:
        (actual,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM artifacts").fetchone()
        (count,) = db.execute("SELECT COUNT(*) FROM artifacts").fetchone()
    assert s.total_bytes() == actual <= 5_000 and s.count() == count == 12
    assert not any(s.contains(k) for k in keys[1:3]) and all(s.contains(k) for k in keys[3:])
    s.close()
    # After a restart the gauge is right at once, before any put.
    gauge = Gauge("g2", "g2", registry=CollectorRegistry())
    s2 = ArtifactStore(tmp_path / "c", size_limit=5_000, metrics=SimpleNamespace(cache_bytes=gauge))
    assert gauge._value.get() == actual  # type: ignore[attr-defined]
    s2.close()


def test_eviction_follows_access_order_from_the_index(tmp_path: Path) -> None:
    r = CollectorRegistry()
    m = SimpleNamespace(cache_evictions_total=Counter("ev", "ev", ["kind"], registry=r))
    s = ArtifactStore(tmp_path / "c", size_limit=100 * 100, metrics=m)
    keys = fill(s, 100, size=100)  # exactly full
    for k in keys[:10]:
        assert s.get(k) is not None  # the first ten are now the most recent
    fill(s, 20, start=1000, size=100)
    assert all(s.contains(k) for k in keys[:10])
    assert not any(s.contains(k) for k in keys[10:30]) and all(s.contains(k) for k in keys[30:])
    assert r.get_sample_value("ev_total", {"kind": "test"}) == 20
    assert len(blob_files(s.directory)) == 100
    s.close()


def test_list_pages_by_kind(store: ArtifactStore) -> None:
    keys = sorted(fill(store, 7))
    store.put("video", artifact_key("video", {"x": 1}), {"v.mp4": b"v"})
    first, token = store.list("test", page_size=3)
    second, token2 = store.list("test", page_size=3, page_token=token)
    third, token3 = store.list("test", page_size=3, page_token=token2)
    assert [m.key for m in first + second + third] == keys and token3 == ""
    assert [m.kind for m in store.list("video")[0]] == ["video"]
    assert store.list("nothing-here") == ([], "")
    with pytest.raises(SpecError):
        store.list("video", page_token=token)  # a token of another listing
    with pytest.raises(SpecError):
        store.list("test", page_token="garbage")
    with pytest.raises(SpecError):
        store.list("test", page_size=-1)
    with pytest.raises(SpecError):
        store.list("Bad Kind")
    assert MAX_PAGE_SIZE == 1000 and len(store.list("test", page_size=10**6)[0]) == 7


_PIN_HOLDER = """
import sys
from services.store import ArtifactStore
s = ArtifactStore(sys.argv[1], size_limit=10**7)
with s.pin(sys.argv[2]):
    print("pinned", flush=True)
    sys.stdin.readline()
"""


def test_delete_refuses_a_pinned_artifact(tmp_path: Path) -> None:
    s = ArtifactStore(tmp_path / "c", size_limit=10**7)
    key = fill(s, 1)[0]
    assert not s.is_pinned(key)
    with s.pin(key):
        assert s.is_pinned(key)
        with pytest.raises(ArtifactInUse):
            s.delete(key, if_unpinned=True)
        assert s.contains(key)
    assert not s.is_pinned(key) and list((s.directory / "_pins").iterdir()) == []
    # Pinned by another process on this machine.
    child = subprocess.Popen(
        [sys.executable, "-c", _PIN_HOLDER, str(s.directory), key],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "pinned"
        assert s.is_pinned(key)
        with pytest.raises(ArtifactInUse):
            s.delete(key, if_unpinned=True)
    finally:
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(timeout=30)
    assert s.delete(key, if_unpinned=True) and not s.contains(key) and blob_files(s.directory) == []
    assert not s.delete(key, if_unpinned=True)
    s.close()


def test_a_crash_mid_delete_is_finished_by_the_next_cull(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    s = ArtifactStore(directory, size_limit=10**7)
    key = fill(s, 1, size=5000)[0]
    s.close()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import os, sys
                from services.store import ArtifactStore
                from services.store.local import LocalTier
                LocalTier._delete_blobs = lambda self, key, nonce, names: os._exit(3)  # die once unpublished
                ArtifactStore(sys.argv[1], size_limit=10**7).delete(sys.argv[2])
                """
            ),
            str(directory),
            key,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    s = ArtifactStore(directory, size_limit=10**7)
    assert not s.contains(key) and s.total_bytes() == 0
    assert len(blob_files(directory)) == 1  # left behind, but recorded as doomed
    s.cull()
    assert blob_files(directory) == []
    s.close()


def test_a_cache_of_the_old_layout_is_cleared(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    old = diskcache.Cache(str(directory))
    old.set(f"m:{key_of('old')}", '{"kind": "test"}')
    old.set(f"b:{key_of('old')}:0123456789abcdef:a.bin", b"x" * 100)
    old.close()
    s = ArtifactStore(directory, size_limit=10**7)
    assert len(s.local.cache) == 0 and not s.contains(key_of("old"))
    key = fill(s, 1)[0]
    s.close()
    s = ArtifactStore(directory, size_limit=10**7)  # reopening the new layout keeps it
    assert s.contains(key)
    s.close()


def test_cull_removes_pin_files_of_crashed_holders(tmp_path: Path) -> None:
    s = ArtifactStore(tmp_path / "c", size_limit=10**7)
    key = fill(s, 1)[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys\nfrom services.store import ArtifactStore\n"
            "s = ArtifactStore(sys.argv[1], size_limit=10**7)\n"
            "with s.pin(sys.argv[2]):\n    os._exit(0)\n",
            str(s.directory),
            key,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (s.directory / "_pins").iterdir()] == [f"{key}.pin"]
    assert not s.is_pinned(key)  # the kernel dropped the dead holder's lock
    s.cull()
    assert list((s.directory / "_pins").iterdir()) == [] and s.contains(key)
    s.close()
