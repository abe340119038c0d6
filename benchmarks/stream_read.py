"""Streaming checkpoint read/write: peak memory and wall time, loratools against safetensors.

    .venv/bin/python benchmarks/stream_read.py            # ~1.5 GiB checkpoint, largest tensor 64 MiB
    .venv/bin/python benchmarks/stream_read.py --quick    # a few seconds: checks that the script works
    .venv/bin/python benchmarks/stream_read.py --size-gb 3 --largest-mb 128 --json out.json

A synthetic bf16 checkpoint (config.json, 3 shards, model.safetensors.index.json) is generated in a
temporary directory, tensor by tensor from a seeded generator and streamed through loratools'
CheckpointWriter, so building it never holds more than one tensor. Then each method runs in a
fresh child process (so peaks don't mix):

  build             generate every tensor and stream it through CheckpointWriter (loratools)
  read-ours    (a)  Checkpoint.open, then ck.get(name) for every tensor, checksum it, drop it
  read-peer    (b)  safetensors.torch.load_file on every shard (the usual way), then the same checksum
  read-peer-pread (b2)  the same with load_file(..., backend="pread"): bytes read into RAM
  write-ours   (c)  stream every tensor from the checkpoint through CheckpointWriter into a copy
  write-peer   (d)  load_file every shard, save_file each shard again (+ index, config), fsync
  write-peer-pread (d2)  the same with load_file(..., backend="pread")

Note: safetensors' default ("mmap") load_file returns tensors backed by a private, copy-on-write
memory map of the file (an rw-p mapping in /proc/self/maps): nothing is copied until a tensor is
written to, so its pages are file-backed and do not show in RssAnon. The "pread" backend (when
the installed safetensors has it) reads the bytes into ordinary process memory, as an eager load
does; those rows are skipped on versions without it. Each method runs --repeat times, interleaved;
the table shows the median wall time and the highest peak.

While a child works, a thread in this (parent) process reads /proc/CHILD/status every
--interval-ms and keeps the maximum RssAnon (private anonymous memory: what a process really
allocates; file-backed mmap pages and page cache are not in it). The child resets its VmHWM after
its imports (/proc/self/clear_refs) and reports it at the end: VmHWM also counts resident pages of
mmap'd files, which the kernel can drop at any time, so it is shown for context only. Wall time
is measured inside the child around the work alone (not interpreter start-up or imports).

Checksums: for each tensor, a float sum (chunked ``.float().sum()``, accumulated in float64) and
an exact integer sum of its raw 16-bit words. Those of read-ours and read-peer must agree with
each other and with the ones computed while building; the copies written by write-ours and
write-peer are read back (untimed, in this process) and must agree too. The temporary directory
is deleted at the end, also on failure. Disk use is at most about twice the checkpoint size.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 1024**2
GiB = 1024**3
SEED = 1234
CHUNK = 1 << 20  # elements per checksum chunk: keeps the checksum's temporaries at a few MiB

# --------------------------------------------------------------------------------------------
# /proc helpers (Linux only)


_STATUS_RE = re.compile(rb"^(RssAnon|VmHWM|VmRSS|RssFile):\s+(\d+) kB", re.M)


def read_status(pid: int | str = "self") -> dict[str, int]:
    """RssAnon, VmHWM, VmRSS, RssFile of a process, in bytes ({} once it has exited)."""
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY)
    except FileNotFoundError:
        return {}
    try:
        raw = os.read(fd, 8192)
    except OSError:
        return {}
    finally:
        os.close(fd)
    return {k.decode(): int(v) * 1024 for k, v in _STATUS_RE.findall(raw)}


def cpu_busy_seconds() -> float:
    """CPU time spent busy by the whole machine so far (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Polls /proc/PID/status and keeps the maxima, until stopped or the process is gone."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop_event = threading.Event()
        self.peak_anon = self.peak_rss = self.samples = 0
        self.cpu = 0.0  # this thread's own CPU time

    def sample(self) -> bool:
        s = read_status(self.pid)
        if "RssAnon" not in s:  # exited (a zombie has no memory lines)
            return False
        self.peak_anon = max(self.peak_anon, s["RssAnon"])
        self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))
        self.samples += 1
        return True

    def run(self):
        c0 = time.thread_time()
        while not self.stop_event.is_set() and self.sample():
            time.sleep(self.interval)
        self.cpu = time.thread_time() - c0

    def stop(self):
        self.stop_event.set()
        self.join()


# --------------------------------------------------------------------------------------------
# the synthetic checkpoint


def layout(total: int, largest: int) -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    """A Llama-like bf16 layout: the embedding and lm_head are the largest tensors (``largest``
    bytes each), MLP matrices at most half of that, and as many layers as make about ``total``."""
    h = 64
    while h < 4096 and 2.75 * (2 * h) ** 2 * 2 * 2 <= largest:  # MLP matrix (bf16) <= largest / 2
        h *= 2
    inter = int(2.75 * h) // 64 * 64
    vocab = max(1, largest // (2 * h))
    layer = [("input_layernorm.weight", (h,)), ("self_attn.q_proj.weight", (h, h)),
             ("self_attn.k_proj.weight", (h, h)), ("self_attn.v_proj.weight", (h, h)),
             ("self_attn.o_proj.weight", (h, h)), ("post_attention_layernorm.weight", (h,)),
             ("mlp.gate_proj.weight", (inter, h)), ("mlp.up_proj.weight", (inter, h)),
             ("mlp.down_proj.weight", (h, inter))]
    per_layer = sum(2 * math.prod(s) for _, s in layer)
    n_layers = max(1, round((total - 2 * 2 * vocab * h - 2 * h) / per_layer))
    specs = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(n_layers):
        specs += [(f"model.layers.{i}.{n}", s) for n, s in layer]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inter, "num_hidden_layers": n_layers, "num_attention_heads": max(1, h // 128),
              "num_key_value_heads": max(1, h // 128), "vocab_size": vocab, "torch_dtype": "bfloat16",
              "tie_word_embeddings": False}
    return config, specs


def shard_size_for(total: int) -> int:
    # Greedy planning fills each shard to within one tensor of the limit: with the largest tensor
    # under a tenth of the total, 0.4 * total gives exactly 3 shards.
    return int(0.4 * total)


# --------------------------------------------------------------------------------------------
# work done in the child processes


def checksum(t) -> tuple[float, int]:
    import torch

    flat = t.reshape(-1)
    fsum = 0.0
    for c in flat.split(CHUNK):
        fsum += float(c.float().sum())
    words = flat.view(torch.int16) if t.element_size() == 2 else flat.view(torch.uint8)
    isum = 0
    for c in words.split(CHUNK // 4):  # an int64 temporary of 2 MiB
        isum += int(c.sum(dtype=torch.int64))
    return fsum, isum


def shard_files(ckpt: Path) -> dict[str, list[str]]:
    """shard file name -> tensor names, from the index (or the single model.safetensors)."""
    idx = ckpt / "model.safetensors.index.json"
    if not idx.exists():
        from safetensors import safe_open

        with safe_open(ckpt / "model.safetensors", "pt") as f:
            return {"model.safetensors": list(f.keys())}
    out: dict[str, list[str]] = {}
    for name, fname in json.loads(idx.read_text())["weight_map"].items():
        out.setdefault(fname, []).append(name)
    return out


def fsync_tree(d: Path) -> None:
    for p in [*sorted(d.iterdir()), d]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def work_build(dst, size, largest, seed):
    import torch

    from loratools import st
    from loratools.checkpoint import CheckpointWriter

    config, layout_specs = layout(size, largest)
    specs = [st.TensorInfo(n, torch.bfloat16, s) for n, s in layout_specs]
    total = sum(s.nbytes for s in specs)
    g = torch.Generator().manual_seed(seed)
    sums = {}
    with CheckpointWriter(dst, specs, max_shard_size=shard_size_for(total), config=config) as w:
        for s in specs:
            t = torch.randn(s.shape, generator=g, dtype=s.dtype)
            sums[s.name] = checksum(t)
            w.write(s.name, t)
            del t
    return {"sums": sums}


def work_read_ours(src):
    from loratools.checkpoint import Checkpoint

    sums = {}
    with Checkpoint.open(src) as ck:
        for name in ck.keys():
            t = ck.get(name)
            sums[name] = checksum(t)
            del t
    return {"sums": sums}


def _load_all(src: Path, backend: str) -> dict:
    from safetensors.torch import load_file

    kw = {} if backend == "default" else {"backend": backend}
    sd = {}
    for fname in shard_files(src):
        sd.update(load_file(src / fname, **kw))
    return sd


def work_read_peer(src, backend):
    sd = _load_all(Path(src), backend)
    sums = {name: checksum(t) for name, t in sd.items()}
    del sd
    return {"sums": sums}


def work_write_ours(src, dst):
    from loratools.checkpoint import Checkpoint, CheckpointWriter

    with Checkpoint.open(src) as ck:
        specs = [ck.info(n) for n in ck.keys()]
        with CheckpointWriter(dst, specs, max_shard_size=shard_size_for(ck.total_bytes), aux_from=ck.root) as w:
            for s in specs:
                t = ck.get(s.name)
                w.write(s.name, t)
                del t
    return {}


def work_write_peer(src, dst, backend):
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    groups = shard_files(src)
    sd = _load_all(src, backend)
    dst.mkdir()
    for fname, names in groups.items():
        save_file({n: sd[n] for n in names}, dst / fname, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    if len(groups) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for f, names in groups.items() for n in sorted(names)}}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.copyfile(src / "config.json", dst / "config.json")
    fsync_tree(dst)  # loratools' writer fsyncs (atomic output): do the same, for like-for-like times
    del sd
    return {}


# method -> (function, extra arguments after the paths)
WORK = {"build": (work_build, ()), "read-ours": (work_read_ours, ()),
        "read-peer": (work_read_peer, ("default",)), "read-peer-pread": (work_read_peer, ("pread",)),
        "write-ours": (work_write_ours, ()),
        "write-peer": (work_write_peer, ("default",)), "write-peer-pread": (work_write_peer, ("pread",))}
LABELS = {
    "read-ours": "(a) loratools read: Checkpoint.open + ck.get each",
    "read-peer": "(b) peer read: load_file per shard (default mmap backend)",
    "read-peer-pread": "(b2) peer read: load_file per shard, backend=\"pread\"",
    "write-ours": "(c) loratools copy: ck.get -> CheckpointWriter",
    "write-peer": "(d) peer copy: load_file + save_file per shard (mmap)",
    "write-peer-pread": "(d2) peer copy: load_file(backend=\"pread\") + save_file",
    "build": "(build) loratools: generate + CheckpointWriter",
}
OURS = {"read-peer": "read-ours", "read-peer-pread": "read-ours",
        "write-peer": "write-ours", "write-peer-pread": "write-ours"}


def has_pread_backend() -> bool:
    import inspect

    from safetensors.torch import load_file

    return "backend" in inspect.signature(load_file).parameters


def child_main(method: str, args: list[str]) -> None:
    import torch  # noqa: F401 - every child imports the same modules, so baselines match
    import safetensors.torch  # noqa: F401

    import loratools.checkpoint  # noqa: F401

    conv = [int(a) if a.isdigit() else a for a in args]
    print("READY " + json.dumps(read_status()), flush=True)
    if sys.stdin.readline().strip() != "GO":
        sys.exit(2)
    hwm_reset = reset_hwm()
    before = read_status()
    fn, extra = WORK[method]
    busy0, cpu0, t0 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
    res = fn(*conv, *extra)
    wall = time.perf_counter() - t0
    cpu, busy = time.process_time() - cpu0, cpu_busy_seconds() - busy0
    after = read_status()
    res.update(wall=wall, cpu=cpu, machine_busy=busy, before=before, after=after, hwm_reset=hwm_reset)
    print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------
# the parent


def run_child(method: str, args: list, interval: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, *map(str, args)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    sampler = None
    try:
        line = p.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"{method}: child failed to start (exit code {p.wait()})")
        sampler = Sampler(p.pid, interval)
        sampler.sample()  # the baseline: interpreter + torch + safetensors + loratools imported
        baseline = sampler.peak_anon
        sampler.start()
        p.stdin.write("GO\n")
        p.stdin.flush()
        result = None
        for line in p.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
        sampler.stop()
        code = p.wait()
        if code != 0 or result is None:
            raise RuntimeError(f"{method}: child failed (exit code {code})")
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if p.poll() is None:
            p.kill()
            p.wait()
    # CPU the rest of the machine used while the child worked (other processes: they slow it down)
    other = max(0.0, result["machine_busy"] - result["cpu"] - sampler.cpu)
    result.update(method=method, baseline_anon=baseline, peak_anon=sampler.peak_anon,
                  peak_rss=sampler.peak_rss, samples=sampler.samples, sampler_cpu=sampler.cpu,
                  other_cpu=other, other_load=other / max(result["wall"], 1e-9) / (os.cpu_count() or 1))
    return result


def verify_copy(path: Path, expected: dict) -> None:
    """Read a written checkpoint back (with loratools, untimed) and compare every tensor."""
    from loratools.checkpoint import Checkpoint

    if not (path / "model.safetensors.index.json").exists():
        raise SystemExit(f"FAIL: {path.name} has no model.safetensors.index.json")
    with Checkpoint.open(path) as ck:
        if set(ck.keys()) != set(expected):
            raise SystemExit(f"FAIL: {path.name} holds other tensors than the source")
        for name in ck.keys():
            got = checksum(ck.get(name))
            if tuple(got) != tuple(expected[name]):
                raise SystemExit(f"FAIL: {path.name}: tensor {name!r} differs from the source")


def compare_sums(a: dict, b: dict, what: str) -> None:
    if a.keys() != b.keys():
        raise SystemExit(f"FAIL: {what}: different tensor names")
    bad = [n for n in a if tuple(a[n]) != tuple(b[n])]
    if bad:
        raise SystemExit(f"FAIL: {what}: checksums differ for {len(bad)} tensors, e.g. {bad[0]!r}")


def machine() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._peak import cpu_model

    cpu = cpu_model()
    ram = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    import safetensors
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "ram_gib": round(ram / GiB, 1),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": torch.__version__, "safetensors": safetensors.__version__}


def mib(n: float) -> str:
    return f"{n / MiB:,.0f}" if n >= 10 * MiB else f"{n / MiB:,.1f}"


def summarize(runs: list[dict]) -> dict:
    """Median wall time; the highest peak (and its baseline) over the repeats."""
    walls = sorted(r["wall"] for r in runs)
    worst = max(runs, key=lambda r: r["peak_anon"] - r["baseline_anon"])
    return {"wall": walls[len(walls) // 2], "wall_min": walls[0], "wall_max": walls[-1],
            "peak_anon": worst["peak_anon"], "baseline_anon": worst["baseline_anon"],
            "over": worst["peak_anon"] - worst["baseline_anon"],
            "hwm": max(r["after"].get("VmHWM", 0) for r in runs)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.5, help="checkpoint size in GiB (default 1.5)")
    ap.add_argument("--largest-mb", type=float, default=64, help="largest tensor in MiB (default 64)")
    ap.add_argument("--quick", action="store_true", help="small sizes (64 MiB, largest 4 MiB): a few seconds")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each method, interleaved (default 3; 1 with --quick): median wall, highest peak")
    ap.add_argument("--interval-ms", type=float, default=2.0, help="memory sampling interval (default 2 ms)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--tmpdir", help="where to build the temporary checkpoint (default: the system temp dir)")
    ap.add_argument("--json", help="also write the raw results to this file")
    a = ap.parse_args(argv)
    if a.quick:
        a.size_gb, a.largest_mb = 1 / 16, 4
        if "--repeat" not in (argv if argv is not None else sys.argv):
            a.repeat = 1
    size, largest = int(a.size_gb * GiB), int(a.largest_mb * MiB)
    if largest * 10 > size:
        ap.error("--largest-mb must be under a tenth of --size-gb (the point is a checkpoint much larger than its largest tensor)")
    if a.repeat < 1:
        ap.error("--repeat must be at least 1")
    interval = a.interval_ms / 1000
    t_start = time.perf_counter()

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
          f"{info['ram_gib']} GiB RAM, {info['os']}; Python {info['python']}, torch {info['torch']}, "
          f"safetensors {info['safetensors']}")

    pread = has_pread_backend()
    readers = ["read-ours", "read-peer"] + (["read-peer-pread"] if pread else [])
    writers = ["write-ours", "write-peer"] + (["write-peer-pread"] if pread else [])
    runs: dict[str, list[dict]] = {m: [] for m in [*readers, *writers]}
    tmp = Path(tempfile.mkdtemp(prefix="loratools-bench-", dir=a.tmpdir))
    try:
        src = tmp / "src"
        build = run_child("build", [src, size, largest, a.seed], interval)
        expected = build.pop("sums")
        runs["build"] = [build]
        from loratools.checkpoint import Checkpoint

        with Checkpoint.open(src) as ck:
            total = ck.total_bytes
            big = max(ck.info(n).nbytes for n in ck.keys())
            n_tensors, n_shards = len(ck.keys()), len(ck.shards)
        disk = sum(p.stat().st_size for p in src.iterdir())
        print(f"checkpoint: {n_tensors} bf16 tensors, {mib(total)} MiB in {n_shards} shards "
              f"(+ index, config; {mib(disk)} MiB on disk), largest tensor {mib(big)} MiB; "
              f"built in {build['wall']:.1f} s")
        for rep in range(a.repeat):
            for method in readers:
                r = run_child(method, [src], interval)
                compare_sums(expected, r.pop("sums"), f"{method} vs the generated tensors")
                runs[method].append(r)
            for method in writers:
                dst = tmp / method
                r = run_child(method, [src, dst], interval)
                if rep == 0:
                    verify_copy(dst, expected)
                shutil.rmtree(dst)
                runs[method].append(r)
        print(f"checksums: {' == '.join(readers)} == generated, for every tensor (every run)")
        print(f"copies: the outputs of {', '.join(writers)} read back equal to the source")
        if not pread:
            print(f"(safetensors {info['safetensors']} has no load_file(backend=...): the pread rows are skipped)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    by = {m: summarize(rs) for m, rs in runs.items()}
    print()
    print(f"checkpoint {mib(total)} MiB, largest tensor {mib(big)} MiB; {a.repeat} run(s) each; memory in MiB; "
          f"'over base' = peak RssAnon minus the child's RssAnon after imports")
    print("| method | wall s (median) | peak RssAnon | over base | VmHWM | over base / largest | over base / total "
          "| peer/ours peak RssAnon (over base) | peer/ours wall |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for m in [*readers, *writers, "build"]:
        r = by[m]
        ratio_mem = ratio_wall = ""
        if m in OURS:
            o = by[OURS[m]]
            ratio_mem = f"{r['peak_anon'] / o['peak_anon']:.2f}x ({r['over'] / max(o['over'], 1):.2f}x)"
            ratio_wall = f"{r['wall'] / o['wall']:.2f}x"
        wall = f"{r['wall']:.2f}" if len(runs[m]) == 1 else f"{r['wall']:.2f} ({r['wall_min']:.2f}-{r['wall_max']:.2f})"
        print(f"| {LABELS[m]} | {wall} | {mib(r['peak_anon'])} | {mib(r['over'])} | {mib(r['hwm'])} | "
              f"{r['over'] / big:.2f} | {r['over'] / total:.3f} | {ratio_mem} | {ratio_wall} |")
    every = [r for rs in runs.values() for r in rs]
    print(f"\nchild baseline RssAnon after imports: {mib(min(r['baseline_anon'] for r in every))}-"
          f"{mib(max(r['baseline_anon'] for r in every))} MiB; samples per run: "
          f"{min(r['samples'] for r in every)}-{max(r['samples'] for r in every)} every {a.interval_ms:g} ms; "
          f"VmHWM reset after imports: {all(r['hwm_reset'] for r in every)}; "
          f"total time {time.perf_counter() - t_start:.0f} s")
    long_runs = [r for r in every if r["wall"] >= 0.5] or every  # /proc/stat counts in 10 ms ticks
    busiest = max(long_runs, key=lambda r: r["other_load"])
    print(f"other processes' CPU while the children worked: at most {busiest['other_load']:.0%} of the machine "
          f"({busiest['method']}, {busiest['wall']:.2f} s run)")
    if busiest["other_load"] > 0.10:
        print("WARNING: the machine was busy with other work during some runs: wall times are disturbed "
              "(memory figures are not); rerun on a quiet machine")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": info, "args": vars(a), "total_bytes": total,
                                            "largest_bytes": big, "tensors": n_tensors, "shards": n_shards,
                                            "summary": by, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3:])
    else:
        main()
