"""Interleaved document formats, read into one internal form (`ParsedDocument`).

Accepted, recognised per record (a file may mix them):

* items: `items: [{type: text, text} | {type: image, url}]`, in document order.
* MMC4 (as published): `text_list` (sentences), `image_info` (one object per image:
  `raw_url`, `image_name`, `matched_text_index`, `matched_sim`, `face_detections`, ...),
  `url`, optional `similarity_matrix`. An image is placed after the sentence at its
  `matched_text_index`; images sharing a sentence keep their `image_info` order.
  `similarity_matrix` is not kept (images x sentences floats; `matched_sim` is the
  entry that placed each image).
* OBELICS (as published): parallel `texts`/`images` (one of the two is null at each
  index), `metadata` (a JSON string: a list parallel to them, an object per image) and
  `general_metadata` (a JSON string: the document `url` and its Common Crawl location).

The internal form is the ordered items, a doc_id, the document url (the sample's and
the ledger's `url`) and `source_meta`, which the crawl writes as the raw sample's json
`meta` and curation keeps as the sidecar column `source_meta` (JSON):
`{format, doc_url, images: [per image, in document order: the published fields +
source_index], general_metadata (OBELICS), <other top-level fields of the record>}`;
`omitted` lists fields left out because they were too large or too deeply nested. A
document in the items format with no other fields has no source_meta.

Documents are hostile input. A record whose structure is wrong raises `BadDocument`
(reason `bad_document`); one over the caps below raises it with reason
`document_too_large`. Either becomes one dropped crawl-ledger row with the error; the
crawl goes on. The caps come from what curation accepts of one raw sample
(`rawshards.ReadCaps`): a document the crawl writes must not fail to be read back.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import InputError
from ..ids import make_uid
from ..rawshards import ReadCaps
from .guard import MAX_URL_LENGTH
from .sources import read_jsonl

SAMPLE_CAPS = ReadCaps()
# a raw sample is its images + txt + json, and curation reads at most this many members
MAX_DOCUMENT_IMAGES = SAMPLE_CAPS.max_members_per_sample - 2
MAX_DOCUMENT_ITEMS = 10_000  # text + image entries (OBELICS paragraphs, MMC4 sentences)
# items + source_meta as JSON; the rest of the sample's json (missing image urls, uid,
# hashes) must still fit under curation's json cap
MAX_DOCUMENT_JSON_BYTES = SAMPLE_CAPS.max_json_bytes * 3 // 4
MAX_META_VALUE_CHARS = 4096  # one metadata field as JSON; a longer one is omitted
MAX_META_DEPTH = 16

# top-level fields that are a format's structure, not metadata to carry along
STRUCTURE_FIELDS = frozenset({"items", "text_list", "image_info", "similarity_matrix", "texts", "images",
                              "metadata", "general_metadata", "url", "doc_id", "id"})


class BadDocument(ValueError):
    """One document is malformed (bad_document) or over a cap (document_too_large): it
    is dropped with this reason and message, the crawl goes on."""

    def __init__(self, message: str, reason: str = "bad_document"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ParsedDocument:
    format: str  # "items" | "mmc4" | "obelics"
    items: list[dict]  # {"type": "text", "text"} | {"type": "image", "url"}, in document order
    doc_id: str | None
    url: str | None  # the document's own url
    source_meta: dict | None

    @property
    def text(self) -> str:
        return "\n".join(it["text"] for it in self.items if it["type"] == "text")


# --------------------------------------------------------------------------- helpers
def _is_list(value) -> bool:
    return isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, (str, bytes)))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _type(value) -> str:
    return type(value).__name__


def _list(rec: dict, name: str, cap: int, what: str = "entries") -> list:
    """rec[name] as a list (missing: empty), at most `cap` long."""
    value = rec.get(name)
    if _missing(value):
        return []
    if not _is_list(value):
        raise BadDocument(f"'{name}' is a {_type(value)}, not a list")
    if len(value) > cap:
        raise BadDocument(f"'{name}' has {len(value)} {what} (at most {cap})", "document_too_large")
    return list(value)


def _doc_url(value) -> str | None:
    """A document url is metadata, never fetched: kept when it is a string of sane length."""
    return value if isinstance(value, str) and 0 < len(value) <= MAX_URL_LENGTH else None


def _json_field(rec: dict, name: str):
    """An OBELICS field that is a JSON string (or, re-saved, the value itself)."""
    value = rec.get(name)
    if _missing(value) or not isinstance(value, str):
        return value
    if len(value) > SAMPLE_CAPS.max_json_bytes:
        raise BadDocument(f"'{name}' is {len(value)} characters (at most {SAMPLE_CAPS.max_json_bytes})",
                          "document_too_large")
    try:
        return json.loads(value, parse_constant=lambda _c: None)
    except RecursionError:
        raise BadDocument(f"'{name}' is nested too deeply") from None
    except ValueError as exc:
        raise BadDocument(f"'{name}' is not valid JSON ({str(exc)[:100]})") from None


class _Unkeepable(ValueError):
    pass


def _plain(value, depth: int = 0):
    """Plain JSON values (numpy arrays and scalars from parquet become lists and numbers;
    NaN/inf become null, strings lose lone surrogates), or _Unkeepable."""
    if depth > MAX_META_DEPTH:
        raise _Unkeepable("nested too deeply")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, numbers.Integral):
        number = int(value)
        # curation reads json integers as int64; a larger one is kept as a float
        return number if -(1 << 63) <= number < (1 << 63) else _plain(float(number), depth)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if _is_list(value):
        return [_plain(v, depth + 1) for v in list(value)]
    if isinstance(value, (bytes, bytearray)):
        raise _Unkeepable("bytes")
    return str(value)[:MAX_META_VALUE_CHARS]


def _keep_fields(fields: dict, where: str, omitted: list[str]) -> dict:
    """The fields that are small plain JSON; the others are named in `omitted`."""
    kept = {}
    for key, value in fields.items():
        key = str(key)[:200]
        try:
            plain = _plain(value)
            if len(json.dumps(plain)) > MAX_META_VALUE_CHARS:
                raise _Unkeepable("too large")
        except (_Unkeepable, OverflowError, RecursionError):
            omitted.append(f"{where}{key}")
            continue
        kept[key] = plain
    return kept


def _index(value, n_texts: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadDocument(f"{where}.matched_text_index is a {_type(value)}, not an integer")
    index = int(value)
    if not 0 <= index < n_texts:
        raise BadDocument(f"{where}.matched_text_index {index} is outside text_list ({n_texts} sentences)")
    return index


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise BadDocument(f"{where} is a {_type(value)}, not a string")
    return value


# --------------------------------------------------------------------------- formats
def _items_format(rec: dict) -> tuple[list[dict], dict]:
    """Our own form. An image url that is not a fetchable url is not a structural
    problem: that image is missing (bad_url), like one that fails to download."""
    items = rec.get("items")
    if not _is_list(items):
        raise BadDocument(f"'items' is a {_type(items)}, not a list")
    out = []
    for n, it in enumerate(_list(rec, "items", MAX_DOCUMENT_ITEMS)):
        if not isinstance(it, dict):
            raise BadDocument(f"item {n} is a {_type(it)}, not an object")
        kind = it.get("type")
        if kind == "image":
            out.append({"type": "image", "url": it.get("url")})
        elif kind == "text":
            text = it.get("text")
            if not _missing(text) and not isinstance(text, str):
                raise BadDocument(f"item {n}: text is a {_type(text)}, not a string")
            out.append({"type": "text", "text": text if isinstance(text, str) else ""})
        else:
            raise BadDocument(f"item {n} has type {str(kind)[:50]!r} (expected 'text' or 'image')")
    return out, {}


def _mmc4_format(rec: dict, omitted: list[str]) -> tuple[list[dict], dict]:
    sentences = _list(rec, "text_list", MAX_DOCUMENT_ITEMS, "sentences")
    texts = [_text(t, f"text_list[{n}]") for n, t in enumerate(sentences)]
    infos = _list(rec, "image_info", MAX_DOCUMENT_IMAGES, "images")
    placed: dict[int, list[int]] = {}  # sentence index -> images after it, in image_info order
    for n, info in enumerate(infos):
        if not isinstance(info, dict):
            raise BadDocument(f"image_info[{n}] is a {_type(info)}, not an object")
        placed.setdefault(_index(info.get("matched_text_index"), len(texts), f"image_info[{n}]"), []).append(n)
    items, images = [], []
    for s, text in enumerate(texts):
        if text:
            items.append({"type": "text", "text": text})
        for n in placed.get(s, ()):
            items.append({"type": "image", "url": infos[n].get("raw_url")})
            images.append({**_keep_fields(infos[n], f"images[{len(images)}].", omitted), "source_index": n})
    return items, {"images": images}


def _obelics_format(rec: dict, omitted: list[str]) -> tuple[list[dict], dict]:
    texts, images = rec.get("texts"), rec.get("images")
    if _missing(texts) or _missing(images):
        raise BadDocument("an OBELICS document needs both 'texts' and 'images'")
    texts = _list(rec, "texts", MAX_DOCUMENT_ITEMS)
    images = _list(rec, "images", MAX_DOCUMENT_ITEMS)
    if len(texts) != len(images):
        raise BadDocument(f"'texts' has {len(texts)} entries, 'images' {len(images)} (they run in parallel)")
    n_images = sum(not _missing(i) for i in images)
    if n_images > MAX_DOCUMENT_IMAGES:
        raise BadDocument(f"the document has {n_images} images (at most {MAX_DOCUMENT_IMAGES})", "document_too_large")
    metadata = _json_field(rec, "metadata")
    if _missing(metadata):
        metadata = [None] * len(texts)
    elif not _is_list(metadata):
        raise BadDocument(f"'metadata' is a JSON {_type(metadata)}, not a list")
    elif len(metadata) != len(texts):
        raise BadDocument(f"'metadata' has {len(metadata)} entries, 'texts' {len(texts)} (they run in parallel)")
    general = _json_field(rec, "general_metadata")
    if not _missing(general) and not isinstance(general, dict):
        raise BadDocument(f"'general_metadata' is a JSON {_type(general)}, not an object")
    items, kept_images = [], []
    for n, (text, image, meta) in enumerate(zip(texts, images, list(metadata))):
        if not _missing(image):
            if not _missing(meta) and not isinstance(meta, dict):
                raise BadDocument(f"metadata[{n}] is a {_type(meta)}, not an object")
            items.append({"type": "image", "url": image})
            kept_images.append({**_keep_fields(meta or {}, f"images[{len(kept_images)}].", omitted),
                                "source_index": n})
        elif not _missing(text):
            if _text(text, f"texts[{n}]"):
                items.append({"type": "text", "text": text})
    extra = {"images": kept_images}
    if isinstance(general, dict):
        extra["general_metadata"] = _keep_fields(general, "general_metadata.", omitted)
        extra["doc_url"] = _doc_url(general.get("url"))
    return items, extra


def parse_document(rec: dict) -> ParsedDocument:
    """One record of a document list -> ParsedDocument, or BadDocument."""
    omitted: list[str] = []
    if not _missing(rec.get("items")):
        fmt, (items, extra) = "items", _items_format(rec)
    elif not (_missing(rec.get("text_list")) and _missing(rec.get("image_info"))):
        fmt, (items, extra) = "mmc4", _mmc4_format(rec, omitted)
    elif not (_missing(rec.get("texts")) and _missing(rec.get("images"))):
        fmt, (items, extra) = "obelics", _obelics_format(rec, omitted)
    else:
        raise BadDocument("a document needs 'items' or both 'texts' and 'images' (OBELICS), "
                          "or 'text_list'/'image_info' (MMC4)")
    n_images = sum(it["type"] == "image" for it in items)
    if n_images > MAX_DOCUMENT_IMAGES:
        raise BadDocument(f"the document has {n_images} images (at most {MAX_DOCUMENT_IMAGES})", "document_too_large")
    url = _doc_url(rec.get("url")) or extra.get("doc_url")
    doc_id = next((rec[k] for k in ("doc_id", "id") if not _missing(rec.get(k)) and rec.get(k) != ""), None)
    others = {k: v for k, v in rec.items() if str(k) not in STRUCTURE_FIELDS and not _missing(v)}
    source_meta = None
    if fmt != "items" or others:
        source_meta = {**_keep_fields(others, "", omitted), **extra, "format": fmt, "doc_url": url}
        if omitted:
            source_meta["omitted"] = omitted[:100]
    return ParsedDocument(fmt, items, None if doc_id is None else str(doc_id), url, source_meta)


def document_json(doc: ParsedDocument) -> str:
    return json.dumps({"doc_id": doc.doc_id, "items": doc.items}, default=str)


def read_documents(path: str | Path, source: str | None = None) -> pd.DataFrame:
    """Columns: uid, position, source, url (the document's own url, if any), caption (its
    text, for the ledger), doc (JSON items; None for a refused document), meta (the
    source_meta JSON, or None), problem_reason and problem (why a document is refused,
    else None)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"document list not found: {path}")
    if path.suffix.lower() == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as exc:
            raise InputError(f"cannot read document list {path}: {type(exc).__name__}: {exc}") from None
    else:
        df = read_jsonl(path, "document list")
    if len(df) == 0:
        raise InputError(f"document list {path} has no rows")
    columns = set(map(str, df.columns))
    if not ({"items", "text_list", "image_info"} & columns or {"texts", "images"} <= columns):
        raise InputError(f"document list {path}: a document needs 'items' or both 'texts' and 'images' (OBELICS), "
                         f"or 'text_list'/'image_info' (MMC4); columns are {[str(c) for c in df.columns]}")
    source = source or path.stem
    rows = []
    for position, rec in enumerate(df.to_dict(orient="records")):
        row = {"uid": make_uid(source, position), "position": position, "source": source}
        try:
            doc = parse_document(rec)
            doc_json = document_json(doc)
            meta_json = None if doc.source_meta is None else json.dumps(doc.source_meta, sort_keys=True,
                                                                        allow_nan=False)
            size = len(doc_json.encode("utf-8", "surrogatepass")) + len(meta_json or "")
            if size > MAX_DOCUMENT_JSON_BYTES:
                raise BadDocument(f"the document is {size} bytes of JSON (at most {MAX_DOCUMENT_JSON_BYTES})",
                                  "document_too_large")
        except Exception as exc:  # noqa: BLE001 - a document no check foresaw is refused, not the whole list
            reason, error = ((exc.reason, str(exc)) if isinstance(exc, BadDocument)
                             else ("bad_document", f"unreadable document: {type(exc).__name__}: {exc}"))
            rows.append({**row, "url": _doc_url(rec.get("url")), "caption": None, "doc": None, "meta": None,
                         "problem_reason": reason, "problem": error[:2000]})
            continue
        rows.append({**row, "url": doc.url, "caption": doc.text, "doc": doc_json, "meta": meta_json,
                     "problem_reason": None, "problem": None})
    return pd.DataFrame(rows)
