"""`curate export llava`: a tier as LLaVA-NeXT training data.

Writes, under OUT:
  <tier>.json            [{id, image | video, conversations: [{from: human|gpt, value}]}]
  <tier>.yaml            datasets: [{json_path, sampling_strategy}] (what LLaVA-NeXT's scripts read)
  images/<tier>/...      the images, where the JSON points (pass OUT/images as image_folder)
  videos/<tier>/...      the clips (pass OUT/videos as video_folder)

Conversations: a sample's question/answer pairs when its source carried them (the demo's
`qa`), else the caption as the answer to a describe prompt. A document gets one
`<image>` per image, in order; a video gets one `<image>` for the clip.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from ..catalog import find_run_root
from ..errors import InputError
from ..fsutil import atomic_write_text
from ..rawshards import iter_samples

IMAGE = "<image>"
DESCRIBE = {"image_text": "Describe the image briefly.", "interleaved": "Describe the images in order.",
            "video": "Describe what happens in the video."}


def _qa(source_meta: str | None) -> list[dict]:
    if not source_meta:
        return []
    qa = json.loads(source_meta).get("qa")
    qa = json.loads(qa) if isinstance(qa, str) else qa
    return [p for p in (qa or []) if isinstance(p, dict) and p.get("q") and p.get("a")]


def conversations(kind: str, text: str | None, source_meta: str | None, n_images: int) -> list[dict]:
    placeholders = "\n".join([IMAGE] * n_images)
    pairs = _qa(source_meta)
    if not pairs:
        pairs = [{"q": DESCRIBE[kind], "a": text or ""}]
    turns = []
    for i, pair in enumerate(pairs):
        turns.append({"from": "human", "value": f"{placeholders}\n{pair['q']}" if i == 0 else pair["q"]})
        turns.append({"from": "gpt", "value": pair["a"]})
    return turns


def export_llava(root: str | Path, tier: str, out: str | Path, sampling_strategy: str = "all") -> dict:
    run_root = find_run_root(root)
    tier_dir = run_root / "tiers" / tier
    if not (tier_dir / "manifest.json").exists():
        known = sorted(p.name for p in (run_root / "tiers").iterdir() if p.is_dir())
        raise InputError(f"no tier '{tier}' under {run_root / 'tiers'}; tiers are {known}")
    out = Path(out)
    manifest = json.loads((tier_dir / "manifest.json").read_text())
    records, n_files = [], 0
    for shard in manifest["shards"]:
        rows = {r["key"]: r for r in pq.read_table(tier_dir / shard["sidecar"]).to_pylist()}
        for key, files in iter_samples(tier_dir / shard["name"]):
            row = rows[key]
            media = json.loads(row["media"])
            record = {"id": row["uid"]}
            if row["kind"] == "video":
                rel = f"{tier}/{key}.{media[0]}"
                _write(out / "videos" / rel, files[media[0]])
                record["video"] = rel
                n_images = 1
            else:
                rels = [f"{tier}/{key}" + ("" if m == "jpg" else "_" + m.split(".")[0]) + ".jpg" for m in media]
                for rel, m in zip(rels, media):
                    _write(out / "images" / rel, files[m])
                record["image"] = rels[0] if row["kind"] == "image_text" else rels
                n_images = len(rels)
            n_files += len(media)
            record["conversations"] = conversations(row["kind"], row.get("text"), row.get("source_meta"), n_images)
            records.append(record)
    json_path = out / f"{tier}.json"
    atomic_write_text(json_path, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    atomic_write_text(out / f"{tier}.yaml", yaml.safe_dump(
        {"datasets": [{"json_path": str(json_path.resolve()), "sampling_strategy": sampling_strategy}]}, sort_keys=False))
    return {"records": len(records), "files": n_files, "json": str(json_path), "yaml": str(out / f"{tier}.yaml")}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
