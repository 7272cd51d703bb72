"""Small synthetic raw shards for engine tests: JPEG + caption + json per sample, with
planted exact and near duplicates, written as WebDataset tars (our crawl's layout, with
a listing parquet beside each tar when asked)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.ids import make_uid

CHEAP_RECIPE = """\
name: cheap
seed: 3
ops:
  - op: decode_image
  - op: perceptual_hash
  - op: image_quality
    min_side: 16
  - op: caption_length
    min_words: 2
  - op: exact_dedup
  - op: near_dedup
    max_hamming: 4
tiers:
  - name: wide
    where: "width > height"
  - name: rest
    where: "true"
shard:
  max_samples: {max_samples}
"""


def jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A blocky random picture: distinct pictures get distinct perceptual hashes."""
    blocks = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(blocks).resize((w, h), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_raw_shards(folder: Path, shards: int = 4, per_shard: int = 50, seed: int = 0, listing: bool = False) -> list[Path]:
    """Raw shards `raw-00000.tar`, ...; about 6% exact copies and 6% re-encoded copies of
    earlier samples, some too small or with one-word captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    made: list[bytes] = []
    paths = []
    for s in range(shards):
        path = folder / f"raw-{s:05d}.tar"
        keys = []
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                roll = rng.random()
                w, h = int(rng.integers(24, 96)), int(rng.integers(24, 96))
                if made and roll < 0.06:
                    data = made[int(rng.integers(len(made)))]
                elif made and roll < 0.12:
                    src = Image.open(io.BytesIO(made[int(rng.integers(len(made)))]))
                    buf = io.BytesIO()
                    src.save(buf, format="JPEG", quality=70)
                    data = buf.getvalue()
                else:
                    data = jpeg(rng, w if roll > 0.15 else 8, h)
                made.append(data)
                words = int(rng.integers(1, 9))
                caption = " ".join(["a", "red", "square", "on", "blue", "ground", "near", "trees", "today"][:words])
                meta = {"uid": make_uid(f"gen{seed}", key), "kind": "image_text", "url": f"http://example.invalid/{key}.jpg"}
                add(tar, f"{key}.jpg", data)
                add(tar, f"{key}.txt", caption.encode())
                add(tar, f"{key}.json", json.dumps(meta).encode())
                keys.append(key)
        if listing:
            pq.write_table(pa.table({"key": keys, "status": ["success"] * len(keys)}), path.with_suffix(".parquet"))
        paths.append(path)
    return paths


def write_recipe(path: Path, max_samples: int = 20) -> Path:
    path.write_text(CHEAP_RECIPE.format(max_samples=max_samples))
    return path
