"""The artifact store: one small interface, a local-directory backend and an S3 backend.

Every write is atomic (a reader sees the whole object or nothing), and `write(..., if_absent=True)` succeeds
for exactly one of several writers (an S3 conditional write; O_EXCL-style link on disk). Stages build on
that: a shard exists only when complete, and a stage is done when its `_SUCCESS` marker exists.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

log = logging.getLogger("selflengthen.store")


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

    # The metadata entry naming the writer of a conditional write (see write).
    WRITER_METADATA = "selflengthen-writer"
    # Whole-request retries botocore does not do: a GET body cut off after its headers arrived, and a conditional
    # PUT answered 409 ConditionalRequestConflict (another conditional write of the key was in flight: nothing
    # was decided, S3 asks to retry).
    READ_ATTEMPTS = 5
    CONFLICT_ATTEMPTS = 5
    RETRY_DELAY_SECONDS = 0.1

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client=None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            # the run's keys must stay under exactly this prefix: no empty, '.' or '..' segments
            try:
                _check_key(self.prefix)
            except ValueError:
                raise ValueError(f"invalid S3 prefix {prefix!r}: no empty, '.' or '..' segments wanted") from None
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

    def _pause(self, attempt: int) -> None:
        time.sleep(min(self.RETRY_DELAY_SECONDS * 2 ** (attempt - 1), 5.0))

    def read(self, key: str) -> bytes:
        from botocore.exceptions import (
            FlexibleChecksumError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        full = self._key(key)
        for attempt in range(1, self.READ_ATTEMPTS + 1):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                raise KeyError(key) from None
            # botocore retries a request until its headers arrive; a body cut short (or corrupted) after that
            # reaches us: read the object again.
            except (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, FlexibleChecksumError) as err:
                if attempt == self.READ_ATTEMPTS:
                    raise
                log.warning("reading s3://%s/%s failed (%s); retrying", self.bucket, full, type(err).__name__)
                self._pause(attempt)
        raise AssertionError("unreachable")

    def write(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        full = self._key(key)
        if not if_absent:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)
            return
        # The object carries a token naming this write. When the reply to the PUT that created it is lost (a dropped
        # connection, a 5xx after the write), botocore sends the PUT again and S3 answers 412 to our own object:
        # the token tells that from another writer's object, so exactly one writer is told it won.
        token = uuid.uuid4().hex
        for attempt in range(1, self.CONFLICT_ATTEMPTS + 1):
            try:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*",
                                       Metadata={self.WRITER_METADATA: token})
                return
            except self.client.exceptions.ClientError as err:
                code = err.response.get("Error", {}).get("Code")
                if code == "PreconditionFailed":
                    if self._writer(full) == token:
                        log.info("conditional write of s3://%s/%s: an earlier try of ours succeeded", self.bucket, full)
                        return
                    raise AlreadyExists(key) from None
                if code != "ConditionalRequestConflict" or attempt == self.CONFLICT_ATTEMPTS:
                    raise
                log.warning("conditional write of s3://%s/%s met a concurrent one (409); retrying", self.bucket, full)
                self._pause(attempt)

    def _writer(self, full_key: str) -> str | None:
        """The writer token of an object (None when it has none, or is gone)."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=full_key)
        except self.client.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return (head.get("Metadata") or {}).get(self.WRITER_METADATA)

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
