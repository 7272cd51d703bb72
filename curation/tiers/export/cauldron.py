"""The Cauldron / FineVision layout that nanoVLM trains on (format per the
HuggingFaceM4/the_cauldron and HuggingFaceM4/FineVision dataset cards and nanoVLM's
data loader): a row holds `images` (a list of images) and `texts`, a list of
{user, assistant} turns.

Writes OUT/<name>/<name>-00000.parquet, ... (a new file every 256 MiB of image bytes,
row groups of 64 rows) with the image bytes inside, so the folder is all a trainer needs:
`load_dataset("parquet", data_files="OUT/<name>/*.parquet", split="train")` decodes
`images` as a list of Image features (the schema carries the `datasets` feature
metadata). nanoVLM puts every image before the first user text, so the texts hold no
placeholder and a document is exported as its images and a describe prompt answered by
its text, in order. Images only: a video sample is left out (and counted).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .core import OutputFile, Sample, Writer, media_order

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the arrow type of datasets' Image feature
TEXT = pa.struct([("user", pa.string()), ("assistant", pa.string())])
# `datasets` reads features from this schema metadata. The list is written as a JSON list
# (not {"_type": "List"}), the spelling every datasets release reads.
FEATURES = {"images": [{"_type": "Image"}],
            "texts": [{"user": {"dtype": "string", "_type": "Value"}, "assistant": {"dtype": "string", "_type": "Value"}}],
            "id": {"dtype": "string", "_type": "Value"}, "tier": {"dtype": "string", "_type": "Value"}}
SCHEMA = pa.schema([("images", pa.list_(IMAGE)), ("texts", pa.list_(TEXT)), ("id", pa.string()), ("tier", pa.string())],
                   metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})
ROWS_PER_GROUP = 64
MAX_FILE_BYTES = 256 << 20


def record(sample: Sample) -> dict:
    turns = sample.turns(interleave=False)
    return {"images": [{"bytes": sample.media[i].data, "path": sample.media[i].file_name} for i in media_order(turns)],
            "texts": [{"user": q.text(), "assistant": a.text()} for q, a in zip(turns[::2], turns[1::2])],
            "id": sample.uid, "tier": sample.tier}


class CauldronWriter(Writer):
    format = "cauldron"
    holds_video = False
    interleave = False

    def __init__(self, out: Path, name: str):
        super().__init__(out, name)
        self.folder = out / name
        self.done: list[OutputFile] = []
        self.rows: list[dict] = []
        self.file: OutputFile | None = None
        self.parquet: pq.ParquetWriter | None = None
        self.file_bytes = 0

    @property
    def media_root(self) -> None:
        return None  # the image bytes go inside the parquet

    def _open(self) -> None:
        self.file = self.opened(OutputFile(self.folder / f"{self.name}-{len(self.done):05d}.parquet", self.out, binary=True))
        self.parquet = pq.ParquetWriter(self.file.file, SCHEMA)
        self.file_bytes = 0

    def _flush(self) -> None:
        if self.parquet is None:
            self._open()
        if self.rows:
            self.parquet.write_table(pa.Table.from_pylist(self.rows, schema=SCHEMA))
            self.rows = []

    def _close_file(self) -> None:
        self._flush()
        self.parquet.close()
        self.done.append(self.file)
        self.parquet = self.file = None

    def add(self, sample: Sample) -> None:
        row = record(sample)
        self.rows.append(row)
        self.file_bytes += sum(len(i["bytes"]) for i in row["images"])
        if len(self.rows) >= ROWS_PER_GROUP:
            self._flush()
        if self.file_bytes >= MAX_FILE_BYTES:
            self._close_file()

    def finish(self) -> dict:
        if self.parquet is not None or not self.done:  # an empty export is one empty file
            self._close_file()
        for f in self.done:
            f.commit()
        # files an earlier, larger export of this name left behind would join the dataset
        mine = re.compile(rf"^{re.escape(self.name)}-\d{{5}}\.parquet$")
        written = {f.path.name for f in self.done}
        for stale in self.folder.iterdir():
            if mine.match(stale.name) and stale.name not in written:
                stale.unlink()
        return {"outputs": {"parquet folder": str(self.folder), "files": str(len(self.done))},
                "use": f'load_dataset("parquet", data_files="{self.folder}/*.parquet", split="train")'}

    def abort(self) -> None:
        if self.parquet is not None:
            try:
                self.parquet.close()
            except (OSError, pa.ArrowException):
                pass
        super().abort()
