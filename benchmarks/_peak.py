"""Run a Python snippet in a fresh child process and measure its peak anonymous memory.

A thread in the parent reads /proc/CHILD/status every few ms and keeps the highest RssAnon:
private anonymous memory, what the process really allocates (file-backed mmap pages and the page
cache are not in it). The snippet prints one JSON line last; its wall time is measured by the
snippet itself around the work (imports excluded)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(code: str, interval: float = 0.005, env: dict | None = None) -> tuple[dict, float]:
    """Returns (the JSON the snippet printed last, peak RssAnon in MiB)."""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env=env)
    peak = 0
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_anon_kb(p.pid))
            time.sleep(interval)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    out, err = p.communicate()
    done.set()
    t.join()
    if p.returncode != 0:
        raise RuntimeError(f"child failed ({p.returncode}):\n{err[-3000:]}")
    last = [l for l in out.splitlines() if l.startswith("{")][-1]
    return json.loads(last), peak / 1024


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine() -> str:
    import os
    import platform

    import torch
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (f"{cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
