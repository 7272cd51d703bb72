"""A dataset card (`README.md`) per tier folder, so Hugging Face `datasets` loads the
tier by its path alone: `load_dataset("OUT/tiers/<tier>", split="train")`.

Without a card, `load_dataset(folder)` picks the most common data file type in the
folder and loads the parquet sidecars instead of the media; and the webdataset builder,
left to infer the columns from the first samples, refuses a tier whose samples carry
different member names (documents: `0.jpg` in one, `0.png` + `1.jpg` in the next) and
does not know `webm`. The card's YAML front matter fixes both: `configs` points the
train split at `*.tar` (which makes `datasets` choose its webdataset builder) and
`dataset_info.features` declares every column up front, so a sample that lacks a member
gets None in that column instead of failing.

Columns are the tar members as the webdataset builder names them:
  * image_text: `jpg`, `png`, `webp` (Image); each sample sets the one of its real format.
    All three are declared whenever the tier holds image_text samples, so every such
    tier has the same columns and tiers concatenate.
  * interleaved documents: `0.<ext>`, `1.<ext>`, ... (Image), one column per member name
    any document of the tier carries; a document sets its own, in the order that
    `json.media` lists.
  * video: `mp4`, `webm` (Video, decode off: {"bytes", "path"} without torchcodec).
  * always: `txt` (the sample's text, None when it has none), `json` (the sidecar row,
    a struct typed like the sidecar parquet), `__key__`, `__url__` (sample key, shard).

The card depends only on the manifest and the sidecars, so the same run writes the same
bytes (no timestamps), and it is written atomically after the manifest.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .. import schemas
from ..fsutil import atomic_write_text
from ..kinds import TIER_IMAGE_EXTS, TIER_VIDEO_EXTS, registered

CARD_NAME = "README.md"
IMAGE_EXTS, VIDEO_EXTS = TIER_IMAGE_EXTS, TIER_VIDEO_EXTS  # the only formats a tier stores (curation.media)

# datasets' Value dtype names where they differ from pyarrow's type names.
_VALUE_DTYPES = {"double": "float64", "float": "float32", "halffloat": "float16"}


def member_feature(name: str) -> dict:
    """The declared feature of tar member `name` (its last extension decides)."""
    ext = name.rsplit(".", 1)[-1].lower()
    if ext in IMAGE_EXTS:
        return {"dtype": "image"}
    if ext in VIDEO_EXTS:
        # decode off: rows give {"bytes", "path"} and need no torchcodec;
        # ds.cast_column(name, datasets.Video()) decodes where torchcodec is installed.
        return {"dtype": {"video": {"decode": False}}}
    return {"dtype": "binary"}


def value_dtype(arrow_type: pa.DataType) -> str:
    """A scalar sidecar column's arrow type as a datasets Value dtype (strings, int64,
    float64, bool); anything else is refused here, where it shows, rather than in a
    user's load_dataset."""
    if pa.types.is_nested(arrow_type) or pa.types.is_dictionary(arrow_type) or isinstance(arrow_type, pa.ExtensionType):
        raise ValueError(f"sidecar column type {arrow_type} has no flat datasets Value dtype")
    name = str(arrow_type)
    return _VALUE_DTYPES.get(name, name)


def column_feature(arrow_type: pa.DataType) -> dict:
    """A sidecar column's type as a datasets feature in the card's YAML: lists as `list`,
    structs as `struct`, maps (op_versions) and JSON text (source_meta) as `json` (the
    tar's json holds an object there; datasets hands back the decoded value)."""
    if isinstance(arrow_type, pa.JsonType) or pa.types.is_map(arrow_type):
        return {"dtype": "json"}
    if pa.types.is_list(arrow_type):
        inner = column_feature(arrow_type.value_type)  # datasets writes a list's item feature bare
        if "struct" in inner:
            return {"list": inner["struct"]}
        return {"list": inner["dtype"] if inner.get("dtype", "json") != "json" else inner}
    if pa.types.is_struct(arrow_type):
        return {"struct": [{"name": f.name, **column_feature(f.type)} for f in arrow_type]}
    return {"dtype": value_dtype(arrow_type)}


def _member_order(name: str) -> tuple:
    """Single-member kinds in a fixed order first, then document members by index."""
    fixed = IMAGE_EXTS + VIDEO_EXTS
    if name in fixed:
        return (0, fixed.index(name), "")
    index, _, ext = name.partition(".")
    return (1, int(index), ext) if index.isdigit() else (2, 0, name)


def tier_contents(tier_dir: Path, manifest: dict) -> tuple[Counter, list[str], pa.Schema]:
    """(samples per kind, the media member names the tier's samples carry, sidecar schema),
    read from the sidecars' `kind` and `media` columns only."""
    kinds: Counter = Counter()
    members: set[str] = set()
    sidecar_schema = None
    for shard in manifest["shards"]:
        path = tier_dir / shard["sidecar"]
        sidecar_schema = sidecar_schema or pq.read_schema(path)
        table = pq.read_table(path, columns=["kind", "media"])
        kinds.update(table.column("kind").to_pylist())
        for media in table.column("media").to_pylist():
            members.update(media or [])
    for kind in registered():  # a single-member kind: every extension it may have, declared
        if not kind.multi and kinds.get(kind.name):
            members.update(kind.tier_exts)
    # An empty tier has no sidecar to read; the contract says what one would hold.
    return kinds, sorted(members, key=_member_order), sidecar_schema or schemas.arrow_schema("sidecar")


def card_features(members: list[str], sidecar_schema: pa.Schema) -> list[dict]:
    """dataset_info.features in the order the webdataset builder yields a sample's fields
    (media, txt, json as the tar holds them; then __key__, __url__)."""
    json_struct = [{"name": f.name, **column_feature(f.type)} for f in sidecar_schema]
    return ([{"name": m, **member_feature(m)} for m in members]
            + [{"name": "txt", "dtype": "string"}, {"name": "json", "struct": json_struct},
               {"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}])


def card_text(tier_dir: Path, manifest: dict) -> str:
    kinds, members, sidecar_schema = tier_contents(tier_dir, manifest)
    tier, pipeline = manifest["tier"], manifest["pipeline"]
    front = {
        "pretty_name": f"{pipeline} / {tier}",
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "*.tar"}]}],
        "dataset_info": {"config_name": "default", "features": card_features(members, sidecar_schema)},
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=1000).rstrip("\n"),
        "---",
        "",
        f"# {tier}",
        "",
        f"Tier `{tier}` of curation pipeline `{pipeline}` ({_identity(manifest)}): "
        f"{manifest['num_samples']} samples in {len(manifest['shards'])} WebDataset "
        f"shard{'' if len(manifest['shards']) == 1 else 's'}, "
        f"{manifest['num_bytes']} bytes. `manifest.json` lists each shard with its sha256; "
        "each `<shard>.parquet` sidecar holds the shard's rows in order.",
        "",
        "| kind | samples |",
        "|---|---|",
        *[f"| {kind} | {n} |" for kind, n in sorted(kinds.items())],
        *([] if kinds else ["| (none) | 0 |"]),
        "",
        *([] if manifest["shards"] else ["This tier has no samples, so no shards: `load_dataset` finds no data "
                                         "files here and raises.", ""]),
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("path/to/tiers/{tier}", split="train")',
        "row = ds[0]",
        *_usage(kinds),
        "```",
        "",
        "Or with `webdataset`: `wds.WebDataset(sorted(glob.glob(\"*.tar\")))`. A sample's media "
        "members are listed, in order, by `json[\"media\"]` (a list of member names).",
        "",
        "## Columns",
        "",
        "| column | type | content |",
        "|---|---|---|",
        *[f"| `{m}` | {_type_words(m)} | {_member_words(m)} |" for m in members],
        "| `txt` | string | the sample's text (an image's caption, a document's or clip's text); None when it has none |",
        "| `json` | struct | the sidecar row: provenance, annotations, media facts |",
        "| `__key__` | string | the sample key (the sidecar's `key`) |",
        "| `__url__` | string | the shard the sample came from |",
        "",
    ]
    return "\n".join(lines)


def _identity(manifest: dict) -> str:
    parts = [f"recipe version {manifest['recipe_version']}" if manifest.get("recipe_version") is not None else None,
             f"config hash `{manifest['config_hash']}`", f"seed {manifest['seed']}",
             f"curation {manifest['curation_version']}"]
    return ", ".join(p for p in parts if p)


def _usage(kinds: Counter) -> list[str]:
    out = [line for kind in registered() if kinds.get(kind.name) for line in kind.card_usage()]
    out.append('print(row["txt"], row["json"]["uid"])')
    return out


def _type_words(member: str) -> str:
    dtype = member_feature(member)["dtype"]
    return "Video (decode off)" if isinstance(dtype, dict) else {"image": "Image", "binary": "binary"}[dtype]


def _member_words(member: str) -> str:
    if member in IMAGE_EXTS:
        return f"an image sample's image when it is {member.upper()}; None otherwise"
    if member in VIDEO_EXTS:
        return f"a video sample's clip when it is {member.upper()}; None otherwise"
    index, _, ext = member.partition(".")
    if index.isdigit():
        return f"image {index} of a document when it is {ext.upper()}; None otherwise"
    return "media member"


def write_card(tier_dir: str | Path, manifest: dict) -> Path:
    """Write `<tier_dir>/README.md` for the tier `manifest` describes (atomically)."""
    path = Path(tier_dir) / CARD_NAME
    atomic_write_text(path, card_text(Path(tier_dir), manifest))
    return path
