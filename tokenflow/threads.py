"""Per-thread OpenMP resources: a thread that is done with torch work hands its OpenMP team back.

Why this exists: torch's CPU kernels run their parallel loops on OpenMP, which in the Linux wheels is GNU
libgomp. libgomp gives every native thread that starts a parallel region its own team of worker threads and
keeps that team until the thread exits. Whenever the process holds more libgomp threads than it has CPUs,
libgomp assumes the machine is oversubscribed and cuts the spin-wait at every barrier from about 300,000
iterations to 100, so the workers sleep on a futex between the many short parallel regions of a diffusion
step and each region pays a wake-up.

A server whose stage workers are long-lived threads keeps the idle team of every stage that ever computed:
after the inversion stage ran, its parked team plus the propagation stage's team exceed two CPUs, and the
edit that follows runs throttled (about 100 times as many context switches, 35-50 % slower on an idle
2-core machine than the same call on the library's main thread). Releasing the team when a job ends leaves
one team per computing thread, as in the library.

The release is OpenMP 5.0's `omp_pause_resource(omp_pause_soft, <host>)`, which in libgomp frees the
calling thread's team and nothing else, so it is safe while other threads compute; the thread's next
parallel region builds a new team (one thread start). Other OpenMP runtimes (LLVM libomp, Intel libiomp)
pause process-wide state instead, so for them this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import threading

OMP_PAUSE_SOFT = 1
"""`omp_pause_soft` of `omp_pause_resource_t` (OpenMP 5.0): release threads, keep data."""

_lock = threading.Lock()
_libgomp: ctypes.CDLL | None = None


def loaded_libgomp_path() -> str | None:
    """Path of the GNU OpenMP runtime mapped into this process (torch's bundled copy), or None.

    Found in /proc/self/maps rather than by name, because wheels may bundle it under a hashed name
    (``libgomp-<hash>.so.1``) and a second, unloaded libgomp on the system would be the wrong one.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6:
                    path = fields[5].strip()
                    name = os.path.basename(path)
                    if name.startswith("libgomp") and ".so" in name:
                        return path
    except OSError:  # not Linux
        return None
    return None


def _runtime() -> ctypes.CDLL | None:
    """The loaded libgomp, if any; looked up again until found (torch may be imported later)."""
    global _libgomp
    with _lock:
        if _libgomp is None:
            path = loaded_libgomp_path()
            if path is not None:
                lib = ctypes.CDLL(path)  # already mapped: dlopen returns the same handle
                if hasattr(lib, "omp_pause_resource") and hasattr(lib, "omp_get_initial_device"):
                    lib.omp_pause_resource.argtypes = [ctypes.c_int, ctypes.c_int]
                    lib.omp_pause_resource.restype = ctypes.c_int
                    lib.omp_get_initial_device.restype = ctypes.c_int
                    _libgomp = lib
        return _libgomp


def release_openmp_team() -> bool:
    """Free the calling thread's OpenMP worker team; True if a libgomp was there to ask.

    Call it when a thread that ran torch CPU work goes idle but stays alive (a job worker between jobs, a
    process's main thread that embeds a server after computing itself). Harmless when the thread has no
    team, and a no-op without libgomp (CUDA-only work, other OpenMP runtimes, non-Linux).
    """
    lib = _runtime()
    if lib is None:
        return False
    return lib.omp_pause_resource(OMP_PAUSE_SOFT, lib.omp_get_initial_device()) == 0
