"""Build the demo corpus: deterministic from a seed, no downloads.

Layout under the corpus folder:
  files/                     every servable file (images, videos, junk)
  image_text.parquet         path, caption, qa  (the url list, before a server is known)
  documents.jsonl            interleaved multi-image documents, with questions about their images (qa)
  videos.parquet             path, caption       (short mp4 clips)
  truth.parquet              path -> planted category, for measuring filters later
  trusted/trusted-000000.tar fresh scenes with true captions (jpg + txt): the trusted set
                             `curate train-filter` learns the CLIP filter from
  eval/shapes_bench/         a small evaluation set (jpg + question txt, WebDataset) that
                             `decontaminate` protects; some of its images are planted in
                             the crawl as exact, re-encoded, resized and cropped copies
                             (planted eval_*, truth's eval_item names the reference key)
  robots.txt, ai.txt,        the opt-out signals the demo server publishes (with the
  .well-known/tdmrep.json    response headers of RESPONSE_HEADERS): OPTOUT_PLANTS' folders
                             are refused, each by its own signal; OPTOUT_DECOYS' are not
  truth_videos.parquet       per video: its shots, the hard cuts between them and the clips
                             the bundled video_clips recipe must cut it into
  corpus.json                counts per category and the build parameters

`planted` categories: scene (a true caption), mismatch (caption of another scene),
text_sign (OCR-rich), exact_dup, near_dup, tiny, huge, elongated, truncated, random_bytes,
html, short_caption, missing (404), eval_* (above), optout_<signal> (refused by that
signal), optout_decoy (looks refused, is allowed).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import pandas as pd
from PIL import Image

from ..crawl.fetch import USER_AGENT_TOKEN
from ..fsutil import atomic_write_bytes, atomic_write_text
from ..ops.clips import X264_OPTIONS
from ..wds import tar_bytes
from . import scenes

CORPUS_VERSION = "7"


@dataclass(frozen=True)
class CorpusPlan:
    """How many of each planted category. The defaults give ~3,000 image-text rows."""

    scene: int = 2200
    mismatch: int = 250
    mismatch_qa: bool = False  # mismatches carry the questions of the scene their caption describes
    text_sign: int = 200
    exact_dup: int = 100
    near_dup: int = 100
    tiny: int = 30
    huge: int = 6
    elongated: int = 20
    truncated: int = 20
    random_bytes: int = 15
    html: int = 10
    short_caption: int = 40
    missing: int = 25
    documents: int = 60
    videos: int = 24
    trusted: int = 1000  # hand-checked pairs, not crawled: what train-filter learns from
    eval_items: int = 60  # the evaluation set decontaminate protects (eval/shapes_bench)
    eval_copied: int = 12  # of its images, planted in the crawl in each of EVAL_COPIES' forms
    optout: int = 8  # scenes per opt-out signal that the signal must refuse (OPTOUT_PLANTS)
    optout_decoys: int = 4  # per OPTOUT_DECOYS form: under an opt-out folder, yet allowed
    multi_scene_videos: int = 9  # videos of 2-3 shots with hard cuts (MULTI_SCENE), besides `videos`

    @classmethod
    def noisy(cls, share: float = 0.3, base: "CorpusPlan | None" = None) -> "CorpusPlan":
        """`base` (default: the full plan) as noisy as web data: `share` of its image-text
        rows are mismatches whose caption AND questions describe another scene (web text
        about the wrong image is wrong in every field); duplicates and junk keep their
        share of the rows, the true scenes their count (eval copies and opt-out plants,
        a few dozen rows, are not counted)."""
        base = base or cls()
        other = ("exact_dup", "near_dup", "tiny", "huge", "elongated", "truncated", "random_bytes", "html",
                 "short_caption", "missing")
        clean = base.scene + base.text_sign
        rows = clean + base.mismatch + sum(getattr(base, f) for f in other)
        other_share = sum(getattr(base, f) for f in other) / rows
        if not 0 <= share < 1 - other_share:
            raise ValueError(f"mismatch share must be in [0, {1 - other_share:.2f}) for this plan, not {share}")
        total = clean / (1 - share - other_share)
        return replace(base, mismatch=round(share * total), mismatch_qa=True,
                       **{f: round(getattr(base, f) * total / rows) for f in other})

    @classmethod
    def small(cls) -> "CorpusPlan":
        """A few hundred rows with every category present, for fast tests."""
        return cls(scene=160, mismatch=30, text_sign=20, exact_dup=12, near_dup=12, tiny=5, huge=2,
                   elongated=5, truncated=5, random_bytes=4, html=3, short_caption=6, missing=5,
                   documents=6, videos=3, trusted=400, eval_items=24, eval_copied=8, optout=2,
                   optout_decoys=1, multi_scene_videos=3)


def _write(root: Path, rel: str, data: bytes) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return rel


def _near_copy(img: Image.Image, rng: random.Random) -> bytes:
    """Same picture after the kind of processing a re-upload gets: rescale + re-encode."""
    scale = rng.uniform(0.85, 0.95)
    small = img.resize((max(8, int(img.width * scale)), max(8, int(img.height * scale))), Image.BILINEAR)
    return scenes.encode_jpeg(small, quality=rng.choice([60, 70, 75]))


EVAL_SET = "shapes_bench"
EVAL_COPIES = ("eval_exact", "eval_reencoded", "eval_resized", "eval_cropped")


def _eval_copy(form: str, img: Image.Image, data: bytes, rng: random.Random) -> bytes:
    """A benchmark image as it turns up in a crawl: the same file, re-encoded, resized,
    or cropped (a uniform crop of 80-92% of each side, anywhere in the image)."""
    if form == "eval_exact":
        return data
    if form == "eval_reencoded":
        return scenes.encode_jpeg(img, quality=rng.choice([55, 65, 75]))
    if form == "eval_resized":
        scale = rng.uniform(0.5, 0.8)
        return scenes.encode_jpeg(img.resize((int(img.width * scale), int(img.height * scale)), Image.BILINEAR), quality=80)
    f = rng.uniform(0.8, 0.92)
    cw, ch = int(img.width * f), int(img.height * f)
    x, y = rng.randint(0, img.width - cw), rng.randint(0, img.height - ch)
    return scenes.encode_jpeg(img.crop((x, y, x + cw, y + ch)), quality=85)


def _plant_eval_copies(root: Path, seed: int, plan: "CorpusPlan", rows: list[dict]) -> None:
    """Write the evaluation set (eval/shapes_bench) and insert copies of `eval_copied` of
    its images into the url list at random places. Its own random stream: the rest of
    the corpus is the same with or without it."""
    rng = random.Random(seed + 2)
    samples, copies = [], []
    for j in range(plan.eval_items):
        sc = scenes.random_scene(rng)
        img = scenes.render(sc)
        data = scenes.encode_jpeg(img)
        item = f"q{j:05d}"
        question = scenes.questions(sc)[0]["q"] if scenes.questions(sc) else "What is shown?"
        samples.append((item, [("jpg", data), ("txt", question.encode())]))
        if j < plan.eval_copied:
            for form in EVAL_COPIES:
                rel = _write(root, f"files/{form.replace('_', '/')}/{j:05d}.jpg", _eval_copy(form, img, data, rng))
                copies.append({"path": rel, "caption": scenes.caption(sc, rng), "qa": None, "planted": form,
                               "eval_item": item})
    folder = root / "eval" / EVAL_SET
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / f"{EVAL_SET}-000000.tar", tar_bytes(samples))
    for row in copies:
        rows.insert(rng.randint(0, len(rows)), row)


# Opt-out plants. planted category -> (folder, the signal that must refuse it: its
# evidence entry's `signal`, and the crawl's reason). Each folder holds scenes with true
# captions, which nothing else would drop.
OPTOUT_PLANTS = {
    "optout_robots": ("files/optout/robots", "robots", "opt_out:robots"),
    "optout_tdmrep": ("files/optout/tdm", "tdmrep", "opt_out:tdm"),
    "optout_ai_txt": ("files/optout/ai", "ai_txt", "opt_out:ai_txt"),  # .jpeg: ai.txt disallows *.jpeg
    "optout_tdm_header": ("files/optout/tdm-header", "tdm_header", "opt_out:tdm"),
    "optout_x_robots_tag": ("files/optout/x-robots", "x_robots_tag", "opt_out"),
}
# Folders whose files look refused and are not: the rule that lets each through.
OPTOUT_DECOYS = {
    "files/optout/robots/public": "robots.txt: a longer Allow inside our disallowed folder",
    "files/optout/tdm/free": "tdmrep.json: a longer location with tdm-reservation 0",
    "files/optout/x-robots-other": "X-Robots-Tag: noai addressed to another crawler",
}
# robots.txt: everyone else is refused everything; our crawler's own group (RFC 9309: it
# replaces `*`) refuses one folder only.
ROBOTS_TXT = f"""# The demo server's robots.txt (curation/demo/corpus.py)
User-agent: *
Disallow: /

User-agent: {USER_AGENT_TOKEN}
Disallow: /files/optout/robots/
Allow: /files/optout/robots/public/
"""
AI_TXT = "# Spawning ai.txt: no AI training on .jpeg files\nUser-Agent: *\nDisallow: *.jpeg\n"
TDMREP = [{"location": "/files/optout/tdm/*", "tdm-reservation": 1,
           "tdm-policy": "https://example.org/demo-tdm-policy.json"},
          {"location": "/files/optout/tdm/free/*", "tdm-reservation": 0}]
# What the demo server adds to responses under these url path prefixes.
RESPONSE_HEADERS = {
    "/files/optout/tdm-header/": (("tdm-reservation", "1"),),
    "/files/optout/x-robots/": (("X-Robots-Tag", f"{USER_AGENT_TOKEN}: noai"),),
    "/files/optout/x-robots-other/": (("X-Robots-Tag", "otherbot: noai, noimageai"),),
}


def _plant_optouts(root: Path, seed: int, plan: "CorpusPlan", rows: list[dict]) -> None:
    """Write the host's signal files, and `plan.optout` scenes per signal (plus the
    decoys) into the url list at random places. Their own random stream: the rest of the
    corpus is the same with or without them."""
    rng = random.Random(seed + 3)
    _write(root, "robots.txt", ROBOTS_TXT.encode())
    _write(root, "ai.txt", AI_TXT.encode())
    _write(root, ".well-known/tdmrep.json", (json.dumps(TDMREP, indent=1) + "\n").encode())
    folders = [(planted, folder, plan.optout) for planted, (folder, _, _) in OPTOUT_PLANTS.items()]
    folders += [("optout_decoy", folder, plan.optout_decoys) for folder in OPTOUT_DECOYS]
    planted_rows = []
    for planted, folder, n in folders:
        ext = "jpeg" if planted == "optout_ai_txt" else "jpg"
        for i in range(n):
            sc = scenes.random_scene(rng)
            rel = _write(root, f"{folder}/{i:05d}.{ext}", scenes.encode_jpeg(scenes.render(sc)))
            planted_rows.append({"path": rel, "caption": scenes.caption(sc, rng), "qa": json.dumps(scenes.questions(sc)),
                                 "planted": planted})
    for row in planted_rows:
        rows.insert(rng.randint(0, len(rows)), row)


# Multi-scene videos: hard cuts between shots of clearly different scenes (a dark
# background of its own, a shape of another colour), 8 fps. Per pattern: the shot lengths
# (seconds), and the clips the bundled video_clips recipe (VIDEO_CLIPS_LIMITS) must cut
# the video into: a shot shorter than min_seconds joins the clip before it.
MULTI_SCENE = (  # keyframe_cuts: a keyframe starts each shot, so its clips are remuxed, the others re-encoded
    {"shots": (2.0, 2.0), "clips": ((0.0, 2.0), (2.0, 4.0)), "keyframe_cuts": True},
    {"shots": (1.5, 2.0, 1.5), "clips": ((0.0, 1.5), (1.5, 3.5), (3.5, 5.0))},
    {"shots": (2.0, 0.5, 2.0), "clips": ((0.0, 2.5), (2.5, 4.5))},
)
VIDEO_CLIPS_LIMITS = {"min_seconds": 1.0, "max_seconds": 30.0}  # pipelines/video_clips.yaml's, which MULTI_SCENE assumes
VIDEO_FPS = 8
SHOT_BACKGROUNDS = ((25, 35, 95), (110, 25, 30), (25, 95, 45), (70, 70, 70))
DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")


def _plant_multi_scene_videos(root: Path, seed: int, plan: "CorpusPlan") -> tuple[list[dict], list[dict]]:
    """`plan.multi_scene_videos` videos cycling through MULTI_SCENE: (url list rows, truth rows)."""
    rng = random.Random(seed + 4)
    rows, truth = [], []
    for v in range(plan.multi_scene_videos):
        pattern = MULTI_SCENE[v % len(MULTI_SCENE)]
        backgrounds = rng.sample(SHOT_BACKGROUNDS, len(pattern["shots"]))
        colours = rng.sample(sorted(scenes.COLOURS), len(pattern["shots"]))
        shots = [(bg, colour, rng.choice(DIRECTIONS), round(seconds * VIDEO_FPS))
                 for bg, colour, seconds in zip(backgrounds, colours, pattern["shots"])]
        rel = _write(root, f"files/video/multi/{v:04d}.mp4", _shots_video_bytes(shots, pattern.get("keyframe_cuts", False)))
        rows.append({"path": rel, "caption": ", then ".join(f"a {c} circle moves from {d}" for _, c, d, _ in shots)
                     .capitalize() + "."})
        cuts = [float(sum(pattern["shots"][:k])) for k in range(1, len(pattern["shots"]))]
        truth.append({"path": rel, "planted": "multi_scene", "shots": list(pattern["shots"]), "cuts": cuts,
                      "clip_starts": [a for a, _ in pattern["clips"]], "clip_ends": [b for _, b in pattern["clips"]],
                      "keyframe_cuts": pattern.get("keyframe_cuts", False)})
    return rows, truth


def _video_bytes(scene: scenes.Scene, direction: str, n_frames: int = 16) -> bytes:
    """A one-shot video: the scene's first shape's colour as a circle moving `direction`."""
    return _shots_video_bytes([(scene.background, scene.objects[0].colour, direction, n_frames)])


def _shots_video_bytes(shots: list[tuple[tuple[int, int, int], str, str, int]], keyframe_cuts: bool = False) -> bytes:
    """An H.264 mp4 of one or more shots, each (background, circle colour, direction the
    circle moves, frames), cut hard from one to the next; `keyframe_cuts`: each shot starts
    on a keyframe (else only the first frame is one)."""
    import av  # PyAV ships its own FFmpeg
    from av.video.frame import PictureType
    from PIL import ImageDraw

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        # H.264: what browsers play (curate browse shows clips in a <video>); MPEG-4 Part 2
        # plays nowhere on the web. One thread, no lookahead or B-frames, frames given as
        # yuv420p: x264 then writes the same bytes every time (with them it does not).
        stream = container.add_stream("libx264", rate=VIDEO_FPS, options=dict(X264_OPTIONS))
        stream.width, stream.height, stream.pix_fmt = 96, 96, "yuv420p"
        pts = 0
        for background, colour, direction, n_frames in shots:
            for t in range(n_frames):
                frac = t / (n_frames - 1)
                pos = frac if direction in ("left to right", "top to bottom") else 1 - frac
                img = Image.new("RGB", (96, 96), background)
                c = int(14 + pos * 68)
                cx, cy = (c, 48) if "left" in direction else (48, c)
                ImageDraw.Draw(img).ellipse((cx - 12, cy - 12, cx + 12, cy + 12), fill=scenes.COLOURS[colour])
                frame = av.VideoFrame.from_image(img).reformat(format="yuv420p")
                frame.pts = pts
                frame.time_base = Fraction(1, VIDEO_FPS)
                if keyframe_cuts and t == 0:
                    frame.pict_type = PictureType.I
                pts += 1
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def build_params(seed: int = 0, plan: CorpusPlan | None = None) -> dict:
    """What a corpus build depends on: a corpus built with other parameters is another corpus."""
    return {"version": CORPUS_VERSION, "seed": seed, "plan": (plan or CorpusPlan()).__dict__}


def built_params(root: str | Path) -> dict | None:
    """The parameters of the corpus built under `root`, None if none is."""
    stamp = Path(root) / "corpus.json"
    return json.loads(stamp.read_text()).get("params") if stamp.is_file() else None


def build(root: str | Path, seed: int = 0, plan: CorpusPlan | None = None) -> dict:
    """Write the corpus under `root` (skipped if already built with the same parameters)."""
    root = Path(root)
    plan = plan or CorpusPlan()
    params = build_params(seed, plan)
    stamp = root / "corpus.json"
    if stamp.exists():
        existing = json.loads(stamp.read_text())
        if existing.get("params") == params:
            return existing
    rng = random.Random(seed)
    rows: list[dict] = []  # path, caption, qa, planted

    def add(planted: str, rel: str, caption: str, qa: list | None = None) -> None:
        rows.append({"path": rel, "caption": caption, "qa": json.dumps(qa) if qa else None, "planted": planted})

    good: list[tuple[str, Image.Image, str]] = []
    for i in range(plan.scene):
        sc = scenes.random_scene(rng)
        img = scenes.render(sc)
        rel = _write(root, f"files/scene/{i:05d}.jpg", scenes.encode_jpeg(img))
        cap = scenes.caption(sc, rng)
        add("scene", rel, cap, scenes.questions(sc))
        good.append((rel, img, cap))
    for i in range(plan.mismatch):
        sc = scenes.random_scene(rng)
        other = scenes.random_scene(rng)
        while {(o.shape, o.colour) for o in other.objects} & {(o.shape, o.colour) for o in sc.objects}:
            other = scenes.random_scene(rng)
        rel = _write(root, f"files/mismatch/{i:05d}.jpg", scenes.encode_jpeg(scenes.render(sc)))
        add("mismatch", rel, scenes.caption(other, rng), scenes.questions(other) if plan.mismatch_qa else None)
    for i in range(plan.text_sign):
        sc = scenes.random_scene(rng, with_word=True)
        rel = _write(root, f"files/sign/{i:05d}.jpg", scenes.encode_jpeg(scenes.render(sc)))
        add("text_sign", rel, scenes.caption(sc, rng), scenes.questions(sc))
    for i, (src, _, cap) in enumerate(rng.sample(good, plan.exact_dup)):
        rel = _write(root, f"files/copy/{i:05d}.jpg", (root / src).read_bytes())
        add("exact_dup", rel, cap)
    for i, (_, img, cap) in enumerate(rng.sample(good, plan.near_dup)):
        rel = _write(root, f"files/near/{i:05d}.jpg", _near_copy(img, rng))
        add("near_dup", rel, cap)
    for i in range(plan.tiny):
        sc = scenes.random_scene(rng)
        rel = _write(root, f"files/tiny/{i:05d}.jpg", scenes.encode_jpeg(scenes.render(sc).resize((16, 16))))
        add("tiny", rel, scenes.caption(sc, rng))
    for i in range(plan.huge):
        # 9000x9000 of flat colour: a few hundred KB on the wire, 81 MP decoded.
        img = Image.new("RGB", (9000, 9000), scenes.BACKGROUNDS[i % len(scenes.BACKGROUNDS)])
        rel = _write(root, f"files/huge/{i:05d}.jpg", scenes.encode_jpeg(img, quality=50))
        add("huge", rel, "A very large plain image of a single colour.")
    for i in range(plan.elongated):
        sc = scenes.random_scene(rng)
        rel = _write(root, f"files/long/{i:05d}.jpg", scenes.encode_jpeg(scenes.render(sc).resize((640, 48))))
        add("elongated", rel, scenes.caption(sc, rng))
    for i in range(plan.truncated):
        data = (root / good[rng.randrange(len(good))][0]).read_bytes()
        rel = _write(root, f"files/truncated/{i:05d}.jpg", data[: len(data) // 2])
        add("truncated", rel, "A picture of a shape that was cut off in transfer.")
    for i in range(plan.random_bytes):
        rel = _write(root, f"files/random/{i:05d}.jpg", rng.randbytes(rng.randint(200, 4000)))
        add("random_bytes", rel, "A file that claims to be a picture of shapes.")
    for i in range(plan.html):
        rel = _write(root, f"files/html/{i:05d}.jpg", b"<!doctype html><html><body>Not an image</body></html>")
        add("html", rel, "A web page served where an image was expected.")
    for i in range(plan.short_caption):
        sc = scenes.random_scene(rng)
        rel = _write(root, f"files/short/{i:05d}.jpg", scenes.encode_jpeg(scenes.render(sc)))
        add("short_caption", rel, rng.choice(["", "img", "shapes", "photo 1"]))
    for i in range(plan.missing):
        add("missing", f"files/missing/{i:05d}.jpg", "A picture that is no longer online.")

    rng.shuffle(rows)  # interleave categories across raw shards
    _plant_eval_copies(root, seed, plan, rows)
    _plant_optouts(root, seed, plan, rows)
    table = pd.DataFrame(rows)
    table[["path", "caption", "qa"]].to_parquet(root / "image_text.parquet", index=False)
    table["eval_item"] = table["eval_item"] if "eval_item" in table.columns else None
    table[["path", "planted", "eval_item"]].to_parquet(root / "truth.parquet", index=False)

    docs = []
    for d in range(plan.documents):
        n_img = rng.randint(2, 4)
        items = [{"type": "text", "text": f"Document {d}: a set of {n_img} drawings of shapes."}]
        pictures = []
        for j in range(n_img):
            sc = scenes.random_scene(rng)
            pictures.append(sc)
            rel = _write(root, f"files/doc/{d:04d}_{j}.jpg", scenes.encode_jpeg(scenes.render(sc)))
            items.append({"type": "image", "path": rel})
            items.append({"type": "text", "text": f"Figure {j + 1} shows {scenes.caption(sc, rng)[0].lower()}{scenes.caption(sc, rng)[1:]}"})
        # multi-image questions (no draw from rng: the rest of the corpus stays as it was)
        docs.append({"doc_id": f"doc{d:04d}", "items": items, "qa": scenes.document_questions(pictures)})
    with open(root / "documents.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")

    videos = []
    for v in range(plan.videos):
        sc = scenes.random_scene(rng)
        direction = rng.choice(["left to right", "right to left", "top to bottom", "bottom to top"])
        obj = sc.objects[0]
        rel = _write(root, f"files/video/{v:04d}.mp4", _video_bytes(sc, direction))
        videos.append({"path": rel, "caption": f"A {obj.colour} circle moves from {direction}."})
    video_truth = [{"path": v["path"], "planted": "one_scene", "shots": [2.0], "cuts": [], "clip_starts": [],
                    "clip_ends": [], "keyframe_cuts": False} for v in videos]  # one scene: video_clips leaves it whole
    multi, multi_truth = _plant_multi_scene_videos(root, seed, plan)
    videos += multi
    pd.DataFrame(videos).to_parquet(root / "videos.parquet", index=False)
    pd.DataFrame(video_truth + multi_truth).to_parquet(root / "truth_videos.parquet", index=False)

    # The trusted set: fresh scenes with true captions, as a WebDataset tar, drawn from
    # their own random stream so the crawled corpus does not change with its size.
    trusted_rng = random.Random(seed + 1)
    samples = []
    for i in range(plan.trusted):
        sc = scenes.random_scene(trusted_rng, with_word=trusted_rng.random() < 0.1)
        samples.append((f"trusted{i:06d}", [("jpg", scenes.encode_jpeg(scenes.render(sc))),
                                            ("txt", scenes.caption(sc, trusted_rng).encode())]))
    (root / "trusted").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / "trusted" / "trusted-000000.tar", tar_bytes(samples))

    counts = table["planted"].value_counts().sort_index().to_dict()
    summary = {"params": params, "image_text_rows": len(table), "planted": counts,
               "documents": len(docs), "videos": len(videos), "multi_scene_videos": len(multi), "trusted": plan.trusted}
    atomic_write_text(stamp, json.dumps(summary, indent=2) + "\n")
    return summary
