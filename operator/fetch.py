"""Init-container helper: copy trained models (complete trees) from the store into local directories.

    python -m selflengthen.operator.fetch --storage s3://bucket/prefix PREFIX=DEST [PREFIX=DEST ...]

Credentials come from the environment (Secret references in the pod spec), never from arguments.
"""

from __future__ import annotations

import argparse
import sys

from ..pipeline.store import open_store
from ..pipeline.treestore import download_tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selflengthen.operator.fetch", description=__doc__)
    parser.add_argument("--storage", required=True, help="store URI (s3://BUCKET/PREFIX or file://DIR)")
    parser.add_argument("--endpoint-url", help="S3 endpoint (MinIO, ...)")
    parser.add_argument("pairs", nargs="+", metavar="PREFIX=DEST")
    args = parser.parse_args(argv)
    store = open_store(args.storage, args.endpoint_url)
    for pair in args.pairs:
        prefix, sep, dest = pair.partition("=")
        if not sep or not prefix or not dest:
            parser.error(f"{pair!r}: PREFIX=DEST wanted")
        try:
            path = download_tree(store, prefix, dest)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"{store.uri}/{prefix} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
