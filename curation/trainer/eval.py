"""Evaluation on held-out samples (uid hash mod 10 == 0; training never reads them).

* loss per tier: mean answer-token loss, the same tokens training learns;
* answer accuracy: each held-out demo question is answered by ranking the answers that
  question ever has in the data (e.g. the six colours) by their log-likelihood; chance is
  1 / (number of candidates), reported per question;
* distractor resistance (mPLUG-Owl3): the question's image comes after N distractor images
  (other held-out scenes); accuracy against N, plotted.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import torch

from .data import (Example, encode, eval_sources, held_out_samples, make_example, pack, qa_pairs, to_device, turn)
from .model import VLM


@torch.no_grad()
def held_out_loss(model: VLM, tok, plan: dict, per_tier: int = 40, batch_size: int = 16) -> dict:
    """{tier: mean loss over the answer tokens of up to `per_tier` held-out samples}."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    examples = []
    for tier, sample in held_out_samples(eval_sources(plan), model.cfg.frames_per_video, per_tier):
        examples.append(make_example(sample, model.cfg, tok, model.vision.mean, model.vision.std, tier))
    for ex, loss, count in _sample_losses(model, tok, examples, batch_size):
        totals[ex.tier][0] += loss
        totals[ex.tier][1] += count
    return {t: {"loss": round(s / max(n, 1), 4), "tokens": n} for t, (s, n) in sorted(totals.items())}


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


def _questions(model: VLM, plan: dict, limit: int, seed: int = 0) -> list[tuple]:
    """(image, question, answer) from held-out scene images, a deterministic sample."""
    found = []
    for _, sample in held_out_samples(eval_sources(plan), model.cfg.frames_per_video):
        if sample["role"] == "single" and sample["qa"]:  # one image (curation.kinds: image_text)
            found += [(sample["images"][0], qa["q"], qa["a"]) for qa in sample["qa"]]
    random.Random(seed).shuffle(found)
    return found[:limit]


@torch.no_grad()
def choose_answers(model: VLM, tok, prompts: list[tuple], candidates: list[list[str]],
                   batch_size: int = 32) -> list[str]:
    """For each prompt (images, question), the candidate with the highest log-likelihood
    as the assistant's answer."""
    examples = []
    for p, (images, question) in enumerate(prompts):
        pictures = [("image", i) for i in range(len(images))]
        prompt = turn([*pictures, ("text", "\n", False), ("text", question, False)], None)
        role = "single" if len(images) == 1 else "multi"
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


def answer_accuracy(model: VLM, tok, plan: dict, limit: int = 300) -> dict:
    sets = answer_sets(plan)
    questions = _questions(model, plan, limit)
    if not questions:
        return {"questions": 0}
    picks = choose_answers(model, tok, [([im], q) for im, q, _ in questions], [sets[q] for _, q, _ in questions])
    by_question: dict[str, list] = defaultdict(lambda: [0, 0, 0.0])
    for (_, q, a), pick in zip(questions, picks):
        row = by_question[q]
        row[0] += pick == a
        row[1] += 1
        row[2] += 1 / len(sets[q])
    correct, total, chance = (sum(r[i] for r in by_question.values()) for i in range(3))
    return {"questions": total, "accuracy": round(correct / total, 4), "chance": round(chance / total, 4),
            "by_question": {q: {"n": n, "accuracy": round(c / n, 4), "chance": round(ch / n, 4),
                                "candidates": len(sets[q])} for q, (c, n, ch) in sorted(by_question.items())}}


def distractor_resistance(model: VLM, tok, plan: dict, counts=(0, 1, 3, 7), limit: int = 60, seed: int = 0) -> dict:
    """Accuracy when the question's image follows N distractor scenes."""
    sets = answer_sets(plan)
    questions = _questions(model, plan, 10 ** 9, seed)
    pool = [im for im, _, _ in questions]
    rng = random.Random(seed)
    result = {}
    for n in counts:
        chosen = questions[:limit]
        prompts = []
        for image, q, _ in chosen:
            others = [im for im in rng.sample(pool, min(len(pool), n + 3)) if im is not image][:n]
            prompts.append(([*others, image], q))
        picks = choose_answers(model, tok, prompts, [sets[q] for _, q, _ in chosen])
        result[n] = {"accuracy": round(sum(p == a for p, (_, _, a) in zip(picks, chosen)) / max(len(chosen), 1), 4),
                     "chance": round(sum(1 / len(sets[q]) for _, q, _ in chosen) / max(len(chosen), 1), 4),
                     "questions": len(chosen)}
    return result


def plot_distractors(result: dict, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(result, key=int)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ns, [result[n]["accuracy"] for n in ns], marker="o", label="accuracy")
    ax.plot(ns, [result[n]["chance"] for n in ns], linestyle="--", label="chance")
    ax.set(xlabel="distractor images before the target", ylabel="answer accuracy", ylim=(0, 1), title=title)
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
