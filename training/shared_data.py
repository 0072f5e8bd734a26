"""Where the sample clips, dubs and audio live: ../shared/data beside the repository, read in place,
or wherever STABLEDUB_SHARED_DATA points."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA: Path = Path(os.environ.get("STABLEDUB_SHARED_DATA", REPO.parent / "shared" / "data"))
