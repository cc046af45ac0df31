"""A real local Ray cluster for tests: a head and a second node on this machine, each a
separate ``ray start --block`` process (1 CPU, a fixed memory resource, its own temp dir),
stopped by signalling the process groups this module started (never ``ray stop``, which
would stop every Ray process on the machine)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

NODE_MEMORY = 1_500_000_000
"""Each node's ``memory`` resource (bytes): one worker's request fits, two do not."""
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
"""Token authentication off: the cluster lives and dies inside one test session."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the node's process group (ours: started with a new session), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            # the group may outlive its leader for a moment (raylet, gcs): give them the signal
        except subprocess.TimeoutExpired:
            continue
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_nodes(address: str, n: int, env: dict[str, str], timeout: float = 90) -> None:
    code = (
        "import ray, sys, logging; ray.init(address=sys.argv[1], logging_level=logging.ERROR);"
        "print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run([sys.executable, "-c", code, address], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        if r.returncode == 0 and r.stdout.strip() == str(n):
            return
        time.sleep(1)
    raise RuntimeError(f"the test Ray cluster at {address} did not come up with {n} nodes")


@contextmanager
def local_cluster() -> Iterator[str]:
    """Start the two nodes; yield the head's address; stop both."""
    env = {**os.environ, **ENV}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    logs = Path(tempfile.mkdtemp(prefix="sm-ray-logs-"))
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
              "--memory", str(NODE_MEMORY), "--disable-usage-stats"]  # fmt: skip
    try:
        for i, extra in enumerate(
            [["--head", "--port", str(port), "--include-dashboard", "false"],
             ["--address", address]]
        ):  # fmt: skip
            tmp = tempfile.mkdtemp(prefix=f"smr{i}")  # short: Ray's socket paths are limited
            with (logs / f"node{i}.log").open("w") as log:
                procs.append(subprocess.Popen(
                    [_ray(), "start", *extra, *common, "--temp-dir", tmp],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                ))  # fmt: skip
            _wait_nodes(address, i + 1, env)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)


if __name__ == "__main__":  # a manual check: start, print the address, stop
    with local_cluster() as addr:
        print(addr)
