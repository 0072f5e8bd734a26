"""A private fake multi-node Ray cluster with an autoscaler, for autoscaling tests.

`ray.cluster_utils.AutoscalingCluster` does what we need, but its start and shutdown run
`ray stop --force`, which kills every Ray process of this user on the machine (other people's
local clusters too), it binds the default port and temp dir (so a plain `ray.init()` elsewhere
could join it), and the 2.60 wheel lacks the `example.yaml` it reads. This is the same recipe,
isolated: its own port and temp dir, its processes found by session id and ended by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                pids.append(int(entry))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


@dataclass
class FakeAutoscalingCluster:
    """Head node plus autoscaled worker node types (fake nodes are real raylets on this host)."""

    head_resources: dict[str, float]
    worker_node_types: dict[str, dict[str, Any]]
    idle_timeout_s: float = 6.0
    autoscaler_v2: bool = False  # v2 with the fake provider launched no nodes here (Ray 2.60)
    env: dict[str, str] = field(default_factory=dict)
    address: str = ""
    temp_dir: str = ""
    _sid: int | None = None

    def config(self, port: int) -> dict[str, Any]:
        nodes = {name: {"node_config": {}, "min_workers": 0, **spec} for name, spec in self.worker_node_types.items()}
        head = {k: v for k, v in self.head_resources.items() if k not in ("CPU", "GPU")}
        nodes["ray.head.default"] = {"resources": head, "node_config": {}, "max_workers": 0}
        return {
            "cluster_name": "stabledub-fake",
            "max_workers": sum(spec.get("max_workers", 0) for spec in self.worker_node_types.values()),
            # gcs_address: fake nodes otherwise join the default port 6379, maybe someone else's cluster.
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "gcs_address": f"127.0.0.1:{port}",
                **({"launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID} if self.autoscaler_v2 else {}),
            },
            "available_node_types": nodes,
            "head_node_type": "ray.head.default",
            "auth": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_s / 60.0,
            "docker": {},
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
        }

    def process_env(self) -> dict[str, str]:
        """Environment for drivers of this cluster (and for the cluster itself)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # Token auth would read/write ~/.ray/auth_token, shared with everyone on this machine.
        env.update({"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": self.address, **self.env})
        return env

    def start(self) -> str:
        # Short path: Ray's unix socket paths under the temp dir must stay below ~107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="sdray-", dir="/tmp")
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        config_path = Path(self.temp_dir) / "autoscaling.json"
        config_path.write_text(json.dumps(self.config(port)))
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            f"--autoscaling-config={config_path}",
            "--include-dashboard=false",
            f"--num-cpus={self.head_resources.get('CPU', 0)}",
            f"--num-gpus={self.head_resources.get('GPU', 0)}",
            "--disable-usage-stats",
        ]
        env = self.process_env()
        env.pop("RAY_ADDRESS")
        env.update({"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"})
        if self.autoscaler_v2:
            env.update(
                {
                    "RAY_enable_autoscaler_v2": "1",
                    "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
                }
            )
        # A new session: every process the cluster starts (raylets, workers, fake nodes) inherits
        # its id, so shutdown can end exactly those, by pid.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._sid = proc.pid
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            self.shutdown()
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out}")
        return self.address

    def shutdown(self) -> None:
        if self._sid is None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            for pid in _session_pids(self._sid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while _session_pids(self._sid) and time.time() < deadline:
                time.sleep(0.2)
        self._sid = None

    def ray_data_log(self) -> str:
        """Ray Data's execution log of the last dataset (its scaling decisions), for diagnosis."""
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/ray-data/ray-data-dataset_*.log"))
        return logs[-1].read_text(errors="replace") if logs else ""

    def remove_files(self) -> None:
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
