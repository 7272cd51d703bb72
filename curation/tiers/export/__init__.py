"""`curate export FORMAT`: a tier, or a training stage's mix of tiers, as another
trainer's data.

  llava     LLaVA-NeXT conversation JSON + data YAML (llava.py)
  sharegpt  LLaMA-Factory sharegpt JSONL + its dataset_info.json entry (sharegpt.py)
  messages  chat `messages` + images, a `datasets` ImageFolder that TRL reads (messages.py)
  cauldron  nanoVLM's Cauldron/FineVision parquet, images inside (cauldron.py)

A stage comes from the pipeline's `stages:` (the one that made the run unless
--pipeline names another). llava writes each tier whole and puts the stage's strategies
in its YAML, which LLaVA-NeXT applies when it loads; the other formats hold no strategy,
so they get exactly the samples `curate plan` selects (tiers/plan.py).

Reading the tiers, the safety rules and the conversation built for each sample live in
core.py; each format's module only lays a sample out. Modules load lazily, so the CLI's
parser stays light.
"""

from __future__ import annotations

import importlib
from pathlib import Path

FORMATS = {"llava": ("llava", "LlavaWriter"), "sharegpt": ("sharegpt", "SharegptWriter"),
           "messages": ("messages", "MessagesWriter"), "cauldron": ("cauldron", "CauldronWriter")}


def export(fmt: str, root: str | Path, out: str | Path, *, tier: str | None = None, stage: str | None = None,
           pipeline: str | Path | None = None, sampling_strategy: str | None = None) -> dict:
    """Export one tier or one stage. Returns records and media counts, what was written
    (`outputs`), how to load it (`use`), the samples skipped as unsafe or inconsistent
    (`skipped`, never written), the ones the format cannot hold (`left_out`) and `notes`."""
    from ...catalog import find_run_root
    from ...config import STRATEGY
    from ...errors import InputError
    from .core import SAFE_NAME, shown, tier_manifest

    if fmt not in FORMATS:
        raise InputError(f"unknown export format {shown(fmt)}; formats are {sorted(FORMATS)}")
    if (tier is None) == (stage is None):
        raise InputError("name exactly one of --tier or --stage")
    run_root = find_run_root(root)
    notes: list[str] = []
    if tier is not None:
        tier_manifest(run_root, tier)  # the name and the tier are checked before anything is written
        name, parts = tier, [(tier, None)]
        mixture = [(tier, sampling_strategy or "all")]
        if fmt != "llava" and sampling_strategy not in (None, "all"):
            raise InputError(f"--sampling-strategy goes into llava's data YAML; {fmt} has none (export a --stage "
                             "to get a stage's sampled mix)")
        if not STRATEGY.match(mixture[0][1]) or mixture[0][1].startswith("balanced:"):
            raise InputError(f"--sampling-strategy {shown(sampling_strategy)} must be all, first:N, end:N or random:N "
                             "(balanced:t is a stage strategy: export the --stage)")
    else:
        if sampling_strategy is not None:
            raise InputError("--sampling-strategy is for --tier; a stage's strategies come from the pipeline's stages:")
        cfg = _pipeline(run_root, pipeline)
        chosen = next((s for s in cfg.stages if s.name == stage), None)
        if chosen is None:
            raise InputError(f"no stage {shown(stage)} in {cfg.path}; stages are {[s.name for s in cfg.stages]}")
        if ".." in stage or not SAFE_NAME.match(stage):  # it names the export's files
            raise InputError(f"stage name {shown(stage)} cannot name a file (letters, digits, _ . -)")
        name = stage
        mixture = [(m.tier, m.strategy) for m in chosen.mix]
        for t in dict.fromkeys(t for t, _ in mixture):
            made_by = tier_manifest(run_root, t)[1].get("config_hash")
            if made_by != cfg.config_hash:
                notes.append(f"tier {t} was made by config {made_by}, the pipeline read is {cfg.config_hash} "
                             f"({cfg.path}); the stage is taken as that pipeline describes it")
        balanced = [t for t, s in mixture if s.startswith("balanced:")]
        if fmt == "llava" and not balanced:
            parts = [(t, None) for t in dict.fromkeys(t for t, _ in mixture)]
        elif fmt == "llava":
            # LLaVA-NeXT's YAML has no balanced:t: such a tier's json holds the plan's
            # selection, read whole (`all`); so it may appear once in the stage.
            if len(balanced) != len(set(balanced)) or any(t in balanced for t, s in mixture
                                                           if not s.startswith("balanced:")):
                raise InputError(f"stage {shown(stage)}: a tier with a balanced:t strategy must appear once in the "
                                 "stage for a llava export")
            from ..plan import make_plan

            plan = next(s for s in make_plan(cfg, run_root)["stages"] if s["name"] == stage)
            selected = {m["tier"]: m["shards"] for m in plan["mix"] if m["strategy"].startswith("balanced:")}
            parts = [(t, selected.get(t)) for t in dict.fromkeys(t for t, _ in mixture)]
            notes += [f"tier {t}: {s} has no LLaVA-NeXT equivalent; {t}.json holds the plan's selection, sampled 'all'"
                      for t, s in mixture if s.startswith("balanced:")]
            mixture = [(t, "all" if s.startswith("balanced:") else s) for t, s in mixture]
        else:
            from ..plan import make_plan

            plan = next(s for s in make_plan(cfg, run_root)["stages"] if s["name"] == stage)
            parts = [(m["tier"], m["shards"]) for m in plan["mix"]]
    module, cls = FORMATS[fmt]
    writer_cls = getattr(importlib.import_module(f".{module}", __name__), cls)
    out = Path(out)
    try:
        writer = writer_cls(out, name, mixture) if fmt == "llava" else writer_cls(out, name)
        result = _run(writer, run_root, parts, out)
    except OSError as exc:
        raise InputError(f"cannot export to {out}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")) from None
    result.update(format=fmt, name=name, notes=notes)
    return result


def export_llava(root: str | Path, tier: str, out: str | Path, sampling_strategy: str = "all") -> dict:
    """One tier as LLaVA-NeXT data (`curate export llava --tier`)."""
    return export("llava", root, out, tier=tier, sampling_strategy=sampling_strategy)


def _pipeline(run_root: Path, pipeline):
    from ... import config
    from ...errors import ConfigError

    cfg = config.for_output(run_root, pipeline)  # the recipe the run recorded, unless --pipeline names one
    if not cfg.stages:
        raise ConfigError(f"{cfg.path} defines no 'stages'; add stages: [{{name, mix: [{{tier, strategy}}]}}]")
    return cfg


def _run(writer, run_root: Path, parts: list, out: Path) -> dict:
    """Every selected sample through the writer: media written first (each file once,
    never one file for two samples), then its record."""
    from .core import read_tier, shown, write_media

    skipped: list[dict] = []
    left_out: dict[str, int] = {}
    owners: dict[Path, tuple[str, str]] = {}
    records = files = 0
    try:
        for tier, selection in parts:
            for sample in read_tier(run_root, tier, selection, writer.media_root, skipped):
                if sample.of_kind.part == "video" and not writer.holds_video:
                    reason = f"{sample.kind}: the {writer.format} format holds images only"
                    left_out[reason] = left_out.get(reason, 0) + 1
                    continue
                owner = (sample.tier, sample.key)  # a stage may list a sample twice; that is one file
                if any(owners.get(m.target, owner) != owner for m in sample.media if m.target is not None):
                    skipped.append({"shard": sample.shard, "key": shown(sample.key),
                                    "reason": "its file names repeat an earlier sample's"})
                    continue
                for m in sample.media:
                    if m.target is not None and m.target not in owners:
                        write_media(m.target, m.data, writer.media_root)
                        owners[m.target] = owner
                files += len(sample.media)
                writer.add(sample)
                records += 1
        result = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return {"records": records, "files": len(owners) if writer.media_root is not None else files,
            "skipped": skipped, "left_out": left_out, **result}
