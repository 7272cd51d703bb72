"""Fine-tune the tiny vit-gpt2 captioner on trusted pairs, so re-captions mean something.

No pretrained captioner can be downloaded on an offline machine, and the random-weight
captioner of `build_tiny_captioner` produces deterministic but meaningless text. The
demo's trusted set (rendered scenes with true captions, as WebDataset tars) is enough to
teach a small ViT + GPT-2 captioner the colours, shapes and positions of the scenes:

* the tokenizer, and the model's architecture family, come from `build_tiny_captioner`
  (the demo vocabulary; a VisionEncoderDecoderModel that takes no prompt); the encoder
  and decoder are widened (`TINY_CAPTIONER`) and re-initialised from `seed` with a
  normal init range, and the image processor resizes to 64 px;
* it is trained with teacher forcing (the language-model loss on the caption tokens
  followed by the end token), AdamW with warmup and cosine decay, from a fixed seed;
* about 10% of the pairs are held out: the loss and next-token accuracy before and after
  training, and for greedy captions the exact-match rate and per-attribute correctness
  (colours, shapes, the (colour, shape, position) objects, the sign word);
* the result is saved with `save_pretrained` (model, tokenizer, image processor) so the
  `caption` operator loads the folder as it is, and `training.json` records the metrics.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path
from typing import Callable

from .clipfilter import read_pairs
from .errors import CurationError
from .fsutil import atomic_write_text

# Small enough to train in about a minute on two CPU cores, big enough to see three
# shapes at 64 px and say which colour is where.
TINY_CAPTIONER = {
    "image_size": 64,
    "encoder": {"patch_size": 8, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 256},
    "decoder": {"n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 64},
}
TRAINING_FILE = "training.json"

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")  # curation/demo/scenes.py
_SHAPES = ("circle", "square", "triangle")
_OBJECT = re.compile(r"\b(" + "|".join(_COLOURS) + r") (" + "|".join(_SHAPES) + r") (on the left|in the middle|on the right)")
_SIGN = re.compile(r"\bsays (\w+)")


def _normalise(text: str) -> str:
    """Lower case, punctuation as separate words: the tokenizer's view of a caption."""
    return " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))


def build_model(out: Path, seed: int, cfg: dict | None = None):
    """The tiny vit-gpt2 captioner of `build_tiny_captioner` written to `out` (tokenizer,
    special tokens), widened to `cfg` and re-initialised from `seed`. Returns
    (model, tokenizer, image processor)."""
    import torch
    from transformers import (AutoTokenizer, VisionEncoderDecoderConfig, VisionEncoderDecoderModel,
                              ViTImageProcessor)

    from .ops.caption import build_tiny_captioner

    cfg = cfg or TINY_CAPTIONER
    build_tiny_captioner(out, "vit-gpt2", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = VisionEncoderDecoderConfig.from_pretrained(out)
    encoder, decoder = base.encoder, base.decoder
    for key, value in cfg["encoder"].items():
        setattr(encoder, key, value)
    encoder.image_size, encoder.initializer_range = cfg["image_size"], 0.02
    for key, value in cfg["decoder"].items():
        setattr(decoder, key, value)
    decoder.initializer_range = 0.02
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = (
        base.decoder_start_token_id, base.pad_token_id, base.eos_token_id)
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config)
    model.generation_config.decoder_start_token_id = base.decoder_start_token_id
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = base.pad_token_id, base.eos_token_id
    model.generation_config.max_length = None  # max_new_tokens from the operator decides
    processor = ViTImageProcessor(size={"height": cfg["image_size"], "width": cfg["image_size"]})
    return model, tokenizer, processor


def _labels(tokenizer, texts: list[str], max_len: int):
    """Caption tokens + the end token, padded with -100 (ignored by the loss)."""
    import torch

    rows = [tokenizer(t, add_special_tokens=False).input_ids[: max_len - 1] + [tokenizer.eos_token_id] for t in texts]
    labels = torch.full((len(rows), max(len(r) for r in rows)), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        labels[i, : len(r)] = torch.tensor(r)
    return labels


def _teacher_forced(model, pixels, labels, batch_size: int) -> dict:
    """Mean token loss and next-token accuracy over held-out pairs."""
    import torch

    total_loss, right, count = 0.0, 0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            lab = labels[start:start + batch_size]
            out = model(pixel_values=pixels[start:start + batch_size], labels=lab)
            mask = lab != -100
            n = int(mask.sum())
            total_loss += float(out.loss) * n
            right += int(((out.logits.argmax(-1) == lab) & mask).sum())
            count += n
    return {"loss": round(total_loss / count, 4), "token_accuracy": round(right / count, 4)}


def caption_metrics(generated: list[str], truth: list[str]) -> dict:
    """Greedy captions against the true ones. exact_match: the whole caption (the demo's
    openers, "A picture of" / "An image showing" ..., are random, so even a perfect model
    stays well below 1); description_match: the same set of (colour, shape, position)
    objects; colour/shape precision: the fraction of colour/shape words in a generated
    caption that occur in the true one, and recall the other way round; sign_accuracy:
    the sign word, over the captions whose image has a sign."""
    exact = described = 0
    tallies = {k: [0, 0, 0, 0] for k in ("colour", "shape", "object")}  # hit_p, n_gen, hit_r, n_true
    signs = [0, 0]
    for g, t in zip(generated, truth):
        g, t = _normalise(g), _normalise(t)
        exact += g == t
        g_obj, t_obj = _OBJECT.findall(g), _OBJECT.findall(t)
        described += set(g_obj) == set(t_obj) and len(g_obj) == len(t_obj)
        words_g, words_t = g.split(), t.split()
        for key, gen, true in (("colour", [w for w in words_g if w in _COLOURS], [w for w in words_t if w in _COLOURS]),
                               ("shape", [w for w in words_g if w in _SHAPES], [w for w in words_t if w in _SHAPES]),
                               ("object", g_obj, t_obj)):
            tallies[key][0] += sum(x in true for x in gen)
            tallies[key][1] += len(gen)
            tallies[key][2] += sum(x in gen for x in true)
            tallies[key][3] += len(true)
        sign_t = _SIGN.search(t)
        if sign_t:
            sign_g = _SIGN.search(g)
            signs[0] += bool(sign_g) and sign_g.group(1) == sign_t.group(1)
            signs[1] += 1
    n = max(1, len(truth))
    out = {"exact_match": round(exact / n, 4), "description_match": round(described / n, 4)}
    for key, (hp, ng, hr, nt) in tallies.items():
        out[f"{key}_precision"] = round(hp / ng, 4) if ng else 0.0
        out[f"{key}_recall"] = round(hr / nt, 4) if nt else 0.0
    out["sign_accuracy"] = round(signs[0] / signs[1], 4) if signs[1] else None
    out["signs_held_out"] = signs[1]
    return out


def greedy_captions(model, tokenizer, pixels, batch_size: int = 64, max_new_tokens: int = 40) -> list[str]:
    """What the caption operator produces (greedy, special tokens dropped)."""
    import torch

    texts = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            ids = model.generate(pixel_values=pixels[start:start + batch_size], max_new_tokens=max_new_tokens,
                                 num_beams=1, do_sample=False)
            texts += [" ".join(t.split()) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return texts


def train_captioner(shards: list[Path], out: Path, *, steps: int = 400, batch_size: int = 32, lr: float = 1e-3,
                    holdout: float = 0.1, seed: int = 0, model_cfg: dict | None = None, threads: int = 1,
                    log: Callable[[str], None] = print) -> dict:
    """Fine-tune the tiny vit-gpt2 captioner on the trusted pairs in `shards`, evaluate it
    on a held-out tenth, save it to `out` (a folder the `caption` operator loads)."""
    import torch

    cfg = model_cfg or TINY_CAPTIONER
    out = Path(out)
    pairs = read_pairs([Path(s) for s in shards], cfg["image_size"])
    if len(pairs) < 20:
        raise CurationError(f"train-captioner needs at least 20 image-caption pairs; the shards hold {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_hold = max(10, int(len(pairs) * holdout))
    held, train = [pairs[i] for i in order[:n_hold]], [pairs[i] for i in order[n_hold:]]

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.time()
        model, tokenizer, processor = build_model(out, seed, cfg)
        max_len = cfg["decoder"]["n_positions"]

        def pixels_of(items):
            return processor(images=[im for im, _ in items], return_tensors="pt").pixel_values

        train_px, held_px = pixels_of(train), pixels_of(held)
        train_lab = _labels(tokenizer, [t for _, t in train], max_len)
        held_lab = _labels(tokenizer, [t for _, t in held], max_len)
        before = _teacher_forced(model, held_px, held_lab, 128)

        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warmup if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
        gen = torch.Generator().manual_seed(seed)
        perm, pos, losses = torch.randperm(len(train), generator=gen), 0, []
        log_every = max(1, steps // 10)
        model.train()
        for step in range(steps):
            if pos + batch_size > len(train):  # a new epoch: reshuffle
                perm, pos = torch.randperm(len(train), generator=gen), 0
            idx = perm[pos:pos + batch_size]
            pos += batch_size
            lab = train_lab[idx]
            lab = lab[:, : int((lab != -100).sum(1).max())]  # drop all-padding columns
            loss = model(pixel_values=train_px[idx], labels=lab).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                recent = losses[-log_every:]
                log(f"train-captioner: step {step + 1}/{steps} loss {sum(recent) / len(recent):.3f} "
                    f"({time.time() - t0:.0f}s)")
        train_seconds = time.time() - t0

        after = _teacher_forced(model, held_px, held_lab, 128)
        generated = greedy_captions(model, tokenizer, held_px)
        metrics = {"untrained": before, **after,
                   **caption_metrics(generated, [t for _, t in held])}
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        processor.save_pretrained(out)
    finally:
        torch.set_num_threads(threads_before)

    info = {"metrics": metrics, "trained_on": [str(s) for s in shards],
            "pairs": {"train": len(train), "held_out": len(held)}, "steps": steps, "batch_size": batch_size,
            "lr": lr, "seed": seed, "model_cfg": cfg, "seconds": round(train_seconds, 1),
            "final_loss": round(sum(losses[-log_every:]) / len(losses[-log_every:]), 4),
            "examples": [{"generated": g, "true": t} for g, (_, t) in list(zip(generated, held))[:5]]}
    atomic_write_text(out / TRAINING_FILE, json.dumps(info, indent=1) + "\n")
    return info
