"""Chat `messages` with a list of images, the layout Hugging Face processors' chat
templates and TRL's SFTTrainer read (format per the transformers chat-templating docs
for multimodal models and TRL's vision SFT docs), stored as a `datasets` ImageFolder
(format per the datasets "ImageFolder" docs: metadata.jsonl, `file_names`).

Writes one self-contained folder, OUT/<name>/:
  metadata.jsonl    {id, messages: [{role, content: [{type: image} | {type: text, text}]}],
                     file_names: [images/<tier>/..., ...]}
  images/<tier>/... the images (paths relative to metadata.jsonl, as ImageFolder requires)

`load_dataset("imagefolder", data_dir="OUT/<name>", split="train")` gives `messages` and
`images` (a list of decoded images, `{type: image}` entries matched in order), what TRL
takes as is; `load_dataset("json", data_files=".../metadata.jsonl")` reads the same rows
with the paths as strings. Images only: a video sample is left out (and counted), since
ImageFolder decodes every listed file as an image.
"""

from __future__ import annotations

from pathlib import Path

from .core import JsonLinesFile, Sample, Writer, media_order


def content(turn) -> list[dict]:
    return [{"type": "text", "text": p.text} if p.kind == "text" else {"type": "image"} for p in turn.segments()]


def record(sample: Sample) -> dict:
    turns = sample.turns()
    return {"id": sample.uid,
            "messages": [{"role": t.role, "content": content(t)} for t in turns],
            "file_names": [sample.media[i].rel for i in media_order(turns)]}


class MessagesWriter(Writer):
    format = "messages"
    holds_video = False

    def __init__(self, out: Path, name: str):
        super().__init__(out, name)
        self.data = self.opened(JsonLinesFile(out / name / "metadata.jsonl", out))

    @property
    def media_root(self) -> Path:
        return self.out / self.name

    def add(self, sample: Sample) -> None:
        self.data.add(record(sample))

    def finish(self) -> dict:
        self.data.commit()
        return {"outputs": {"dataset folder": str(self.out / self.name), "records": str(self.data.path)},
                "use": f'load_dataset("imagefolder", data_dir="{self.out / self.name}", split="train")'}
