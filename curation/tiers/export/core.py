"""What every export format shares: reading a tier's shards safely, and turning one
sample into an ordered conversation whose turns hold text and media placeholders. The
format writers (llava.py, sharegpt.py, messages.py, cauldron.py) only lay it out.

Conversations, in one place (`conversation`):
* a sample whose source carried question/answer pairs (the demo's `qa`): one user turn
  per question, the sample's media in front of the first, each answered by its answer;
* a document (kind interleaved), when its `doc` items account for every image once and
  it ends with text: text and images in the document's order (its questions, if any,
  are left out: the trainer's). Each run of images opens a user turn; the text after
  it is the assistant's, so the model writes each part of the document having seen the
  images before it. Text before the first image is context in
  the first user turn;
* anything else (and documents for formats that cannot place an image inside text): the
  media in front of a describe prompt, answered by the sample's text.

Every path written is built from names that come from data (tar member names, sidecar
keys and media lists, manifest entries). Each must be one plain file name: no
separators, no `..`, no NUL, nothing absolute; and the result must resolve inside its
output folder. A sample that fails is skipped and reported, never written. Text from
data cannot add a placeholder: `<image>` / `<video>` in it are written without brackets,
so a record's placeholder count is always its media count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ...errors import InputError
from ...kinds import Kind, UnknownKind, kind_of
from ...rawshards import iter_samples

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
TIER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")  # as config.TIER_NAME, bounded
PLACEHOLDER_IN_TEXT = re.compile(r"<(image|video)>", re.IGNORECASE)


class UnsafeSample(ValueError):
    """A sample whose names would leave the output folder, or that does not add up."""


def safe(value, what: str, pattern: re.Pattern = SAFE_NAME) -> str:
    if not isinstance(value, str) or ".." in value or not pattern.match(value):
        raise UnsafeSample(f"unsafe {what} {shown(value)}")
    return value


def shown(value) -> str:
    """A name from data, printable whatever it holds (ascii() escapes control characters)."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def inside(root: Path, rel: str) -> Path:
    """root/rel, after checking that it resolves (symlinks included) inside root."""
    target = root / rel
    resolved, base = target.resolve(), root.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise UnsafeSample(f"path {shown(rel)} leaves {root}")
    return target


# --------------------------------------------------------------------------- conversation
@dataclasses.dataclass(frozen=True)
class Part:
    kind: str  # "text" | "image" | "video"
    text: str = ""
    media: int = -1  # index into Sample.media for an image or video


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    parts: tuple[Part, ...]

    def text(self, tokens: dict[str, str] | None = None, sep: str = "\n") -> str:
        """The turn as one string: each media part as its token (left out where
        `tokens` has none), text parts as they are."""
        tokens = tokens or {}
        pieces = [p.text if p.kind == "text" else tokens.get(p.kind) for p in self.parts]
        return sep.join(p for p in pieces if p is not None)

    def segments(self) -> list[Part]:
        """The parts with neighbouring text joined by newlines (chat templates concatenate
        text items as they are)."""
        merged: list[Part] = []
        for p in self.parts:
            if p.kind == "text" and merged and merged[-1].kind == "text":
                merged[-1] = Part("text", merged[-1].text + "\n" + p.text)
            else:
                merged.append(p)
        return merged


def media_order(turns: list[Turn]) -> list[int]:
    """Media indices in the order their placeholders appear: the order a trainer matches
    placeholders to a record's media list."""
    return [p.media for t in turns for p in t.parts if p.kind != "text"]


def clean_text(text) -> str:
    return PLACEHOLDER_IN_TEXT.sub(lambda m: m.group(1), text if isinstance(text, str) else "")


def qa_pairs(source_meta: str | None) -> list[tuple[str, str]]:
    if not source_meta:
        return []
    try:
        meta = json.loads(source_meta)
        qa = meta.get("qa") if isinstance(meta, dict) else None
        qa = json.loads(qa) if isinstance(qa, str) else qa
    except (ValueError, RecursionError):  # metadata from a crawl is data: a bad field means no pairs
        return []
    if not isinstance(qa, list):
        return []
    return [(p["q"], p["a"]) for p in qa
            if isinstance(p, dict) and isinstance(p.get("q"), str) and isinstance(p.get("a"), str) and p["q"] and p["a"]]


def document_sequence(doc: dict | None, media: list[str]) -> list[Part] | None:
    """A document's text and images in its own order, or None where its items do not
    account for each of `media` exactly once (then it is not placed inside text)."""
    items = doc.get("items") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return None
    sequence, placed = [], set()
    for item in items:
        if not isinstance(item, dict):
            return None
        if item.get("type") == "text":
            text = clean_text(item.get("text")).strip()
            if text:
                sequence.append(Part("text", text))
        elif item.get("type") == "image":
            member = item.get("member")
            if member is None:  # an image that never arrived (crawled with require_images: any)
                continue
            if not isinstance(member, str) or member not in media or member in placed:
                return None
            placed.add(member)
            sequence.append(Part("image", media=media.index(member)))
    return sequence if len(placed) == len(media) else None


def document_turns(sequence: list[Part]) -> list[Turn] | None:
    """Each run of images opens a user turn (with any text before the first image); the
    text after it is the assistant's. None when the document does not end with text."""
    turns, role, parts = [], "user", []
    for part in sequence:
        if part.kind == "image" and role == "assistant":
            turns.append(Turn(role, tuple(parts)))
            role, parts = "user", []
        elif part.kind == "text" and role == "user" and any(p.kind == "image" for p in parts):
            turns.append(Turn(role, tuple(parts)))
            role, parts = "assistant", []
        parts.append(part)
    if role != "assistant":
        return None
    turns.append(Turn(role, tuple(parts)))
    return turns


def conversation(kind: str, text: str | None, source_meta: str | None, doc: dict | None, media: list[str],
                 interleave: bool = True) -> list[Turn]:
    """The sample as alternating user/assistant turns (rules in the module docstring).
    `interleave=False` for formats that can only put media before the first question."""
    k = kind_of(kind)
    pairs = [] if k.doc_layout else qa_pairs(source_meta)  # a document exports as one; its questions are the trainer's
    if not pairs and k.doc_layout and interleave:
        sequence = document_sequence(doc, media)
        turns = document_turns(sequence) if sequence else None
        if turns:
            return turns
    if not pairs:
        pairs = [(k.describe, text or "")]
    leading = tuple(Part(k.part, media=i) for i in range(len(media)))
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns.append(Turn("user", (leading if i == 0 else ()) + (Part("text", clean_text(question)),)))
        turns.append(Turn("assistant", (Part("text", clean_text(answer)),)))
    return turns


# --------------------------------------------------------------------------- samples
@dataclasses.dataclass(frozen=True)
class Media:
    kind: str  # "image" | "video"
    rel: str  # where it lies under the format's media root: images/<tier>/<file>, videos/<tier>/<file>
    data: bytes
    target: Path | None  # the file to write (None: the format embeds the bytes)

    @property
    def file_name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Sample:
    uid: str
    tier: str
    shard: str
    key: str
    kind: str
    media: tuple[Media, ...]
    text: str | None
    source_meta: str | None  # JSON text
    doc: dict | None
    media_names: tuple[str, ...]

    @property
    def of_kind(self) -> Kind:
        return kind_of(self.kind)

    def turns(self, interleave: bool = True) -> list[Turn]:
        return conversation(self.kind, self.text, self.source_meta, self.doc, list(self.media_names), interleave)


def build_sample(tier: str, shard: str, key: str, files: dict[str, bytes], row: dict, media_root: Path | None) -> Sample:
    """One sample, its media named and (with a media root) placed, or UnsafeSample.
    Nothing is written here."""
    safe(key, "key")
    if row.get("key") != key:
        raise UnsafeSample("the sidecar row's key differs from the tar's")
    kind = row.get("kind")
    try:
        k = kind_of(kind)
    except UnknownKind:
        raise UnsafeSample(f"unknown kind {shown(kind)}") from None
    names = row.get("media")
    if not isinstance(names, list) or not names:
        raise UnsafeSample("no media listed")
    rels = k.export_media(tier, key, names)  # (part, member, path); names checked against k's media names
    names = [name for _, name, _ in rels]
    if len({rel for _, _, rel in rels}) != len(rels):
        raise UnsafeSample("two media members map to one file name")
    missing = [name for _, name, _ in rels if not isinstance(files.get(name), bytes)]
    if missing:
        raise UnsafeSample(f"media {shown(missing[0])} is not in the tar")
    media = tuple(Media(kind_, rel, files[name], inside(media_root, rel) if media_root is not None else None)
                  for kind_, name, rel in rels)
    uid = row.get("uid")
    return Sample(uid=uid if isinstance(uid, str) else key, tier=tier, shard=shard, key=key, kind=kind, media=media,
                  text=row.get("text") if isinstance(row.get("text"), str) else None,
                  source_meta=row.get("source_meta") if isinstance(row.get("source_meta"), str) else None,
                  doc=row.get("doc") if isinstance(row.get("doc"), dict) else None, media_names=tuple(names))


def tier_manifest(run_root: Path, tier: str) -> tuple[Path, dict]:
    """The tier's folder and its manifest, with a list of shards (InputError if it is no tier)."""
    if not isinstance(tier, str) or ".." in tier or not TIER_NAME.match(tier):
        raise InputError(f"--tier {shown(tier)} is not a tier name (lower-case letters, digits, _ . -)")
    tier_dir = run_root / "tiers" / tier
    if not (tier_dir / "manifest.json").is_file():
        known = sorted(p.name for p in (run_root / "tiers").iterdir() if p.is_dir()) if (run_root / "tiers").is_dir() else []
        raise InputError(f"no tier '{tier}' under {run_root / 'tiers'}; tiers are {known}")
    try:
        manifest = json.loads((tier_dir / "manifest.json").read_text())
        if not isinstance(manifest.get("shards"), list):
            raise TypeError("'shards' is not a list")
        return tier_dir, manifest
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{tier_dir / 'manifest.json'} is not a tier manifest: {exc}") from None


def read_tier(run_root: Path, tier: str, selection: dict | None, media_root: Path | None,
              skipped: list) -> Iterator[Sample]:
    """The tier's samples in tier order, each checked by build_sample. `selection`: None
    for every sample, else {shard name: None (all of it) | [keys]} as a stage plan lists
    them. What cannot be exported is appended to `skipped` and not yielded."""
    tier_dir, manifest = tier_manifest(run_root, tier)
    for shard in manifest["shards"]:
        try:
            name = safe(shard.get("name") if isinstance(shard, dict) else None, "shard name")
            tar = inside(tier_dir, name)
            sidecar = inside(tier_dir, safe(shard.get("sidecar"), "sidecar name"))
        except UnsafeSample as exc:
            skipped.append({"shard": shown(shard), "key": None, "reason": str(exc)})
            continue
        if selection is not None and name not in selection:
            continue
        wanted = None if selection is None or selection[name] is None else set(selection[name])
        if not (tar.is_file() and sidecar.is_file()):
            skipped.append({"shard": name, "key": None, "reason": "its tar or sidecar is missing"})
            continue
        # Errors of reading are caught here; an error raised by the caller while it holds a
        # yielded sample (a write that fails) does not pass through this generator's except.
        try:
            rows = {r.get("key"): r for r in pq.read_table(sidecar).to_pylist()}
            for key, files in iter_samples(tar):
                if wanted is not None and key not in wanted:
                    continue
                try:
                    if key not in rows:
                        raise UnsafeSample("not in the sidecar")
                    sample = build_sample(tier, name, key, files, rows[key], media_root)
                except UnsafeSample as exc:
                    skipped.append({"shard": name, "key": shown(key), "reason": str(exc)})
                    continue
                yield sample
        except (EOFError, tarfile.TarError, pa.ArrowException, InputError) as exc:
            skipped.append({"shard": name, "key": None, "reason": f"unreadable shard (rest skipped): {exc}"})


# --------------------------------------------------------------------------- files under OUT
def write_media(path: Path, data: bytes, out: Path) -> None:
    """Write one media file: its folder is checked again once it exists, and the file is
    opened without following a symlink, so nothing planted in OUT redirects a write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.parent.resolve().is_relative_to(out.resolve()):
        raise InputError(f"{path.parent} leaves {out}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class OutputFile:
    """A file under OUT, written to a fresh temporary name (created exclusively, so nothing
    planted there is followed) and renamed over PATH on commit: a reader sees the old
    file or the whole new one. A symlink planted at PATH is replaced, not followed."""

    def __init__(self, path: Path, out: Path, binary: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.parent.resolve().is_relative_to(out.resolve()):
            raise InputError(f"{path.parent} leaves {out}")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o644)
        self.path, self.tmp = path, Path(tmp)
        self.file = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class JsonListFile(OutputFile):
    """A JSON list written one record per line, so a large export is never held whole."""

    def __init__(self, path: Path, out: Path):
        super().__init__(path, out)
        self.count = 0
        self.file.write("[")

    def add(self, record: dict) -> None:
        self.file.write(("\n" if not self.count else ",\n") + json.dumps(record, ensure_ascii=False))
        self.count += 1

    def commit(self) -> None:
        self.file.write("\n]\n")
        super().commit()


class JsonLinesFile(OutputFile):
    def __init__(self, path: Path, out: Path):
        super().__init__(path, out)
        self.count = 0

    def add(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1


class Writer:
    """One export format. The driver (export.run) hands it each sample whose media are
    already written under `media_root`; `finish` commits its files and names them."""

    format = ""
    holds_video = True  # False: video samples are left out (and counted)
    interleave = True  # False: media go before the first question, never inside text

    def __init__(self, out: Path, name: str):
        self.out, self.name = out, name
        self.open_files: list[OutputFile] = []

    @property
    def media_root(self) -> Path | None:
        return self.out

    def opened(self, f: OutputFile) -> OutputFile:
        self.open_files.append(f)
        return f

    def add(self, sample: Sample) -> None:
        raise NotImplementedError

    def finish(self) -> dict:
        """Commit; return {"outputs": {label: path}, "use": how a trainer loads it}."""
        raise NotImplementedError

    def abort(self) -> None:
        for f in self.open_files:
            if not f.file.closed:
                f.abort()
