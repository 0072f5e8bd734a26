"""Storage on any fsspec URL with atomic commits.

Local files are written to a temporary name in the same directory and renamed into place; object
stores (s3://, gs://) make a PUT visible whole or not at all, so the final name is written once.
Either way a reader never sees a partial file.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")
ATTEMPTS = 8
FIRST_BACKOFF_S = 0.2
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, ValueError, TypeError)
# The storage refused a write for room: disk full, quota, a file size limit (ulimit -f, FAT's 4 GiB).
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def out_of_space(error: BaseException) -> bool:
    """A write refused for room: no film's fault, and every later write would fail the same way,
    so a run stops on it (exit 1, finished work kept) instead of failing film after film."""
    return isinstance(error, OSError) and error.errno in OUT_OF_SPACE


def transient(error: BaseException) -> bool:
    """Worth retrying: throttling, 5xx, dropped connections, timeouts (not missing or forbidden)."""
    if isinstance(error, PERMANENT):
        return False
    if isinstance(error, (OSError, ConnectionError, TimeoutError)):
        return True
    name = type(error).__name__
    return any(
        word in name
        for word in ("Timeout", "Connection", "Throttl", "SlowDown", "ServerError", "ClientError", "EndpointConnection")
    )


def retrying(action: Callable[[], T], what: str, attempts: int = ATTEMPTS) -> T:
    """Run `action`, retrying transient storage errors with jittered exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - classified below
            if attempt == attempts or not transient(error):
                raise
            delay = FIRST_BACKOFF_S * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1f s", what, type(error).__name__, error, attempt, attempts - 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return retrying(lambda: fs.exists(path), f"checking {url}")


def _local_temporary(path: str) -> str:
    """A unique temporary name beside `path` (same directory, so the final rename is atomic)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")


@contextmanager
def _removed_on_error(tmp: str) -> Iterator[None]:
    """A write that fails (a full disk) takes its partial temporary with it: it holds the room
    the next write needs (a killed run's leftovers are removed by `remove_temporaries`)."""
    try:
        yield
    except BaseException:
        with suppress(OSError):
            os.remove(tmp)
        raise


def write_bytes(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    if is_local(fs):
        tmp = _local_temporary(path)
        with _removed_on_error(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    else:
        retrying(lambda: fs.pipe_file(path, data), f"writing {url}")


def put_file(local_path: str, url: str) -> None:
    """Copy a finished local file to `url` atomically (then the local file may be deleted)."""
    fs, path = filesystem(url)
    if is_local(fs):
        tmp = _local_temporary(path)
        with _removed_on_error(tmp):
            fs.put_file(local_path, tmp)
            os.replace(tmp, path)
    else:
        retrying(lambda: fs.put_file(local_path, path), f"uploading {url}")


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return retrying(lambda: fs.cat_file(path), f"reading {url}")


def read_json(url: str) -> Any:
    import json

    return json.loads(read_bytes(url))


def write_json(url: str, data: Any) -> None:
    import json

    write_bytes(url, json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def remove_tree(url: str) -> None:
    """Delete a file or a folder and everything under it, taking the name literally: fsspec's `rm`
    expands glob characters, and a film key may hold `[`, `*` or `?`."""
    fs, path = filesystem(url)
    if is_local(fs):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    if not retrying(lambda: fs.exists(path), f"checking {url}"):
        return
    for found in retrying(lambda: fs.find(path), f"listing {url}") or [path]:
        retrying(lambda found=found: fs.rm_file(found), f"removing {found}")


def remove_temporaries(url: str, recursive: bool = True) -> int:
    """Delete `.tmp-*` leftovers of a killed run under a local directory; returns how many."""
    fs, path = filesystem(url)
    if not is_local(fs) or not os.path.isdir(path):
        return 0
    removed = 0
    for root, dirs, files in os.walk(path):
        if not recursive:
            dirs.clear()
        for name in files:
            if name.startswith(".tmp-"):
                os.remove(os.path.join(root, name))
                removed += 1
    return removed
