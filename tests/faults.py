"""Test-only inpainting models that misbehave on purpose (loaded by import path, `tests.faults:Name`)."""

from __future__ import annotations

import os
from pathlib import Path

from stages.inpaint import IdentityModel


class CrashOnceModel(IdentityModel):
    """The identity model, except that the first call anywhere kills its actor process outright."""

    def __call__(self, track, segment):
        marker = Path(os.environ["STABLEDUB_CRASH_MARKER"])
        try:
            with open(marker, "x") as f:  # exactly one process wins and dies mid-batch
                f.write(str(os.getpid()))
        except FileExistsError:
            return super().__call__(track, segment)
        os._exit(1)
