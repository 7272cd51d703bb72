"""Does curation pay? The same tiny model, trained for the same steps on the raw pool and
on curated data, answers the same held-out questions; which data gives the better model?

    .venv/bin/python bench/bench_data_to_model.py --work /tmp/d2m [--noise 0.3 [0.5 ...]] [--seeds 0 1 2] [--steps N]
                     [--arch llava] [--size tiny] [--lr X] [--batch-size N] [--train-option KEY=VALUE ...]
                     [--small] [--questions N] [--jobs N] [--json FILE] [--plot PNG]
    .venv/bin/python bench/bench_data_to_model.py --small --steps 30 --seeds 0 --work /tmp/d2m   # smoke run

1. A noisy demo corpus (curation.demo.corpus.CorpusPlan.noisy): `--noise` of the image-text
   rows are mismatches whose caption AND questions describe another scene, duplicates and
   junk keep their share of the rows.
2. One crawl, three curations of the same raw shards (so uids, and the trainer's held-out
   split, are the same in every arm):
     raw              bench/raw_pool.yaml: every image-text sample that decodes, one tier
     curated          `curate demo` itself (curation.demo.run.run_demo with the noisy plan):
                      the demo recipe with its CLIP filter trained on the trusted set
     curated_no_clip  the demo recipe without clip_score and what needs it (semantic_dedup)
   Training stage per arm: the single-image image-text tiers, every sample once (`all`):
   raw's `pool`; the demo recipe's alignment + captioned_detail + ocr_rich (its documents
   and video tiers are left out, as the raw pool has none). Each curated arm trains on what
   its recipe wrote, re-captions included (the trainer reads `caption` before `text`).
3. Per arm and seed: curation.trainer.train with the same TrainOptions (threads=1, workers=1,
   trainable=full: one stage from scratch, not connector-only alignment).
4. Every model answers the held-out questions of the curated arm's plan, those about
   images the corpus planted with true text (scene, text_sign: a mismatch the CLIP filter
   let through is left out, and so is every image the corpus also planted a copy of,
   exact_dup or near_dup under another url, whose caption an arm may train on),
   candidates: every answer each question has in that plan; with its own image and with
   a grey one.

Reported per arm: accuracy pooled over the seeds with a 95% Wilson interval, per seed,
grey-image accuracy (pooled), the share of planted mismatches in its training data; and
paired differences between arms over the same questions (each question's accuracy
averaged over the seeds, a 95% bootstrap interval that resamples questions). Floor (issue
14): curated beats raw with the intervals apart (curated's lower bound above raw's upper).

Several --noise shares: one corpus, crawl, curations and table each, and the plot shows
each arm's accuracy against the share. --jobs N trains N models at a time (spawned
processes, one compute thread each).

--work DIR keeps everything (WORK/<small|full>-noise<share>/: demo/ with corpus, crawl,
models and the curated arm, raw/, no_clip/, train/); a second run re-uses complete
curations, finished trainings and their evaluations. Progress goes to stderr, the table
to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# The training recipe, the same for every arm (the lead tunes it; CLI options override).
# The encoder: the run's own CLIP filter (demo/models/clip-filter, trained on the trusted set,
# the same for every arm), as the four papers start from a pretrained CLIP/SigLIP encoder;
# `--random-encoder` trains the tiny from-code ViT instead (README "Do the models look?").
# 1500 steps: the models fit their data (6 epochs of the 30%-noise raw pool, 11 of the curated
# one); at 500 the training loss of every arm was still falling (raw 0.45 -> 0.36 at 1500,
# curated 0.27 -> 0.17), which measures how fast an arm learns, not what it learns.
TRAIN_DEFAULTS = {"arch": "owl3", "size": "tiny", "steps": 1500, "lr": 1e-3, "batch_size": 16, "trainable": "full",
                  "model_overrides": {}}
SEEDS = (0, 1, 2)
ARMS = ("raw", "curated", "curated_no_clip")
STAGE = "scenes"
RAW_RECIPE = HERE / "raw_pool.yaml"
RAW_TIERS = ("pool",)
CURATED_TIERS = ("alignment", "captioned_detail", "ocr_rich")  # the demo recipe's single-image tiers
CLEAN_PLANTS = ("scene", "text_sign")  # corpus categories whose caption and questions are true of the image
FLOOR = "curated beats raw with the 95% intervals apart"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ recipes

def demo_recipe() -> dict:
    """The bundled demo recipe as a mapping (what `curate demo` runs)."""
    from curation.config import load_yaml
    from curation.paths import find_pipeline

    return load_yaml(find_pipeline("demo"))


def recipe_without(doc: dict, op_name: str) -> dict:
    """`doc` with every `op_name` step removed, and every later step that needs a column
    only removed steps wrote (clip_score -> semantic_dedup, which reads its embeddings)."""
    from curation.ops import registry

    ops, lost, kept = registry(), set(), []
    for entry in doc["ops"]:
        cls = ops[entry["op"]]
        if entry["op"] == op_name or lost & set(cls.requires):
            lost |= set(cls.provides(None))
        else:
            kept.append(entry)
    out = copy.deepcopy(doc)
    out["ops"] = copy.deepcopy(kept)
    out["name"] = f"{doc.get('name', 'recipe')}_without_{op_name}"
    return out


def with_training_stage(doc: dict, tiers: tuple[str, ...]) -> dict:
    """`doc` with one training stage, STAGE, that reads each of `tiers` whole."""
    out = copy.deepcopy(doc)
    out["stages"] = [{"name": STAGE, "mix": [{"tier": t, "strategy": "all"} for t in tiers]}]
    return out


# ------------------------------------------------------------------ data

@dataclasses.dataclass
class Paths:
    root: Path

    @property
    def demo(self) -> Path:
        return self.root / "demo"

    def arm(self, arm: str) -> Path:
        return {"raw": self.root / "raw", "curated": self.demo / "curated", "curated_no_clip": self.root / "no_clip"}[arm]

    def plan(self, arm: str) -> Path:
        return self.arm(arm) / "bench_plan.json"


def _quiet():
    """The pipeline and the trainer print progress on stdout: send it to stderr (the table owns stdout)."""
    return contextlib.redirect_stdout(sys.stderr)


def prepare(paths: Paths, small: bool, noise: float, times: dict) -> None:
    """Corpus, crawl, models and the three curations (each skipped when already complete),
    then each arm's plan."""
    from curation import config
    from curation.demo import corpus
    from curation.demo.run import MODELS_ENV, run_demo
    from curation.runner import run_pipeline
    from curation.tiers.plan import make_plan, write_plan

    plan = corpus.CorpusPlan.noisy(noise, corpus.CorpusPlan.small() if small else corpus.CorpusPlan())
    t = time.time()
    if (paths.arm("curated") / "_SUCCESS").exists():
        log(f"curated arm already complete in {paths.arm('curated')}")
    else:
        with _quiet():
            run_demo(paths.demo, small=small, plan=plan, log=log)
        times["demo (corpus, crawl, models, curated arm)"] = round(time.time() - t, 1)
    os.environ[MODELS_ENV] = str((paths.demo / "models").resolve())
    recipes = {"raw": config.load_yaml(RAW_RECIPE), "curated": demo_recipe(),
               "curated_no_clip": recipe_without(demo_recipe(), "clip_score")}
    for arm in ("raw", "curated_no_clip"):
        if (paths.arm(arm) / "_SUCCESS").exists():
            log(f"{arm} arm already complete in {paths.arm(arm)}")
            continue
        t = time.time()
        log(f"curating the {arm} arm into {paths.arm(arm)}")
        with _quiet():
            run_pipeline(config.parse(recipes[arm], f"<bench {arm}>"), paths.demo / "raw", paths.arm(arm))
        times[f"curate {arm}"] = round(time.time() - t, 1)
    _stop_ray()
    t = time.time()
    for arm in ARMS:
        tiers = RAW_TIERS if arm == "raw" else CURATED_TIERS
        cfg = config.parse(with_training_stage(recipes[arm], tiers), f"<bench {arm} plan>")
        write_plan(make_plan(cfg, paths.arm(arm)), paths.plan(arm))
    times["plans"] = round(time.time() - t, 1)


def _stop_ray() -> None:
    """The curations' local Ray: its workers would hold memory while the models train."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def planted_samples(paths: Paths, arm: str):
    """uid, whether held out, and what the corpus planted (curation.demo.truth's url path
    match; `other` if none) of every sample of the arm's training stage."""
    import duckdb
    import pandas as pd

    from curation.trainer.data import is_held_out

    plan = json.loads(paths.plan(arm).read_text())
    sidecars = [str(Path(plan["root"]) / "tiers" / m["tier"] / (name[:-4] + ".parquet"))
                for m in plan["stages"][0]["mix"] for name in m["shards"]]
    rows = duckdb.sql(f"SELECT uid, url FROM read_parquet({sidecars!r})").df() if sidecars else pd.DataFrame(
        columns=["uid", "url"])
    rows["held_out"] = rows["uid"].map(is_held_out).astype(bool)
    rows["path"] = rows["url"].str.replace(r"^https?://[^/]+/", "", regex=True)
    truth = pd.read_parquet(paths.demo / "corpus" / "truth.parquet")[["path", "planted"]]
    rows = rows.merge(truth, on="path", how="left")
    rows["planted"] = rows["planted"].fillna("other")
    return rows


def training_mix(paths: Paths, arm: str) -> dict:
    """What the arm trains on (held-out uids excluded): samples, and how many of each planted category."""
    rows = planted_samples(paths, arm)
    planted = rows[~rows["held_out"]]["planted"].value_counts().to_dict()
    n = int((~rows["held_out"]).sum())
    return {"samples": n, "planted": planted, "mismatch_share": round(planted.get("mismatch", 0) / max(n, 1), 4)}


def copied_scenes(corpus_root: Path) -> set[str]:
    """Paths of the planted scenes that the corpus also planted a copy of (exact_dup,
    near_dup: the scene's own caption on a copied or re-encoded image, under another url)."""
    import pandas as pd

    rows = pd.read_parquet(corpus_root / "image_text.parquet").merge(pd.read_parquet(corpus_root / "truth.parquet"),
                                                                     on="path")
    copies = set(rows.loc[rows["planted"].isin(("exact_dup", "near_dup")), "caption"])
    return set(rows.loc[rows["planted"].isin(CLEAN_PLANTS) & rows["caption"].isin(copies), "path"])


# ------------------------------------------------------------------ training and evaluation

def run_dir(paths: Paths, settings: dict, arm: str, seed: int) -> Path:
    encoder = "clip" if settings["model_overrides"].get("vision_id") else "random"
    tag = f"{settings['arch']}-{settings['size']}-{encoder}-{settings['steps']}steps"
    return paths.root / "train" / tag / f"{arm}-seed{seed}"


def train_arm(paths: Paths, settings: dict, arm: str, seed: int) -> dict | None:
    """Train one arm's model (settings: TrainOptions fields); None when already trained."""
    from curation.trainer.train import TrainOptions, train

    out = run_dir(paths, settings, arm, seed)
    state = out / "checkpoint" / "state.json"
    if state.is_file() and json.loads(state.read_text())["step"] >= settings["steps"]:
        return None
    opts = TrainOptions(plan=str(paths.plan(arm)), out=str(out), stage=STAGE, seed=seed, threads=1, workers=1,
                        progress=False, **settings)
    with _quiet():
        return train(opts)


def question_identity(questions) -> list[str]:
    return [f"{q.uid}/{q.q}/{q.a}" for q in questions]


def answers_of_run(run: Path, questions, sets: dict) -> dict[str, list[bool]]:
    """Per question, whether the run's model picks the right answer with the question's
    image and with a grey one (curation.trainer.eval.answer_correctness); cached in the
    run folder for the same questions."""
    from curation.trainer.eval import answer_correctness
    from curation.trainer.train import load_run

    cache = run / "bench_answers.json"
    ident = question_identity(questions)
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("questions") == ident:
            return saved["correct"]
    model, tok, _ = load_run(run)
    correct = answer_correctness(model, tok, questions, sets, ("image", "grey"))
    cache.write_text(json.dumps({"questions": ident, "correct": correct}))
    return correct


def summarise(correct: dict[str, dict[int, dict[str, list[bool]]]], chance: float) -> dict:
    """correct[arm][seed][condition] -> per arm pooled and per-seed accuracies with 95%
    Wilson intervals, paired differences between arms, and the floor's verdict."""
    from curation.trainer.eval import accuracy_rate, paired_difference_interval

    def rate(flags: list[bool]) -> dict:
        return {**accuracy_rate(flags), "n": len(flags)}

    def per_question(arm: str) -> list[float]:  # each question's accuracy over the seeds
        runs = [correct[arm][s]["image"] for s in sorted(correct[arm])]
        return [sum(r[i] for r in runs) / len(runs) for i in range(len(runs[0]))]

    arms = {}
    for arm, seeds in correct.items():
        arms[arm] = {"pooled": rate([c for s in seeds.values() for c in s["image"]]),
                     "grey": rate([c for s in seeds.values() for c in s["grey"]]),
                     "per_seed": {str(s): rate(c["image"])["accuracy"] for s, c in sorted(seeds.items())}}
    differences = {}
    for a, b in (("curated", "raw"), ("curated_no_clip", "raw"), ("curated", "curated_no_clip")):
        if a in correct and b in correct:
            differences[f"{a} - {b}"] = paired_difference_interval(per_question(a), per_question(b))
    verdict = None
    if "curated" in arms and "raw" in arms:
        lo, hi = arms["curated"]["pooled"]["interval"][0], arms["raw"]["pooled"]["interval"][1]
        verdict = {"pass": lo > hi, "detail": f"curated {arms['curated']['pooled']['accuracy']:.1%} "
                   f"[{lo:.1%}, ...] vs raw {arms['raw']['pooled']['accuracy']:.1%} [..., {hi:.1%}]"}
    return {"chance": round(chance, 4), "arms": arms, "differences": differences, "floor": verdict}


def measure(work: str | Path, noise: float = 0.3, seeds=SEEDS, small: bool = False, questions: int | None = None,
            random_encoder: bool = False, jobs: int = 1, **train_settings) -> dict:
    """The whole bench (module docstring); returns every figure, per-phase seconds included."""
    import torch

    from curation.trainer.data import load_plan
    from curation.trainer.eval import answer_sets, held_out_questions
    from curation.trainer.train import load_run

    settings = {**TRAIN_DEFAULTS, **train_settings}
    settings["model_overrides"] = {**TRAIN_DEFAULTS["model_overrides"], **(train_settings.get("model_overrides") or {})}
    paths = Paths(Path(work) / f"{'small' if small else 'full'}-noise{noise:g}")
    times: dict = {}
    t0 = time.time()
    prepare(paths, small, noise, times)
    mixes = {arm: training_mix(paths, arm) for arm in ARMS}
    for arm in ARMS:  # the curation job's own clock, also when this run re-used it
        mixes[arm]["curation_seconds"] = json.loads((paths.arm(arm) / "summary.json").read_text()).get("seconds")
    for arm, mix in mixes.items():
        log(f"{arm}: {mix['samples']} training samples, {mix['mismatch_share']:.1%} planted mismatches")
    if not random_encoder and "vision_id" not in settings["model_overrides"]:
        settings["model_overrides"]["vision_id"] = str((paths.demo / "models" / "clip-filter").resolve())

    torch.set_num_threads(1)
    t = time.time()
    runs = [(arm, seed) for arm in ARMS for seed in seeds]
    with contextlib.ExitStack() as stack:
        if jobs > 1:  # spawn: a forked child of a process that ran torch can hang in its thread pool
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")))
            pending = {(arm, seed): pool.submit(train_arm, paths, settings, arm, seed) for arm, seed in runs}
        for arm, seed in runs:
            log(f"training {settings['arch']}/{settings['size']} on {arm}, seed {seed}, {settings['steps']} steps")
            result = pending[arm, seed].result() if jobs > 1 else train_arm(paths, settings, arm, seed)
            log(f"  done: last loss {result['last_loss']}, {result['seconds']} s" if result else "  already trained")
    times[f"train ({len(runs)} models, {jobs} at a time)"] = round(time.time() - t, 1)

    t = time.time()
    curated_plan = load_plan(paths.plan("curated"))
    model, _, _ = load_run(run_dir(paths, settings, "curated", seeds[0]))
    # clean truth: questions about held-out images the corpus planted with true text (a
    # mismatch the CLIP filter let through carries questions about another scene), and
    # none whose image the crawl also holds as a planted copy under another url (an arm
    # that trains on the copy has seen the answer in its caption)
    rows = planted_samples(paths, "curated")
    clean = set(rows[rows["planted"].isin(CLEAN_PLANTS)]["uid"])
    copied = set(rows[rows["path"].isin(copied_scenes(paths.demo / "corpus"))]["uid"])
    found = held_out_questions(model, curated_plan, 10 ** 9)
    left_out = {"about planted noise": sum(q.uid not in clean for q in found),
                "about an image the crawl also holds a copy of": sum(q.uid in clean and q.uid in copied for q in found)}
    asked = [q for q in found if q.uid in clean and q.uid not in copied][:questions or None]
    log(f"held-out questions: {len(found)} in the curated plan; left out: "
        + ", ".join(f"{n} {why}" for why, n in left_out.items()))
    sets = answer_sets(curated_plan)
    chance = sum(1 / len(sets[q.q]) for q in asked) / max(len(asked), 1)
    times["questions"] = round(time.time() - t, 1)
    log(f"{len(asked)} held-out questions from the curated plan, chance {chance:.1%}")
    correct: dict = {}
    for arm in ARMS:
        t = time.time()
        correct[arm] = {seed: answers_of_run(run_dir(paths, settings, arm, seed), asked, sets) for seed in seeds}
        times[f"eval {arm}"] = round(time.time() - t, 1)
    times["total"] = round(time.time() - t0, 1)
    return {"settings": {**settings, "seeds": list(seeds), "noise": noise, "small": small, "threads": 1, "workers": 1},
            "work": str(paths.root), "questions": len(asked), "questions_left_out": left_out, "training_data": mixes,
            **summarise(correct, chance), "seconds": times}


# ------------------------------------------------------------------ output

def table(result: dict) -> str:
    s = result["settings"]
    encoder = "the run's CLIP filter as encoder" if s["model_overrides"].get("vision_id") else "random from-code encoder"
    lines = [f"Does curation pay? {s['arch']}/{s['size']} ({encoder}), {s['steps']} steps, batch {s['batch_size']}, lr {s['lr']}, "
             f"seeds {', '.join(map(str, s['seeds']))}; {'small' if s['small'] else 'full'} demo, noise {s['noise']:.0%}; "
             f"{result['questions']} held-out questions of the curated plan, chance {result['chance']:.1%} (left out: "
             + ", ".join(f"{n} {why}" for why, n in result.get("questions_left_out", {}).items()) + ")", "",
             "| arm | training samples | planted mismatches | accuracy (pooled, 95% interval) | per seed | grey image |",
             "|---|---|---|---|---|---|"]
    for arm, a in result["arms"].items():
        mix = result["training_data"][arm]
        p, g = a["pooled"], a["grey"]
        lines.append(f"| {arm} | {mix['samples']:,} | {mix['mismatch_share']:.1%} | {p['accuracy']:.1%} "
                     f"[{p['interval'][0]:.1%}, {p['interval'][1]:.1%}] | "
                     f"{' / '.join(f'{v:.1%}' for v in a['per_seed'].values())} | {g['accuracy']:.1%} "
                     f"[{g['interval'][0]:.1%}, {g['interval'][1]:.1%}] |")
    lines.append("")
    for name, d in result["differences"].items():
        lo, hi = d["interval"] or (float("nan"), float("nan"))
        lines.append(f"paired difference {name}: {d['difference']:+.1%} [{lo:+.1%}, {hi:+.1%}]")
    if result["floor"]:
        lines.append(f"{'PASS' if result['floor']['pass'] else 'FAIL'}  {FLOOR}: {result['floor']['detail']}")
    lines.append("")
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()))
    return "\n".join(lines)


def plot(result: dict, png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(result["arms"])
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, arm in enumerate(arms):
        for key, marker, label, dx in (("pooled", "o", "own image", -0.08), ("grey", "x", "grey image", 0.08)):
            r = result["arms"][arm][key]
            ax.errorbar([i + dx], [r["accuracy"]], yerr=[[r["accuracy"] - r["interval"][0]], [r["interval"][1] - r["accuracy"]]],
                        marker=marker, capsize=4, color="C0" if key == "pooled" else "C1",
                        label=label if i == 0 else None)
    ax.axhline(result["chance"], linestyle="--", color="grey", label="chance")
    ax.set_xticks(range(len(arms)), arms)
    ax.set(ylabel="held-out answer accuracy (95% interval)", ylim=(0, 1),
           title=f"{result['settings']['arch']}, {result['settings']['steps']} steps, seeds "
                 f"{', '.join(map(str, result['settings']['seeds']))}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_sweep(results: list[dict], png: str | Path) -> None:
    """Accuracy of each arm (pooled, 95% interval) against the raw pool's mismatch share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["settings"]["noise"])
    noise = [r["settings"]["noise"] for r in results]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, arm in enumerate(results[0]["arms"]):
        rates = [r["arms"][arm]["pooled"] for r in results]
        ax.errorbar([x + (i - 1) * 0.006 for x in noise], [p["accuracy"] for p in rates],
                    yerr=[[p["accuracy"] - p["interval"][0] for p in rates], [p["interval"][1] - p["accuracy"] for p in rates]],
                    marker="o", capsize=4, label=arm)
    ax.plot(noise, [r["chance"] for r in results], linestyle="--", color="grey", label="chance")
    ax.set_xticks(noise, [f"{x:.0%}" for x in noise])
    s = results[0]["settings"]
    ax.set(xlabel="mismatched image-text rows in the crawl", ylabel="held-out answer accuracy (95% interval)",
           title=f"{s['arch']}/{s['size']}, {s['steps']} steps, seeds {', '.join(map(str, s['seeds']))}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _train_option(text: str, settings: dict) -> None:
    """KEY=VALUE: a TrainOptions field (typed as its default), else a model override
    (JSON if it parses, else a string)."""
    from curation.trainer.train import TrainOptions

    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--train-option takes KEY=VALUE, not {text!r}")
    fields = {f.name: f for f in dataclasses.fields(TrainOptions)}
    if key in ("plan", "out", "stage", "seed", "threads", "workers"):
        raise SystemExit(f"--train-option {key}: the bench sets it (same for every arm)")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    if key in fields:
        settings[key] = parsed
    else:
        settings.setdefault("model_overrides", {})[key] = parsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/bench_data_to_model", help="folder for corpus, crawl, curations, runs")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.3],
                    help="share of image-text rows that are mismatches (0.3); several: one corpus and table each")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--small", action="store_true", help="the small corpus plan (a smoke run)")
    ap.add_argument("--questions", type=int, help="at most this many held-out questions (default: all)")
    ap.add_argument("--arch", default=TRAIN_DEFAULTS["arch"])
    ap.add_argument("--size", default=TRAIN_DEFAULTS["size"])
    ap.add_argument("--steps", type=int, default=TRAIN_DEFAULTS["steps"])
    ap.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"])
    ap.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"])
    ap.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                    help="another TrainOptions field (e.g. warmup=50) or a model override (e.g. vision_id=...)")
    ap.add_argument("--random-encoder", action="store_true",
                    help="train the tiny from-code ViT from random weights (default: the run's own CLIP filter)")
    ap.add_argument("--jobs", type=int, default=1, help="models trained at a time (one compute thread each)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--plot", help="PNG: accuracy per arm with intervals (several --noise: against the noise share)")
    args = ap.parse_args(argv)
    settings = {"arch": args.arch, "size": args.size, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size}
    for option in args.train_option:
        _train_option(option, settings)
    results = []
    for noise in args.noise:
        results.append(measure(args.work, noise, tuple(args.seeds), args.small, args.questions,
                               random_encoder=args.random_encoder, jobs=args.jobs, **settings))
        print(table(results[-1]) + "\n", flush=True)
    single = results[0] if len(results) == 1 else None
    if args.json:
        Path(args.json).write_text(json.dumps(single or {"runs": results}, indent=1))
    if args.plot and single:
        plot(single, args.plot)
    elif args.plot:
        plot_sweep(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
