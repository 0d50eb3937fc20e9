"""The artifact store: one small interface, a local-directory backend and an S3 backend.

Every write is atomic (a reader sees the whole object or nothing), and `write(..., if_absent=True)` succeeds
for exactly one of several writers (an S3 conditional write; O_EXCL-style link on disk). Stages build on
that: a shard exists only when complete, and a stage is done when its `_SUCCESS` marker exists.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse


class AlreadyExists(Exception):
    """A conditional write lost: the object was already there."""


class Store(Protocol):
    uri: str

    def read(self, key: str) -> bytes: ...
    def write(self, key: str, data: bytes, *, if_absent: bool = False) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def local_path(self, key: str) -> Path | None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store key {key!r}: relative path without empty, '.' or '..' segments wanted")
    return key


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        # A key that names a directory, or runs through a file, is missing as on S3 (not an OSError).
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

    def write(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, path)  # fails if the target exists: one writer wins
                except FileExistsError:
                    raise AlreadyExists(key) from None
            else:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for path in base.rglob("*"):
            # Hide only in-flight temp files (.NAME.XXXX.tmp, see write): other dot-named keys are keys, as on S3.
            if path.is_file() and not (path.name.startswith(".") and path.name.endswith(".tmp")):
                keys.append(path.relative_to(self.root).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            if not path.is_dir():  # a "directory" is no key: deleting it is a no-op, as on S3
                path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


class S3Store:
    """S3 through boto3; credentials and region come from the environment (never from configuration)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client=None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # Standard retry mode: throttles, 5xx and dropped connections are retried with backoff.
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 10, "mode": "standard"}, connect_timeout=10, read_timeout=60),
        )

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def read(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise KeyError(key) from None

    def write(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        except self.client.exceptions.ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            if if_absent and code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise AlreadyExists(key) from None
            raise

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except self.client.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def local_path(self, key: str) -> Path | None:
        return None


def open_store(uri: str, endpoint_url: str | None = None) -> Store:
    """A store for file://DIR (relative DIRs are relative to the working directory) or s3://BUCKET/PREFIX."""
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://") :])
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    raise ValueError(f"storage.uri {uri!r}: file://DIR or s3://BUCKET/PREFIX wanted")


# JSON lines and JSON documents -------------------------------------------------------------------------------


def dumps_jsonl(rows: Iterable[dict]) -> bytes:
    return b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows)


def read_jsonl(store: Store, key: str) -> Iterator[dict]:
    for line in store.read(key).decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def read_json(store: Store, key: str) -> dict:
    return json.loads(store.read(key))


def write_json(store: Store, key: str, doc: dict, *, if_absent: bool = False) -> None:
    store.write(key, json.dumps(doc, ensure_ascii=False, indent=2).encode() + b"\n", if_absent=if_absent)
