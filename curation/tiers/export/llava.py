"""LLaVA-NeXT training data (format per the LLaVA-NeXT repository's training docs and
`train.py`).

Writes, under OUT (every path in them relative to OUT):
  <tier>.json       [{id, image | video, conversations: [{from: human|gpt, value}]}]
  <name>.yaml       datasets: [{json_path: <tier>.json, sampling_strategy}], one entry per
                    tier of the mix (a tier export: that tier; a stage: the pipeline's
                    `stages:` mix, each tier with its strategy)
  images/<tier>/... videos/<tier>/...   the media, where the JSON points

`image` is a path for a single image and a list for a document, in the order of the
`<image>` tokens; a video is marked with `<image>` too, as LLaVA-NeXT's video data is.
A document's first turn (its opening text, then its first image) keeps that order here;
LLaVA-NeXT's loader moves a turn's only `<image>` to the turn's start when it reads it.
Train from OUT (`--data_path <name>.yaml --image_folder . --video_folder .`): LLaVA-NeXT
opens `json_path` as written and joins media paths to the folders. The YAML's strategies
are applied by LLaVA-NeXT when it loads (its own `random` draw, and it rounds a
percentage up), so a stage trained this way holds about, not exactly, the samples
`curate plan` lists; the other formats write the plan's exact selection.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .core import JsonListFile, OutputFile, Sample, Writer, media_order

TOKENS = {"image": "<image>", "video": "<image>"}


def record(sample: Sample) -> dict:
    turns = sample.turns()
    rels = [sample.media[i].rel for i in media_order(turns)]
    out: dict = {"id": sample.uid}
    kind = sample.of_kind  # "image": a path, or a document's list; "video": a path
    out[kind.part] = rels if kind.multi else rels[0]
    out["conversations"] = [{"from": "human" if t.role == "user" else "gpt", "value": t.text(TOKENS)} for t in turns]
    return out


class LlavaWriter(Writer):
    format = "llava"

    def __init__(self, out: Path, name: str, mixture: list[tuple[str, str]]):
        super().__init__(out, name)
        self.mixture = mixture  # [(tier, sampling strategy)] in the YAML's order
        self.files: dict[str, JsonListFile] = {}

    def _file(self, tier: str) -> JsonListFile:
        if tier not in self.files:
            self.files[tier] = self.opened(JsonListFile(self.out / f"{tier}.json", self.out))
        return self.files[tier]

    def add(self, sample: Sample) -> None:
        self._file(sample.tier).add(record(sample))

    def finish(self) -> dict:
        for tier, _ in self.mixture:
            self._file(tier)  # a tier with no sample still gets its (empty) list
        for f in self.files.values():
            f.commit()
        data_yaml = self.opened(OutputFile(self.out / f"{self.name}.yaml", self.out))
        data_yaml.file.write(yaml.safe_dump({"datasets": [{"json_path": f"{tier}.json", "sampling_strategy": strategy}
                                                          for tier, strategy in self.mixture]}, sort_keys=False))
        data_yaml.commit()
        outputs = {f"{tier} conversations": str(f.path) for tier, f in self.files.items()}
        outputs["data yaml"] = str(data_yaml.path)
        return {"outputs": outputs, "json": str(self.files[self.mixture[0][0]].path), "yaml": str(data_yaml.path),
                "use": f"cd {self.out} && <LLaVA-NeXT train.py> --data_path {self.name}.yaml "
                       "--image_folder . --video_folder ."}
