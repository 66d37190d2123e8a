"""Soak bench: the reliability soak (harness/soak.py, which tests/test_reliability.py runs briefly) with the full
prompt count, printing the server's
memory after every prompt so the curve can be looked at.

A real ComfyUI `main.py` server (CPU by default) runs N prompts with varying seeds, masks and scales, a checkpoint
swap and a branch swap in the middle (and back to the first pair for the last quarter), and one prompt interrupted
with `POST /interrupt` during sampling. After each prompt it prints the resident set size of the server process
(psutil on its pid); with `--gpu` the server may use CUDA and the line also shows torch's allocated/reserved CUDA
memory as ComfyUI's own /system_stats reports it. The summary checks the same promises as the test (RSS margin, no
"Potential memory leak" log line, every prompt succeeded or was interrupted) and exits 1 if one is broken.

Usage: python bench/soak.py [--prompts 50] [--gpu] [--save bench/results/soak-cpu.txt]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from harness import use_comfyui  # noqa: E402
from machine import device_name  # noqa: E402
from harness.server import SERVER_ENV  # noqa: E402
from harness.soak import (BASELINE_PROMPTS, RSS_MARGIN_BYTES, SoakRecord, run_soak, server_rss,  # noqa: E402
                          setup_server, soak_plan, soak_problems)

MIB = 2**20


def machine_info() -> list[str]:
    import torch

    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    lines = [f"Model name: {device_name()}", f"nproc: {nproc}",
             f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
             f"python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}"]
    if torch.cuda.is_available():
        lines.append(f"GPU: {device_name('cuda:0')}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=50, help="number of soak prompts (default 50)")
    parser.add_argument("--gpu", action="store_true", help="start the server without --cpu (CUDA machines)")
    parser.add_argument("--save", help="also write the output to this file")
    parser.add_argument("--keep", action="store_true", help="keep the server's base folder (log, outputs)")
    args = parser.parse_args()
    use_comfyui(cpu=True)  # in-process ComfyUI only builds the test checkpoints; the server picks its own device

    out: list[str] = []

    def emit(line: str = "") -> None:
        out.append(line)
        print(line, flush=True)

    for line in machine_info():
        emit(line)
    plan = soak_plan(args.prompts)
    emit(f"soak: {args.prompts} prompts through ComfyUI main.py {'(GPU allowed)' if args.gpu else '--cpu'}; "
         f"reference RSS after prompt {BASELINE_PROMPTS}, margin {RSS_MARGIN_BYTES / MIB:.0f} MiB")
    emit("server environment: " + " ".join(f"{k}={v}" for k, v in SERVER_ENV.items()) + " (harness/server.py)")
    base = tempfile.mkdtemp(prefix="painternet-soak-")
    server = setup_server(base, cpu=not args.gpu)
    emit(f"server pid {server.process.pid}; RSS after start-up {server_rss_mib(server):.1f} MiB")
    header = f"{'#':>3} {'outcome':<12} {'sec':>6} {'RSS MiB':>8}"
    emit(header + ("  GPU alloc/reserved MiB" if args.gpu else "") + "  prompt")

    def report(r: SoakRecord) -> None:
        gpu = f"  {r.gpu[0] / MIB:9.1f}/{r.gpu[1] / MIB:<9.1f}" if r.gpu else ("  n/a" + " " * 15 if args.gpu else "")
        emit(f"{r.index + 1:>3} {r.outcome[:12]:<12} {r.seconds:6.1f} {r.rss / MIB:8.1f}{gpu}  {r.label}")

    try:
        records = run_soak(server, len(plan), report)
        problems = soak_problems(server, records)
    finally:
        server.stop()
    rss = [r.rss for r in records]
    reference = rss[BASELINE_PROMPTS - 1]
    tail = rss[-max(len(rss) // 4, 1):]
    emit("")
    emit(f"RSS after prompt {BASELINE_PROMPTS}: {reference / MIB:.1f} MiB; after prompt {len(rss)}: "
         f"{rss[-1] / MIB:.1f} MiB (change {(rss[-1] - reference) / MIB:+.1f} MiB, margin "
         f"{RSS_MARGIN_BYTES / MIB:.0f} MiB)")
    emit(f"RSS min/max over the run: {min(rss) / MIB:.1f} / {max(rss) / MIB:.1f} MiB; last quarter (same models as "
         f"the reference) spread {(max(tail) - min(tail)) / MIB:.1f} MiB")
    emit(f"outcomes: {sum(r.outcome == 'success' for r in records)} success, "
         f"{sum(r.outcome == 'interrupted' for r in records)} interrupted, "
         f"{sum(r.outcome.startswith('error') for r in records)} error; "
         f"mean {sum(r.seconds for r in records) / len(records):.1f} s/prompt")
    emit("result: PASS" if not problems else "result: FAIL\n  " + "\n  ".join(problems))
    if args.save:
        with open(args.save, "w", encoding="utf-8") as fh:
            fh.write("\n".join(out) + "\n")
    if args.keep:
        emit(f"kept {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if problems else 0


def server_rss_mib(server) -> float:
    return server_rss(server) / MIB


if __name__ == "__main__":
    sys.exit(main())
