"""Read url lists (parquet, csv, jsonl or txt) into one normalised table.

Every row gets a stable uid from (source, position), so re-reading the same list gives
the same ids. Columns other than the url and caption are carried along as a JSON
object in `meta` and end up in the sidecar's `source_meta`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ..errors import InputError
from ..ids import make_uid

URL_COLUMN_GUESSES = ("url", "URL", "image_url", "img_url")
CAPTION_COLUMN_GUESSES = ("caption", "TEXT", "text", "alt", "alt_text")


def read_jsonl(path: Path, what: str = "url list") -> pd.DataFrame:
    """One JSON object per line, values kept as Python objects (no type guessing: a url
    that is a number stays a number, so it can be refused as one). Blank lines are skipped;
    a line that is not JSON, or not an object, is a user error naming the line."""
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise InputError(f"{what} {path}, line {number}: not UTF-8 text") from None
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{what} {path}, line {number}: not valid JSON ({exc})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{what} {path}, line {number}: a JSON {type(rec).__name__}, not an object")
            records.append(rec)
    return pd.DataFrame(records, dtype=object) if records else pd.DataFrame()


def _read_any(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        if suffix == ".txt":
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            return pd.DataFrame({"url": [ln for ln in lines if ln]})
    except UnicodeDecodeError as exc:
        raise InputError(f"url list {path} is not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"url list {path} has no rows") from None
    except Exception as exc:
        raise InputError(f"cannot read url list {path}: {type(exc).__name__}: {exc}") from None
    raise InputError(f"url list {path}: unsupported format '{suffix}' (use .parquet, .csv, .jsonl or .txt)")


def _pick(columns: list[str], wanted: str | None, guesses: tuple[str, ...], what: str, path: Path, required: bool) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise InputError(f"url list {path}: no {what} column '{wanted}'; columns are {columns}")
        return wanted
    for g in guesses:
        if g in columns:
            return g
    if required:
        raise InputError(f"url list {path}: no {what} column found (tried {list(guesses)}); name it with --url-col")
    return None


def _url(value) -> str | None:
    """Urls must be strings: a number, list or mapping in the url column is no url (the
    ledger then says bad_url), not its repr."""
    return value.strip() if isinstance(value, str) else None


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def read_url_list(path: str | Path, url_col: str | None = None, caption_col: str | None = None,
                  source: str | None = None) -> pd.DataFrame:
    """Columns: uid, position, source, url, caption, meta (JSON string or None)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"url list not found: {path}")
    df = _read_any(path)
    if len(df) == 0:
        raise InputError(f"url list {path} has no rows")
    cols = [str(c) for c in df.columns]
    ucol = _pick(cols, url_col, URL_COLUMN_GUESSES, "url", path, required=True)
    ccol = _pick(cols, caption_col, CAPTION_COLUMN_GUESSES, "caption", path, required=False)
    source = source or path.stem
    extra = [c for c in cols if c not in (ucol, ccol)]
    out = pd.DataFrame({
        "position": range(len(df)),
        "source": source,
        "url": df[ucol].map(_url).values,
        "caption": df[ccol].map(lambda c: None if _clean(c) is None else str(c)).values if ccol else None,
    })
    out.insert(0, "uid", [make_uid(source, i) for i in range(len(df))])
    if extra:
        records = df[extra].to_dict(orient="records")
        out["meta"] = [json.dumps({k: _clean(v) for k, v in r.items()}, default=str) for r in records]
    else:
        out["meta"] = None
    return out
