"""The sample kinds, in one place: one object per kind (`image_text`, `interleaved`,
`video`) owns what differs between them, and every other module asks it rather than
comparing kind names:

* which members of a raw sample are its media, in order (`media_members`), and whether
  a sample whose json names no kind is one (`claims`; `infer` asks them in order);
* which json fields it reads into which sidecar columns (`columns`, `read_fields`,
  curation.rawshards), and what a tier shard stores for it (`tier_members`,
  curation.media; `tier_exts`);
* the names its media may have in a tier, and where an export puts them (`export_media`);
  what each media member is in a conversation (`part`: image or video placeholders) and
  the prompt it is described with (`describe`);
* its visual-token cost (`visual_tokens`, curation.tokens);
* how the reference trainer recognises and decodes it (`decodes`, `decode`,
  curation.trainer.data) and how a tier card shows it (`card_usage`);
* how it is crawled (`crawler`, `crawl_items`, curation.crawl).

The bodies that need a module's private helpers stay in that module; the kind object
says which applies, so adding a kind is one class here plus `register`. Unknown names
are refused (`kind_of` raises UnknownKind, a ValueError)."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, ClassVar

RAW_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image members a raw sample may have
RAW_VIDEO_EXTS = ("mp4", "webm", "mkv", "mov")  # clip members a raw sample may have (PyAV reads all)
TIER_IMAGE_EXTS = ("jpg", "png", "webp")  # the only formats a tier stores (curation.media)
TIER_VIDEO_EXTS = ("mp4", "webm")
# Members of a multi-image sample: "0.jpg", "1.png", ... or "img0.jpg", "image_1.png", "page-2.webp"
NUMBERED_IMAGE = re.compile(r"^(?:(?:img|image|images|page|frame)[._-]?)?([0-9]{1,9})\.(jpg|jpeg|png|webp)\Z")
# Media names a tier's sidecar may list (an export refuses any other)
IMAGE_MEDIA = re.compile(r"^(?:[0-9]{1,6}\.)?(?:jpg|jpeg|png|webp)$")
VIDEO_MEDIA = re.compile(r"^(?:mp4|webm)$")


class UnknownKind(ValueError):
    """A kind name no kind object is registered under."""


def ordered_images(files) -> list[str]:
    """Numbered image members of a multi-image sample ("0.jpg", "1.png", "img2.webp",
    see NUMBERED_IMAGE), in their order."""
    numbered = []
    for e in files:
        m = NUMBERED_IMAGE.match(e)
        if m:
            numbered.append((int(m.group(1)), e))
    return [e for _, e in sorted(numbered)]


def plain_images(files) -> list[str]:
    """Image members named by their extension alone ("jpg", "png", ...), in RAW_IMAGE_EXTS order."""
    return [e for e in RAW_IMAGE_EXTS if e in files]


class Kind:
    """What one sample kind is; subclasses are singletons, registered by name."""
    name: ClassVar[str]
    part: ClassVar[str]  # what each media member is in a conversation: "image" | "video"
    multi: ClassVar[bool]  # may carry more than one media member
    tier_exts: ClassVar[tuple[str, ...]]  # extensions of its media members in a tier
    columns: ClassVar[tuple[str, ...]] = ()  # sidecar columns only this kind fills
    describe: ClassVar[str]  # the export's prompt when the source had no questions
    infer_rank: ClassVar[int]  # inference asks lower ranks first; image_text (the catch-all) is last
    doc_layout: ClassVar[bool] = False  # its text and media are laid out by its doc items (exports, trainer)

    def __repr__(self) -> str:
        return f"<kind {self.name}>"

    # ------------------------------------------------------------- raw samples
    def media_members(self, files) -> list[str]:
        """The sample's media member names, in order."""
        raise NotImplementedError

    def claims(self, files) -> bool:
        """Whether a sample whose json names no kind is of this kind (kinds are asked by infer_rank)."""
        raise NotImplementedError

    def read_fields(self, row: dict, meta: dict, files, media: list[str], inferred: bool, fail) -> None:
        """Fill this kind's columns of a raw sample's row from its json (curation.rawshards)."""

    # ----------------------------------------------------------------- tiers
    def tier_members(self, row: dict, files, max_pixels: int):
        """(members, row updates) a tier sample stores (curation.media.tier_members)."""
        raise NotImplementedError

    def export_media(self, tier: str, key: str, names: list) -> list[tuple[str, str, str]]:
        """(part, member name, path under the export's media root) per media member; the
        names are checked against the tier's media names (UnsafeSample otherwise)."""
        from .tiers.export.core import UnsafeSample, safe

        if not self.multi and len(names) != 1:
            raise UnsafeSample(f"a {self.name} sample lists {len(names)} media")
        return self._export_media(tier, key, [safe(n, "media name", self._media_pattern) for n in names])

    _media_pattern: ClassVar[re.Pattern] = IMAGE_MEDIA

    def _export_media(self, tier: str, key: str, names: list[str]) -> list[tuple[str, str, str]]:
        # an image keeps its real format's extension: <key>.<ext>, a document's <key>_<n>.<ext>
        return [("image", name, f"images/{tier}/{_image_file(key, name)}") for name in names]

    def card_usage(self) -> list[str]:
        """Lines of the tier card's `load_dataset` example for this kind's samples."""
        return []

    # ---------------------------------------------------------------- billing
    def visual_tokens(self, width, height, num_images, num_frames) -> tuple[int, int, int]:
        """(images, frames, visual tokens) of one sample (curation.tokens)."""
        raise NotImplementedError

    # --------------------------------------------------------------- training
    def decodes(self, raw: dict, meta: dict) -> bool:
        """Whether the trainer reads a tier sample (members `raw`, json `meta`) as this kind
        (kinds are asked by infer_rank)."""
        raise NotImplementedError

    def decode(self, raw: dict, meta: dict, sample: dict, frames_per_video: int) -> None:
        """Fill the trainer's sample (curation.trainer.data.decode_sample) with its media."""
        raise NotImplementedError

    # --------------------------------------------------------------- crawling
    def crawler(self) -> Callable[..., Any]:
        """`curate crawl --kind NAME`: the function that fetches its sources into raw shards,
        called as f(input_path, out, **options) and returning the crawl ledger."""
        from .crawl.media import crawl_media

        return functools.partial(crawl_media, self.name)

    def crawl_items(self, input_path, policy, *, url_col=None, caption_col=None, source=None, require_images="all"):
        """(items, valid, refusals, fetch_one) of a curation.crawl.media crawl of this kind."""
        from .errors import InputError

        raise InputError(f"unknown crawl kind {self.name!r}")


def _image_file(key: str, name: str) -> str:
    number, dot, ext = name.rpartition(".")
    return f"{key}_{number}.{ext}" if dot else f"{key}.{name}"


class ImageText(Kind):
    """One image and its text."""
    name, part, multi, tier_exts = "image_text", "image", False, TIER_IMAGE_EXTS
    describe = "Describe the image briefly."
    infer_rank = 1000

    def media_members(self, files) -> list[str]:
        return (plain_images(files) or ordered_images(files))[:1]

    def claims(self, files) -> bool:
        return True  # what is left when no other kind claims the sample

    def tier_members(self, row, files, max_pixels):
        from .media import image_tier_members

        return image_tier_members(row, files, max_pixels)

    def card_usage(self) -> list[str]:
        return ['image = next(row[ext] for ext in ("jpg", "png", "webp") if row[ext] is not None)  # PIL image']

    def visual_tokens(self, width, height, num_images, num_frames):
        from .tokens import anyres_tokens

        return 1, 0, anyres_tokens(int(width), int(height))

    def decodes(self, raw, meta) -> bool:
        return True

    def decode(self, raw, meta, sample, frames_per_video) -> None:
        from .trainer.data import decode_image

        ext = next((e for e in RAW_IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise ValueError(f"sample {raw['__key__']} has no image")
        sample["images"] = [decode_image(raw[ext])]

    def crawler(self):
        from .crawl.image_text import crawl_image_text

        return crawl_image_text  # its own crawler (img2dataset-style url lists, on Ray)


class Interleaved(Kind):
    """A document: text and images in order (`doc.items`)."""
    name, part, multi, tier_exts = "interleaved", "image", True, TIER_IMAGE_EXTS
    columns = ("num_images", "missing_images", "doc", "doc_sha256")
    doc_layout = True
    describe = "Describe the images in order."
    infer_rank = 20  # after video: a clip with stills is a video

    def media_members(self, files) -> list[str]:
        return ordered_images(files) or plain_images(files)

    def claims(self, files) -> bool:
        return len(ordered_images(files)) > 1 or len(plain_images(files)) > 1

    def read_fields(self, row, meta, files, media, inferred, fail) -> None:
        from .rawshards import document_fields

        document_fields(row, meta, files, media, inferred, fail)

    def tier_members(self, row, files, max_pixels):
        from .media import document_tier_members

        return document_tier_members(row, files, max_pixels)

    def card_usage(self) -> list[str]:
        return ['images = [row[m] for m in row["json"]["media"]]  # a document\'s images, in order',
                'items = row["json"]["doc"]["items"]  # text and image items; image items name their member']

    def visual_tokens(self, width, height, num_images, num_frames):
        from .tokens import TOKENS_PER_IMAGE_MULTI

        n = int(num_images or 0)
        return n, 0, n * TOKENS_PER_IMAGE_MULTI

    def decodes(self, raw, meta) -> bool:
        return meta.get("kind") == self.name or bool(meta.get("doc"))

    def decode(self, raw, meta, sample, frames_per_video) -> None:
        from .trainer.data import decode_document

        decode_document(raw, meta, sample)

    def crawl_items(self, input_path, policy, *, url_col=None, caption_col=None, source=None, require_images="all"):
        from .crawl.media import document_items

        return document_items(input_path, policy, source, require_images)


class Video(Kind):
    """One clip and its text."""
    name, part, multi, tier_exts = "video", "video", False, TIER_VIDEO_EXTS
    columns = ("duration", "fps", "num_frames", "codec", "width", "height", "sha256")
    describe = "Describe what happens in the video."
    infer_rank = 10
    _media_pattern = VIDEO_MEDIA

    def media_members(self, files) -> list[str]:
        return [e for e in RAW_VIDEO_EXTS if e in files][:1]

    def claims(self, files) -> bool:
        return any(e in files for e in RAW_VIDEO_EXTS)

    def read_fields(self, row, meta, files, media, inferred, fail) -> None:
        from .rawshards import video_fields

        video_fields(row, meta, files, media, fail)

    def tier_members(self, row, files, max_pixels):
        from .media import video_tier_members

        return video_tier_members(row, files, max_pixels)

    def _export_media(self, tier, key, names):
        return [("video", names[0], f"videos/{tier}/{key}.{names[0]}")]

    def card_usage(self) -> list[str]:
        return ['clip = next(row[ext] for ext in ("mp4", "webm") if row[ext] is not None)  # {"bytes", "path"}',
                '# ds.cast_column("mp4", datasets.Video()) decodes frames where torchcodec is installed']

    def visual_tokens(self, width, height, num_images, num_frames):
        from .tokens import MAX_FRAMES, TOKENS_PER_FRAME

        frames = min(int(num_frames or MAX_FRAMES), MAX_FRAMES)
        return 0, frames, frames * TOKENS_PER_FRAME

    def decodes(self, raw, meta) -> bool:
        return any(e in raw for e in RAW_VIDEO_EXTS)

    def decode(self, raw, meta, sample, frames_per_video) -> None:
        from .trainer.data import decode_video

        ext = next(e for e in RAW_VIDEO_EXTS if e in raw)
        sample.update(role="frame", images=decode_video(raw[ext], frames_per_video))

    def crawl_items(self, input_path, policy, *, url_col=None, caption_col=None, source=None, require_images="all"):
        from .crawl.media import video_items

        return video_items(input_path, policy, url_col, caption_col, source)


_REGISTRY: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add a kind (names are listed in registration order; inference asks by infer_rank)."""
    if not isinstance(kind, Kind) or kind.name in _REGISTRY:
        raise ValueError(f"{kind!r} is not a new Kind")
    _REGISTRY[kind.name] = kind
    return kind


IMAGE_TEXT = register(ImageText())
INTERLEAVED = register(Interleaved())
VIDEO = register(Video())


def registered() -> tuple[Kind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    """Every registered kind's name, in registration order."""
    return tuple(_REGISTRY)


def _by_rank() -> list[Kind]:
    return sorted(_REGISTRY.values(), key=lambda k: k.infer_rank)


def kind_of(name, default: Kind | None = None) -> Kind:
    """The kind registered under `name`; for anything else (not a str included) `default`,
    or UnknownKind when there is none."""
    kind = _REGISTRY.get(name) if isinstance(name, str) else None
    if kind is None:
        if default is not None:
            return default
        raise UnknownKind(f"unknown kind {name!r}; kinds are {list(names())}")
    return kind


def is_kind(name) -> bool:
    return isinstance(name, str) and name in _REGISTRY


def infer(files) -> Kind:
    """The kind of a sample whose json does not say: the first kind by infer_rank that
    claims its members (a video member makes a video, more than one image a document,
    else an image with text)."""
    return next(k for k in _by_rank() if k.claims(files))


def tier_sample_kind(raw: dict, meta: dict) -> Kind:
    """The kind the trainer reads a tier sample as: by its members and json."""
    return next(k for k in _by_rank() if k.decodes(raw, meta))
