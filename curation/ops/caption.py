"""Captioning / re-captioning with any transformers image-to-text model.

One loading path for a hub id or a local folder, through AutoModelForImageTextToText:
vision-encoder-decoder models (ViT + GPT-2 style; they take no prompt) and models whose
processor takes a text prompt (BLIP, GIT, LLaVA-style chat models; a chat template, when
the processor has one, wraps the prompt with the image placeholder).

The prompt is a template: with `ocr_context: true`, `{ocr}` is replaced by the row's
`ocr_text` (written by an earlier `ocr` operator), so the captioner can use the words in
the image. Rows without OCR text use `prompt_without_ocr` (default: the prompt with
`{ocr}` left empty). The prompt each row was captioned with is recorded.

Video rows are captioned per scene: the frame in the middle of each scene that the
`video_frames` operator found (the clip's middle frame when it did not run) is decoded
again from the mp4 and captioned. `scene_captions` holds
[{start, end, time, caption}], and `caption` the caption of the longest scene.

Outputs: `caption`, `caption_model` (the model as given + the hub revision or a sha256
of the local files, so a caption can be traced to exact weights), `caption_prompt`,
`scene_captions` (video rows only).

`build_tiny_captioner(path)` writes a tiny random-weight captioner (with its tokenizer
and image processor) for tests and offline demos: it runs the whole code path and
produces deterministic, meaningless captions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import pandas as pd
from PIL import Image

from ..errors import ConfigError
from ..kinds import kind_of
from ._media import row_image, video_bytes_of
from .base import MapOp, Resources, describe_error, register
from .frames import with_fallback

DTYPES = ("auto", "float32", "float16", "bfloat16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")  # weights, configs, vocabularies


def model_revision(model: str) -> str:
    """A string that pins the exact weights: sha256 over a local folder's files; for a
    hub model, the commit of the cached snapshot it was loaded from."""
    path = Path(model)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
            digest.update(f.relative_to(path).as_posix().encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        return f"sha256:{digest.hexdigest()[:16]}"
    from transformers.utils import cached_file

    snapshot = Path(cached_file(model, "config.json")).parent  # HF cache: .../snapshots/<commit>/
    return f"rev:{snapshot.name}" if snapshot.parent.name == "snapshots" else "rev:unknown"


class Captioner:
    """A loaded model with its processor: captions(images, prompts) -> texts."""

    def __init__(self, model: str, device: str, dtype: str, max_new_tokens: int, num_beams: int):
        import torch
        from transformers import (AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor,
                                  AutoTokenizer)

        self.torch = torch
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if dtype == "auto":  # half precision only where the hardware runs it fast
            dtype = "bfloat16" if self.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
        config = AutoConfig.from_pretrained(model)
        self.net = AutoModelForImageTextToText.from_pretrained(model, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.takes_prompt = config.model_type != "vision-encoder-decoder"
        if self.takes_prompt:
            self.processor = AutoProcessor.from_pretrained(model)
            self.tokenizer = self.processor.tokenizer
            self.tokenizer.padding_side = "left"  # decoder-only models continue from the right end
        else:
            self.processor = AutoImageProcessor.from_pretrained(model)
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.chat = getattr(self.processor, "chat_template", None) is not None
        self.dtype = getattr(torch, dtype)
        self.name = f"{model}@{model_revision(model)}"
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": False}

    def _text(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)

    def captions(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        if not self.takes_prompt:
            inputs = {"pixel_values": self.processor(images=images, return_tensors="pt").pixel_values}
        else:
            texts = [self._text(p) for p in prompts]
            if not any(texts):
                inputs = self.processor(images=images, return_tensors="pt")
            else:
                inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with self.torch.inference_mode():
            out = self.net.generate(**inputs, **self.generate_kwargs)
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        if "input_ids" in inputs:  # models that echo the prompt: keep only what follows it
            echoed = self.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
            texts = [t[len(e):] if e and t.startswith(e) else t for t, e in zip(texts, echoed)]
        return [" ".join(t.split()) for t in texts]


def _scene_frames(data: bytes, scenes_col) -> tuple[list[list[float]], list[float], list[Image.Image]]:
    """The middle frame of each scene (of the whole clip if scenes were not computed)."""
    def work(video):
        scenes = ([[s["start"], s["end"]] for s in scenes_col] if isinstance(scenes_col, list)
                  else [[0.0, round(video.end, 3)]])
        picked = [min(range(len(video.times)), key=lambda i: abs(video.times[i] - (a + b) / 2)) for a, b in scenes]
        frames = [Image.fromarray(f) for f in video.frames(picked)]
        return scenes, [round(float(video.times[i]), 3) for i in picked], frames

    return with_fallback(data, "auto", work)


@register
class Caption(MapOp):
    name = "caption"
    reasons = ("caption_input_error",)
    version = "1"
    kinds = ("image_text", "interleaved", "video")  # documents: their first image
    fusable = False  # a model: its own actor pool, built once per actor
    resources = Resources(num_cpus=0.5, num_gpus=0.5, batch_size=16)  # GPU share used only where GPUs exist
    outputs = ("caption", "caption_model", "caption_prompt", "scene_captions")

    @dataclasses.dataclass
    class Params:
        model: str = ""  # hub id or local folder
        prompt: str = ""  # ignored by vision-encoder-decoder models (they must get "")
        ocr_context: bool = False
        prompt_without_ocr: str | None = None
        max_ocr_chars: int = 200
        max_new_tokens: int = 30
        num_beams: int = 1  # 1 = greedy
        device: str = "auto"  # auto = cuda when available
        dtype: str = "auto"  # auto = bfloat16 on a GPU that has it, float32 otherwise
        videos: bool = True  # caption video rows per scene

    @classmethod
    def required(cls, params):
        return ("ocr_text",) if params.ocr_context else ()

    @classmethod
    def check_params(cls, params, where):
        def bad(msg):
            raise ConfigError(f"{where} (caption): {msg}")

        if not isinstance(params.model, str) or not params.model:
            bad("'model' (a hub id or a local folder) is required")
        for opt in ("ocr_context", "videos"):
            if not isinstance(getattr(params, opt), bool):
                bad(f"option '{opt}' must be true or false")
        if not isinstance(params.prompt, str) or not isinstance(params.prompt_without_ocr, (str, type(None))):
            bad("prompts must be strings")
        if ("{ocr}" in params.prompt) != params.ocr_context:
            bad("the prompt must contain {ocr} exactly when ocr_context is true")
        if params.prompt_without_ocr is not None and "{ocr}" in params.prompt_without_ocr:
            bad("prompt_without_ocr cannot contain {ocr}")
        if params.max_new_tokens < 1 or params.num_beams < 1 or params.max_ocr_chars < 0:
            bad("need max_new_tokens >= 1, num_beams >= 1, max_ocr_chars >= 0")
        if params.dtype not in DTYPES:
            bad(f"dtype must be one of {list(DTYPES)}")
        if params.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", params.device):
            bad("device must be auto, cpu, cuda or cuda:N")

    def __init__(self, params):
        super().__init__(params)
        self.captioner = Captioner(params.model, params.device, params.dtype, params.max_new_tokens, params.num_beams)
        if not self.captioner.takes_prompt and (params.prompt or params.prompt_without_ocr):
            raise ConfigError(f"caption: {params.model} is a vision-encoder-decoder model and takes no prompt")
        if not params.videos:
            self.kinds = ("image_text", "interleaved")

    def prompt_for(self, row: pd.Series) -> str:
        p = self.params
        if not p.ocr_context:
            return p.prompt
        if "ocr_text" not in row.index:
            raise ValueError("ocr_context needs the ocr operator earlier in the pipeline (no ocr_text column)")
        ocr = " ".join(str(row["ocr_text"] or "").split())[: p.max_ocr_chars] if pd.notna(row["ocr_text"]) else ""
        if not ocr:
            return p.prompt_without_ocr if p.prompt_without_ocr is not None else " ".join(p.prompt.replace("{ocr}", "").split())
        return p.prompt.replace("{ocr}", ocr)

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        # One flat list of (row, image, prompt) jobs; a row that cannot produce its
        # images fails alone and the rest are captioned together.
        jobs: list[tuple[object, Image.Image, str]] = []
        scenes: dict[object, tuple[list, list]] = {}
        for idx, row in live.iterrows():
            try:
                prompt = self.prompt_for(row)
                if kind_of(row["kind"]).part == "video":  # a clip: one caption per scene
                    spans, times, frames = _scene_frames(video_bytes_of(row), row.get("scenes"))
                    scenes[idx] = (spans, times)
                    jobs += [(idx, f, prompt) for f in frames]
                else:
                    jobs.append((idx, row_image(row), prompt))
            except Exception as exc:
                self.fail(live, [idx], "caption_input_error", describe_error(exc))
        texts = self._caption_all([j[1] for j in jobs], [j[2] for j in jobs])

        by_row: dict[object, list[str]] = {}
        for (idx, _, _), text in zip(jobs, texts):
            by_row.setdefault(idx, []).append(text)
        prompts = {idx: p for idx, _, p in jobs}
        captions, scene_captions = [], []
        for idx in live.index:
            found = by_row.get(idx)
            if found is None:
                captions.append(None)
                scene_captions.append(None)
            elif idx in scenes:
                spans, times = scenes[idx]
                longest = max(range(len(spans)), key=lambda i: spans[i][1] - spans[i][0])
                captions.append(found[longest])
                scene_captions.append([{"start": a, "end": b, "time": t, "caption": c}
                                       for (a, b), t, c in zip(spans, times, found)])
            else:
                captions.append(found[0])
                scene_captions.append(None)
        live["caption"], live["scene_captions"] = captions, scene_captions
        live["caption_prompt"] = [prompts.get(idx) for idx in live.index]
        live["caption_model"] = [self.captioner.name if idx in by_row else None for idx in live.index]
        return live

    def _caption_all(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        """Caption in groups of equal prompt length: no padding inside a group, so a
        caption does not depend on which other rows shared its batch."""
        tok = self.captioner.tokenizer
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            text = self.captioner._text(p)
            groups.setdefault(len(tok(text).input_ids) if text else 0, []).append(i)
        out: list[str] = [""] * len(images)
        for members in groups.values():
            for i, text in zip(members, self.captioner.captions([images[i] for i in members], [prompts[i] for i in members])):
                out[i] = text
        return out


# --------------------------------------------------------------------- tiny captioner
# Words of the demo captions (curation/demo/scenes.py) and sign words, so a tiny
# captioner trained or not speaks the demo's vocabulary.
_TINY_WORDS = ("a an the picture of image showing simple drawing sign that says above red green blue yellow "
               "purple orange circle square triangle on left right in middle and one two three shapes shape text "
               "open closed stop exit sale hotel parking cafe bakery library museum station pharmacy garden market "
               "school bridge harbor theater bank . , :").split()


def build_tiny_captioner(path: str | Path, arch: str = "vit-gpt2", seed: int = 0) -> Path:
    """Write a tiny random-weight captioner to `path` (no downloads): `vit-gpt2`
    (VisionEncoderDecoderModel, no prompt) or `blip` (BlipForConditionalGeneration with
    a BlipProcessor, takes a prompt). A large init range makes the random model's
    output depend visibly on the image and the prompt."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel,
                              ViTConfig, ViTImageProcessor)

    path = Path(path)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + list(_TINY_WORDS)))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[BOS]", eos_token="[SEP]")
    pad, bos, eos = vocab["[PAD]"], vocab["[BOS]"], vocab["[SEP]"]
    torch.manual_seed(seed)
    if arch == "vit-gpt2":
        encoder = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, initializer_range=0.5)
        decoder = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                             add_cross_attention=True, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                             initializer_range=0.5)
        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = bos, pad, eos
        model = VisionEncoderDecoderModel(config)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
        tokenizer.save_pretrained(path)
    elif arch == "blip":
        text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=128, bos_token_id=bos,
                    pad_token_id=pad, sep_token_id=eos, eos_token_id=eos, initializer_range=0.5)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=8, initializer_range=0.5)
        model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
        BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                      tokenizer=tokenizer).save_pretrained(path)
    else:
        raise ValueError(f"unknown tiny captioner arch {arch!r}: vit-gpt2 or blip")
    model.generation_config.max_length = None  # max_new_tokens from the operator decides
    model.save_pretrained(path)
    return path
