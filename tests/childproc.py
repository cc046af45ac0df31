"""Run the CLI in a fresh process and read back that process's own peak RSS.

The child reports VmHWM, its address space's high-water mark, at exit. (``ru_maxrss`` from
``wait4`` would not do: a vforked child inherits its parent's maximum, and pytest's is large
once the suite has run for a while.)
"""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import atexit, sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("VmHWM_KiB " + line.split()[1] + "\\n")
atexit.register(hwm)
from streammerge.cli import main
main(sys.argv[1:], prog_name="streammerge")
"""


def run_measured(args: list[str]) -> tuple[int, str, str, float]:
    """Run ``streammerge ARGS`` in a child: (exit code, stdout, stderr, its peak RSS in MiB)."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=600
    )
    hwm = [ln for ln in proc.stderr.splitlines() if ln.startswith("VmHWM_KiB ")]
    assert len(hwm) == 1, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr, int(hwm[0].split()[1]) / 1024
