"""Train a small CLIP as a data filter, the DFN way, and load CLIP models for scoring.

No pretrained CLIP weights can be downloaded on an offline machine, and a filter is
only as good as the data it learned from. Data Filtering Networks (Fang et al., 2023)
train the filtering CLIP on a small *trusted* set of high-quality pairs, then score the
noisy pool with it. `curate train-filter` does that with open_clip:

* trusted pairs come from WebDataset tars (an image member plus a `txt` caption per
  sample), for example a hand-checked tier of an earlier run;
* a small CLIP (`TINY_CLIP` below; any open_clip config works) is trained
  contrastively, from a fixed seed;
* a held-out part of the trusted set calibrates a score threshold: the score that
  keeps 98% of held-out matched pairs, written with the model for the `clip_score`
  operator's `min_score: calibrated`; the same images with another held-out caption
  show how many mismatches that threshold rejects (and the ROC AUC);
* the result is an open_clip `local-dir:` model (`open_clip_config.json` +
  `open_clip_model.safetensors`), loadable exactly like `hf-hub:` models.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .errors import CurationError
from .fsutil import atomic_write_text, file_sha256
from .rawshards import IMAGE_EXTS, TEXT_EXTS, iter_samples

# A CLIP small enough to train on a laptop CPU in a minute, big enough to learn colours,
# shapes and positions of the demo scenes. Uses open_clip's bundled BPE tokenizer.
TINY_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
CALIBRATION_FILE = "calibration.json"


# ------------------------------------------------------------------------ loading models
@dataclass
class ClipModel:
    model: object  # open_clip.CLIP
    preprocess: Callable
    tokenizer: Callable
    name: str  # what the sidecar records: model id (+ tag) and a weights digest when local
    calibrated_min_score: float | None


def load_clip(model: str, pretrained: str | None = None, device: str = "cpu") -> ClipModel:
    """`model` as open_clip names it: a built-in architecture (`ViT-B-32`, with a
    `pretrained` tag or checkpoint file), `hf-hub:org/repo`, or `local-dir:PATH`
    (what train-filter writes). A bare directory path is taken as `local-dir:`."""
    import open_clip

    if not model.startswith(("hf-hub:", "local-dir:")) and Path(model).is_dir():
        model = f"local-dir:{model}"
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as exc:  # open_clip raises RuntimeError/FileNotFoundError/ValueError...
        raise CurationError(f"cannot load CLIP model {model!r} (pretrained={pretrained!r}): "
                            f"{str(exc).splitlines()[0][:300]}") from None
    net.eval()
    name, calibrated = model + (f"/{pretrained}" if pretrained else ""), None
    if model.startswith("local-dir:"):
        root = Path(model[len("local-dir:"):])
        weights = sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin"))
        if weights:
            name += f"@{file_sha256(weights[0])[:12]}"
        calib = root / CALIBRATION_FILE
        if calib.is_file():
            calibrated = float(json.loads(calib.read_text())["min_score"])
    elif pretrained and Path(pretrained).is_file():
        name = f"{model}/{Path(pretrained).name}@{file_sha256(pretrained)[:12]}"
    return ClipModel(net, preprocess, tokenizer, name, calibrated)


def embed_images(clip: ClipModel, images: list[Image.Image]) -> np.ndarray:
    """L2-normalised image embeddings, float32, one row per image."""
    import torch

    device = next(clip.model.parameters()).device
    with torch.inference_mode():
        pixels = torch.stack([clip.preprocess(im) for im in images]).to(device)
        return torch.nn.functional.normalize(clip.model.encode_image(pixels).float(), dim=-1).cpu().numpy()


def embed_texts(clip: ClipModel, texts: list[str]) -> np.ndarray:
    """L2-normalised text embeddings, float32, one row per text."""
    import torch

    device = next(clip.model.parameters()).device
    with torch.inference_mode():
        tokens = clip.tokenizer(texts).to(device)
        return torch.nn.functional.normalize(clip.model.encode_text(tokens).float(), dim=-1).cpu().numpy()


# ----------------------------------------------------------------------- trusted pairs
def read_pairs(shards: list[Path], image_size: int) -> list[tuple[Image.Image, str]]:
    """(image, caption) from WebDataset tars; samples without both are skipped. Images
    are decoded with PIL only (nothing in a shard is ever unpickled)."""
    pairs = []
    for shard in shards:
        try:
            for _key, files in iter_samples(shard):
                img_ext = next((e for e in IMAGE_EXTS if e in files), None)
                txt_ext = next((e for e in TEXT_EXTS if e in files), None)
                if img_ext is None or txt_ext is None:
                    continue
                try:
                    image = Image.open(io.BytesIO(files[img_ext])).convert("RGB")
                except Exception:
                    continue  # a broken image in a trusted set is skipped, not fatal
                image.thumbnail((image_size * 2, image_size * 2))  # keep memory small
                pairs.append((image, files[txt_ext].decode("utf-8", "replace").strip()))
        except Exception as exc:
            raise CurationError(f"cannot read trusted shard {shard}: {exc}") from None
    return pairs


# ---------------------------------------------------------------------------- training
def train_filter(shards: list[Path], out: Path, *, epochs: int = 12, batch_size: int = 64, lr: float = 2e-3,
                 holdout: float = 0.15, seed: int = 0, model_cfg: dict | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Train a CLIP on the trusted pairs in `shards`, calibrate it, save it to `out`."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    model_cfg = model_cfg or TINY_CLIP
    size = model_cfg["vision_cfg"]["image_size"]
    pairs = read_pairs(shards, size)
    if len(pairs) < 20:
        raise CurationError(f"train-filter needs at least 20 image-caption pairs; the shards hold {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_hold = max(10, int(len(pairs) * holdout))
    held, train = [pairs[i] for i in order[:n_hold]], [pairs[i] for i in order[n_hold:]]

    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    preprocess = open_clip.image_transform(size, is_train=False)
    tokenizer = open_clip.get_tokenizer("", context_length=model_cfg["text_cfg"]["context_length"])
    pixels = torch.stack([preprocess(im) for im, _ in train])
    tokens = tokenizer([t for _, t in train])

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        for start in range(0, len(train), batch_size):
            idx = perm[start:start + batch_size]
            if len(idx) < 2:
                continue
            img_f, txt_f, scale = model(pixels[idx], tokens[idx])
            logits = scale * img_f @ txt_f.T
            # Trusted sets repeat captions ("a red circle on the left"): identical captions
            # in one batch are all positives for each other's images, not negatives.
            same = _same_caption_mask([train[i][1] for i in idx.tolist()])
            loss = (_soft_ce(logits, same) + _soft_ce(logits.T, same.T)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        log(f"train-filter: epoch {epoch + 1}/{epochs} loss {np.mean(losses[-steps_per_epoch:]):.3f} "
            f"({time.time() - t0:.0f}s)")
    model.eval()

    clip = ClipModel(model, preprocess, tokenizer, "trained", None)
    metrics = calibrate(clip, held, seed)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    atomic_write_text(out / "open_clip_config.json", json.dumps({
        "model_cfg": model_cfg,
        "preprocess_cfg": {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                           "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
    }, indent=1) + "\n")
    info = {"min_score": metrics["min_score"], "metrics": metrics, "trained_on": [str(s) for s in shards],
            "pairs": {"train": len(train), "held_out": len(held)}, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "seed": seed, "seconds": round(time.time() - t0, 1), "final_loss": round(losses[-1], 4)}
    atomic_write_text(out / CALIBRATION_FILE, json.dumps(info, indent=1) + "\n")
    return info


def _same_caption_mask(texts: list[str]):
    import torch

    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    codes = torch.tensor([ids[t] for t in texts])
    return (codes[:, None] == codes[None, :]).float()


def _soft_ce(logits, targets):
    import torch

    targets = targets / targets.sum(dim=1, keepdim=True)
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def calibrate(clip: ClipModel, held: list[tuple[Image.Image, str]], seed: int, false_reject: float = 0.02) -> dict:
    """The threshold that keeps all but `false_reject` of the held-out trusted pairs (a
    filter should rarely throw good data away), and how it does on the same images
    with another held-out caption: the share of mismatched pairs it rejects, and the
    ROC AUC of the score separating the two."""
    images = [im for im, _ in held]
    texts = [t for _, t in held]
    rng = random.Random(seed + 1)
    wrong = []
    for t in texts:
        j = rng.randrange(len(texts))
        while texts[j] == t:
            j = rng.randrange(len(texts))
        wrong.append(texts[j])
    img, txt, wtxt = embed_images(clip, images), embed_texts(clip, texts), embed_texts(clip, wrong)
    pos, neg = (img * txt).sum(1), (img * wtxt).sum(1)
    threshold = float(np.quantile(pos, false_reject))
    return {"min_score": round(threshold, 4), "false_reject": false_reject,
            "mismatched_rejected": round(float((neg < threshold).mean()), 4), "auc": round(roc_auc(pos, neg), 4),
            "matched_mean": round(float(pos.mean()), 4), "mismatched_mean": round(float(neg.mean()), 4)}


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a matched pair outscores a mismatched one (ties count half)."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())
