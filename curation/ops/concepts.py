"""Concept matching, MetaCLIP-style: which entries of a concept list a sample's caption
(and OCR text) mentions. Writes `concepts`, the matched entries as a list of strings
(as the list spells them, in list order; [] when nothing matched), which the
`balanced:t` stage strategy (curation/tiers/plan.py) caps per entry.

A concept list is a UTF-8 text file, one entry per line ('#' starts a comment line), or
a JSON list of strings (MetaCLIP's metadata.json). `concept_list` names a bundled list
(curation/concepts/<name>.txt; `demo` is the demo corpus's vocabulary) or a file.

Matching is a substring match of the normalised text (NFC, case-folded, runs of
whitespace as one space) with word boundaries: an entry that starts or ends with a
letter or digit matches only where the text has no letter or digit right beside it, so
`cat` is not found in `concatenate`. Scripts written without spaces (Han, kana, Thai,
Lao, Khmer, Myanmar) have no word boundaries to check. Entries may overlap: `red` and
`red circle` both match "a red circle". One Aho-Corasick automaton (pyahocorasick)
finds every entry in one pass over the text, so a 500k-entry list costs the same per
caption as a short one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from pathlib import Path

import pandas as pd

from ..errors import ConfigError
from ..paths import PACKAGE_DIR
from .base import MapOp, Resources, register

CONCEPTS_DIR = PACKAGE_DIR / "concepts"  # bundled lists: <name>.txt (package data)
MAX_LIST_BYTES = 256 << 20  # MetaCLIP's 500k entries are ~10 MB
MAX_ENTRY_CHARS = 256
BUNDLED_NAME = re.compile(r"^[a-z0-9_]{1,64}$")
_SPACES = re.compile(r"\s+")
# Scripts written without spaces between words: no word boundary to check there.
_UNSPACED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
                       "\uf900-\ufaff\U00020000-\U0003ffff]")


def normalise(text: str) -> str:
    """What matching compares: NFC, case-folded, whitespace runs as one space, stripped."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text).casefold()).strip()


def _word_char(ch: str) -> bool:
    """A character that continues a word in a spaced script (letters, digits, _, marks)."""
    return (ch.isalnum() or ch == "_" or unicodedata.category(ch)[0] == "M") and not _UNSPACED.match(ch)


def concept_list_path(spec: str) -> Path:
    """A bundled list's path by name (`demo`), or `spec` as a file path."""
    if BUNDLED_NAME.match(spec) and (CONCEPTS_DIR / f"{spec}.txt").is_file():
        return CONCEPTS_DIR / f"{spec}.txt"
    return Path(spec)


def load_concepts(spec: str) -> tuple[str, ...]:
    """The entries of a concept list, in order, without repeats (entries equal after
    normalise() count once: the first spelling is kept). ConfigError on a list that
    cannot be read, is too large, or holds a non-string or over-long entry."""
    path = concept_list_path(spec)
    try:
        size = path.stat().st_size
        if size > MAX_LIST_BYTES:
            raise ConfigError(f"concept list {path}: {size:,} bytes, over the {MAX_LIST_BYTES >> 20} MiB cap")
        with open(path, "rb") as f:
            text = f.read(MAX_LIST_BYTES + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        bundled = sorted(p.stem for p in CONCEPTS_DIR.glob("*.txt"))
        raise ConfigError(f"concept list {spec!r} cannot be read ({type(exc).__name__}); give a UTF-8 file or a "
                          f"bundled list: {bundled}") from None
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"concept list {path}: not valid JSON ({exc})") from None
        if not isinstance(raw, list) or not all(isinstance(e, str) for e in raw):
            raise ConfigError(f"concept list {path}: a JSON list must hold strings only")
    else:
        raw = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    entries: dict[str, str] = {}
    for entry in raw:
        shown = _SPACES.sub(" ", entry).strip()
        if len(shown) > MAX_ENTRY_CHARS:
            raise ConfigError(f"concept list {path}: entry {shown[:40]!r}... is over {MAX_ENTRY_CHARS} characters")
        key = normalise(shown)
        if key:
            entries.setdefault(key, shown)
    if not entries:
        raise ConfigError(f"concept list {path} has no entries")
    return tuple(entries.values())


class ConceptMatcher:
    """Every entry of a list found in a text, on word boundaries, in one pass."""

    def __init__(self, entries: tuple[str, ...] | list[str]):
        import ahocorasick

        self.entries = tuple(entries)
        self.automaton = ahocorasick.Automaton()
        for index, entry in enumerate(self.entries):
            key = normalise(entry)
            if key and key not in self.automaton:
                # (index, length, whether each edge needs a word boundary)
                self.automaton.add_word(key, (index, len(key), _word_char(key[0]), _word_char(key[-1])))
        if len(self.automaton) == 0:
            raise ConfigError("a concept list needs at least one entry")
        self.automaton.make_automaton()

    def match(self, *texts: str | None) -> list[str]:
        """The entries found in any of `texts` (each matched on its own: an entry never
        spans two), in list order."""
        found: set[int] = set()
        for text in texts:
            if text:
                self._find(normalise(text), found)
        return [self.entries[i] for i in sorted(found)]

    def _find(self, norm: str, found: set[int]) -> None:
        for end, (index, length, left, right) in self.automaton.iter(norm):
            start = end - length + 1
            if left and start > 0 and _word_char(norm[start - 1]):
                continue
            if right and end + 1 < len(norm) and _word_char(norm[end + 1]):
                continue
            found.add(index)


@register
class Concepts(MapOp):
    """Match captions and OCR text to a concept list (MetaCLIP-style); writes `concepts`."""

    name = "concepts"
    version = "1"
    resources = Resources(num_cpus=0.25, batch_size=256)  # cheap: leaves CPU to model stages
    outputs = ("concepts",)

    @dataclasses.dataclass
    class Params:
        concept_list: str = "demo"  # a bundled list's name, or a .txt / .json file
        include_ocr: bool = True  # match ocr_text too, when an earlier ocr operator wrote it
        max_chars: int = 100_000  # text matched per sample: documents can be long

    @classmethod
    def input_files_identity(cls, params):
        from ..fsutil import listing_digest

        return listing_digest([concept_list_path(params.concept_list)])

    @classmethod
    def check_params(cls, params, where):
        # The list itself is read where the operator runs (curate plan reads a recipe
        # without its files).
        if params.max_chars < 1:
            raise ConfigError(f"{where} (concepts): max_chars must be >= 1")

    def __init__(self, params):
        super().__init__(params)
        self.matcher = ConceptMatcher(load_concepts(params.concept_list))

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        cap = self.params.max_chars
        texts = live["text"].fillna("").astype(str)
        ocr = (live["ocr_text"].fillna("").astype(str) if self.params.include_ocr and "ocr_text" in live.columns
               else pd.Series("", index=live.index))
        live["concepts"] = pd.Series([self.matcher.match(t[:cap], o[:cap]) for t, o in zip(texts, ocr)],
                                     index=live.index, dtype=object)
        return live
