"""Build the demo corpus: deterministic from a seed, no downloads.

Layout under the corpus folder:
  files/                     every servable file (images, videos, junk)
  image_text.parquet         path, caption, qa  (the url list, before a server is known)
  documents.jsonl            interleaved multi-image documents, with questions about their images (qa)
  videos.parquet             path, caption       (short mp4 clips)
  truth.parquet              path -> planted category, for measuring filters later
  trusted/trusted-000000.tar fresh scenes with true captions (jpg + txt): the trusted set
                             `curate train-filter` learns the CLIP filter from
  eval/shapes_bench/         a small evaluation set (jpg + question txt, WebDataset) that
                             `decontaminate` protects; some of its images are planted in
                             the crawl as exact, re-encoded, resized and cropped copies
                             (planted eval_*, truth's eval_item names the reference key)
  corpus.json                counts per category and the build parameters

`planted` categories: scene (a true caption), mismatch (caption of another scene),
text_sign (OCR-rich), exact_dup, near_dup, tiny, huge, elongated, truncated, random_bytes,
html, short_caption, missing (404).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pandas as pd
from PIL import Image

from ..fsutil import atomic_write_bytes, atomic_write_text
from ..wds import tar_bytes
from . import scenes

CORPUS_VERSION = "6"


@dataclass(frozen=True)
class CorpusPlan:
    """How many of each planted category. The defaults give ~3,000 image-text rows."""

    scene: int = 2200
    mismatch: int = 250
    text_sign: int = 200
    exact_dup: int = 100
    near_dup: int = 100
    tiny: int = 30
    huge: int = 6
    elongated: int = 20
    truncated: int = 20
    random_bytes: int = 15
    html: int = 10
    short_caption: int = 40
    missing: int = 25
    documents: int = 60
    videos: int = 24
    trusted: int = 1000  # hand-checked pairs, not crawled: what train-filter learns from
    eval_items: int = 60  # the evaluation set decontaminate protects (eval/shapes_bench)
    eval_copied: int = 12  # of its images, planted in the crawl in each of EVAL_COPIES' forms

    @classmethod
    def small(cls) -> "CorpusPlan":
        """A few hundred rows with every category present, for fast tests."""
        return cls(scene=160, mismatch=30, text_sign=20, exact_dup=12, near_dup=12, tiny=5, huge=2,
                   elongated=5, truncated=5, random_bytes=4, html=3, short_caption=6, missing=5,
                   documents=6, videos=3, trusted=400, eval_items=24, eval_copied=8)


def _write(root: Path, rel: str, data: bytes) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return rel


def _near_copy(img: Image.Image, rng: random.Random) -> bytes:
    """Same picture after the kind of processing a re-upload gets: rescale + re-encode."""
    scale = rng.uniform(0.85, 0.95)
    small = img.resize((max(8, int(img.width * scale)), max(8, int(img.height * scale))), Image.BILINEAR)
    return scenes.encode_jpeg(small, quality=rng.choice([60, 70, 75]))


EVAL_SET = "shapes_bench"
EVAL_COPIES = ("eval_exact", "eval_reencoded", "eval_resized", "eval_cropped")


def _eval_copy(form: str, img: Image.Image, data: bytes, rng: random.Random) -> bytes:
    """A benchmark image as it turns up in a crawl: the same file, re-encoded, resized,
    or cropped (a uniform crop of 80-92% of each side, anywhere in the image)."""
    if form == "eval_exact":
        return data
    if form == "eval_reencoded":
        return scenes.encode_jpeg(img, quality=rng.choice([55, 65, 75]))
    if form == "eval_resized":
        scale = rng.uniform(0.5, 0.8)
        return scenes.encode_jpeg(img.resize((int(img.width * scale), int(img.height * scale)), Image.BILINEAR), quality=80)
    f = rng.uniform(0.8, 0.92)
    cw, ch = int(img.width * f), int(img.height * f)
    x, y = rng.randint(0, img.width - cw), rng.randint(0, img.height - ch)
    return scenes.encode_jpeg(img.crop((x, y, x + cw, y + ch)), quality=85)


def _plant_eval_copies(root: Path, seed: int, plan: "CorpusPlan", rows: list[dict]) -> None:
    """Write the evaluation set (eval/shapes_bench) and insert copies of `eval_copied` of
    its images into the url list at random places. Its own random stream: the rest of
    the corpus is the same with or without it."""
    rng = random.Random(seed + 2)
    samples, copies = [], []
    for j in range(plan.eval_items):
        sc = scenes.random_scene(rng)
        img = scenes.render(sc)
        data = scenes.encode_jpeg(img)
        item = f"q{j:05d}"
        question = scenes.questions(sc)[0]["q"] if scenes.questions(sc) else "What is shown?"
        samples.append((item, [("jpg", data), ("txt", question.encode())]))
        if j < plan.eval_copied:
            for form in EVAL_COPIES:
                rel = _write(root, f"files/{form.replace('_', '/')}/{j:05d}.jpg", _eval_copy(form, img, data, rng))
                copies.append({"path": rel, "caption": scenes.caption(sc, rng), "qa": None, "planted": form,
                               "eval_item": item})
    folder = root / "eval" / EVAL_SET
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / f"{EVAL_SET}-000000.tar", tar_bytes(samples))
    for row in copies:
        rows.insert(rng.randint(0, len(rows)), row)


def _video_bytes(scene: scenes.Scene, direction: str, n_frames: int = 16) -> bytes:
    import av  # PyAV ships its own FFmpeg

    obj = scene.objects[0]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        # H.264: what browsers play (curate browse shows clips in a <video>); MPEG-4 Part 2
        # plays nowhere on the web. One thread, no lookahead or B-frames, frames given as
        # yuv420p: x264 then writes the same bytes every time (with them it does not).
        stream = container.add_stream("libx264", rate=8, options={"threads": "1", "bframes": "0", "rc-lookahead": "0",
                                                                    "sync-lookahead": "0"})
        stream.width, stream.height, stream.pix_fmt = 96, 96, "yuv420p"
        for t in range(n_frames):
            frac = t / (n_frames - 1)
            pos = frac if direction in ("left to right", "top to bottom") else 1 - frac
            img = Image.new("RGB", (96, 96), scene.background)
            from PIL import ImageDraw

            d = ImageDraw.Draw(img)
            c = int(14 + pos * 68)
            cx, cy = (c, 48) if "left" in direction else (48, c)
            d.ellipse((cx - 12, cy - 12, cx + 12, cy + 12), fill=scenes.COLOURS[obj.colour])
            frame = av.VideoFrame.from_image(img).reformat(format="yuv420p")
            frame.pts = t
            frame.time_base = Fraction(1, 8)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def build(root: str | Path, seed: int = 0, plan: CorpusPlan | None = None) -> dict:
    """Write the corpus under `root` (skipped if already built with the same parameters)."""
    root = Path(root)
    plan = plan or CorpusPlan()
    params = {"version": CORPUS_VERSION, "seed": seed, "plan": plan.__dict__}
    stamp = root / "corpus.json"
    if stamp.exists():
        existing = json.loads(stamp.read_text())
        if existing.get("params") == params:
            return existing
    rng = random.Random(seed)
    rows: list[dict] = []  # path, caption, qa, planted

    def add(planted: str, rel: str, caption: str, qa: list | None = None) -> None:
        rows.append({"path": rel, "caption": caption, "qa": json.dumps(qa) if qa else None, "planted": planted})

    good: list[tuple[str, Image.Image, str]] = []
    for i in range(plan.scene):
        sc = scenes.random_scene(rng)
        img = scenes.render(sc)
        rel = _write(root, f"files/scene/{i:05d}.jpg", scenes.encode_jpeg(img))
        cap = scenes.caption(sc, rng)
        add("scene", rel, cap, scenes.questions(sc))
        good.append((rel, img, cap))
    for i in range(plan.mismatch):
        sc = scenes.random_scene(rng)
        other = scenes.random_scene(rng)
        while {(o.shape, o.colour) for o in other.objects} & {(o.shape, o.colour) for o in sc.objects}:
            other = scenes.random_scene(rng)
        rel = _write(root, f"files/mismatch/{i:05d}.jpg", scenes.encode_jpeg(scenes.render(sc)))
        add("mismatch", rel, scenes.caption(other, rng))
    for i in range(plan.text_sign):
        sc = scenes.random_scene(rng, with_word=True)
        rel = _write(root, f"files/sign/{i:05d}.jpg", scenes.encode_jpeg(scenes.render(sc)))
        add("text_sign", rel, scenes.caption(sc, rng), scenes.questions(sc))
    for i, (src, _, cap) in enumerate(rng.sample(good, plan.exact_dup)):
        rel = _write(root, f"files/copy/{i:05d}.jpg", (root / src).read_bytes())
        add("exact_dup", rel, cap)
    for i, (_, img, cap) in enumerate(rng.sample(good, plan.near_dup)):
        rel = _write(root, f"files/near/{i:05d}.jpg", _near_copy(img, rng))
        add("near_dup", rel, cap)
    for i in range(plan.tiny):
        sc = scenes.random_scene(rng)
        rel = _write(root, f"files/tiny/{i:05d}.jpg", scenes.encode_jpeg(scenes.render(sc).resize((16, 16))))
        add("tiny", rel, scenes.caption(sc, rng))
    for i in range(plan.huge):
        # 9000x9000 of flat colour: a few hundred KB on the wire, 81 MP decoded.
        img = Image.new("RGB", (9000, 9000), scenes.BACKGROUNDS[i % len(scenes.BACKGROUNDS)])
        rel = _write(root, f"files/huge/{i:05d}.jpg", scenes.encode_jpeg(img, quality=50))
        add("huge", rel, "A very large plain image of a single colour.")
    for i in range(plan.elongated):
        sc = scenes.random_scene(rng)
        rel = _write(root, f"files/long/{i:05d}.jpg", scenes.encode_jpeg(scenes.render(sc).resize((640, 48))))
        add("elongated", rel, scenes.caption(sc, rng))
    for i in range(plan.truncated):
        data = (root / good[rng.randrange(len(good))][0]).read_bytes()
        rel = _write(root, f"files/truncated/{i:05d}.jpg", data[: len(data) // 2])
        add("truncated", rel, "A picture of a shape that was cut off in transfer.")
    for i in range(plan.random_bytes):
        rel = _write(root, f"files/random/{i:05d}.jpg", rng.randbytes(rng.randint(200, 4000)))
        add("random_bytes", rel, "A file that claims to be a picture of shapes.")
    for i in range(plan.html):
        rel = _write(root, f"files/html/{i:05d}.jpg", b"<!doctype html><html><body>Not an image</body></html>")
        add("html", rel, "A web page served where an image was expected.")
    for i in range(plan.short_caption):
        sc = scenes.random_scene(rng)
        rel = _write(root, f"files/short/{i:05d}.jpg", scenes.encode_jpeg(scenes.render(sc)))
        add("short_caption", rel, rng.choice(["", "img", "shapes", "photo 1"]))
    for i in range(plan.missing):
        add("missing", f"files/missing/{i:05d}.jpg", "A picture that is no longer online.")

    rng.shuffle(rows)  # interleave categories across raw shards
    _plant_eval_copies(root, seed, plan, rows)
    table = pd.DataFrame(rows)
    table[["path", "caption", "qa"]].to_parquet(root / "image_text.parquet", index=False)
    table["eval_item"] = table["eval_item"] if "eval_item" in table.columns else None
    table[["path", "planted", "eval_item"]].to_parquet(root / "truth.parquet", index=False)

    docs = []
    for d in range(plan.documents):
        n_img = rng.randint(2, 4)
        items = [{"type": "text", "text": f"Document {d}: a set of {n_img} drawings of shapes."}]
        pictures = []
        for j in range(n_img):
            sc = scenes.random_scene(rng)
            pictures.append(sc)
            rel = _write(root, f"files/doc/{d:04d}_{j}.jpg", scenes.encode_jpeg(scenes.render(sc)))
            items.append({"type": "image", "path": rel})
            items.append({"type": "text", "text": f"Figure {j + 1} shows {scenes.caption(sc, rng)[0].lower()}{scenes.caption(sc, rng)[1:]}"})
        # multi-image questions (no draw from rng: the rest of the corpus stays as it was)
        docs.append({"doc_id": f"doc{d:04d}", "items": items, "qa": scenes.document_questions(pictures)})
    with open(root / "documents.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")

    videos = []
    for v in range(plan.videos):
        sc = scenes.random_scene(rng)
        direction = rng.choice(["left to right", "right to left", "top to bottom", "bottom to top"])
        rel = _write(root, f"files/video/{v:04d}.mp4", _video_bytes(sc, direction))
        obj = sc.objects[0]
        videos.append({"path": rel, "caption": f"A {obj.colour} circle moves from {direction}."})
    pd.DataFrame(videos).to_parquet(root / "videos.parquet", index=False)

    # The trusted set: fresh scenes with true captions, as a WebDataset tar, drawn from
    # their own random stream so the crawled corpus does not change with its size.
    trusted_rng = random.Random(seed + 1)
    samples = []
    for i in range(plan.trusted):
        sc = scenes.random_scene(trusted_rng, with_word=trusted_rng.random() < 0.1)
        samples.append((f"trusted{i:06d}", [("jpg", scenes.encode_jpeg(scenes.render(sc))),
                                            ("txt", scenes.caption(sc, trusted_rng).encode())]))
    (root / "trusted").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / "trusted" / "trusted-000000.tar", tar_bytes(samples))

    counts = table["planted"].value_counts().sort_index().to_dict()
    summary = {"params": params, "image_text_rows": len(table), "planted": counts,
               "documents": len(docs), "videos": len(videos), "trusted": plan.trusted}
    atomic_write_text(stamp, json.dumps(summary, indent=2) + "\n")
    return summary
