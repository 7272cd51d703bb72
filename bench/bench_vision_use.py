"""Do the trained models use their images? (README "Do the models look?", issue 14)

Trains each architecture on one plan stage (same data, steps and settings), then asks
every model the same held-out questions three ways: with the question's own image, with a
grey image and with a shuffled one (curation/trainer/eval.py). A model that reads its
images beats grey and shuffled by a margin whose 95% intervals (Wilson) lie apart; one
that learned a text-only shortcut does not. The floor (issue 14): accuracy at least 10
points above grey-image accuracy, intervals apart, for every architecture.

    .venv/bin/python bench/bench_vision_use.py --plan shards/demo/curated/plan.json \\
        --vision shards/demo/models/clip-filter --work /tmp/vision_use --markdown /tmp/vision_use.md

`--vision` is the encoder every arch starts from: the demo's own CLIP filter (a small
open_clip ViT that `curate demo` trains on the trusted set) is what the table in README
uses, as the four papers start from a pretrained CLIP/SigLIP encoder; leave it out to train
the tiny from-code ViT from random weights instead (the baseline the issue measured).
Each arch's run folder (checkpoint, loss.png, eval.json, distractors.png) stays under
--work; a finished run is evaluated again, not retrained. Two archs train at a time with
--jobs 2 (one compute thread and one loader process each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCHS = ("llava", "omnifusion", "evlm", "owl3")
FLOOR_POINTS = 0.10  # accuracy - grey, and the intervals apart


def run_arch(arch: str, plan: str, work: str, stage: str, steps: int, vision: str | None, questions: int,
             distractors: tuple, seed: int, lr: float) -> dict:
    """Train (or resume) one arch, then evaluate it; returns its row."""
    import torch

    from curation.trainer.data import load_plan
    from curation.trainer.eval import evaluate
    from curation.trainer.train import TrainOptions, load_run, train

    out = Path(work) / arch
    started = time.time()
    overrides = {"vision_id": str(Path(vision).resolve()) if vision and Path(vision).exists() else vision} \
        if vision else {}
    summary = train(TrainOptions(plan=plan, out=str(out), arch=arch, stage=stage, steps=steps, lr=lr, seed=seed,
                                 progress=False, save_every=max(50, steps // 4), model_overrides=overrides))
    trained = time.time()
    torch.set_num_threads(1)
    model, tok, state = load_run(out)
    report = evaluate(model, tok, load_plan(plan), out, questions, distractors, title=f"{arch} after {stage}")
    a = report["answers"]
    return {"arch": arch, "stage": stage, "steps": state["step"], "vision": vision or "tiny ViT from code (random)",
            "train_s": round(trained - started, 1), "eval_s": round(time.time() - trained, 1),
            "last_loss": summary["last_loss"], "questions": a["questions"], "chance": a["chance"],
            "image": {"accuracy": a["accuracy"], "interval": a["interval"]}, "grey": a["grey"],
            "shuffled": a["shuffled"], "minus_grey": a["minus_grey"], "minus_shuffled": a["minus_shuffled"],
            "distractors": report.get("distractors"), "passes": passes(a)}


def passes(a: dict) -> bool:
    """Issue 14's floor: >= 10 points above grey, the two 95% intervals apart."""
    return a["accuracy"] - a["grey"]["accuracy"] >= FLOOR_POINTS and a["interval"][0] > a["grey"]["interval"][1]


def _pct(r: dict) -> str:
    lo, hi = r["interval"]
    return f"{100 * r['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown(rows: list[dict]) -> str:
    lines = ["| arch | questions | accuracy | grey image | shuffled image | chance | accuracy - grey | floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["minus_grey"]
        lines.append(f"| {r['arch']} | {r['questions']} | {_pct(r['image'])} | {_pct(r['grey'])} | "
                     f"{_pct(r['shuffled'])} | {100 * r['chance']:.1f}% | {100 * d['difference']:+.1f} "
                     f"[{100 * d['interval'][0]:+.1f}, {100 * d['interval'][1]:+.1f}] | "
                     f"{'PASS' if r['passes'] else 'FAIL'} |")
    return "\n".join(lines)


def plot(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.26
    for k, (name, label) in enumerate((("image", "own image"), ("grey", "grey image"), ("shuffled", "shuffled image"))):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        acc = [r[name]["accuracy"] for r in rows]
        err = [[r[name]["accuracy"] - r[name]["interval"][0] for r in rows],
               [r[name]["interval"][1] - r[name]["accuracy"] for r in rows]]
        ax.bar(xs, acc, width, yerr=err, capsize=3, label=label)
    for i, r in enumerate(rows):
        ax.plot([i - 1.5 * width, i + 1.5 * width], [r["chance"]] * 2, color="black", linestyle="--",
                label="chance" if i == 0 else None)
    ax.set_xticks(range(len(rows)), [r["arch"] for r in rows])
    ax.set(ylabel="held-out answer accuracy", ylim=(0, 1), title=title)
    ax.legend(fontsize=8, ncol=4, loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def measure(plan: str, work: str, archs=ARCHS, stage: str = "stage1.5_knowledge", steps: int = 600,
            vision: str | None = None, questions: int = 300, distractors=(0, 1, 3), seed: int = 0,
            lr: float = 1e-3, jobs: int = 1) -> list[dict]:
    Path(work).mkdir(parents=True, exist_ok=True)
    args = [(arch, plan, work, stage, steps, vision, questions, tuple(distractors), seed, lr) for arch in archs]
    if jobs <= 1:
        rows = []
        for a in args:
            print(f"[vision-use] {a[0]}: training {steps} steps of {stage} ...", file=sys.stderr, flush=True)
            rows.append(run_arch(*a))
            print(f"[vision-use] {a[0]}: {_pct(rows[-1]['image'])} vs grey {_pct(rows[-1]['grey'])}",
                  file=sys.stderr, flush=True)
        return rows
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_arch, *a) for a in args]
        print(f"[vision-use] training {len(args)} archs, {jobs} at a time ...", file=sys.stderr, flush=True)
        return [f.result() for f in futures]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="plan.json from `curate plan` (e.g. the demo's)")
    p.add_argument("--work", default="/tmp/vision_use", help="run folders, one per arch")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--stage", default="stage1.5_knowledge")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vision", help="encoder for every arch (curate train --vision); default: the random tiny ViT")
    p.add_argument("--questions", type=int, default=300)
    p.add_argument("--distractors", default="0,1,3", help="distractor counts for the distractor curve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="archs trained at once")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--plot", help="bar chart PNG (default WORK/vision_use.png)")
    a = p.parse_args(argv)
    started = time.time()
    rows = measure(a.plan, a.work, tuple(a.archs.split(",")), a.stage, a.steps, a.vision, a.questions,
                   tuple(int(x) for x in a.distractors.split(",") if x.strip()), a.seed, a.lr, a.jobs)
    table = markdown(rows)
    print(table)
    print(f"floor (>= {100 * FLOOR_POINTS:.0f} points above grey, intervals apart): "
          f"{'PASS' if all(r['passes'] for r in rows) else 'FAIL'} in {time.time() - started:.0f} s")
    png = Path(a.plot or Path(a.work) / "vision_use.png")
    plot(rows, png, f"{a.stage}, {a.steps} steps: accuracy with own / grey / shuffled image")
    print(f"plot: {png}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.markdown:
        Path(a.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
