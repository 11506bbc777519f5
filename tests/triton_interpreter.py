"""Rerun a test file under Triton's interpreter (``TRITON_INTERPRET=1``), where the fused kernels run on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys


def assert_passes_under_interpreter(test_file: str) -> None:
    """Run ``test_file``'s tests in a subprocess with ``TRITON_INTERPRET=1`` and require them to pass.

    Args:
        test_file: the test module's path (``__file__``). Its interpreter-only tests skip themselves in this
            process and run in the subprocess; the test calling this helper skips there.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and "skipped" in done.stdout  # the calling test itself is skipped there
