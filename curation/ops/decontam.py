"""Decontamination: drop curated samples that copy an evaluation benchmark's images.

`decontaminate` (global, stage B) takes reference evaluation sets, each `{name, path}`
(plus optional `format` and `image_column`/`text_column`), read by the same readers as
`curate run --input` (curation/inputs.py, sources.py, rawshards.py): WebDataset tars,
Hugging Face parquet or save_to_disk folders, or a folder of images. Every path lies
inside `root` (symlinks resolved): a set that leaves it is a recipe error.

Each reference image is fingerprinted once per run, one parallel task per reference
shard: the sha256 of its bytes, the 64-bit DCT phash (as `perceptual_hash` computes it)
of the whole image, and the phash of a grid of crops (`crop_scales` x `crop_grid` x
`crop_grid` positions), so that a cropped copy still lands near one of them. A reference
item that cannot be read or decoded is skipped and reported (stderr, and the count in
the result), never fatal; a set with no usable item is a recipe error.

A live sample matches when
  * its sha256 equals a reference's (`sha256`),
  * its phash is within `max_hamming` bits of a reference fingerprint and its aspect
    ratio is that reference's (crops are uniform, so both a resize and a crop keep it;
    within `max_aspect_log_ratio` in log space) (`phash:<bits>`), found by the banded
    equality joins of near_dedup (decide.near_pairs_across_sql), in DuckDB, or
  * with `min_similarity` and `embedding_model` set, its CLIP image embedding
    (`clip_score` with `keep_embeddings: true`, the same model) has cosine similarity
    >= `min_similarity` with a reference's (`embedding:<cos>`); one task per annotated
    file compares its rows with the (capped) reference matrix, or
  * with `question_ngram: n` set, one of its questions (`source_meta`'s `qa[*].q`) shares
    a run of n words (lowercased, punctuation dropped) with a reference item's question
    (its text member or `text_column`) (`question`), an equality join in DuckDB.
The best match (sha256, then the fewest bits, then the highest similarity, then set and
item) drops the sample with reason `contaminated:<set>`; the ledger's `contaminated_by`
is `<set>/<item key>` and `contamination_match` says how. Reference sets are capped
(`max_items`, `max_bytes`): over the cap is a recipe error, not a silent truncation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..decide import near_pairs_across_sql, sql_str
from ..errors import ConfigError
from .base import GlobalOp, register

SET_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
SET_KEYS = {"name", "path", "format", "image_column", "text_column"}
MATCH_COLUMNS = ("contaminated_by", "contamination_match")  # ledger columns (curation/contracts)
SHOWN_SKIPS = 20  # skipped reference items named on stderr per run (all are counted)
REFERENCE_SCHEMA = pa.schema([("set", pa.string()), ("item", pa.string()), ("sha256", pa.string()),
                              ("variant", pa.string()), ("phash", pa.string()), ("width", pa.int64()),
                              ("height", pa.int64()), ("embedding", pa.binary()), ("question", pa.string())])


def phash_hex(image) -> str:
    """The `perceptual_hash` operator's hash of a decoded image (on its thumbnail)."""
    import imagehash

    from ..media import thumbnail
    from .image import THUMBNAIL_SIDE

    return str(imagehash.phash(thumbnail(image, THUMBNAIL_SIDE)))


def crop_boxes(width: int, height: int, scales: tuple[float, ...], grid: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(variant name, box) of the whole image and of each uniform crop: every scale at a
    grid x grid lattice of positions, from one corner to the other."""
    boxes = [("whole", (0, 0, width, height))]
    steps = np.linspace(0.0, 1.0, grid) if grid > 1 else np.array([0.5])
    for scale in scales:
        cw, ch = max(1, round(width * scale)), max(1, round(height * scale))
        for fx in steps:
            for fy in steps:
                x, y = round((width - cw) * fx), round((height - ch) * fy)
                boxes.append((f"crop{scale:g}@{fx:.2f},{fy:.2f}", (x, y, x + cw, y + ch)))
    return boxes


def fingerprint_shard(token: str, set_name: str, scales: tuple[float, ...], grid: int, max_pixels: int,
                      embedding_model: str | None, out: str) -> list[tuple[str, str]]:
    """Task: every reference item of one shard -> rows of REFERENCE_SCHEMA in `out`.
    Returns the items skipped, as (item, why): unreadable, no image, undecodable."""
    from ..media import MediaError, open_image
    from ..rawshards import read_shard

    rows, skipped, pending = [], [], []
    clip = None

    def embed_pending() -> None:  # a batch at a time: a shard's decoded images are never all held
        nonlocal clip
        if not pending:
            return
        from ..clipfilter import embed_images, load_clip

        clip = clip or load_clip(embedding_model, None, "cpu")
        for (at, _), vec in zip(pending, embed_images(clip, [im for _, im in pending])):
            rows[at]["embedding"] = np.asarray(vec, dtype=np.float16).tobytes()
        pending.clear()

    for row, _files in read_shard(token, set_name):
        item = row.get("raw_key") or "<shard>"
        if row.get("status") != "kept":
            skipped.append((item, f"{row.get('reason')}: {row.get('error')}"))
            continue
        data = row.get("image_bytes")
        if not data:
            skipped.append((item, "no_image: the reference item holds no image"))
            continue
        try:
            image = open_image(data, max_pixels)
        except MediaError as exc:
            skipped.append((item, f"{exc.reason}: {exc}"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        w, h = image.size
        if embedding_model:  # the whole image's row (the next one) carries its embedding
            pending.append((len(rows), image))
        for variant, box in crop_boxes(w, h, scales, grid):
            part = image if variant == "whole" else image.crop(box)
            rows.append({"set": set_name, "item": item, "sha256": digest if variant == "whole" else None,
                         "variant": variant, "phash": phash_hex(part), "width": part.size[0],
                         "height": part.size[1], "embedding": None,
                         "question": row.get("text") if variant == "whole" else None})
        if len(pending) >= 64:
            embed_pending()
    embed_pending()
    pq.write_table(pa.Table.from_pylist(rows, schema=REFERENCE_SCHEMA), out)
    return skipped


def embedding_matches(annotated: str, references: str, min_similarity: float, out: str) -> int:
    """Task: rows of one annotated file whose CLIP image embedding is within
    min_similarity (cosine) of a reference embedding -> (raw_shard, raw_key, set, item, sim)."""
    from .clip import EMBEDDING_COLUMN
    from .dedup import _unit_rows

    ref = pq.read_table(references, columns=["set", "item", "embedding"]).to_pandas()
    ref = ref[ref["embedding"].notna()]
    schema = pa.schema([("raw_shard", pa.string()), ("raw_key", pa.string()), ("set", pa.string()),
                        ("item", pa.string()), ("similarity", pa.float64())])
    found: dict[str, list] = {name: [] for name in schema.names}
    if EMBEDDING_COLUMN in pq.read_schema(annotated).names and len(ref):
        refs = _unit_rows(list(ref["embedding"]))
        table = pq.read_table(annotated, columns=["raw_shard", "raw_key", EMBEDDING_COLUMN]).to_pandas()
        table = table[table[EMBEDDING_COLUMN].notna()]
        for lo in range(0, len(table), 4096):  # bounded memory: a chunk of rows at a time
            chunk = table.iloc[lo:lo + 4096]
            sims = _unit_rows(list(chunk[EMBEDDING_COLUMN])) @ refs.T
            best = sims.argmax(axis=1)
            for i in np.nonzero(sims[np.arange(len(chunk)), best] >= min_similarity)[0]:
                found["raw_shard"].append(chunk["raw_shard"].iloc[i])
                found["raw_key"].append(chunk["raw_key"].iloc[i])
                found["set"].append(ref["set"].iloc[best[i]])
                found["item"].append(ref["item"].iloc[best[i]])
                found["similarity"].append(round(float(sims[i, best[i]]), 4))
    pq.write_table(pa.table(found, schema=schema), out)
    return len(found["raw_key"])


def confined(root: Path, path: str, where: str) -> Path:
    """`path` (relative to root, or absolute) resolved, refused unless it lies in root."""
    base = root.resolve()
    target = (base / path).resolve()
    if target != base and base not in target.parents:
        raise ConfigError(f"{where}: path {path!r} leaves the reference root {str(root)!r}")
    if not target.exists():
        raise ConfigError(f"{where}: reference set {path!r} not found under {str(root)!r}")
    return target


@register
class Decontaminate(GlobalOp):
    """Drop samples whose image copies an evaluation set's (reason contaminated:<set>):
    same bytes, phash within max_hamming of the image or of one of its crops, CLIP
    embedding similarity, or a question sharing question_ngram words in a row; the
    ledger's contaminated_by names the reference item, contamination_match how."""

    name = "decontaminate"
    reasons = ("contaminated:*",)  # one per reference set: contaminated:<set name>
    version = "1"
    requires = ("sha256", "phash")

    @dataclasses.dataclass
    class Params:
        root: str = ""
        sets: list[dict] = dataclasses.field(default_factory=list)
        max_hamming: int = 4
        max_aspect_log_ratio: float = 0.08
        # 9 scales x 7 x 7 positions: 442 hashes per image (5 x 5 x 5 caught 80% of 80-92% crops within 4 bits, this 98%)
        crop_scales: list[float] = dataclasses.field(default_factory=lambda: [0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8, 0.775, 0.75])
        crop_grid: int = 7
        embedding_model: str | None = None
        min_similarity: float | None = None
        question_ngram: int = 0  # 0: off; n: a shared run of n words of a question matches
        max_items: int = 20_000  # x 442 fingerprints each (see README: Decontamination, for what was measured)
        max_bytes: int = 4 << 30
        max_pixels: int = 40_000_000

    @classmethod
    def input_files_identity(cls, params):
        from ..fsutil import listing_digest

        return listing_digest([Path(params.root) / s["path"] for s in params.sets])

    @classmethod
    def check_params(cls, params, where):
        w = f"{where} (decontaminate)"
        if not params.root:
            raise ConfigError(f"{w}: 'root' is required: the folder that holds the reference sets")
        if not params.sets:
            raise ConfigError(f"{w}: 'sets' is required: a list of {{name, path}} reference evaluation sets")
        from ..inputs import INPUT_FORMATS

        names = set()
        for i, s in enumerate(params.sets):
            if not isinstance(s, dict) or not {"name", "path"} <= set(s) or set(s) - SET_KEYS:
                raise ConfigError(f"{w}: sets[{i}] must be a mapping with name and path (and optionally "
                                  f"format, image_column, text_column)")
            if not all(isinstance(v, str) for v in s.values()):
                raise ConfigError(f"{w}: sets[{i}]: every value must be a string")
            if not SET_NAME.match(s["name"]) or s["name"] in names:
                raise ConfigError(f"{w}: sets[{i}]: name {s['name']!r} must be unique, lowercase letters, digits, "
                                  "'_', '.', '-' (it becomes the reason contaminated:<name>)")
            names.add(s["name"])
            if s.get("format", "auto") not in INPUT_FORMATS:
                raise ConfigError(f"{w}: sets[{i}]: format must be one of {sorted(INPUT_FORMATS)}")
        if not 0 <= params.max_hamming <= 16:
            raise ConfigError(f"{w}: max_hamming must be in 0..16")
        if not all(0 < s < 1 for s in params.crop_scales) or not 1 <= params.crop_grid <= 9:
            raise ConfigError(f"{w}: crop_scales must lie in (0, 1) and crop_grid in 1..9")
        if (params.min_similarity is None) != (params.embedding_model is None):
            raise ConfigError(f"{w}: embedding matching needs both embedding_model and min_similarity")
        if params.min_similarity is not None and not 0 < params.min_similarity <= 1:
            raise ConfigError(f"{w}: min_similarity must be in (0, 1]")
        if params.question_ngram < 0:
            raise ConfigError(f"{w}: question_ngram must be >= 0 (0: off)")
        if params.max_items < 1 or params.max_bytes < 1 or params.max_pixels < 1 or params.max_aspect_log_ratio < 0:
            raise ConfigError(f"{w}: max_items, max_bytes and max_pixels must be >= 1, max_aspect_log_ratio >= 0")

    # ------------------------------------------------------------------ references
    def reference_shards(self) -> list[tuple[str, object]]:
        """(set name, ShardRef) of every reference shard, checked against the caps."""
        from ..inputs import InputError, InputOptions, resolve_input
        from ..rawshards import count_samples

        p = self.params
        root = Path(p.root)
        shards, items, size = [], 0, 0
        for s in p.sets:
            where = f"decontaminate: reference set {s['name']!r}"
            path = confined(root, s["path"], where)
            options = InputOptions(format=s.get("format", "auto"), image_column=s.get("image_column"),
                                   text_column=s.get("text_column"))
            try:
                found = resolve_input(str(path), options)
            except InputError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            for ref in found.shards:
                local = Path(ref.url) if not ref.remote else None
                if local is not None and not all(_inside(root, local / m if m else local) for m in ref.members or ("",)):
                    raise ConfigError(f"{where}: {ref.url} leaves the reference root {str(root)!r}")
                size += max(ref.size, 0)
                items += count_samples(ref)
                shards.append((s["name"], ref))
        if items > p.max_items or size > p.max_bytes:
            raise ConfigError(f"decontaminate: the reference sets hold {items} items in {size} bytes, over the caps "
                              f"(max_items {p.max_items}, max_bytes {p.max_bytes}); raise them or split the sets")
        return shards

    def fingerprint(self, ctx, folder: Path) -> str:
        """Fingerprint every reference shard in parallel; returns the parquet glob."""
        p = self.params
        folder.mkdir(parents=True, exist_ok=True)
        shards = self.reference_shards()
        args = [(ref.token(), name, tuple(p.crop_scales), p.crop_grid, p.max_pixels, p.embedding_model,
                 str(folder / f"{i:06d}.parquet")) for i, (name, ref) in enumerate(shards)]
        skipped = [(name, item, why) for (name, _), found in zip(shards, ctx.map_tasks(fingerprint_shard, args))
                   for item, why in found]
        for name, item, why in skipped[:SHOWN_SKIPS]:
            print(f"decontaminate: reference set {name}: item {item!r} skipped: {why}", file=sys.stderr, flush=True)
        if len(skipped) > SHOWN_SKIPS:
            print(f"decontaminate: ... {len(skipped) - SHOWN_SKIPS} more reference items skipped", file=sys.stderr)
        self.skipped = skipped
        return str(folder / "*.parquet")

    # ------------------------------------------------------------------ matching
    def decide(self, ctx) -> None:
        con, p = ctx.con, self.params
        refs = self.fingerprint(ctx, ctx.scratch / "decontaminate" / "refs")
        con.execute(f"""CREATE OR REPLACE TEMP TABLE _ref AS
                        SELECT row_number() OVER (ORDER BY "set", item, variant) - 1 AS hid, *,
                               ('0x' || phash)::UBIGINT AS h
                        FROM read_parquet({sql_str(refs)})""")
        usable = dict(con.execute("""SELECT "set", count(DISTINCT item) FROM _ref GROUP BY ALL""").fetchall())
        empty = [s["name"] for s in p.sets if not usable.get(s["name"])]
        if empty:
            raise ConfigError(f"decontaminate: reference set(s) {empty} hold no usable image "
                              f"({len(self.skipped)} items skipped: {self.skipped[:3]})")
        for col in MATCH_COLUMNS:
            con.execute(f'ALTER TABLE samples ADD COLUMN IF NOT EXISTS "{col}" VARCHAR')
            ctx.columns.add(col)
        live = "status = 'kept'"
        con.execute("CREATE OR REPLACE TEMP TABLE _match (uid VARCHAR, \"set\" VARCHAR, item VARCHAR, "
                    "rank INTEGER, score DOUBLE, how VARCHAR)")
        con.execute(f"""INSERT INTO _match SELECT DISTINCT s.uid, r."set", r.item, 0, 0, 'sha256'
                        FROM samples s JOIN _ref r ON s.sha256 = r.sha256 WHERE s.{live}""")
        # Distinct sample hashes (with the aspect ratios that carry them) against every fingerprint.
        con.execute(f"""CREATE OR REPLACE TEMP TABLE _hashed AS
                        SELECT uid, ('0x' || phash)::UBIGINT AS h, ln(width::DOUBLE / height) AS aspect FROM samples
                        WHERE {live} AND width > 0 AND height > 0 AND regexp_full_match(phash, '[0-9a-f]{{16}}')""")
        con.execute("""CREATE OR REPLACE TEMP TABLE _distinct AS
                       SELECT h, row_number() OVER (ORDER BY h) - 1 AS hid FROM (SELECT DISTINCT h FROM _hashed)""")
        near_pairs_across_sql(con, "_distinct", "_ref", p.max_hamming)
        con.execute(f"""INSERT INTO _match
                        SELECT x.uid, r."set", r.item, 1, bit_count(xor(x.h, r.h)), 'phash:' || bit_count(xor(x.h, r.h))
                        FROM _cross_pairs c JOIN _distinct d ON d.hid = c.a JOIN _hashed x ON x.h = d.h
                        JOIN _ref r ON r.hid = c.b
                        WHERE abs(x.aspect - ln(r.width::DOUBLE / r.height)) <= {float(p.max_aspect_log_ratio)!r}""")
        if p.min_similarity is not None:
            self.match_embeddings(ctx, refs)
        if p.question_ngram and "source_meta" in ctx.columns:
            self.match_questions(ctx, p.question_ngram)
        con.execute(f"""CREATE OR REPLACE TEMP TABLE _best AS SELECT * FROM _match
                        QUALIFY row_number() OVER (PARTITION BY uid ORDER BY rank, score, "set", item) = 1""")
        con.execute(f"""UPDATE samples SET status = 'dropped', reason = 'contaminated:' || b."set",
                               contaminated_by = b."set" || '/' || b.item, contamination_match = b.how
                        FROM _best b WHERE samples.uid = b.uid AND samples.{live}""")

    def match_questions(self, ctx, n: int) -> None:
        """Word n-grams of the reference questions and of the samples' QA questions, joined."""
        con = ctx.con
        con.execute(f"""CREATE OR REPLACE TEMP MACRO _words(t) AS
                        string_split(trim(regexp_replace(lower(t), '[^[:alnum:]]+', ' ', 'g')), ' ')""")
        con.execute(f"""CREATE OR REPLACE TEMP MACRO _ngrams(t) AS
                        list_transform(range(0, greatest(len(_words(t)) - {n} + 1, 0)),
                                       lambda i: array_to_string(_words(t)[i + 1:i + {n}], ' '))""")
        con.execute("""CREATE OR REPLACE TEMP TABLE _ref_grams AS
                       SELECT DISTINCT "set", item, unnest(_ngrams(question)) AS g FROM _ref
                       WHERE variant = 'whole' AND question IS NOT NULL""")
        con.execute("""INSERT INTO _match
                       SELECT s.uid, r."set", r.item, 3, 0, 'question'
                       FROM (SELECT uid, unnest(_ngrams(q)) AS g FROM (
                               SELECT uid, unnest(CAST(json_extract_string(source_meta, '$.qa[*].q') AS VARCHAR[])) AS q
                               FROM samples WHERE status = 'kept' AND json_valid(source_meta)
                                 AND json_type(source_meta, '$.qa') = 'ARRAY')) s
                       JOIN _ref_grams r USING (g)""")

    def match_embeddings(self, ctx, refs: str) -> None:
        from .clip import EMBEDDING_COLUMN

        flag = f"has_{EMBEDDING_COLUMN}"  # load_samples keeps a flag, not the embedding
        if flag not in ctx.columns and not ctx.con.execute(
                f"SELECT count(*) FROM information_schema.columns WHERE table_name = 'samples' AND column_name = '{flag}'").fetchall()[0][0]:
            raise ConfigError("decontaminate: min_similarity needs image embeddings: set keep_embeddings: true on "
                              "clip_score (with the same model as embedding_model)")
        folder = ctx.scratch / "decontaminate"
        matrix = folder / "reference_embeddings.parquet"
        ctx.con.execute(f"""COPY (SELECT "set", item, embedding FROM read_parquet({sql_str(refs)})
                                  WHERE embedding IS NOT NULL ORDER BY "set", item)
                            TO {sql_str(str(matrix))} (FORMAT parquet)""")
        (folder / "emb").mkdir(exist_ok=True)
        ctx.map_tasks(embedding_matches, [(str(a), str(matrix), float(self.params.min_similarity),
                                           str(folder / "emb" / f"{i:06d}.parquet")) for i, a in enumerate(ctx.annotated)])
        ctx.con.execute(f"""INSERT INTO _match
                            SELECT s.uid, e."set", e.item, 2, -e.similarity, 'embedding:' || e.similarity
                            FROM read_parquet({sql_str(str(folder / 'emb' / '*.parquet'))}) e
                            JOIN samples s USING (raw_shard, raw_key) WHERE s.status = 'kept'""")


def _inside(root: Path, path: Path) -> bool:
    base, target = root.resolve(), Path(os.path.realpath(path))
    return target == base or base in target.parents
