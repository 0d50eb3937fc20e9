"""Directory trees (adapters, full models, training checkpoints) in the artifact store.

A tree under PREFIX is its files as keys PREFIX/<relative path>, and PREFIX/_COMPLETE, written last, listing the
files and their sizes. A reader uses a tree only when its marker exists, so a half-finished upload (a killed
trainer) is never mistaken for a whole one. Big files go through the backend's own transfer when it has one
(boto3's managed multipart transfer for S3, a file copy on disk) and are never held in memory whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .store import Store

COMPLETE = "_COMPLETE"


def _files(local_dir: Path) -> list[Path]:
    return sorted(p for p in local_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def _put_file(store: Store, path: Path, key: str) -> None:
    client = getattr(store, "client", None)
    if client is not None and hasattr(store, "bucket") and hasattr(store, "_key"):
        client.upload_file(str(path), store.bucket, store._key(key))  # multipart above 8 MiB: no 5 GB limit
        return
    target = store.local_path(key)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    store.write(key, path.read_bytes())


def _get_file(store: Store, key: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    client = getattr(store, "client", None)
    if client is not None and hasattr(store, "bucket") and hasattr(store, "_key"):
        client.download_file(store.bucket, store._key(key), str(path))
        return
    source = store.local_path(key)
    if source is not None:
        if not source.is_file():
            raise KeyError(key)
        shutil.copyfile(source, path)
        return
    path.write_bytes(store.read(key))


def tree_complete(store: Store, prefix: str) -> bool:
    return store.exists(f"{prefix.rstrip('/')}/{COMPLETE}")


def tree_manifest(store: Store, prefix: str) -> dict:
    return json.loads(store.read(f"{prefix.rstrip('/')}/{COMPLETE}"))


def upload_tree(store: Store, local_dir: str | Path, prefix: str, *, meta: dict | None = None) -> dict:
    """Upload every file under local_dir to prefix/, then the completion marker. Files of an earlier upload to
    the same prefix that the new tree lacks are deleted first (the marker goes first of all)."""
    local_dir = Path(local_dir)
    prefix = prefix.rstrip("/")
    files = _files(local_dir)
    if not files:
        raise ValueError(f"{local_dir}: no files to upload")
    names = [p.relative_to(local_dir).as_posix() for p in files]
    old = store.list(prefix)
    if old:
        store.delete(f"{prefix}/{COMPLETE}")
        keep = {f"{prefix}/{n}" for n in names}
        for key in old:
            if key not in keep:
                store.delete(key)
    for path, name in zip(files, names):
        _put_file(store, path, f"{prefix}/{name}")
    marker = {"files": {n: p.stat().st_size for p, n in zip(files, names)}, **(meta or {})}
    store.write(f"{prefix}/{COMPLETE}", json.dumps(marker, indent=2).encode())
    return marker


def download_tree(store: Store, prefix: str, dest: str | Path) -> Path:
    """Download the complete tree at prefix/ into dest (replacing what was there; atomic: dest appears whole).
    A dest that already holds this very tree (same marker) is reused as it is."""
    prefix = prefix.rstrip("/")
    dest = Path(dest)
    try:
        marker_bytes = store.read(f"{prefix}/{COMPLETE}")
    except KeyError:
        raise FileNotFoundError(f"{store.uri}/{prefix}: no complete tree there ({COMPLETE} missing)") from None
    local_marker = dest / f".{COMPLETE}"
    if local_marker.is_file() and local_marker.read_bytes() == marker_bytes:
        return dest
    marker = json.loads(marker_bytes)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for name, size in marker["files"].items():
            _get_file(store, f"{prefix}/{name}", tmp / name)
            if (tmp / name).stat().st_size != size:
                raise OSError(f"{store.uri}/{prefix}/{name}: size {(tmp / name).stat().st_size}, {size} expected")
        (tmp / f".{COMPLETE}").write_bytes(marker_bytes)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.replace(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def delete_tree(store: Store, prefix: str) -> None:
    """Delete a tree: its marker first, so that no reader ever sees a complete-looking partial tree."""
    prefix = prefix.rstrip("/")
    store.delete(f"{prefix}/{COMPLETE}")
    for key in store.list(prefix):
        store.delete(key)
