"""A lease on the run directory, so two drivers never write the same output.

The driver holding the lease refreshes `lease.json` every `HEARTBEAT_S`. Another run refuses to
start while the lease is fresh, and takes it over when it is stale (the holder stopped refreshing:
killed, preempted) or when the holder is a dead process on this same host.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from stages.storage import exists, filesystem, join, read_json, write_json

HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


class LeaseHeld(RuntimeError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Lease:
    run_dir: str
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    stale_after: float = STALE_AFTER_S
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return join(self.run_dir, "lease.json")

    def _record(self) -> dict:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "refreshed": time.time()}

    def acquire(self) -> Lease:
        if exists(self.url):
            held = read_json(self.url)
            age = time.time() - float(held.get("refreshed", 0))
            same_host_dead = held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", -1)))
            if age < self.stale_after and not same_host_dead:
                raise LeaseHeld(
                    f"run directory {self.run_dir} is in use by another run (pid {held.get('pid')} on host "
                    f"{held.get('host')}, lease refreshed {age:.0f} s ago). Two runs on one output would corrupt "
                    f"it; if that run is dead, its lease expires {max(0.0, self.stale_after - age):.0f} s from now."
                )
        write_json(self.url, self._record())
        if read_json(self.url).get("owner") != self.owner:  # another run won the race
            raise LeaseHeld(f"run directory {self.run_dir} was just taken by another run")
        self._thread = threading.Thread(target=self._heartbeat, name="lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                write_json(self.url, self._record())
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried at the next tick
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        fs, path = filesystem(self.url)
        try:
            if fs.exists(path) and read_json(self.url).get("owner") == self.owner:
                fs.rm(path)
        except Exception:  # noqa: BLE001 - a stale lease only delays the next run
            pass

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
