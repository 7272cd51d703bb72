"""From tier shards to packed batches.

  plan.json stage --> per-tier webdataset pipelines (resampled shards, key selection,
  held-out split, shuffle buffer) --> weighted mix --> decode (jpg/png/webp, mp4/webm,
  txt, json only; never pickle) --> conversation --> token ids + labels --> packed rows.

Held-out split: a sample whose uid hashes to 0 mod 10 is never trained on; eval reads
exactly those. Packing puts several samples in one row; each keeps its own position ids
(restarting at 0) and a segment id, from which the model keeps attention within each
sample (lm.py: a FlexAttention document mask, or causal SDPA per sample; never an L x L
mask outside the dense reference path), so packed samples never see each other.

Data position (for resume): every batch holds exactly `batch_size` samples, and the
DataLoader takes batches from its workers in turn (batch b from worker b % workers), so
"batches consumed" tells each stream how many raw samples to skip before decoding
anything. A restarted DataLoader begins its turns at worker 0 again, so after `done`
batches worker w carries on the stream of worker (w + done) % workers: the resumed
sequence of batches is the uninterrupted one whatever `done` and the worker count.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import CurationError
from ..kinds import kind_of, tier_sample_kind
from .config import ModelConfig
from .views import cut_views, image_layout, lm_tokens, to_tensor

USER, ASSISTANT = "User:", "Assistant:"
DESCRIBE_IMAGE, DESCRIBE_VIDEO = "Describe the image.", "Describe the video."
# the tiny tokenizer needs every word the templates write, image labels included
TEMPLATE_TEXT = [USER, ASSISTANT, DESCRIBE_IMAGE, DESCRIBE_VIDEO, "Image " + " ".join(map(str, range(1, 17)))]
HELD_OUT_MOD = 10


def is_held_out(uid: str) -> bool:
    digest = hashlib.blake2b(uid.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % HELD_OUT_MOD == 0


# ---------------------------------------------------------------- plan

@dataclass
class TierSource:
    tier: str
    shards: list[str]  # tar paths
    keys: dict[str, set | None]  # shard file name -> keys the plan selected (None: all)
    weight: float  # share of the stage's samples


def load_plan(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CurationError(f"plan {path} not found; make one with `curate plan --root OUTPUT`")
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CurationError(f"plan {path} is not valid JSON ({exc})") from exc
    if not plan.get("stages"):
        raise CurationError(f"plan {path} has no stages")
    root = Path(plan.get("root", ""))
    if not (root / "tiers").is_dir():  # the plan travelled without its absolute root: look beside it
        root = path.parent
    if not (root / "tiers").is_dir():
        raise CurationError(f"plan {path}: tier folder not found under {plan.get('root')} or {path.parent}")
    plan["root"] = str(root)
    return plan


def find_stage(plan: dict, name: str | None) -> dict:
    if name is None:
        return plan["stages"][0]
    for stage in plan["stages"]:
        if stage["name"] == name:
            return stage
    names = ", ".join(s["name"] for s in plan["stages"])
    raise CurationError(f"stage {name!r} is not in the plan; stages: {names}")


def stage_sources(plan: dict, stage: dict) -> list[TierSource]:
    sources = []
    for mix in stage["mix"]:
        if not mix["samples"]:
            continue
        folder = Path(plan["root"]) / "tiers" / mix["tier"]
        shards = {name: (None if keys is None else set(keys)) for name, keys in mix["shards"].items()}
        missing = [n for n in shards if not (folder / n).is_file()]
        if missing:
            raise CurationError(f"tier {mix['tier']}: shard {folder / missing[0]} is missing")
        sources.append(TierSource(mix["tier"], [str(folder / n) for n in sorted(shards)], shards, mix["samples"]))
    if not sources:
        raise CurationError(f"stage {stage['name']} selects no samples")
    return sources


def eval_sources(plan: dict) -> list[TierSource]:
    """Every tier any stage reads, all of its shards (held-out uids are filtered later)."""
    merged: dict[str, set] = {}
    for stage in plan["stages"]:
        for mix in stage["mix"]:
            merged.setdefault(mix["tier"], set()).update(mix["shards"])
    root = Path(plan["root"]) / "tiers"
    return [TierSource(t, [str(root / t / n) for n in sorted(names)], {n: None for n in names}, 1.0)
            for t, names in sorted(merged.items())]


def plan_texts(plan: dict):
    """All text of the plan's tiers (captions, documents, questions, answers): the tiny
    tokenizer's vocabulary source."""
    import pyarrow.parquet as pq

    yield from TEMPLATE_TEXT
    for src in eval_sources(plan):
        for shard in src.shards:
            table = pq.read_table(shard[:-4] + ".parquet", columns=["text", "source_meta"]).to_pylist()
            for row in table:
                yield row["text"] or ""
                for qa in qa_pairs(row["source_meta"]):
                    yield qa["q"]
                    yield qa["a"]


# ---------------------------------------------------------------- decoding

def qa_pairs(source_meta) -> list[dict]:
    """Demo scene questions: source_meta is JSON whose "qa" is a JSON list (or null)."""
    if not source_meta:
        return []
    meta = json.loads(source_meta) if isinstance(source_meta, str) else source_meta
    qa = meta.get("qa") if isinstance(meta, dict) else None
    if isinstance(qa, str):
        qa = json.loads(qa)
    return [x for x in qa or [] if x.get("q") and x.get("a")]


def decode_sample(raw: dict, frames_per_video: int) -> dict:
    """A raw webdataset sample (bytes per extension) -> text, metadata and PIL images.
    Only json, txt, jpg/png/webp and mp4/webm clips are decoded, each explicitly; which
    the sample is (by its members and json) and how its media decode is its kind's
    (curation.kinds: a clip member makes a video, a doc a document, else one image)."""
    meta = json.loads(raw["json"])
    text = meta.get("caption") or meta.get("text") or raw.get("txt", b"").decode("utf-8")
    kind = tier_sample_kind(raw, meta)
    sample = {"uid": meta.get("uid") or raw["__key__"], "kind": kind.name, "text": text,
              "qa": qa_pairs(meta.get("source_meta")), "doc": None, "images": [], "role": "single"}
    kind.decode(raw, meta, sample, frames_per_video)
    return sample


def decode_document(raw: dict, meta: dict, sample: dict) -> None:
    """A document's images and text items, in its doc's order (images its tar lacks are skipped)."""
    doc = json.loads(meta["doc"]) if isinstance(meta.get("doc"), str) else meta.get("doc")
    items = []
    for item in doc["items"]:
        if item.get("type") == "image":
            if item.get("member") in raw:
                items.append(("image", len(sample["images"])))
                sample["images"].append(decode_image(raw[item["member"]]))
            else:  # questions name images by their place in the document, which no longer holds
                sample["qa"] = []
        elif item.get("text"):
            items.append(("text", item["text"]))
    sample.update(role="multi", doc=items)


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def decode_video(data: bytes, count: int) -> list[Image.Image]:
    """`count` frames spread evenly over the clip (first and last included). Only those
    frames are decoded (curation.ops.frames.PyAvVideo seeks to each), so memory does not
    grow with the clip's length."""
    from ..ops.frames import PyAvVideo

    video = PyAvVideo(data)  # raises ValueError when the stream has no frames
    n = len(video.pts)
    picks = [round(i * (n - 1) / max(1, count - 1)) for i in range(min(count, n))]
    return [Image.fromarray(frame).convert("RGB") for frame in video.frames(picks)]


# ---------------------------------------------------------------- conversations

def conversation(sample: dict, rng: random.Random | None = None) -> list[tuple]:
    """Segments: ("text", str, trains), ("image", index), ("eos",): the training sequence.
    Scene QA turns come before the caption turn, so no answer can be copied from it. A
    document with questions about its images trains, half of the time (seeded), as a
    multi-image QA conversation instead of its text: never both in one sequence, since its
    text describes the figures the questions ask about."""
    kind = kind_of(sample["kind"])
    if kind.doc_layout:
        if sample["qa"] and rng is not None and rng.random() < 0.5:
            return qa_conversation(sample, _shuffled(sample["qa"], rng))
        return document_conversation(sample)
    if sample["role"] == "frame":  # a clip's frames (the kind's decode set the role)
        return caption_conversation(sample)
    return qa_conversation(sample, [*_shuffled(sample["qa"], rng), {"q": DESCRIBE_IMAGE, "a": sample["text"]}])


def _shuffled(pairs: list[dict], rng: random.Random | None) -> list[dict]:
    pairs = list(pairs)
    if rng is not None:
        rng.shuffle(pairs)
    return pairs


def visual_prompt(count: int, role: str) -> list[tuple]:
    """How the images open the first user turn. Several images (documents, and eval's
    distractor sets of any size, one included) are labelled "Image k:" so a question or an
    answer can name one; a single image or a clip's frames come bare."""
    if role == "multi":
        return [seg for i in range(count)
                for seg in (("text", f"Image {i + 1}: ", False), ("image", i), ("text", "\n", False))]
    return [*(("image", i) for i in range(count)), ("text", "\n", False)]


def qa_conversation(sample: dict, pairs: list[dict]) -> list[tuple]:
    """One turn per question/answer pair, the sample's images in front of the first."""
    segs = []
    for i, pair in enumerate(pairs):
        opening = visual_prompt(len(sample["images"]), sample["role"]) if i == 0 else []
        segs += turn([*opening, ("text", pair["q"], False)], pair["a"])
    return segs


def caption_conversation(sample: dict) -> list[tuple]:
    """The images (or a clip's frames) and the describe prompt, answered by the caption alone."""
    describe = DESCRIBE_VIDEO if sample["role"] == "frame" else DESCRIBE_IMAGE
    return qa_conversation(sample, [{"q": describe, "a": sample["text"]}])


def document_conversation(sample: dict) -> list[tuple]:
    """A document's text and images in its order; all of its text trains."""
    segs = [("image", x[1]) if x[0] == "image" else ("text", x[1] + "\n", True) for x in sample["doc"]]
    return segs + [("eos",)]


def held_out_conversations(sample: dict) -> list[tuple[str, list[tuple]]]:
    """(task, segments) for held-out loss, each target given away nowhere else in its
    sequence: the caption alone ("caption"), each question alone ("qa"), a document's text
    alone ("document"). The training sequence would leak: its caption repeats the answers
    before it."""
    kind = kind_of(sample["kind"])
    found = [("qa", qa_conversation(sample, [pair])) for pair in sample["qa"]]
    if kind.doc_layout:
        return [("document", document_conversation(sample)), *found]
    return ([("caption", caption_conversation(sample))] if sample["text"] else []) + found


def turn(prompt: list[tuple], answer: str | None) -> list[tuple]:
    """One user turn and, if given, the answer the model learns to give."""
    segs = [("text", USER + " ", False), *prompt, ("text", "\n" + ASSISTANT + " ", False)]
    return segs + [("text", answer, True), ("eos",)] if answer is not None else segs


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where the token is not learned
    pixels: torch.Tensor  # [views, 3, S, S]
    layouts: list[tuple]
    uid: str = ""
    tier: str = ""
    extra: dict = field(default_factory=dict)


def encode(segments: list[tuple], images: list[Image.Image], role: str, cfg: ModelConfig, tok, mean, std,
           uid: str = "", tier: str = "") -> Example:
    """Token ids and labels; each image becomes as many `<image>` ids as it takes LM
    positions. A sample longer than max_len is cut, never through an image."""
    layouts = [image_layout(cfg, role, im.width, im.height) for im in images]
    ids, labels, spans = [], [], []
    for seg in segments:
        if seg[0] == "image":
            n = lm_tokens(cfg, layouts[seg[1]])
            spans.append((seg[1], len(ids), len(ids) + n))
            ids += [tok.image_id] * n
            labels += [-100] * n
        elif seg[0] == "eos":
            ids.append(tok.eos_id)
            labels.append(tok.eos_id if labels and labels[-1] != -100 else -100)
        else:
            piece = tok.encode(seg[1])
            ids += piece
            labels += piece if seg[2] else [-100] * len(piece)
    cut = len(ids)
    if cut > cfg.max_len:
        cut = min([cfg.max_len] + [start for _, start, end in spans if end > cfg.max_len])
    kept = [i for i, _, end in spans if end <= cut]
    views = [to_tensor(cut_views(cfg, images[i], layouts[i]), mean, std) for i in kept]
    pixels = torch.cat(views) if views else torch.zeros(0, 3, cfg.image_size, cfg.image_size)
    return Example(ids[:cut], labels[:cut], pixels, [layouts[i] for i in kept], uid, tier)


def make_example(sample: dict, cfg: ModelConfig, tok, mean, std, tier: str = "", rng=None) -> Example:
    return encode(conversation(sample, rng), sample["images"], sample["role"], cfg, tok, mean, std,
                  sample["uid"], tier)


# ---------------------------------------------------------------- packing

def pack(examples: list[Example], max_len: int, pad_id: int) -> dict:
    """First-fit packing (longest first) into rows of at most max_len tokens."""
    rows: list[list[Example]] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        for row in rows:
            if sum(len(e.input_ids) for e in row) + len(ex.input_ids) <= max_len:
                row.append(ex)
                break
        else:
            rows.append([ex])
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, -100, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    pixels, layouts, samples = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row, start=1):
            n = len(ex.input_ids)
            input_ids[r, at:at + n] = torch.tensor(ex.input_ids)
            labels[r, at:at + n] = torch.tensor(ex.labels)
            labels[r, at] = -100  # a sample's first token is never predicted from its neighbour
            position_ids[r, at:at + n] = torch.arange(n)
            segment_ids[r, at:at + n] = s
            pixels.append(ex.pixels)
            layouts += ex.layouts
            samples.append({"row": r, "segment": s, "uid": ex.uid, "tier": ex.tier, **ex.extra})
            at += n
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment_ids,
            "pixels": torch.cat(pixels), "layouts": layouts, "samples": samples}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------- streaming

def stream_role(skip_batches: int) -> tuple[int, int, int, int]:
    """(stream, total streams, role, workers) of this DataLoader worker on this rank: its
    role is the original worker whose stream it continues after `skip_batches` batches
    (see the module docstring); stream = rank * workers + role identifies the stream's
    seeds and, without resampling, its share of the shards."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    role = (worker + skip_batches) % workers
    return rank * workers + role, world * workers, role, workers


def _every_nth(stream: int, total: int):
    """A pipeline stage keeping shard urls stream, stream + total, ... (by stream, not by the
    worker's process id, so a resumed worker reads the shards of the stream it continues)."""
    def stage(urls):
        return itertools.islice(urls, stream, None, total)
    return stage


class TrainBatches(IterableDataset):
    """Endless packed batches of `batch_size` training samples for one stage.

    resample=True (default): each stream draws shards with replacement from its own seed
    (webdataset's ResampledShards), so tiers with fewer shards than streams still feed
    every stream. resample=False: shards are dealt out over the streams (ranks x workers),
    epoch after epoch.
    """

    def __init__(self, sources: list[TierSource], cfg: ModelConfig, tok, mean, std, batch_size: int, seed: int = 0,
                 skip_batches: int = 0, shuffle_buffer: int = 200, resample: bool = True):
        self.sources, self.cfg, self.tok, self.mean, self.std = sources, cfg, tok, mean, std
        self.batch_size, self.seed, self.skip_batches = batch_size, seed, skip_batches
        self.shuffle_buffer, self.resample = shuffle_buffer, resample

    def __iter__(self):
        if get_worker_info() is not None:
            torch.set_num_threads(1)  # workers decode; the main process computes
        stream, total, role, workers = stream_role(self.skip_batches)
        rng = random.Random(f"{self.seed}/{stream}/mix")
        tiers = [self._tier_samples(src, stream, total) for src in self.sources]
        mixed = _weighted_mix(tiers, [s.weight for s in self.sources], rng)
        # resume: skip what this stream already delivered, before any decoding
        done = self.skip_batches // workers + (1 if role < self.skip_batches % workers else 0)
        raw = itertools.islice(mixed, done * self.batch_size, None)
        for position in itertools.count(done * self.batch_size, self.batch_size):
            examples = []
            for offset, (tier, item) in enumerate(itertools.islice(raw, self.batch_size)):
                turn_order = random.Random(f"{self.seed}/{stream}/{position + offset}")  # same after a resume
                try:
                    sample = decode_sample(item, self.cfg.frames_per_video)
                    examples.append(make_example(sample, self.cfg, self.tok, self.mean, self.std, tier, turn_order))
                except (ValueError, OSError, KeyError) as exc:  # one unreadable sample must not stop training
                    warnings.warn(f"skipping sample {item.get('__key__')} of {item.get('__url__')}: {exc}")
            if examples:
                yield pack(examples, self.cfg.max_len, self.tok.pad_id)

    def _tier_samples(self, src: TierSource, stream: int, total: int):
        """Endless (tier, raw sample) pairs of one tier, plan keys only, held-out excluded."""
        def keep(raw):
            keys = src.keys.get(Path(raw["__url__"]).name)
            if keys is not None and raw["__key__"] not in keys:
                return False
            return not is_held_out(_uid(raw))

        for epoch in itertools.count():
            if self.resample:
                shards = wds.ResampledShards(src.shards, seed=self.seed, worker_seed=lambda: stream, deterministic=True)
                stages = [shards]
            else:
                stages = [wds.SimpleShardList(src.shards, seed=self.seed + epoch), _every_nth(stream, total)]
            pipeline = wds.DataPipeline(*stages, wds.tarfile_to_samples(), wds.select(keep),
                                        wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2,
                                                    rng=random.Random(f"{self.seed}/{stream}/{src.tier}/{epoch}")))
            count = 0
            for raw in pipeline:
                count += 1
                yield src.tier, raw
            if count == 0:
                raise CurationError(f"tier {src.tier}: no training samples reach this worker "
                                    f"(fewer shards than nodes x workers? use resampling)")


def _uid(raw: dict) -> str:
    return json.loads(raw["json"]).get("uid") or raw["__key__"]


def _weighted_mix(iterators: list, weights: list[float], rng: random.Random):
    iterators = [iter(it) for it in iterators]
    while True:
        yield next(rng.choices(iterators, weights=weights)[0])


def held_out_samples(sources: list[TierSource], frames_per_video: int, limit_per_tier: int | None = None):
    """(tier, decoded sample) for held-out uids, tier by tier in shard order. A sample that
    cannot be decoded is skipped with a warning, as in training."""
    for src in sources:
        count = 0
        pipeline = wds.DataPipeline(wds.SimpleShardList(src.shards), wds.tarfile_to_samples(),
                                    wds.select(lambda raw: is_held_out(_uid(raw))))
        for raw in pipeline:
            if limit_per_tier is not None and count >= limit_per_tier:
                break
            try:
                sample = decode_sample(raw, frames_per_video)
            except (ValueError, OSError, KeyError) as exc:
                warnings.warn(f"skipping held-out sample {raw.get('__key__')} of {raw.get('__url__')}: {exc}")
                continue
            count += 1
            yield src.tier, sample
