"""What every stage shares: batch <-> segment conversion, errors as values, busy-time accounting.

A stage subclasses `SegmentStage`, loads what it needs once in `__init__(config)` and implements
`process(segment) -> segment`. It never imports Ray: `pipeline/plan.py` wires it with
`map_batches` and declares its resources there. Tests call `process` (or `__call__` on a batch)
directly.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from typing import Any, ClassVar

import numpy as np

from stages.schema import Segment, Status, segments_from_batch, segments_to_batch
from stages.storage import out_of_space

log = logging.getLogger(__name__)
WORKER = f"{socket.gethostname()}:{os.getpid()}"


class StageError(Exception):
    """A problem with the input that fails this segment (or film) with a clear reason."""


class SegmentStage:
    name: ClassVar[str] = "stage"

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def process(self, segment: Segment) -> Segment:
        raise NotImplementedError

    def run_one(self, segment: Segment) -> Segment:
        """Process one segment; a failure becomes the segment's status, never an exception."""
        if segment.status is not Status.OK:
            return segment
        began = time.perf_counter()
        try:
            segment = self.process(segment)
        except StageError as error:
            segment.fail(f"{self.name}: {error}", stage=self.name)
        except Exception as error:  # noqa: BLE001 - any crash in one film must not stop the catalog
            log.warning("%s failed on %s: %s", self.name, segment.film.uid, traceback.format_exc())
            segment.fail(f"{self.name}: {type(error).__name__}: {error}", stage=self.name)
            segment.out_of_space = out_of_space(error)
        segment.timings[self.name] = segment.timings.get(self.name, 0.0) + time.perf_counter() - began
        segment.workers[self.name] = WORKER
        if segment.status is Status.OK:
            try:
                self.commit(segment)
            except Exception as error:  # noqa: BLE001
                segment.fail(f"{self.name}: committing output: {type(error).__name__}: {error}", stage=self.name)
                segment.out_of_space = out_of_space(error)
        return segment

    def commit(self, segment: Segment) -> None:
        """Runs after `process` with timings recorded: where a stage writes its completion marker."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return segments_to_batch([self.run_one(s) for s in segments_from_batch(batch)])
