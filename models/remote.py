"""Model folders on any fsspec URL: fetch to a local cache for `from_pretrained`, upload after save.

diffusers' `from_pretrained` reads local folders (or the hub, which we never use at run time), so a
folder at s3://, gs://, memory:// ... is copied once into a cache keyed by its URL; the copy is made
under a temporary name and renamed, so a half-copied folder is never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

CACHE_ENV = "STABLEDUB_CACHE"


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "stabledub")


def is_remote(url: str) -> bool:
    fs, _ = fsspec.core.url_to_fs(str(url))
    return not isinstance(fs, LocalFileSystem)


def local_dir(url: str | os.PathLike, refresh: bool = False) -> str:
    """A local folder with the contents of `url` (the path itself when it is already local)."""
    url = str(url)
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return path
    target = os.path.join(cache_root(), hashlib.sha256(url.encode()).hexdigest()[:24])
    if os.path.isdir(target) and not refresh:
        return target
    os.makedirs(cache_root(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".fetch-", dir=cache_root())
    try:
        for remote in fs.find(path):
            relative = remote[len(path.rstrip("/")) + 1 :]
            destination = os.path.join(staging, relative)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            fs.get_file(remote, destination)
        try:
            os.rename(staging, target)  # atomic; refused when another process got there first
        except OSError:
            if refresh:
                # Readers holding files of the old copy keep them (POSIX); new readers get the new one.
                retired = f"{target}.old-{uuid.uuid4().hex}"
                os.rename(target, retired)
                os.rename(staging, target)
                shutil.rmtree(retired, ignore_errors=True)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return target


def upload_dir(local: str, url: str) -> None:
    """Copy a finished local folder to `url`, file by file (each file is committed whole)."""
    fs, path = fsspec.core.url_to_fs(url)
    for root, _, files in os.walk(local):
        for name in files:
            source = os.path.join(root, name)
            relative = os.path.relpath(source, local).replace(os.sep, "/")
            destination = f"{path.rstrip('/')}/{relative}"
            fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(source, destination)


def staging_dir() -> str:
    """A fresh local folder to save into before `upload_dir`."""
    return os.path.join(tempfile.gettempdir(), f"stabledub-save-{uuid.uuid4().hex}")
