"""`training.cli.end_processes` closes the process group and lets the process end normally: exit handlers run and the
exit code is the command's (the 2-process runs themselves are in test_painterdata.py and test_painterbench.py)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO


def test_end_processes_closes_the_group_and_the_interpreter_exits_normally(tmp_path):
    script = textwrap.dedent(f"""
        import atexit, sys
        import torch.distributed as dist
        sys.path.insert(0, {REPO!r})
        from training.cli import end_processes

        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        atexit.register(lambda: print("exit handlers ran, group open:", dist.is_initialized(), flush=True))
        raise SystemExit(end_processes(3))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "exit handlers ran, group open: False" in result.stdout
    assert "terminate called" not in result.stderr
