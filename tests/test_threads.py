"""tokenflow.threads: a thread that computed hands its OpenMP team back, with real threads and real torch."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from tokenflow.threads import loaded_libgomp_path, release_openmp_team


def native_threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def parallel_work() -> torch.Tensor:
    """Enough elements for torch to start an OpenMP parallel region (its grain is 32768)."""
    return torch.arange(1 << 20, dtype=torch.float32).mul_(1e-6).exp_()


def gone_soon(tids: set[int], seconds: float = 5.0) -> bool:
    """A released worker leaves the task list once it has finished exiting."""
    deadline = time.monotonic() + seconds
    while tids & native_threads():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


needs_libgomp = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task") or loaded_libgomp_path() is None or torch.get_num_threads() < 2,
    reason="needs Linux, torch on GNU OpenMP and at least 2 torch threads",
)


@needs_libgomp
def test_a_thread_releases_its_team_and_computes_again_afterwards() -> None:
    expected = parallel_work()
    seen: dict[str, object] = {}

    def body() -> None:
        before = native_threads()
        seen["first"] = parallel_work()
        team = native_threads() - before  # libgomp started this thread's workers
        seen["team"] = team
        seen["released"] = release_openmp_team()
        seen["gone"] = gone_soon(team)  # checked while this thread lives: its exit would free them too
        seen["again"] = parallel_work()  # a new team, same numbers
        seen["released_twice"] = release_openmp_team() and release_openmp_team()  # no team: harmless

    t = threading.Thread(target=body)
    t.start()
    t.join()
    team = seen["team"]
    assert isinstance(team, set) and team, "a parallel region on a fresh thread starts OpenMP workers"
    assert seen["released"] is True and seen["released_twice"] is True
    assert seen["gone"] is True, "the released team's threads outlived the release"
    assert torch.equal(seen["first"], expected) and torch.equal(seen["again"], expected)  # type: ignore[arg-type]


@needs_libgomp
def test_loading_the_model_leaves_no_team_on_the_loading_thread() -> None:
    """Without preload, a long-lived gRPC handler thread may be the one that loads (services.model_host)."""
    from services.model_host import ModelHost

    def load() -> None:
        ModelHost("tiny", device="cpu", dtype="float32").get()

    first = threading.Thread(target=load)  # starts the process-wide pools (tokenizers' rayon ...) once
    first.start()
    first.join()
    seen: dict[str, object] = {}

    def body() -> None:
        before = native_threads()
        load()
        left = native_threads() - before
        seen["left"] = left
        seen["gone"] = gone_soon(left)  # checked while this thread lives: its exit would free a team too

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen["gone"] is True, f"threads started while loading outlived it: {seen['left']}"
