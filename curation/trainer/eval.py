"""Evaluation on held-out samples (uid hash mod 10 == 0; training never reads them).

* held-out loss per tier and task, on sequences that give no target away: the caption
  alone ("caption"), each question alone ("qa"), a document's text alone ("document")
  (data.held_out_conversations). A training sequence would not do: its caption repeats
  the answers asked before it, so its loss rewards copying, not looking.
* answer accuracy: each held-out demo question is answered by ranking the answers that
  question ever has in the data (e.g. the six colours) by their log-likelihood; chance is
  1 / (number of candidates), per question. The same questions are asked again with a
  grey image (same size) and with a shuffled image (the images permuted across questions,
  none keeping its own sample's): a model that uses the image loses accuracy on both.
  Each accuracy has a 95% Wilson interval; the differences accuracy - grey and accuracy -
  shuffled a 95% paired bootstrap interval (the same questions, resampled together).
* distractor resistance (mPLUG-Owl3): the question's image at a random (seeded) place
  among N+1 images; the N distractors cannot answer it (a demo question is asked of a
  scene only when it is true of it, so a scene that lacks the question lacks what it asks
  about: no circle for "What colour is the circle?"). Every N, 0 included, uses the same
  multi-image prompt ("Image k: <image>"), so the curve measures the distractors alone.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import (Example, encode, eval_sources, held_out_conversations, held_out_samples, pack, qa_pairs,
                   to_device, turn, visual_prompt)
from .model import VLM

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
GREY = (127, 127, 127)  # 0 after SigLIP normalisation: the padding colour, no content


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (stays inside [0, 1], sane at 0 or n)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference_interval(a: list[bool], b: list[bool], resamples: int = 2000, seed: int = 0) -> dict:
    """mean(a) - mean(b) over the same questions, with a 95% percentile bootstrap interval
    that resamples questions (pairs stay together, so what the two share cancels)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(diff) == 0:
        return {"difference": None, "interval": None}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"difference": round(float(diff.mean()), 4), "interval": [round(float(lo), 4), round(float(hi), 4)]}


def accuracy_rate(correct: list[bool]) -> dict:
    """Share of True with its 95% Wilson interval."""
    k, n = int(sum(correct)), len(correct)
    return {"accuracy": round(k / max(n, 1), 4), "interval": [round(x, 4) for x in wilson_interval(k, n)]}


# ---------------------------------------------------------------- held-out loss

@torch.no_grad()
def held_out_loss(model: VLM, tok, plan: dict, per_tier: int = 40, batch_size: int = 16) -> dict:
    """{tier: {task: mean loss over the target tokens, target token count}} over up to
    `per_tier` held-out samples per tier; tasks as in data.held_out_conversations."""
    examples = []
    for tier, sample in held_out_samples(eval_sources(plan), model.cfg.frames_per_video, per_tier):
        for task, segments in held_out_conversations(sample):
            ex = encode(segments, sample["images"], sample["role"], model.cfg, tok, model.vision.mean,
                        model.vision.std, sample["uid"], tier)
            ex.extra["task"] = task
            examples.append(ex)
    totals: dict[tuple[str, str], list] = defaultdict(lambda: [0.0, 0])
    for ex, loss, count in _sample_losses(model, tok, examples, batch_size):
        totals[ex.tier, ex.extra["task"]][0] += loss
        totals[ex.tier, ex.extra["task"]][1] += count
    report: dict[str, dict] = defaultdict(dict)
    for (tier, task), (s, n) in sorted(totals.items()):
        report[tier][task] = {"loss": round(s / max(n, 1), 4), "tokens": n}
    return dict(report)


def _sample_losses(model: VLM, tok, examples: list[Example], batch_size: int):
    """(example, summed loss over its labelled tokens, labelled token count) for each."""
    device = next(model.parameters()).device
    model.eval()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        for ex, s in zip(chunk, range(len(chunk))):
            ex.extra["index"] = s
        batch = to_device(pack(chunk, model.cfg.max_len, tok.pad_id), device)
        out = model(batch)
        labelled = batch["labels"] != -100
        for meta in batch["samples"]:
            in_sample = (batch["segment_ids"][meta["row"]] == meta["segment"]) & labelled[meta["row"]]
            yield chunk[meta["index"]], float(out.token_loss[meta["row"]][in_sample].sum()), int(in_sample.sum())


# ---------------------------------------------------------------- questions

@dataclass(frozen=True)
class Question:
    uid: str  # the sample the image comes from
    image: Image.Image
    q: str
    a: str
    asked: frozenset  # every question the sample's image has: what it can answer


def answer_sets(plan: dict) -> dict[str, list[str]]:
    """Every answer each demo question has anywhere in the plan's tiers: the candidates."""
    import pyarrow.parquet as pq

    answers: dict[str, set] = defaultdict(set)
    for src in eval_sources(plan):
        for shard in src.shards:
            for meta in pq.read_table(shard[:-4] + ".parquet", columns=["source_meta"]).column(0).to_pylist():
                for qa in qa_pairs(meta):
                    answers[qa["q"]].add(qa["a"])
    return {q: sorted(a) for q, a in answers.items()}


def held_out_questions(model: VLM, plan: dict, limit: int, seed: int = 0) -> list[Question]:
    """Questions about held-out single scene images, a deterministic sample."""
    found = []
    for _, sample in held_out_samples(eval_sources(plan), model.cfg.frames_per_video):
        if sample["role"] == "single" and sample["qa"]:  # one image (curation.kinds: image_text)
            asked = frozenset(qa["q"] for qa in sample["qa"])
            found += [Question(sample["uid"], sample["images"][0], qa["q"], qa["a"], asked) for qa in sample["qa"]]
    random.Random(seed).shuffle(found)
    return found[:limit]


def answer_prompt(images: list, question: str, role: str) -> list[tuple]:
    """The user turn that asks `question` of `images`, up to where the answer begins."""
    return turn([*visual_prompt(len(images), role), ("text", question, False)], None)


@torch.no_grad()
def choose_answers(model: VLM, tok, prompts: list[tuple], candidates: list[list[str]],
                   batch_size: int = 32) -> list[str]:
    """For each prompt (images, question, role), the candidate with the highest
    log-likelihood as the assistant's answer. The images open the turn as in training
    (data.visual_prompt): role "single" bare, "multi" labelled "Image k:"."""
    examples = []
    for p, (images, question, role) in enumerate(prompts):
        prompt = answer_prompt(images, question, role)
        for c, answer in enumerate(candidates[p]):
            ex = encode(prompt + [("text", answer, True)], images, role, model.cfg, tok, model.vision.mean,
                        model.vision.std)
            ex.extra.update(prompt=p, candidate=c)
            examples.append(ex)
    best: dict[int, tuple[float, int]] = {}
    for ex, loss, _ in _sample_losses(model, tok, examples, batch_size):
        p, c = ex.extra["prompt"], ex.extra["candidate"]
        if p not in best or -loss > best[p][0]:
            best[p] = (-loss, c)
    return [candidates[p][best[p][1]] for p in range(len(prompts))]


def grey_like(image: Image.Image) -> Image.Image:
    """A uniform grey image of the same size (so the same views and token count)."""
    return Image.new("RGB", image.size, GREY)


def shuffled_images(questions: list[Question], seed: int = 0) -> list[Image.Image]:
    """The questions' images permuted so that no question gets an image of its own sample
    (where the uids allow it): a random permutation, then swaps that repair collisions."""
    n = len(questions)
    rng = random.Random(f"{seed}/shuffle")
    perm = list(range(n))
    rng.shuffle(perm)
    uid = [q.uid for q in questions]
    for i in range(n):
        if uid[perm[i]] != uid[i]:
            continue
        for j in rng.sample(range(n), n):
            if uid[perm[j]] != uid[i] and uid[perm[i]] != uid[j]:
                perm[i], perm[j] = perm[j], perm[i]
                break
    return [questions[k].image for k in perm]


def answer_accuracy(model: VLM, tok, plan: dict, limit: int = 300, seed: int = 0) -> dict:
    sets = answer_sets(plan)
    return accuracy_report(model, tok, held_out_questions(model, plan, limit, seed), sets, seed)


CONDITIONS = ("image", "grey", "shuffled")  # what each question is asked with: its own image, grey, another's


def answer_correctness(model: VLM, tok, questions: list[Question], sets: dict[str, list[str]],
                       conditions=CONDITIONS, seed: int = 0) -> dict[str, list[bool]]:
    """Per condition (CONDITIONS), whether the model picks each question's answer among
    its candidates `sets[q]` when asked with that image."""
    make = {"image": lambda: [q.image for q in questions], "grey": lambda: [grey_like(q.image) for q in questions],
            "shuffled": lambda: shuffled_images(questions, seed)}
    candidates = [sets[q.q] for q in questions]
    correct = {}
    for name in conditions:
        prompts = [([im], q.q, "single") for im, q in zip(make[name](), questions)]
        correct[name] = [pick == q.a for pick, q in zip(choose_answers(model, tok, prompts, candidates), questions)]
    return correct


def accuracy_report(model: VLM, tok, questions: list[Question], sets: dict[str, list[str]], seed: int = 0) -> dict:
    """Accuracy on the questions with their own, a grey and a shuffled image; intervals."""
    if not questions:
        return {"questions": 0}
    candidates = [sets[q.q] for q in questions]
    correct = answer_correctness(model, tok, questions, sets, CONDITIONS, seed)
    by_question: dict[str, list] = defaultdict(lambda: [0, 0, 0.0, 0, 0])
    for i, q in enumerate(questions):
        row = by_question[q.q]
        row[0] += correct["image"][i]
        row[1] += 1
        row[2] += 1 / len(sets[q.q])
        row[3] += correct["grey"][i]
        row[4] += correct["shuffled"][i]
    n = len(questions)
    chance = sum(1 / len(c) for c in candidates) / n
    return {"questions": n, **accuracy_rate(correct["image"]), "chance": round(chance, 4),
            "grey": accuracy_rate(correct["grey"]), "shuffled": accuracy_rate(correct["shuffled"]),
            "minus_grey": paired_difference_interval(correct["image"], correct["grey"], seed=seed),
            "minus_shuffled": paired_difference_interval(correct["image"], correct["shuffled"], seed=seed),
            "by_question": {q: {"n": k, "accuracy": round(c / k, 4), "chance": round(ch / k, 4),
                                "grey": round(g / k, 4), "shuffled": round(s / k, 4), "candidates": len(sets[q])}
                            for q, (c, k, ch, g, s) in sorted(by_question.items())}}


# ---------------------------------------------------------------- distractors

def can_answer(image_questions: frozenset, question: str) -> bool:
    """Whether an image with these demo questions could answer `question`: the demo asks
    a question of a scene only when it is true of it (curation.demo.scenes.questions)."""
    return question in image_questions


def _eligible_distractors(target: Question, pool: list[Question]) -> list[Question]:
    """One image per other sample that cannot answer the target's question, in uid order."""
    eligible = {q.uid: q for q in pool if q.uid != target.uid and not can_answer(q.asked, target.q)}
    return [eligible[uid] for uid in sorted(eligible)]


def distractor_set(target: Question, pool: list[Question], n: int, rng: random.Random) -> tuple[list, int] | None:
    """(images, target position): the target at a random place among n distractors drawn
    from `pool` that cannot answer its question, each of another sample; None when the
    pool has fewer than n such images."""
    eligible = _eligible_distractors(target, pool)
    if len(eligible) < n:
        return None
    distractors = [q.image for q in rng.sample(eligible, n)]
    at = rng.randrange(n + 1)
    return distractors[:at] + [target.image] + distractors[at:], at


def distractor_resistance(model: VLM, tok, plan: dict, counts=(0, 1, 3, 7), limit: int = 60, seed: int = 0) -> dict:
    """Accuracy against the number of distractor images (module docstring)."""
    return distractor_report(model, tok, held_out_questions(model, plan, 10 ** 9, seed), answer_sets(plan), counts,
                             limit, seed)


def distractor_report(model: VLM, tok, questions: list[Question], sets: dict[str, list[str]], counts, limit: int,
                      seed: int = 0) -> dict:
    # the same questions at every N: those with enough distractors for the largest N
    # (a count question has none: every scene has shapes to count)
    most = max(counts, default=0)
    chosen = list(itertools.islice((q for q in questions if len(_eligible_distractors(q, questions)) >= most), limit))
    result = {}
    for n in counts:
        rng = random.Random(f"{seed}/distractors/{n}")
        sets_at_n = [distractor_set(q, questions, n, rng) for q in chosen]
        prompts = [(images, q.q, "multi") for (images, _), q in zip(sets_at_n, chosen)]
        picks = choose_answers(model, tok, prompts, [sets[q.q] for q in chosen]) if chosen else []
        positions = [at for _, at in sets_at_n]
        result[n] = {**accuracy_rate([p == q.a for p, q in zip(picks, chosen)]),
                     "chance": round(sum(1 / len(sets[q.q]) for q in chosen) / max(len(chosen), 1), 4),
                     "questions": len(chosen),
                     "target_positions": {str(k): positions.count(k) for k in sorted(set(positions))}}
    return result


def plot_distractors(result: dict, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(result, key=int)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    acc = [result[n]["accuracy"] for n in ns]
    lo = [result[n]["accuracy"] - result[n]["interval"][0] for n in ns]
    hi = [result[n]["interval"][1] - result[n]["accuracy"] for n in ns]
    ax.errorbar([int(n) for n in ns], acc, yerr=[lo, hi], marker="o", capsize=3, label="accuracy (95% interval)")
    ax.plot([int(n) for n in ns], [result[n]["chance"] for n in ns], linestyle="--", label="chance")
    ax.set(xlabel="distractor images around the target", ylabel="answer accuracy", ylim=(0, 1), title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def evaluate(model: VLM, tok, plan: dict, out: Path, questions: int = 300, distractors=(0, 1, 3, 7),
             distractor_questions: int = 60, per_tier: int = 40, title: str = "") -> dict:
    report = {"held_out_loss": held_out_loss(model, tok, plan, per_tier),
              "answers": answer_accuracy(model, tok, plan, questions)}
    if distractors:
        report["distractors"] = distractor_resistance(model, tok, plan, distractors, distractor_questions)
        plot_distractors(report["distractors"], out / "distractors.png", title)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    return report
