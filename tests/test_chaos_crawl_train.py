"""Chaos, the two ends of the path (issue 11): `curate crawl` and `curate train` SIGKILLed
(the whole process group) at seeded random points, run again after each kill, then
finished. The resumed result equals an uninterrupted run: for the crawl the ledger and
every raw shard byte; for training the weights, the optimizer state and the loss log.
tests/test_chaos.py does the same for the curate stages A, B and C."""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from curation.demo.server import serve

from .conftest import CURATE, REPO, curate
from .rawgen import CHEAP_RECIPE, write_raw_shards
from .servers import jpeg_bytes

pytestmark = pytest.mark.slow

KILLS = 10


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# =========================================================================== crawl
class Flaky(BaseHTTPRequestHandler):
    """/img/N.jpg: an image; /once/N.jpg: 503 on the first request, then the image;
    /missing/N.jpg: 404; /down/N.jpg: 503 always. Every answer takes DELAY seconds, so a
    crawl lasts long enough to be killed anywhere in it."""

    protocol_version = "HTTP/1.1"
    DELAY = 0.04
    hits: Counter = Counter()
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the crawler was killed mid-request
            pass

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0]
        with Flaky.lock:
            Flaky.hits[path] += 1
            n = Flaky.hits[path]
        time.sleep(Flaky.DELAY)
        number = int(path.rsplit("/", 1)[-1].split(".")[0]) if path[-4:] == ".jpg" else 0
        if path.startswith("/img/") or (path.startswith("/once/") and n > 1):
            code, body, ctype = 200, jpeg_bytes(number), "image/jpeg"
        elif path.startswith(("/once/", "/down/")):
            code, body, ctype = 503, b"busy", "text/plain"
        else:
            code, body, ctype = 404, b"not here", "text/plain"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the crawler was killed mid-answer
            self.close_connection = True


def documents(base: str, n: int = 40) -> list[dict]:
    """Two images per document, with every outcome: kept; kept after a 503 retried within
    the fetch; dropped (a 404 image, no images, malformed); failed transiently (an image
    always 503: retried, and failed again, by every later run)."""
    docs = []
    for i in range(n):
        second = {3: f"/once/{1000 + i}.jpg", 6: f"/missing/{i}.jpg"}.get(i % 10, f"/img/{2 * i + 1}.jpg")
        if i in (9, 29):
            second = f"/down/{i}.jpg"
        items = [{"type": "text", "text": f"document {i} begins"}, {"type": "image", "url": f"{base}/img/{2 * i}.jpg"},
                 {"type": "text", "text": f"and goes on about picture {2 * i + 1}"},
                 {"type": "image", "url": base + second}]
        if i == 19:
            items = [{"type": "text", "text": "a document without pictures"}]
        docs.append({"doc_id": f"d{i}", "items": "not a list" if i == 39 else items})
    return docs


SAMPLES_PER_SHARD = 4
N_SHARDS = 10  # 40 documents in round 0


def crawl_args(docs: Path, out: Path) -> list:
    return ["crawl", "--kind", "interleaved", "--input", docs, "--out", out, "--allow-network", "127.0.0.1/32",
            "--threads", "2", "--retries", "1", "--timeout", "5", "--samples-per-shard", SAMPLES_PER_SHARD]


def committed(out: Path) -> int:
    return len(list(out.glob("interleaved-r000-*.parquet")))


def without_clocks(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame without the fetch clock: fetched_at, and the times inside each opt-out
    evidence entry (when robots.txt and the others were fetched)."""
    frame = frame.drop(columns=["fetched_at"])
    if "optout_evidence" in frame.columns:
        frame["optout_evidence"] = [None if v is None else [{k: e[k] for k in sorted(e) if k != "fetched_at"} for e in v]
                                    for v in frame["optout_evidence"]]
    return frame


def strip_evidence_clocks(row: dict) -> dict:
    """A raw shard listing's row without the fetch times in its opt-out evidence (JSON text there)."""
    evidence = row.get("optout_evidence")
    if evidence is not None:
        entries = json.loads(evidence) if isinstance(evidence, str) else evidence
        row["optout_evidence"] = [{k: v for k, v in e.items() if k != "fetched_at"} for e in entries]
    return row


def raw_files(out: Path) -> dict[str, object]:
    """Round 0's shards by name: tar and stats bytes; the listing parquet's rows without
    fetched_at (a real clock: the one thing two crawls of one list may differ in)."""
    return {p.name: ([strip_evidence_clocks(r) for r in pq.read_table(p).drop_columns(["fetched_at"]).to_pylist()]
                     if p.suffix == ".parquet"
                     else p.read_bytes()) for p in sorted(out.glob("interleaved-r000-*")) if p.is_file()}


def raw_samples(out: Path) -> list[tuple[str, tuple]]:
    """(uid, members) of every sample in every raw shard of every round."""
    found = []
    for tar_path in sorted(out.glob("interleaved-r*.tar")):
        with tarfile.open(tar_path) as tar:
            samples: dict[str, dict] = {}
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        found += [(json.loads(s["json"])["uid"], tuple(sorted(s.items()))) for s in samples.values()]
    return found


def test_crawl_sigkilled_at_seeded_points_then_resumed_equals_uninterrupted(tmp_path):
    Flaky.hits = Counter()
    with serve(Flaky) as base:
        docs = tmp_path / "docs.jsonl"
        docs.write_text("".join(json.dumps(d) + "\n" for d in documents(base)))
        reference = tmp_path / "reference"
        log = tmp_path / "reference.log"
        started = time.time()
        with open(log, "w") as sink:
            proc = subprocess.Popen([*CURATE, *map(str, crawl_args(docs, reference))], cwd=REPO, stdout=sink,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        first_request = None
        while proc.poll() is None:
            if first_request is None and sum(Flaky.hits.values()):
                first_request = time.time() - started
            time.sleep(0.005)
        duration = time.time() - started
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert committed(reference) == N_SHARDS
        shard_period = (duration - first_request) / N_SHARDS

        # The chaos run. Point 0 lands in the start (reading the list, fixing the input,
        # making the round); the others after the crawl has committed a seeded number of
        # shards and this run has made a request, plus a seeded fraction of a shard.
        out = tmp_path / "killed"
        args = [*CURATE, *map(str, crawl_args(docs, out))]
        rng = random.Random("chaos-crawl")
        points = [(None, rng.uniform(0, first_request * 1.2))]
        points += [(t, rng.uniform(0, shard_period)) for t in sorted(rng.choices(range(N_SHARDS), k=KILLS - 1))]
        Flaky.hits = Counter()
        landed = []
        for target, delay in points:
            hits_before = sum(Flaky.hits.values())
            proc = subprocess.Popen(args, cwd=REPO, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            anchor, t0 = None, time.time()
            try:
                while proc.poll() is None:
                    assert time.time() - t0 < 120, "the crawl neither finished nor was killed in 120 s"
                    if anchor is None and (target is None or (sum(Flaky.hits.values()) > hits_before
                                                               and committed(out) >= target)):
                        anchor = time.time() if target is not None else t0
                    if anchor is not None and time.time() - anchor >= delay:
                        _killpg(proc.pid)
                        break
                    time.sleep(0.002)
                proc.wait()
            finally:
                if proc.poll() is None:
                    _killpg(proc.pid)
                    proc.wait()
            if proc.returncode != -signal.SIGKILL:
                assert proc.returncode == 0, f"crawl exited {proc.returncode}"
                break  # finished before this kill: later points have nothing left to hit
            landed.append({"target": target, "at": round(time.time() - t0, 2), "committed": committed(out),
                           "tar.tmp": len(list(out.glob("*.tar.tmp"))), "rounds": len(list(out.glob("_rounds/*/r*"))),
                           "ledger": (out / "crawl_ledger-interleaved.parquet").exists()})
            for tar_path in out.glob("*.tar"):  # a visible shard is a finished shard
                assert tar_path.with_suffix(".parquet").exists(), tar_path
        print(f"\ncrawl: reference {duration:.1f} s; {len(landed)} kills: {landed}")
        assert len(landed) >= KILLS // 2, f"only {len(landed)} kills landed before the crawl finished: {landed}"
        curate(*crawl_args(docs, out))
        assert all(n >= 2 for p, n in Flaky.hits.items() if p.startswith("/once/")), "a 503-once was never retried"

    assert not list(out.rglob("*.tmp")), "a killed write left a partial file visible"
    ref_ledger = pd.read_parquet(reference / "crawl_ledger-interleaved.parquet")
    got_ledger = pd.read_parquet(out / "crawl_ledger-interleaved.parquet")
    # every column but the fetch clock, every row; fetched_at is there exactly where a request was made
    pd.testing.assert_frame_equal(without_clocks(got_ledger), without_clocks(ref_ledger))
    assert got_ledger["fetched_at"].isna().equals(ref_ledger["fetched_at"].isna())
    assert got_ledger.loc[got_ledger["status"] == "kept", "http_status"].eq(200).all()
    outcome = Counter(zip(ref_ledger["status"], ref_ledger["reason"].fillna("-")))
    assert outcome == {("kept", "-"): 32, ("dropped", "missing_images"): 4, ("failed", "missing_images"): 2,
                       ("dropped", "no_images"): 1, ("dropped", "bad_document"): 1}
    # Round 0 is byte-identical: same shard boundaries (finished shards cover a prefix of
    # the round's items), same tars, listings and stats.
    assert raw_files(out) == raw_files(reference)
    # Later rounds (made by the re-runs) retried only the always-503 documents, and kept nothing.
    for pq_path in sorted(set(out.glob("interleaved-r*.parquet")) - set(out.glob("interleaved-r000-*.parquet"))):
        later = pd.read_parquet(pq_path)
        assert set(later["uid"]) <= set(ref_ledger.loc[ref_ledger["status"] == "failed", "uid"])
        assert not later["status"].eq("kept").any()
    samples, ref_samples = raw_samples(out), raw_samples(reference)
    assert len(samples) == len({uid for uid, _ in samples}) == 32  # no duplicates
    assert sorted(samples) == sorted(ref_samples)
    done, ref_done = (json.loads((d / "_SUCCESS-interleaved").read_text()) for d in (out, reference))
    assert {k: v for k, v in done.items() if k != "attempts"} == {k: v for k, v in ref_done.items() if k != "attempts"}


# =========================================================================== train
STEPS, SAVE_EVERY = 40, 4

# `curate train` spends most of its start importing torch and transformers (5-15 s on 2
# busy cores). The killed runs are forked from this process, which has done those
# imports once: each child is `curate train` from main() on, in a process group of its
# own (with its data-loader worker), SIGKILLed as a whole. Reference and final runs are
# real `curate train` processes.
ZYGOTE = r"""
import json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401
import curation.cli, curation.trainer.data, curation.trainer.train  # noqa: F401
print("ready", flush=True)
for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        null, out = os.open(os.devnull, os.O_RDONLY), os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(null, 0), os.dup2(out, 1), os.dup2(out, 2)
        code = 1
        try:
            code = curation.cli.main(argv)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    try:
        os.setpgid(pid, pid)  # also here, so the group exists before anyone is told the pid
    except OSError:
        pass
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x.strip()) for x in self.proc.stdout], daemon=True).start()
        assert self.lines.get(timeout=300) == "ready"

    def start(self, args: list, log: Path) -> int:
        """Fork a `curate ARGS` run; its pid (also its process group)."""
        self.proc.stdin.write(json.dumps([list(map(str, args)), str(log)]) + "\n")
        self.proc.stdin.flush()
        return int(self.lines.get(timeout=60))

    def exit_code(self, timeout: float | None = 0):
        """The run's exit code (negative: killed by that signal), or None while it runs."""
        try:
            return int(self.lines.get(timeout=timeout) if timeout else self.lines.get_nowait())
        except queue.Empty:
            return None

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _killpg(self.proc.pid)
            self.proc.wait()


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A plan over two small tiers (synthetic raw shards through `curate run`), and an
    uninterrupted `curate train` on it."""
    root = tmp_path_factory.mktemp("chaos-train")
    write_raw_shards(root / "raw", shards=2, per_shard=30, seed=7)
    recipe = root / "recipe.yaml"
    recipe.write_text(CHEAP_RECIPE.format(max_samples=12) + "stages:\n  - name: align\n    mix:\n"
                      "      - {tier: wide, strategy: all}\n      - {tier: rest, strategy: all}\n")
    curate("run", recipe, "--input", root / "raw", "--out", root / "curated")
    curate("plan", "--root", root / "curated", "--pipeline", recipe, "--out", root / "plan.json")
    reference = root / "reference"
    curate(*train_args(root / "plan.json", reference))
    return root / "plan.json", reference


def train_args(plan: Path, out: Path) -> list:
    return ["train", "--plan", plan, "--arch", "llava", "--size", "tiny", "--trainable", "full", "--steps", STEPS,
            "--batch-size", 4, "--save-every", SAVE_EVERY, "--warmup", 5, "--workers", 1, "--out", out,
            "--no-progress"]


def logged_step(out: Path, since_ns: int) -> int:
    """The last step in loss.jsonl, once this run has written it (resuming rewrites it
    up to the checkpoint's step); -1 before that."""
    log = out / "loss.jsonl"
    try:
        if log.stat().st_mtime_ns < since_ns:
            return -1
        lines = log.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError):  # not there yet, or a line half read
        return -1


def checkpoint_step(out: Path) -> int | None:
    state = out / "checkpoint" / "state.json"
    return json.loads(state.read_text())["step"] if state.exists() else None


def loss_log(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # timing is the one field that may differ


def same(a, b, where="") -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def assert_same_run(run: Path, reference: Path) -> None:
    import torch

    def load(path, name):
        return torch.load(path / "checkpoint" / name, map_location="cpu", weights_only=True)

    assert not list(run.glob("checkpoint.*")), "a temporary checkpoint was left behind"
    assert loss_log(run) == loss_log(reference)  # steps 1..N once each: same loss, lr, samples, tokens
    same(load(run, "model.pt"), load(reference, "model.pt"), "model")  # the weights, bit for bit
    same(load(run, "optimizer.pt"), load(reference, "optimizer.pt"), "optimizer")  # AdamW moments, scheduler
    state, ref_state = (json.loads((r / "checkpoint" / "state.json").read_text()) for r in (run, reference))
    assert state == ref_state and state["step"] == STEPS


def test_train_sigkilled_at_seeded_points_then_resumed_equals_uninterrupted(trained, zygote, tmp_path):
    plan, reference = trained
    ref_log = [json.loads(line) for line in (reference / "loss.jsonl").read_text().splitlines()]
    step_period = ref_log[-1]["seconds"] / len(ref_log)
    out = tmp_path / "killed"
    args = train_args(plan, out)
    rng = random.Random("chaos-train")
    # Point 0 lands before the first step (plan, tokenizer, model, data loader); the others
    # once this run has logged a seeded step, plus a seeded fraction of a step (a kill can
    # land mid-step, between a step and its checkpoint, or inside a checkpoint's write).
    points = [(None, rng.uniform(0, 1.0))]
    points += [(t, rng.uniform(0, step_period)) for t in sorted(rng.sample(range(1, STEPS), KILLS - 1))]
    landed = []
    for target, delay in points:
        since = time.time_ns()
        pid = zygote.start(args, tmp_path / "runs.log")
        anchor, code, t0 = None, None, time.time()
        try:
            while (code := zygote.exit_code()) is None:
                assert time.time() - t0 < 120, "training neither finished nor was killed in 120 s"
                if anchor is None and (target is None or logged_step(out, since) >= target):
                    anchor = t0 if target is None else time.time()
                if anchor is not None and time.time() - anchor >= delay:
                    _killpg(pid)
                    break
                time.sleep(0.002)
        finally:
            if code is None:
                _killpg(pid)
                code = zygote.exit_code(timeout=60)
        if code != -signal.SIGKILL:
            log = (tmp_path / "runs.log").read_text()
            known = ("  (the checkpoint.old bug: see test_train_killed_inside_the_checkpoint_swap[old_not_yet_removed])"
                     if "Directory not empty" in log and "checkpoint.old" in log else "")
            assert code == 0, f"train exited {code} after kills {landed}{known}: {log[-3000:]}"
            break  # finished before this kill
        landed.append({"target": target, "at": round(time.time() - t0, 2), "logged": logged_step(out, 0),
                       "checkpoint": checkpoint_step(out),
                       "swap": sorted(p.name for p in out.glob("checkpoint.*"))})
    print(f"\ntrain: {len(landed)} kills: {landed}")
    assert len(landed) >= KILLS // 2, f"only {len(landed)} kills landed before training finished: {landed}"
    curate(*args)  # finished by a real `curate train`
    assert_same_run(out, reference)


@pytest.mark.parametrize("window", [
    "old_not_yet_removed", "between_the_renames"])
def test_train_killed_inside_the_checkpoint_swap(trained, zygote, tmp_path, window):
    """The two windows of save_checkpoint a random kill rarely hits, made on purpose: the
    new checkpoint is in place but the old one not yet (fully) removed; or the old one is
    moved aside and the new one (complete) not yet moved in."""
    plan, reference = trained
    out = tmp_path / "run"
    args = train_args(plan, out)
    pid = zygote.start(args, tmp_path / "runs.log")
    t0 = time.time()
    while (checkpoint_step(out) or 0) < 2 * SAVE_EVERY:
        assert time.time() - t0 < 120 and zygote.exit_code() is None, "no checkpoint at step 8"
        time.sleep(0.005)
    _killpg(pid)
    assert zygote.exit_code(timeout=60) == -signal.SIGKILL, "training finished before the kill"
    ckpt = out / "checkpoint"
    for leftover in out.glob("checkpoint.*"):  # the kill may have landed in a save: start from a clean swap
        shutil.rmtree(leftover)
    if window == "old_not_yet_removed":
        subprocess.run(["cp", "-a", ckpt, out / "checkpoint.old"], check=True)
        (out / "checkpoint.old" / "model.pt").unlink()  # rmtree had begun
    else:
        subprocess.run(["cp", "-a", ckpt, out / "checkpoint.tmp"], check=True)
        ckpt.rename(out / "checkpoint.old")
    zygote.start(args, tmp_path / "resume.log")
    code = zygote.exit_code(timeout=300)
    resumed = (tmp_path / "resume.log").read_text()
    assert code == 0, f"the resumed run exited {code}: {resumed[-2000:]}"
    assert_same_run(out, reference)
    assert "from scratch" not in resumed, "the complete checkpoint left by the swap was not resumed from"
