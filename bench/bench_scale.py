"""Scale: the cheap pipeline (bench/scale_recipe.yaml) at growing sizes, one run.

    python bench/bench_scale.py --sizes 10000 100000 1000000 --work /tmp/bench_scale

Generates synthetic raw shards (1,000 image+caption samples per tar, cached under
--work so a re-run skips it), then runs `curate run` once per size as a subprocess
(a fresh OUT each time) while sampling, every --interval seconds:
  driver        the `curate` process (plus its kernel high-water mark, VmHWM)
  workers       the summed RSS of the Ray worker processes (`ray::...`) under that driver,
                and the largest one alone (stage B's DuckDB task runs in one)
  Ray system    the summed RSS of raylet, gcs_server and the other Ray daemons it started
  machine       used memory (MemTotal - MemAvailable), peak minus what was used before
Per stage figures come from OUT/summary.json "stages" (annotate, decide, write: seconds,
samples, raw_bytes_read); an engine that does not write them gets "n/a".

Prints one markdown table (stdout), then the floors of issue 10 as PASS/FAIL lines,
each a ratio against the reference row (10,000 samples, or the smallest size) of the
same run. Progress goes to stderr; everything measured also goes to --json.

Start-up: when OUT/summary.json has "seconds" and "startup_seconds", everything outside
the engine's post-start-up time (seconds - startup_seconds) is start-up: the interpreter
and its imports, Ray's start, printing the summary. An engine that does not report it
gets the time from starting `curate` to its first stage-A progress line instead ("~" in
the table), which also holds the driver's scan of the raw shards' tar headers.

Linux only for the memory figures (reads /proc); elsewhere they are n/a.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GEN_VERSION = "2"
MB = 1024 * 1024

# Planted share of each category (the rest are distinct images with ordinary captions).
EXACT_DUP = 0.05     # the same jpg bytes as an earlier distinct sample
NEAR_DUP = 0.05      # an earlier distinct sample's pixels, re-encoded at a lower quality
TINY = 0.005         # 16-24 px: image_quality drops it (too_small)
SHORT_CAPTION = 0.005  # 1-2 words: caption_length drops it
CORRUPT = 0.001      # truncated jpg: decode_image fails it

WORDS = ("a an the red green blue yellow purple orange black white grey small large tiny huge round square "
         "striped dotted bright dark pale shiny dull old new wooden metal glass paper stone cat dog bird "
         "tree house car boat bicycle chair table lamp window door flower cloud mountain river street "
         "field beach city garden kitchen bridge tower train road forest lake sky sun moon star hill "
         "sits stands runs flies floats rests leans hangs lies shines near under over beside behind "
         "in on with and of at from across along inside outside above below between two three four "
         "many several some photo picture drawing view close-up scene of during morning evening night").split()


# ------------------------------------------------------------------ synthetic raw shards
def _category(seed: int, g: int) -> str:
    u = random.Random(f"{seed}/{g}/cat").random()
    for name, share in (("exact", EXACT_DUP), ("near", NEAR_DUP), ("tiny", TINY),
                        ("short", SHORT_CAPTION), ("corrupt", CORRUPT)):
        if u < share:
            return name if g > 0 else "distinct"
        u -= share
    return "distinct"


def _pixels(seed: int, g: int, tiny: bool = False) -> np.ndarray:
    """A random low-frequency colour field with mild noise: phashes of two of these
    differ by ~32 bits (the closest of 3,000 were 10 apart), so distinct stays distinct."""
    from PIL import Image

    rng = np.random.default_rng([seed, g])
    if tiny:
        w, h = int(rng.integers(16, 25)), int(rng.integers(16, 25))
    else:
        w, h = int(rng.integers(64, 129)), int(rng.integers(64, 97))
    grid = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.int16)
    y, x = int(rng.integers(0, NOISE_SIDE - h)), int(rng.integers(0, NOISE_SIDE - w))
    return np.clip(field + _noise()[y:y + h, x:x + w], 0, 255).astype(np.uint8)


NOISE_SIDE = 256
_NOISE: list[np.ndarray] = []


def _noise() -> np.ndarray:
    """One fixed tile of grain; each image takes a window of it at its own offset."""
    if not _NOISE:
        _NOISE.append(np.random.default_rng(12345).integers(-12, 13, (NOISE_SIDE, NOISE_SIDE, 1), dtype=np.int16))
    return _NOISE[0]


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _caption(seed: int, g: int, short: bool = False) -> str:
    r = random.Random(f"{seed}/{g}/txt")
    n = r.randint(1, 2) if short else r.randint(3, 24)
    words = [r.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def _earlier_distinct(seed: int, g: int) -> int | None:
    r = random.Random(f"{seed}/{g}/ref")
    for _ in range(64):
        ref = r.randrange(g)
        if _category(seed, ref) == "distinct":
            return ref
    return None


def make_sample(seed: int, g: int) -> tuple[str, list[tuple[str, bytes]]]:
    """Sample number g (global, so any prefix of the shard pool is self-consistent:
    duplicates only ever point back at earlier samples)."""
    from curation.ids import make_uid

    cat = _category(seed, g)
    ref = _earlier_distinct(seed, g) if cat in ("exact", "near") else None
    if ref is None and cat in ("exact", "near"):
        cat = "distinct"
    text = _caption(seed, g, short=cat == "short")
    if cat == "exact":
        jpg, text = _jpeg(_pixels(seed, ref), 85), _caption(seed, ref)
    elif cat == "near":
        jpg = _jpeg(_pixels(seed, ref), random.Random(f"{seed}/{g}/q").choice((60, 70, 75)))
    else:
        jpg = _jpeg(_pixels(seed, g, tiny=cat == "tiny"), 85)
        if cat == "corrupt":
            jpg = jpg[: len(jpg) // 2]
    key = f"{g:09d}"

    meta = {"uid": make_uid(f"bench_scale/{seed}", g), "kind": "image_text", "source": "bench_scale",
            "url": f"https://bench.invalid/{seed}/{key}.jpg", "caption": text, "key": key, "status": "success",
            "planted": cat, "dup_of_sample": None if ref is None else f"{ref:09d}"}
    return key, [("jpg", jpg), ("txt", text.encode()), ("json", json.dumps(meta).encode())]


def _write_shard(job: tuple[str, int, int, int]) -> int:
    path, seed, first, count = job
    from curation.wds import tar_bytes

    data = tar_bytes(make_sample(seed, g) for g in range(first, first + count))
    tmp = Path(path + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return count


def generate(work: Path, size: int, seed: int, per_shard: int, procs: int) -> tuple[Path, int]:
    """work/pool/ holds shards 0, 1, ... (generated once, shared by every size);
    work/raw-SIZE/ links the first ones. Returns (raw dir, raw bytes)."""
    pool = work / "pool"
    params = {"version": GEN_VERSION, "seed": seed, "per_shard": per_shard}
    stamp = pool / "params.json"
    if stamp.exists() and json.loads(stamp.read_text()) != params:
        log(f"generation parameters changed: removing {pool}")
        shutil.rmtree(pool)
    pool.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(params) + "\n")
    jobs = []
    for i in range(math.ceil(size / per_shard)):
        count = min(per_shard, size - i * per_shard)
        name = f"scale-{i:06d}.tar" if count == per_shard else f"scale-{i:06d}-n{count}.tar"
        jobs.append((str(pool / name), seed, i * per_shard, count))
    todo = [j for j in jobs if not Path(j[0]).exists()]
    if todo:
        log(f"generating {sum(j[3] for j in todo):,} samples in {len(todo)} shards ({procs} processes)...")
        t, done = time.perf_counter(), 0
        with Pool(procs) as workers:
            for n in workers.imap_unordered(_write_shard, todo):
                done += n
                if done % (20 * per_shard) < per_shard or done == sum(j[3] for j in todo):
                    log(f"  generated {done:,} samples, {time.perf_counter() - t:.0f} s")
    raw = work / f"raw-{size}"
    if raw.exists():
        shutil.rmtree(raw)
    raw.mkdir(parents=True)
    total = 0
    for path, _, first, _ in jobs:
        (raw / f"scale-{first // per_shard:06d}.tar").symlink_to(path)
        total += Path(path).stat().st_size
    return raw, total


# ------------------------------------------------------------------ memory sampling (/proc)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
HAVE_PROC = Path("/proc/self/stat").exists()


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, rss bytes, start time in clock ticks) for every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _read(f"/proc/{name}/stat")
        if not stat:
            continue
        rest = stat.rsplit(")", 1)[-1].split()
        try:
            table[int(name)] = (int(rest[1]), int(rest[21]) * PAGE, int(rest[19]))
        except (IndexError, ValueError):
            continue
    return table


def stop_leftovers(seen: set[tuple[int, int]]) -> list[int]:
    """Processes the run started (pid + start time, so a reused pid is never touched)
    that outlived it: SIGTERM, then SIGKILL. Returns their pids."""
    if not HAVE_PROC:
        return []
    table = _proc_table()
    alive = [pid for pid, start in seen if pid in table and table[pid][2] == start]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in alive):
            time.sleep(0.2)
        table = _proc_table()
        alive = [pid for pid in alive if pid in table and (pid, table[pid][2]) in seen]
        if not alive:
            break
    return [pid for pid, _ in seen if pid in alive] or alive


def _descendants(root: int, table: dict[int, tuple[int, int, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def _is_worker(pid: int) -> bool:
    cmd = (_read(f"/proc/{pid}/cmdline") or "").split("\0")
    return cmd[0].startswith("ray::") or any("default_worker.py" in c for c in cmd[:4])


def _machine_used() -> int | None:
    text = _read("/proc/meminfo")
    if not text:
        return None
    info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
    return info["MemTotal"] - info["MemAvailable"]


class Sampler:
    def __init__(self, pid: int):
        self.pid = pid
        self.driver = self.driver_hwm = self.workers = self.workers_private = self.ray_sys = 0
        self.largest_worker = 0  # one process: stage B's DuckDB task shows here
        # RSS counts the object-store pages a worker has touched (shared memory, capped by
        # Ray's object_store_memory); private = RSS - shared is the worker's own heap.
        self.largest_worker_private = 0
        self.largest_worker_private_title = ""  # Ray names a worker after its task or actor
        self.max_workers_seen = 0
        self.base = _machine_used() if HAVE_PROC else None
        self.machine = 0
        self.now = {"driver": 0, "workers": 0, "n_workers": 0}
        self.seen: set[tuple[int, int]] = set()  # (pid, start time) of every descendant

    def sample(self) -> None:
        if not HAVE_PROC:
            return
        table = _proc_table()
        if self.pid not in table:
            return
        driver = table[self.pid][1]
        workers = private = sys_rss = n = 0
        for pid in _descendants(self.pid, table):
            self.seen.add((pid, table[pid][2]))
            rss = table[pid][1]
            if _is_worker(pid):
                n += 1
                workers += rss
                self.largest_worker = max(self.largest_worker, rss)
                statm = (_read(f"/proc/{pid}/statm") or "0 0 0").split()
                own = max(0, rss - int(statm[2]) * PAGE)
                private += own
                if own > self.largest_worker_private:
                    self.largest_worker_private = own
                    self.largest_worker_private_title = (_read(f"/proc/{pid}/cmdline") or "").split("\0")[0][:80]
            else:
                sys_rss += rss
        status = _read(f"/proc/{self.pid}/status") or ""
        hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
        self.driver_hwm = max(self.driver_hwm, int(hwm.group(1)) * 1024 if hwm else 0)
        self.driver = max(self.driver, driver)
        self.workers = max(self.workers, workers)
        self.workers_private = max(self.workers_private, private)
        self.ray_sys = max(self.ray_sys, sys_rss)
        self.max_workers_seen = max(self.max_workers_seen, n)
        used = _machine_used()
        if used is not None and self.base is not None:
            self.machine = max(self.machine, used - self.base)
        self.now = {"driver": driver, "workers": workers, "n_workers": n}


# ------------------------------------------------------------------ one run
class OutputReader(threading.Thread):
    """Copies the child's stdout+stderr to a log; notes the first stage-A progress line."""

    def __init__(self, stream, log_path: Path, t0: float):
        super().__init__(daemon=True)
        self.stream, self.log_path, self.t0 = stream, log_path, t0
        self.first_progress: float | None = None
        self.last_line = ""

    def run(self) -> None:
        with open(self.log_path, "wb") as log_file:
            pending = b""
            while chunk := self.stream.read1(65536) if hasattr(self.stream, "read1") else self.stream.read(4096):
                log_file.write(chunk)
                pending += chunk
                *lines, pending = re.split(rb"[\r\n]", pending)
                for raw in lines:
                    line = raw.decode(errors="replace").strip()
                    if not line:
                        continue
                    self.last_line = line
                    if self.first_progress is None and line.startswith("curate:"):
                        self.first_progress = time.perf_counter() - self.t0


def curate_command() -> list[str]:
    exe = Path(sys.executable).parent / "curate"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "curation.cli"]


def run_once(size: int, raw: Path, raw_bytes: int, out: Path, args) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"curate-{size}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, so its processes are its descendants
    cmd = curate_command() + ["run", str(args.pipeline), "--input", str(raw), "--out", str(out)]
    log(f"[{size:,}] {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # its own process group: we can stop all of it
    sampler = Sampler(proc.pid)
    reader = OutputReader(proc.stdout, log_path, t0)
    reader.start()
    last_beat = t0
    timed_out = False
    try:
        while proc.poll() is None:
            sampler.sample()
            now = time.perf_counter()
            if args.timeout and now - t0 > args.timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            if now - last_beat >= args.heartbeat:
                last_beat = now
                s = sampler.now
                log(f"[{size:,}] {now - t0:5.0f} s  driver {s['driver'] / MB:6.0f} MB  workers {s['workers'] / MB:6.0f} MB "
                    f"({s['n_workers']})  | {reader.last_line[:100]}")
            time.sleep(args.interval)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        stop_leftovers(sampler.seen)
        raise
    rc = proc.wait()
    wall = time.perf_counter() - t0
    reader.join(10)
    leftovers = stop_leftovers(sampler.seen)
    if leftovers:
        log(f"[{size:,}] stopped {len(leftovers)} process(es) the run left behind: {sorted(leftovers)}")
    result: dict = {"size": size, "rc": rc, "wall_s": wall, "raw_bytes": raw_bytes, "log": str(log_path),
                    "driver_peak_rss": max(sampler.driver, sampler.driver_hwm) if HAVE_PROC else None,
                    "driver_sampled_peak_rss": sampler.driver if HAVE_PROC else None,
                    "workers_peak_rss_sum": sampler.workers if HAVE_PROC else None,
                    "largest_worker_peak_rss": sampler.largest_worker if HAVE_PROC else None,
                    "largest_worker_peak_private": sampler.largest_worker_private if HAVE_PROC else None,
                    "largest_worker_peak_private_title": sampler.largest_worker_private_title if HAVE_PROC else None,
                    "workers_peak_private_sum": sampler.workers_private if HAVE_PROC else None,
                    "ray_system_peak_rss": sampler.ray_sys if HAVE_PROC else None,
                    "machine_peak_delta": sampler.machine if sampler.base is not None else None,
                    "max_workers": sampler.max_workers_seen, "first_progress_s": reader.first_progress}
    if timed_out:
        result["error"] = f"timed out after {args.timeout} s"
    summary_path = out / "summary.json"
    if rc != 0 or not summary_path.exists():
        tail = log_path.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-15:]
        result.setdefault("error", f"curate exited {rc}" + ("" if summary_path.exists() else ", no summary.json"))
        result["log_tail"] = tail
        log(f"[{size:,}] FAILED: {result['error']}\n    " + "\n    ".join(tail))
        return result
    summary = json.loads(summary_path.read_text())
    result["summary"] = {k: summary.get(k) for k in ("raw_samples", "seconds", "startup_seconds", "stages", "curate", "tiers")}
    result["reasons"] = {f"{r['status']}:{r['reason'] or '-'}": r["count"] for r in summary.get("by_stage_status_reason", [])
                         if r.get("stage") == "curate"}
    log(f"[{size:,}] done in {wall:.1f} s: {summary.get('curate')}")
    return result


# ------------------------------------------------------------------ figures
def derive(r: dict) -> dict:
    """The table's numbers from one run's measurements (None where not measured)."""
    d = {"size": r["size"], "ok": "summary" in r}
    if not d["ok"]:
        return d
    s = r["summary"]
    n = s.get("raw_samples") or r["size"]
    stages = s.get("stages") or {}
    wall = r["wall_s"]
    if s.get("startup_seconds") is not None and s.get("seconds") is not None:
        # The engine's own clock: everything outside its post-start-up seconds (interpreter
        # and imports, Ray start, printing the summary) is start-up.
        startup, estimated = max(0.0, wall - (float(s["seconds"]) - float(s["startup_seconds"]))), False
    else:
        startup, estimated = r.get("first_progress_s"), True
    d.update(samples=n, wall_s=wall, startup_s=startup, startup_estimated=estimated,
             ms_per_sample=wall / n * 1e3,
             ms_per_sample_after_startup=(wall - startup) / n * 1e3 if startup is not None else None,
             run_per_s=n / (wall - startup) if startup is not None and wall > startup else None)

    def rate(stage: str, default_samples: int | None = None):
        st = stages.get(stage) or {}
        secs, samples = st.get("seconds"), st.get("samples", default_samples)
        return samples / secs if secs and samples is not None else None

    d["annotate_per_s"] = rate("annotate")
    d["decide_per_s"] = rate("decide", n)
    d["write_per_s"] = rate("write")
    for stage in ("annotate", "write"):
        read = (stages.get(stage) or {}).get("raw_bytes_read")
        d[f"{stage}_read_ratio"] = read / r["raw_bytes"] if read is not None and r["raw_bytes"] else None
    for k in ("driver_peak_rss", "workers_peak_rss_sum", "largest_worker_peak_rss", "largest_worker_peak_private",
              "largest_worker_peak_private_title", "workers_peak_private_sum", "ray_system_peak_rss",
              "machine_peak_delta", "raw_bytes"):
        d[k] = r.get(k)
    d["run_vs_annotate"] = d["run_per_s"] / d["annotate_per_s"] if d["run_per_s"] and d["annotate_per_s"] else None
    d["status"] = s.get("curate") or {}
    return d


def _f(v, fmt: str = "{:.1f}", na: str = "n/a") -> str:
    return na if v is None else fmt.format(v)


def _mb(v) -> str:
    return "n/a" if v is None else f"{v / MB:,.0f} MB"


def table(rows: list[dict]) -> str:
    head = ["samples", "wall s", "start-up s", "ms/sample", "ms/sample after start-up", "annotate /s", "decide /s",
            "write /s", "whole run /s", "driver peak RSS", "workers peak RSS (sum)", "largest worker peak RSS",
            "largest worker peak private (RSS - shared)",
            "Ray daemons peak RSS",
            "machine peak (Δ)", "raw bytes", "annotate read / raw", "write read / raw", "kept / dropped / failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in rows:
        if not d["ok"]:
            lines.append(f"| {d['size']:,} | run failed |" + " |" * (len(head) - 2))
            continue
        st = d["status"]
        cells = [f"{d['samples']:,}", _f(d["wall_s"]),
                 ("~" if d["startup_estimated"] else "") + _f(d["startup_s"]),
                 _f(d["ms_per_sample"], "{:.3f}"), _f(d["ms_per_sample_after_startup"], "{:.3f}"),
                 _f(d["annotate_per_s"], "{:,.0f}"), _f(d["decide_per_s"], "{:,.0f}"), _f(d["write_per_s"], "{:,.0f}"),
                 _f(d["run_per_s"], "{:,.0f}"),
                 _mb(d["driver_peak_rss"]), _mb(d["workers_peak_rss_sum"]), _mb(d.get("largest_worker_peak_rss")),
                 _mb(d.get("largest_worker_peak_private")), _mb(d["ray_system_peak_rss"]),
                 _mb(d["machine_peak_delta"]), f"{d['raw_bytes'] / MB:,.0f} MB",
                 _f(d["annotate_read_ratio"], "{:.2f}x"), _f(d["write_read_ratio"], "{:.2f}x"),
                 f"{st.get('kept', 0):,} / {st.get('dropped', 0):,} / {st.get('failed', 0):,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def floor_checks(rows: list[dict], ref_size: int) -> list[dict]:
    """Issue 10's floors, each against the reference row of this run. Each check: `what`,
    `verdict` (PASS, FAIL, n/a), the two figures compared (`ours` at the size, `baseline`:
    the reference row's figure or the stage/bytes it is held to; None where there is
    none) in `units`, the `floor`, and `line`, the check as one line of text."""
    out = []
    ok = [d for d in rows if d["ok"]]

    def check(verdict, what, shown, detail, ours=None, baseline=None, units="", floor="") -> None:
        out.append({"what": what, "verdict": verdict.strip(), "result": shown, "ours": ours, "baseline": baseline,
                    "units": units, "floor": floor, "line": f"{verdict}  {what}: {shown}" + (f" ({detail})" if detail else "")})

    for d in rows:
        if not d["ok"]:
            check("FAIL", f"{d['size']:,}", "the run failed, no figures", "")
    ref = next((d for d in ok if d["size"] == ref_size), None) or (min(ok, key=lambda d: d["size"]) if ok else None)
    if ref is None:
        return out

    def verdict(value, good) -> str:
        return "n/a " if value is None else ("PASS" if good(value) else "FAIL")

    def mb(v):
        return None if v is None else v / MB

    bigger = [d for d in ok if d["size"] > ref["size"]]
    if not bigger:
        check("n/a ", f"per-sample time and driver RSS vs {ref['size']:,}", "no larger size in this run", "")
    for d in bigger:
        # Start-up is a fixed cost: the reference's is taken off every row. A row's own
        # start-up can hold per-sample work (the engine counts the raw shards' samples
        # before Ray starts), which must not be excused at 1M.
        b = ref["ms_per_sample_after_startup"]
        a = (d["wall_s"] - ref["startup_s"]) / d["samples"] * 1e3 if ref["startup_s"] is not None else None
        ratio = a / b if a is not None and b else None
        own = d["ms_per_sample_after_startup"]
        check(verdict(ratio, lambda x: x <= 1.2), f"per-sample wall time after start-up, {d['size']:,} vs {ref['size']:,}",
              _f(ratio, '{:.2f}x'), f"floor <= 1.20x; {_f(a, '{:.3f}')} vs {_f(b, '{:.3f}')} ms, "
              f"start-up {_f(ref['startup_s'])} s off both; with its own start-up off: "
              f"{_f(own / b if own is not None and b else None, '{:.2f}x')}", a, b, "ms/sample", "<= 1.20x")
        a, b = d["driver_peak_rss"], ref["driver_peak_rss"]
        ratio = a / b if a is not None and b else None
        check(verdict(ratio, lambda x: x <= 1.5), f"driver peak RSS, {d['size']:,} vs {ref['size']:,}",
              _f(ratio, '{:.2f}x'), f"floor <= 1.50x; {_mb(a)} vs {_mb(b)}", mb(a), mb(b), "MB", "<= 1.50x")
    for d in ok:
        # Not one of the floors: which worker's own heap (RSS - shared, so without the
        # object-store pages it maps) peaked, to check it against that task's configured bound.
        a = d.get("largest_worker_peak_private")
        check("info", f"largest worker's private memory at {d['size']:,}", _mb(a),
              f"in {d.get('largest_worker_peak_private_title') or 'n/a'}", mb(a), None, "MB", "")
    for d in ok:
        rss = d["driver_peak_rss"]
        check(verdict(rss, lambda x: x < 1e9), f"driver peak RSS at {d['size']:,}", _mb(rss), "floor < 1 GB",
              mb(rss), None, "MB", "< 1 GB")
    for d in ok:
        ratio = d["run_vs_annotate"]
        check(verdict(ratio, lambda x: x >= 0.7), f"whole run vs stage A alone at {d['size']:,}", _f(ratio, '{:.2f}x'),
              f"floor >= 0.70x; {_f(d['run_per_s'], '{:,.0f}')} vs {_f(d['annotate_per_s'], '{:,.0f}')} samples/s",
              d["run_per_s"], d["annotate_per_s"], "samples/s", ">= 0.70x")
    for d in ok:
        ratio = d["write_read_ratio"]
        read = ratio * d["raw_bytes"] if ratio is not None and d["raw_bytes"] is not None else None
        check(verdict(ratio, lambda x: x <= 1.2), f"stage C bytes read / raw bytes at {d['size']:,}", _f(ratio, '{:.2f}x'),
              "floor <= 1.20x", mb(read), mb(d["raw_bytes"]), "MB", "<= 1.20x")
    return out


def floors(rows: list[dict], ref_size: int) -> list[str]:
    """Issue 10's floors as PASS/FAIL lines (floor_checks)."""
    return [c["line"] for c in floor_checks(rows, ref_size)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"),
                    help="generated shards (kept: a re-run skips generation), outputs, logs, results")
    ap.add_argument("--pipeline", type=Path, default=HERE / "scale_recipe.yaml")
    ap.add_argument("--keep", action="store_true", help="keep each run's OUT folder (default: removed after the run)")
    ap.add_argument("--reference", type=int, default=10_000, help="the row the floors compare against")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-samples", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=min(2, os.cpu_count() or 1), help="generation processes")
    ap.add_argument("--interval", type=float, default=0.2, help="memory sampling period, seconds")
    ap.add_argument("--heartbeat", type=float, default=15.0, help="progress line period on stderr, seconds")
    ap.add_argument("--timeout", type=float, default=0, help="stop a run after this many seconds (0: never)")
    ap.add_argument("--json", type=Path, help="results file (default WORK/results-<time>.json)")
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    args.pipeline = args.pipeline.resolve()
    return args


def measure(args: argparse.Namespace) -> tuple[list[dict], Path]:
    """Every size once; returns the table's rows (derive) and the results file written."""
    if not HAVE_PROC:
        log("no /proc: memory figures will be n/a")

    results = []
    for size in sorted(set(args.sizes)):
        t = time.perf_counter()
        raw, raw_bytes = generate(args.work, size, args.seed, args.shard_samples, args.procs)
        log(f"[{size:,}] raw shards ready: {raw} ({raw_bytes / MB:,.0f} MB, {time.perf_counter() - t:.0f} s)")
        out = args.work / "out" / f"out-{size}"
        results.append(run_once(size, raw, raw_bytes, out, args))
        if not args.keep and out.exists():
            shutil.rmtree(out)

    rows = [derive(r) for r in results]
    path = args.json or args.work / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(),
                                "runs": results, "rows": rows}, indent=2, default=str) + "\n")
    log(f"results: {path}")
    return rows, path


def main() -> None:
    args = parse_args()
    rows, _ = measure(args)
    print(table(rows))
    print()
    for line in floors(rows, args.reference):
        print(line)


if __name__ == "__main__":
    main()
