"""A server as a separate OS process, for tests over real processes: it learns its ports from the
server's start-up line (`serving SERVICES on HOST:PORT (metrics :PORT)`).

Shared by the end-to-end tests (`tokenflow serve`, the command users run) and the fleet tests
(`python -m services.server`, on several loopback addresses).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENFLOW_SERVE = ("-m", "tokenflow.cli", "serve")
SERVICES_SERVER = ("-m", "services.server")


class ServeProcess:
    """One server process; `port`/`metrics_port` are known once `wait_serving` returned."""

    LINE = re.compile(r"^serving (\S+) on (\S+):(\d+) \((?:metrics :(\d+)|metrics off)\)")

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_dir: Path,
        host: str = "127.0.0.1",
        entry: Sequence[str] = TOKENFLOW_SERVE,
    ) -> None:
        self.name, self.host = name, host
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            # /metrics on the same loopback address as gRPC (it binds 127.0.0.1 unless told otherwise)
            [sys.executable, *entry, "--host", host, "--metrics-host", host, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.port = 0
        self.metrics_port: int | None = None

    def wait_serving(self, timeout: float = 120.0) -> ServeProcess:
        """Read stdout until the start-up line (on a thread, so a hang cannot block the test)."""
        lines: list[str] = []

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                lines.append(line)
                if self.LINE.match(line):
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        match = self.LINE.match(lines[-1]) if lines else None
        if match is None:
            raise AssertionError(f"{self.name} did not start: {lines} / {self.log_path.read_text()[-3000:]}")
        self.port = int(match.group(3))
        self.metrics_port = int(match.group(4)) if match.group(4) else None
        return self

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, and the exit code once the process has drained."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"{self.name} did not exit within {timeout} s of SIGTERM") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def close(self) -> None:
        self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
