"""Operator commands for the artifact store: ``tokenflow-store`` / ``python -m services.store``.

    tokenflow-store prune --shared-store /shared --max-bytes 200GB
    tokenflow-store prune --s3-bucket tokenflow --s3-prefix prod/ --max-bytes 2TB
    tokenflow-store prune --cache-dir /cache --max-bytes 20GB      # a node's local tier (LRU, pins kept)
    tokenflow-store usage --s3-bucket tokenflow
    tokenflow-store list --shared-store /shared --kind video

A prune deletes whole artifacts, least recently used first, until the tier holds at most --max-bytes,
then every blob no manifest references; nothing used within --grace-seconds is touched (a node may be
reading or writing it). Without --max-bytes a shared tier is only swept of unreferenced blobs and stale
temporary files. Safe to run while servers use the tier (a CronJob, or by hand).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from services.store.composite import DEFAULT_PRUNE_GRACE, ArtifactStore, make_shared_tier
from services.store.tier import SharedTier, prune_lru


def _parse_size(text: str) -> int:
    from services.config import parse_size  # one size syntax for every flag

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenflow-store", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("prune", "LRU-prune a tier to a size"),
        ("usage", "bytes and artifacts a tier holds"),
        ("list", "list the artifacts of one kind"),
    ):
        s = sub.add_parser(name, help=help_text)
        where = s.add_mutually_exclusive_group(required=True)
        where.add_argument("--cache-dir", type=Path, help="a local tier (diskcache directory)")
        where.add_argument("--shared-store", type=Path, help="a shared-volume tier directory")
        where.add_argument("--s3-bucket", help="an S3 tier's bucket (credentials: the AWS chain)")
        s.add_argument("--s3-prefix", default="", help="key prefix inside the bucket")
        s.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (MinIO, Ceph, ...)")
        if name == "prune":
            s.add_argument("--max-bytes", type=_parse_size, default=None, help="e.g. 200GB or 1.5TiB")
            s.add_argument(
                "--grace-seconds",
                type=float,
                default=DEFAULT_PRUNE_GRACE,
                help=f"never touch what was used this recently (default {DEFAULT_PRUNE_GRACE:.0f})",
            )
        if name == "list":
            s.add_argument("--kind", required=True, help="artifact kind, e.g. video, inversion")
    p.add_argument("--log-level", default="INFO")
    return p


def _shared(args: argparse.Namespace) -> SharedTier:
    tier = make_shared_tier(args.shared_store, args.s3_bucket, args.s3_prefix, args.s3_endpoint_url)
    assert tier is not None
    return tier


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.cache_dir is not None:
        if args.command == "prune" and args.max_bytes is None:
            print("prune --cache-dir needs --max-bytes", file=sys.stderr)
            return 2
        limit = args.max_bytes if args.command == "prune" else 1 << 62
        with ArtifactStore(args.cache_dir, size_limit=limit) as store:
            if args.command == "prune":
                evicted = store.cull()
                print(json.dumps({"evicted": len(evicted), "bytes": store.total_bytes()}))
            elif args.command == "usage":
                print(json.dumps({"tier": "local", "artifacts": store.count(), "bytes": store.total_bytes()}))
            else:
                _print_listing(store.local, args.kind)
        return 0
    tier = _shared(args)
    try:
        if args.command == "prune":
            report = prune_lru(tier, args.max_bytes, args.grace_seconds)
            print(json.dumps({"tier": tier.describe(), **report.__dict__, "evicted": len(report.evicted)}))
        elif args.command == "usage":
            blobs = list(tier.scan_blobs())
            records = sum(1 for _ in tier.scan_records())
            print(
                json.dumps(
                    {
                        "tier": tier.describe(),
                        "artifacts": records,
                        "blobs": len(blobs),
                        "bytes": sum(b.size for b in blobs),
                    }
                )
            )
        else:
            _print_listing(tier, args.kind)
    finally:
        tier.close()
    return 0


def _print_listing(tier: object, kind: str) -> None:
    after = None
    while True:
        page, more = tier.list(kind, 1000, after)  # type: ignore[attr-defined]
        for m in page:
            print(json.dumps({"key": m.key, "kind": m.kind, "bytes": m.total_size, "created": m.created}))
        if not more or not page:
            return
        after = page[-1].key


if __name__ == "__main__":
    sys.exit(main())
