"""Server configuration: what one `tokenflow serve` process hosts and how.

One dataclass, built from command-line flags by `services.server.main` or directly by tests, so the
same code runs all-in-one (``--services all``) or as one stage per deployment.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.limits import DEFAULT_UPLOAD_IDLE_SECONDS, HEALTH_RESERVE
from services.request_limits import HARD_LIMITS, RequestLimits, flag
from tokenflow.limits import MAX_DECODED_FRAMES, MAX_PIXELS_PER_FRAME, DecodeLimits

STAGES: tuple[str, ...] = ("inversion", "keyframes", "propagation")
"""The GPU stages, each its own gRPC service sharing one model per process."""
SERVICES: tuple[str, ...] = (*STAGES, "editor", "artifacts")
"""Every service name `--services` accepts; ``artifacts`` is always served."""

DEFAULT_CACHE_DIR = Path("~/.cache/tokenflow-service").expanduser()
GiB = 1 << 30

_SIZE_UNITS: tuple[tuple[str, int], ...] = (
    ("kB", 10**3), ("KiB", 1 << 10), ("MB", 10**6), ("MiB", 1 << 20),
    ("GB", 10**9), ("GiB", 1 << 30), ("TB", 10**12), ("TiB", 1 << 40),
)  # fmt: skip
"""The size units, spelt as `format_size` writes them: kB (10^3), KiB (2^10), ... TB, TiB."""
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    **{unit.lower(): factor for unit, factor in _SIZE_UNITS},
    **{unit[0].lower(): factor for unit, factor in _SIZE_UNITS if not unit.endswith("iB")},
    **{unit[:2].lower(): factor for unit, factor in _SIZE_UNITS if unit.endswith("iB")},
}
"""What `parse_size` reads, case-insensitively: those units, k/M/G/T alone, Kubernetes' Ki/Mi/Gi/Ti."""
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from a human size: ``"50GB"`` (10^9), ``"512MiB"`` (2^20), ``"1.5G"``, ``"1048576"``.

    Decimal units (kB, MB, GB, TB) and binary ones (KiB, MiB, GiB, TiB; also the Kubernetes-style Ki, Mi,
    Gi, Ti) are both accepted, case-insensitively, so the same string works here and in manifests.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size cannot be negative, got {text}")
        return text
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as a size: use a number with an optional unit, e.g. 20GB, 512MiB, 1048576"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"size {text!r} is too large")
    return int(value)


def parse_services(text: str | Iterable[str]) -> frozenset[str]:
    """``"all"`` or a comma list (``"inversion,editor"``) -> service names; ``artifacts`` is always added."""
    items = [s.strip().lower() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    if not items:
        raise ValueError("--services needs at least one service name (or 'all')")
    if "all" in items:
        return frozenset(SERVICES)
    unknown = sorted(set(items) - set(SERVICES))
    if unknown:
        raise ValueError(
            f"unknown service(s) {', '.join(unknown)}: choose from all, {', '.join(SERVICES[:-1])}"
        )
    return frozenset(items) | {"artifacts"}


_PATH_FIELDS: tuple[str, ...] = (
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "auth_token_file",
    "internal_tls_ca",
    "internal_tls_cert",
    "internal_tls_key",
    "internal_token_file",
)
"""Access-control files: flags of the same name (``--tls-cert`` ...), paths, "" or None = not set."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server process needs; defaults are the embedded single-process setup."""

    services: frozenset[str] = frozenset(SERVICES)
    host: str = "127.0.0.1"
    """Loopback by default: binding another address (0.0.0.0 in a container) is a choice, with TLS and
    tokens when the network is not trusted (README, "Access control")."""
    port: int = 50051
    metrics_port: int | None = 9090
    """Prometheus /metrics port; 0 picks a free one, None disables the endpoint."""
    metrics_host: str = "127.0.0.1"
    """Where /metrics listens (its own address: Prometheus often scrapes from another network)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    """PEM certificate chain and key: every port of this server speaks TLS (None = plaintext)."""
    tls_client_ca: Path | None = None
    """PEM CA bundle: callers must present a certificate it signed (mutual TLS)."""
    auth_token_file: Path | None = None
    """Bearer tokens every RPC but health needs (services/auth.py); None = no authentication."""
    internal_tls_ca: Path | None = None
    internal_tls_cert: Path | None = None
    internal_tls_key: Path | None = None
    """Editor -> stages TLS: the CA of the stages' certificates and the Editor's client certificate; see
    services/tls.py for the defaults taken from the server's own files."""
    internal_token_file: Path | None = None
    """The token the Editor presents to the stages; None = the first admin token of auth_token_file."""
    cache_dir: Path = DEFAULT_CACHE_DIR
    cache_size_bytes: int = 20 * 10**9
    shared_store: Path | None = None
    """Shared tier on a volume many machines mount (plain files, no SQLite); None = local only."""
    shared_store_size: int | None = None
    """Size limit of the shared tier (volume or S3), kept by LRU pruning in the background; None = none."""
    s3_bucket: str | None = None
    """Shared tier in this S3 bucket instead of a volume (credentials from the AWS chain)."""
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    """An S3-compatible endpoint (MinIO, Ceph RGW, ...); None = AWS."""
    model: str = "tiny"
    device: str | None = None
    dtype: str | None = None
    inversion_addr: str | None = None
    keyframes_addr: str | None = None
    propagation_addr: str | None = None
    """Where the Editor finds each stage (any gRPC target); None = this server itself."""
    max_queue: int = 8
    """Jobs waiting per stage beyond the running one; past it requests get RESOURCE_EXHAUSTED."""
    job_grace_seconds: float = 120.0
    """A job with no caller attached for this long is cancelled (a caller may re-attach until then)."""
    max_upload_bytes: int = 2 * GiB
    max_workers: int = 64
    """gRPC handler threads. Each streaming call holds one while it waits, so keep plenty for health."""
    max_concurrent_rpcs: int | None = None
    """Calls of our services in flight at once; past it RESOURCE_EXHAUSTED (SERVER_BUSY). None =
    max_workers - 8, so the threads left over always answer health (services/limits.py)."""
    upload_idle_seconds: float = DEFAULT_UPLOAD_IDLE_SECONDS
    """An upload stream that sends nothing for this long is closed (RESOURCE_EXHAUSTED, UPLOAD_STALLED)."""
    max_decoded_frames: int = MAX_DECODED_FRAMES
    max_pixels_per_frame: int = MAX_PIXELS_PER_FRAME
    """Decode limits of an uploaded video, checked on every decoded frame and before queuing (probe)."""
    max_prompt_chars: int = HARD_LIMITS["max_prompt_chars"]
    max_steps: int = HARD_LIMITS["max_steps"]
    max_edits_per_request: int = HARD_LIMITS["max_edits_per_request"]
    max_schedule_entries: int = HARD_LIMITS["max_schedule_entries"]
    """Request limits (services/request_limits.py): the library's hard limits, which a server may only
    tighten; checked when a request arrives (RESOURCE_EXHAUSTED, INPUT_TOO_LARGE)."""
    shutdown_grace_seconds: float | None = None
    """On SIGTERM, how long running jobs may finish before they are cancelled; None = job_grace_seconds."""
    preload_model: bool = True
    """Load (and warm) the model in the background at start-up; the stages report NOT_SERVING until it is
    ready. False = load on the first request (health is SERVING at once: nothing else would trigger it)."""
    max_connection_age_seconds: float | None = 300.0
    """Servers send GOAWAY after this, so clients reconnect and re-resolve (new pods get traffic)."""
    max_connection_age_grace_seconds: float = 1800.0
    """After GOAWAY, calls in flight (stage jobs run for minutes) get this long before the connection ends."""
    edit_parallelism: int | None = None
    """Editor: distinct edits of one request run at once; None = one per propagation replica (1 embedded)."""
    stage_wait_seconds: float = 30.0
    """Editor: how long a stage call waits for a SERVING replica (wait-for-ready, bounded)."""
    lease_seconds: float = 30.0
    """A running job's lease in the shared tier expires when not renewed for this long; then a replica
    waiting for the same job takes it over (services/store/lease.py). Heartbeats every quarter of it."""
    inversion_shards: int = 1
    """Editor: split an inversion into this many frame ranges over the inversion replicas (1 = never)."""
    inversion_shard_frames: int = 0
    """Editor: with inversion_shards 1, shard automatically (one range per inversion replica) from this
    many frames on; 0 = never."""
    features_budget: int = 8 * GiB
    """Propagation: largest source-features artifact an edit records (bytes); 0 turns features off."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", parse_services(self.services))
        object.__setattr__(self, "cache_dir", Path(os.path.expanduser(str(self.cache_dir))))
        if self.shared_store is not None:
            object.__setattr__(self, "shared_store", Path(os.path.expanduser(str(self.shared_store))))
        for name in _PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and str(value) != "":
                object.__setattr__(self, name, Path(os.path.expanduser(str(value))))
            else:
                object.__setattr__(self, name, None)
        self.validate()

    def validate(self) -> ServerConfig:
        """Raise ValueError with the flag to fix for anything out of range."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535 (0 = pick a free port), got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in 0..65535, or -1 to disable; got {self.metrics_port}")
        if self.cache_size_bytes <= 0:
            raise ValueError("--cache-size must be positive, e.g. 20GB")
        if self.shared_store is not None and self.s3_bucket:
            raise ValueError("choose one shared tier: --shared-store DIR or --s3-bucket NAME, not both")
        if self.shared_store_size is not None and (
            self.shared_store_size <= 0 or (self.shared_store is None and not self.s3_bucket)
        ):
            raise ValueError("--shared-store-size needs a positive size and --shared-store or --s3-bucket")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {self.max_queue}")
        if not (self.job_grace_seconds >= 0 and math.isfinite(self.job_grace_seconds)):
            raise ValueError(f"--job-grace-seconds must be >= 0, got {self.job_grace_seconds}")
        if self.shutdown_grace_seconds is not None and not self.shutdown_grace_seconds >= 0:
            raise ValueError(f"--shutdown-grace-seconds must be >= 0, got {self.shutdown_grace_seconds}")
        if self.max_connection_age_seconds is not None and not self.max_connection_age_seconds > 0:
            raise ValueError("--max-connection-age-seconds must be > 0 (0 on the command line = no limit)")
        if not self.max_connection_age_grace_seconds >= 0:
            raise ValueError("--max-connection-age-grace-seconds must be >= 0")
        if self.edit_parallelism is not None and self.edit_parallelism < 1:
            raise ValueError(f"--edit-parallelism must be >= 1 (0 = automatic), got {self.edit_parallelism}")
        if not self.stage_wait_seconds > 0:
            raise ValueError(f"--stage-wait-seconds must be > 0, got {self.stage_wait_seconds}")
        if not (self.lease_seconds > 0 and math.isfinite(self.lease_seconds)):
            raise ValueError(f"--lease-seconds must be > 0, got {self.lease_seconds}")
        if self.inversion_shards < 1 or self.inversion_shard_frames < 0:
            raise ValueError("--inversion-shards must be >= 1 and --inversion-shard-frames >= 0")
        if self.max_upload_bytes <= 0:
            raise ValueError("--max-upload-bytes must be positive")
        if self.features_budget < 0:
            raise ValueError(f"--features-budget must be >= 0, got {self.features_budget}")
        for cert, key, flags in (
            (self.tls_cert, self.tls_key, "--tls-cert and --tls-key"),
            (self.internal_tls_cert, self.internal_tls_key, "--internal-tls-cert and --internal-tls-key"),
        ):
            if (cert is None) != (key is None):
                raise ValueError(f"TLS needs a certificate and its key: give both {flags}")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs TLS: add --tls-cert and --tls-key")
        if self.max_workers < 8:
            raise ValueError(
                f"max_workers must be >= 8 so health checks answer while jobs run, got {self.max_workers}"
            )
        most = self.max_workers - HEALTH_RESERVE
        if self.max_concurrent_rpcs is not None and not 1 <= self.max_concurrent_rpcs <= most:
            raise ValueError(
                f"--max-concurrent-rpcs must be in 1..{most} (--max-workers minus {HEALTH_RESERVE} kept for "
                f"health), got {self.max_concurrent_rpcs}"
            )
        if not (self.upload_idle_seconds > 0 and math.isfinite(self.upload_idle_seconds)):
            raise ValueError(f"--upload-idle-seconds must be > 0, got {self.upload_idle_seconds}")
        if self.max_decoded_frames < 1 or self.max_pixels_per_frame < 1:
            raise ValueError("--max-decoded-frames and --max-pixels-per-frame must be >= 1")
        self.request_limits  # noqa: B018 - RequestLimits refuses a value above the library's limit
        if not self.model:
            raise ValueError("--model needs a preset name (tiny, sd15-arch, sd21-arch) or a diffusers folder")
        if "editor" in self.services:
            for stage in STAGES:
                if stage not in self.services and not self.stage_addr(stage):
                    raise ValueError(
                        f"the editor needs the {stage} stage: serve it here too, or pass --{stage}-addr "
                        "HOST:PORT (any gRPC target, e.g. dns:///inversion:50051)"
                    )
        return self

    def stage_addr(self, stage: str) -> str | None:
        """The configured address of a stage for the Editor (None = this server)."""
        return {
            "inversion": self.inversion_addr,
            "keyframes": self.keyframes_addr,
            "propagation": self.propagation_addr,
        }[stage]

    @property
    def stages(self) -> tuple[str, ...]:
        """The GPU stages this process hosts, in pipeline order."""
        return tuple(s for s in STAGES if s in self.services)

    @property
    def rpc_limit(self) -> int:
        """Concurrent calls of our services (`max_concurrent_rpcs`, default max_workers - 8)."""
        return self.max_concurrent_rpcs or max(1, self.max_workers - HEALTH_RESERVE)

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_pixels_per_frame=self.max_pixels_per_frame, max_decoded_frames=self.max_decoded_frames
        )

    @property
    def request_limits(self) -> RequestLimits:
        return RequestLimits(**{name: getattr(self, name) for name in HARD_LIMITS})

    @property
    def shutdown_grace(self) -> float:
        return self.job_grace_seconds if self.shutdown_grace_seconds is None else self.shutdown_grace_seconds

    def describe_services(self) -> str:
        """Stable, human-readable list for the start-up line, e.g. ``inversion,editor,artifacts``."""
        return ",".join(s for s in SERVICES if s in self.services)


# ----------------------------------------------------------------------------------------------------------
# command line and environment

ENV_PREFIX = "TOKENFLOW_"


def env_name(option: str) -> str:
    """The environment variable of a flag: ``--cache-size`` -> ``TOKENFLOW_CACHE_SIZE``."""
    return ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


_REQUEST_LIMIT_HELP: dict[str, str] = {
    "max_prompt_chars": "longest prompt, in characters",
    "max_steps": "most inversion steps and editing steps of a request",
    "max_edits_per_request": "most edits (prompts) per Edit request",
    "max_schedule_entries": "most entries of a keyframe schedule",
}
"""Help of the request-limit flags, one per HARD_LIMITS name (services/request_limits.py)."""


def config_defaults() -> dict[str, Any]:
    """ServerConfig's field defaults by name (the flags' defaults are read from here)."""
    return {
        f.name: f.default for f in dataclasses.fields(ServerConfig) if f.default is not dataclasses.MISSING
    }


def format_size(n: int) -> str:
    """The shortest exact spelling of a size that parse_size reads back: 20GB, 8GiB, 1048576."""
    for unit, factor in sorted(_SIZE_UNITS, key=lambda u: u[1], reverse=True):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    """The `tokenflow serve` flags. Every flag is also read from its TOKENFLOW_* variable (flags win).

    Defaults come from ServerConfig's own (one declaration); a flag spells None as 0 or -1 where noted.
    """
    D = config_defaults()
    p = argparse.ArgumentParser(
        prog="tokenflow serve",
        description="Serve the TokenFlow gRPC services (all in one process, or any subset). Every flag can "
        "also be set with an environment variable: --cache-size -> TOKENFLOW_CACHE_SIZE.",
    )
    p.add_argument(
        "--services",
        default="all",
        help=f"'all' or a comma list of {', '.join(SERVICES[:-1])} (artifacts is always served); default all",
    )
    p.add_argument(
        "--host",
        default=D["host"],
        help="address to listen on (default %(default)s, this machine only; 0.0.0.0 = every interface: "
        "then use TLS and tokens unless the network is trusted)",
    )
    p.add_argument(
        "--port", type=int, default=D["port"], help="gRPC port; 0 picks a free one (default %(default)s)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=D["metrics_port"],
        help="Prometheus port; 0 = pick one, -1 = off (default %(default)s)",
    )
    p.add_argument(
        "--metrics-host", default=D["metrics_host"], help="address /metrics listens on (default %(default)s)"
    )
    g = p.add_argument_group("access control (README: Access control)")
    g.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS on every port")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument(
        "--tls-client-ca", default=None, help="PEM CA bundle: require client certificates it signed (mTLS)"
    )
    g.add_argument(
        "--auth-token-file",
        default=None,
        help="bearer tokens, one per line: TOKEN [PRINCIPAL [user|admin]]; every RPC but health needs one",
    )
    g.add_argument(
        "--internal-tls-ca",
        default=None,
        help="editor: CA of the stages' certificates (default with TLS: --tls-client-ca, else --tls-cert)",
    )
    g.add_argument(
        "--internal-tls-cert",
        default=None,
        help="editor: client certificate for mTLS to the stages (default: --tls-cert)",
    )
    g.add_argument(
        "--internal-tls-key", default=None, help="editor: key of --internal-tls-cert (default: --tls-key)"
    )
    g.add_argument(
        "--internal-token-file",
        default=None,
        help="editor: file with its token for the stages (default: the first admin of --auth-token-file)",
    )
    p.add_argument(
        "--cache-dir",
        default=str(D["cache_dir"]),
        help="local artifact cache directory (default %(default)s)",
    )
    p.add_argument(
        "--cache-size",
        default=format_size(D["cache_size_bytes"]),
        help="cache size limit, e.g. 50GB or 512MiB (default %(default)s)",
    )
    p.add_argument(
        "--features-budget",
        default=format_size(D["features_budget"]),
        help="largest source-features artifact an edit records (they let later prompts on the clip skip "
        "the source branch of propagation); 0 turns features off (default %(default)s)",
    )
    p.add_argument("--shared-store", default=None, help="shared tier directory on a volume all nodes mount")
    p.add_argument(
        "--shared-store-size",
        default=None,
        help="shared tier size limit, e.g. 200GB: LRU-pruned in the background (default: no limit)",
    )
    p.add_argument("--s3-bucket", default=None, help="shared tier in this S3 bucket (AWS credential chain)")
    p.add_argument("--s3-prefix", default="", help="key prefix inside --s3-bucket (default: none)")
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint, e.g. http://minio:9000")
    p.add_argument(
        "--model", default=D["model"], help="diffusers SD folder or preset (tiny = test model, noise)"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float16 / bfloat16 / float32 (default: fp16 on GPU)")
    for stage in STAGES:
        p.add_argument(f"--{stage}-addr", default=None, help=f"editor: gRPC target of the {stage} stage")
    p.add_argument(
        "--max-queue", type=int, default=D["max_queue"], help="queued jobs per stage (default %(default)s)"
    )
    p.add_argument(
        "--job-grace-seconds",
        type=float,
        default=D["job_grace_seconds"],
        help="cancel a job after this long with no caller attached (default %(default)s)",
    )
    p.add_argument(
        "--max-upload-bytes",
        default=format_size(D["max_upload_bytes"]),
        help="upload size limit (default %(default)s)",
    )
    p.add_argument(
        "--shutdown-grace-seconds",
        type=float,
        default=None,
        help="on SIGTERM, time running jobs get to finish (default: --job-grace-seconds)",
    )
    p.add_argument(
        "--max-workers", type=int, default=D["max_workers"], help="gRPC handler threads (default %(default)s)"
    )
    p.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=0,
        help="calls in flight at once, past it RESOURCE_EXHAUSTED; 0 = --max-workers minus 8, kept for "
        "health (default 0)",
    )
    p.add_argument(
        "--upload-idle-seconds",
        type=float,
        default=D["upload_idle_seconds"],
        help="close an upload that sends nothing for this long (default %(default)s)",
    )
    p.add_argument(
        "--max-decoded-frames",
        type=int,
        default=D["max_decoded_frames"],
        help="most frames decoded from one upload, skipped ones included (default %(default)s)",
    )
    p.add_argument(
        "--max-pixels-per-frame",
        type=int,
        default=D["max_pixels_per_frame"],
        help="largest decoded picture, width x height, of every frame (default %(default)s)",
    )
    for name in HARD_LIMITS:  # a server may only tighten the library's limits
        what = _REQUEST_LIMIT_HELP[name]
        p.add_argument(
            flag(name), type=int, default=D[name], help=f"{what} (at most, and default, %(default)s)"
        )
    p.add_argument(
        "--max-connection-age-seconds",
        type=float,
        default=D["max_connection_age_seconds"],
        help="send clients GOAWAY after this so they re-resolve and reach new pods; 0 = never "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-connection-age-grace-seconds",
        type=float,
        default=D["max_connection_age_grace_seconds"],
        help="after GOAWAY, time calls in flight get before the connection closes (default %(default)s)",
    )
    p.add_argument(
        "--edit-parallelism",
        type=int,
        default=0,
        help="editor: distinct edits of a request run at once; 0 = one per propagation replica (default 0)",
    )
    p.add_argument(
        "--stage-wait-seconds",
        type=float,
        default=D["stage_wait_seconds"],
        help="editor: how long a stage call waits for a serving replica before failing (default %(default)s)",
    )
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=D["lease_seconds"],
        help="a running job's lease expires after this long without a heartbeat; then another replica "
        "takes the job over (default %(default)s)",
    )
    p.add_argument(
        "--inversion-shards",
        type=int,
        default=D["inversion_shards"],
        help="editor: split each inversion into N frame ranges over the inversion replicas "
        "(default %(default)s)",
    )
    p.add_argument(
        "--inversion-shard-frames",
        type=int,
        default=D["inversion_shard_frames"],
        help="editor: shard inversions of at least this many frames, one range per inversion replica "
        "(0 = never; default %(default)s)",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default INFO)")
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line with the job id on every job's line (default text)",
    )
    return p


def apply_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Make each flag's TOKENFLOW_* variable its default, so a flag on the command line still wins.

    Values go through the flag's own `type` and `choices`, so a bad variable fails like a bad flag and
    names the variable. Boolean switches accept 1/true/yes/on and 0/false/no/off.
    """
    env = os.environ if environ is None else environ
    for action in parser._actions:
        long_flags = [o for o in action.option_strings if o.startswith("--")]
        if not long_flags or action.dest in ("help", "version"):
            continue
        name = env_name(long_flags[0])
        if name not in env:
            continue
        raw = env[name]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            truth = raw.strip().lower()
            if truth not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                parser.error(f"{name}={raw!r}: use 1/true/yes/on or 0/false/no/off")
            on = truth in ("1", "true", "yes", "on")
            value: object = on if isinstance(action, argparse._StoreTrueAction) else not on
        else:
            try:
                value = action.type(raw) if callable(action.type) else raw
            except (TypeError, ValueError) as e:
                parser.error(f"{name}={raw!r}: {e}")
            if action.choices is not None and value not in action.choices:
                choices = ", ".join(map(str, action.choices))
                parser.error(f"{name}={raw!r}: choose from {choices}")
        parser.set_defaults(**{action.dest: value})


def parse_args(argv: Iterable[str], environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    apply_environment(parser, environ)
    return parser.parse_args(list(argv))


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """ServerConfig from parsed flags; ValueError with the flag to fix."""
    return ServerConfig(
        services=parse_services(args.services),
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_host=args.metrics_host,
        **{name: getattr(args, name) for name in _PATH_FIELDS},
        cache_dir=Path(args.cache_dir),
        cache_size_bytes=parse_size(args.cache_size),
        shared_store=Path(args.shared_store) if args.shared_store else None,
        shared_store_size=parse_size(args.shared_store_size) if args.shared_store_size else None,
        s3_bucket=args.s3_bucket or None,
        s3_prefix=args.s3_prefix,
        s3_endpoint_url=args.s3_endpoint_url,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        inversion_addr=args.inversion_addr,
        keyframes_addr=args.keyframes_addr,
        propagation_addr=args.propagation_addr,
        max_queue=args.max_queue,
        job_grace_seconds=args.job_grace_seconds,
        max_upload_bytes=parse_size(args.max_upload_bytes),
        max_workers=args.max_workers,
        max_concurrent_rpcs=args.max_concurrent_rpcs or None,
        upload_idle_seconds=args.upload_idle_seconds,
        max_decoded_frames=args.max_decoded_frames,
        max_pixels_per_frame=args.max_pixels_per_frame,
        **{name: getattr(args, name) for name in HARD_LIMITS},
        shutdown_grace_seconds=args.shutdown_grace_seconds,
        max_connection_age_seconds=args.max_connection_age_seconds or None,
        max_connection_age_grace_seconds=args.max_connection_age_grace_seconds,
        edit_parallelism=args.edit_parallelism or None,
        stage_wait_seconds=args.stage_wait_seconds,
        lease_seconds=args.lease_seconds,
        inversion_shards=args.inversion_shards,
        inversion_shard_frames=args.inversion_shard_frames,
        features_budget=parse_size(args.features_budget),
    )
