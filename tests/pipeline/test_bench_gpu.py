"""bench/gpu.py end to end on CPU: a quick pack of real frames and audio, then the bench with the
tiny preset, in child processes (as on the GPU machine: a fresh Python that reads only the pack)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def bench(*args: str, timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(900)
def test_gpu_bench_runs_on_cpu_from_a_pack_and_marks_its_results_as_cpu(tmp_path):
    pack = tmp_path / "pack"
    made = bench("--make-pack", str(pack), "--clips", "1", "--quick-frames", "20", "--no-wheels", timeout=400)
    assert "1 segments, 1 tracks" in made
    meta = json.loads((pack / "meta.json").read_text())
    assert meta["audio"]["audio_dim"] == 80 and meta["segments"][0]["frames"] == 20

    out = bench("--pack", str(pack), "--budget-s", "800", timeout=850)
    assert "stage tiny@64 hybrid,  2 windows/call" in out and "stage tiny@64 attention-only" in out
    assert "bare: none of ray, av, webdataset, mediapipe, decord imported" in out
    results = {line.split()[1]: line for line in out.splitlines() if line.startswith("RESULT ")}
    assert set(results) == {"gpu_frames_per_s_256_sd", "gpu_busy", "hybrid_speedup_gpu"}
    assert float(results["gpu_frames_per_s_256_sd"].split()[2]) > 0
    assert "(CPU" in results["gpu_frames_per_s_256_sd"] and "(CPU" in results["hybrid_speedup_gpu"]
    assert results["gpu_busy"].split()[2] == "nan"
