"""Servers built in the test process on loopback, and their Prometheus /metrics as the text parser reads it.

One tiny `ServerConfig` for every test that builds a server in-process, so a setting the tests must pin
(a loopback host, an ephemeral port, the tiny preset on CPU, a bounded cache) is written once and each
test states only what it is about. One scrape and one lookup of the real text exposition, so a counter
is read the same way in every test.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from services.config import ServerConfig
    from services.model_host import ModelHost
    from services.server import RunningServer

# Every sample of a /metrics page, by (sample name, its labels).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def tiny_server_config(cache_dir: Path, **overrides: Any) -> ServerConfig:
    """All services on 127.0.0.1 and an ephemeral port, the tiny preset on CPU, a 1 GiB cache, no metrics
    port (``metrics_port=0`` for an ephemeral one); `overrides` are any other `ServerConfig` fields."""
    from services.config import ServerConfig  # the client tests import the server side only when they serve

    settings: dict[str, Any] = {
        "services": "all",
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": None,
        "cache_dir": cache_dir,
        "cache_size_bytes": 1 << 30,
        "model": "tiny",
        "device": "cpu",
    }
    return ServerConfig(**(settings | overrides))


def stage_server(directory: Path, host: ModelHost | None, **overrides: Any) -> RunningServer:
    """The three stage services on `host` (a shared ModelHost; None where no stage needs the model),
    a 200 MiB cache in `directory`, no model preload; `overrides` as for `tiny_server_config`."""
    from services.config import STAGES
    from services.server import build_server

    stages: dict[str, Any] = {
        "services": frozenset(STAGES), "cache_size_bytes": 200 << 20, "preload_model": False,
    }  # fmt: skip
    return build_server(tiny_server_config(directory / "cache", **(stages | overrides)), model_host=host)


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    """Every sample of a server's /metrics page, parsed with prometheus_client's text parser."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of sample `name` over the series whose labels include `labels` (0 when there is none):
    every label given is one series, fewer sum over the rest (all stages' jobs, say)."""
    wanted = labels.items()
    return sum(v for (n, series), v in samples.items() if n == name and wanted <= dict(series).items())
