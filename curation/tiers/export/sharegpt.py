"""LLaMA-Factory's sharegpt format (format per LLaMA-Factory's data/README.md and its
`mllm_demo` dataset).

Writes, under OUT (OUT is LLaMA-Factory's `dataset_dir`; every path relative to it):
  <name>.jsonl        {id, messages: [{role: user|assistant, content}], images: [...], videos: [...]}
  dataset_info.json   the entry LLaMA-Factory reads for <name>: file_name, formatting
                      sharegpt, columns (messages, images, videos) and tags (role/content,
                      user/assistant). Entries already there for other names are kept.
  images/<tier>/... videos/<tier>/...

LLaMA-Factory's rules, kept by every record: turns alternate user, assistant, starting
with the user and ending with the assistant; `<image>` appears exactly len(images)
times and `<video>` len(videos) times, matched in order; media paths are looked up under
`media_dir`, which defaults to `dataset_dir`. A stage export holds exactly the samples the
plan selects, tier after tier (LLaMA-Factory shuffles when it trains).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import InputError
from .core import JsonLinesFile, OutputFile, Sample, Writer, media_order

TOKENS = {"image": "<image>", "video": "<video>"}
MAX_DATASET_INFO_BYTES = 64 << 20  # a registry of datasets, not data: refuse anything near this


def record(sample: Sample) -> dict:
    turns = sample.turns()
    media = [sample.media[i] for i in media_order(turns)]
    return {"id": sample.uid,
            "messages": [{"role": t.role, "content": t.text(TOKENS)} for t in turns],
            "images": [m.rel for m in media if m.kind == "image"],
            "videos": [m.rel for m in media if m.kind == "video"]}


def dataset_info_entry(file_name: str) -> dict:
    return {"file_name": file_name, "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images", "videos": "videos"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


class SharegptWriter(Writer):
    format = "sharegpt"

    def __init__(self, out: Path, name: str):
        super().__init__(out, name)
        self.data = self.opened(JsonLinesFile(out / f"{name}.jsonl", out))

    def add(self, sample: Sample) -> None:
        self.data.add(record(sample))

    def finish(self) -> dict:
        info_path = self.out / "dataset_info.json"
        info = {}
        if info_path.is_file():  # the user's registry: keep the other datasets in it
            if info_path.stat().st_size > MAX_DATASET_INFO_BYTES:
                raise InputError(f"{info_path} is over {MAX_DATASET_INFO_BYTES >> 20} MiB; not a dataset_info.json")
            try:
                info = json.loads(info_path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError):
                info = None
            if not isinstance(info, dict):
                raise InputError(f"{info_path} is not a JSON object of datasets; move it away and export again")
        info[self.name] = dataset_info_entry(self.data.path.name)
        self.data.commit()
        info_file = self.opened(OutputFile(info_path, self.out))
        info_file.file.write(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        info_file.commit()
        return {"outputs": {"records": str(self.data.path), "dataset_info": str(info_path)},
                "use": f"llamafactory-cli train ... --dataset_dir {self.out} --dataset {self.name}"}
