"""Training: one plan stage at a time.

* What trains: the plan's first stage is alignment (the connector only: for omnifusion
  that includes its image start/end embeddings, for evlm/owl3 the cross-/hyper-attention
  blocks); later stages train the full model, the vision encoder at its paper's rate
  (config.STAGE_DEFAULTS: LLaVA-OneVision 0.2x, the others frozen; a from-code random
  encoder trains at 1x). `trainable=` and `vision_lr_scale=` override.
* Checkpoint = model, optimizer, scheduler, step and data position (batches consumed);
  running the same command again on the same --out resumes from it.
* Gradient accumulation (`grad_accum` K): each optimizer step backpropagates K loader
  batches (micro-batches of `batch_size` samples), each micro-batch's summed answer-token
  loss divided by the answer tokens of all K (on every rank), so the gradient is the one of
  a single batch of K x batch_size samples, whatever the packing.
* `activation_checkpointing` and `attention` are the model's engine settings (model.py, lm.py).
* One process on CPU; `torchrun --nproc-per-node N -m curation.cli train ...` gives DDP on
  GPUs (each rank streams its own shards), with bf16 autocast on GPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..errors import CurationError
from .config import ModelConfig, default_vision_lr_scale, model_config
from .data import TrainBatches, find_stage, load_plan, plan_texts, stage_sources, to_device
from .lm import resolve_backend
from .model import VLM
from .tokenizer import HFTokenizer, WordTokenizer, load_tokenizer, save_tokenizer


@dataclass
class TrainOptions:
    plan: str
    out: str
    arch: str = "llava"
    size: str = "tiny"
    stage: str | None = None  # default: the plan's first stage
    steps: int = 100
    batch_size: int = 16  # samples per loader batch (packed into rows of max_len tokens)
    grad_accum: int = 1  # loader batches per optimizer step
    activation_checkpointing: bool = False  # recompute decoder layers in backward (less memory, ~1/3 more compute)
    attention: str = "auto"  # packed attention backend (lm.py): auto | flex | documents | dense
    lr: float = 1e-3
    vision_lr_scale: float | None = None  # None: config.default_vision_lr_scale (per arch, stage, encoder)
    warmup: int = 20
    trainable: str | None = None  # "connector" | "full"; default from the stage's position in the plan
    init: str | None = None  # start from the weights of another run's checkpoint (the previous stage)
    seed: int = 0
    workers: int = 1  # DataLoader workers (0: load in the training process)
    shuffle_buffer: int = 200
    resample: bool = True
    save_every: int = 50
    threads: int = 1  # CPU threads for compute; more can be far slower on a busy machine (OpenMP spinning)
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)  # e.g. vision_id, lm_id, max_len


# ---------------------------------------------------------------- what trains

def trainable_mode(plan: dict, stage: dict, override: str | None) -> str:
    if override:
        if override not in ("connector", "full"):
            raise CurationError(f"--trainable must be connector or full, not {override!r}")
        return override
    return "connector" if stage is plan["stages"][0] else "full"


def set_trainable(model: VLM, mode: str) -> None:
    """Alignment trains the connector (which holds every new block); otherwise all of it."""
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "full" or name.startswith("connector."))


def make_optimizer(model: VLM, lr: float, vision_lr_scale: float) -> torch.optim.Optimizer:
    vision = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("vision.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("vision.")]
    groups = [{"params": rest, "lr": lr}]
    if vision and vision_lr_scale > 0:
        groups.append({"params": vision, "lr": lr * vision_lr_scale})
    elif vision:
        for p in vision:
            p.requires_grad_(False)
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def answer_tokens(batch: dict) -> int:
    """Tokens the loss is taken over (labels shifted by one, as model._loss does)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def accumulate_gradients(trained, micro_batches: list[dict], autocast=None, world_size: int = 1) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step, leaving in .grad the gradient
    of the mean answer-token loss over all of them (and over all ranks: DDP averages the
    ranks' gradients, hence the world_size factor). Returns (this rank's mean loss, its
    answer tokens)."""
    tokens = sum(answer_tokens(b) for b in micro_batches)
    device = micro_batches[0]["labels"].device
    total = torch.tensor(float(tokens), device=device)
    if world_size > 1:
        torch.distributed.all_reduce(total)
    total = total.clamp(min=1.0)
    loss_sum = 0.0
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        # DDP: all-reduce gradients once, after the last micro-batch
        sync = nullcontext() if last or not hasattr(trained, "no_sync") else trained.no_sync()
        with sync:
            with autocast or nullcontext():
                output = trained(batch)
            summed = output.token_loss.sum()
            (summed * world_size / total).backward()
        loss_sum += float(summed.detach())
    return loss_sum / max(1, tokens), tokens


# ---------------------------------------------------------------- building

def build_tokenizer(plan: dict, cfg: ModelConfig):
    return HFTokenizer(cfg.lm_id) if cfg.lm_id else WordTokenizer.build(plan_texts(plan))


def load_run(run_dir: str | Path, device="cpu"):
    """(model, tokenizer, state) of a run's checkpoint."""
    ckpt = Path(run_dir) / "checkpoint"
    if not (ckpt / "state.json").is_file():
        raise CurationError(f"no checkpoint in {run_dir} (expected {ckpt}/state.json)")
    state = json.loads((ckpt / "state.json").read_text())
    tok = load_tokenizer(ckpt / "tokenizer.json")
    model = VLM(ModelConfig.from_dict(state["config"]), tok.vocab_size, tok.image_id)
    model.load_state_dict(torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True))
    return model.to(device), tok, state


def save_checkpoint(out: Path, model: VLM, tok, optimizer, scheduler, state: dict) -> None:
    """Written beside the old one, then swapped in, so a crash never leaves half a checkpoint."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    save_tokenizer(tok, tmp / "tokenizer.json")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(old, ignore_errors=True)  # a kill inside the last save's cleanup may have left it
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(out: Path) -> None:
    """A kill between save_checkpoint's two renames leaves no checkpoint/: take the new one
    if it is complete (state.json is written last), else the old one."""
    final = out / "checkpoint"
    if (final / "state.json").is_file():
        return
    for candidate in (out / "checkpoint.tmp", out / "checkpoint.old"):
        if (candidate / "state.json").is_file():
            shutil.rmtree(final, ignore_errors=True)
            candidate.rename(final)
            return


# ---------------------------------------------------------------- the loop

def train(opts: TrainOptions, stop_after: int | None = None) -> dict:
    """Train one stage; returns a summary. `stop_after` ends the run early with a
    checkpoint, as an interruption would (used by the resume test)."""
    dist = _setup_distributed()
    device = torch.device(f"cuda:{dist['local_rank']}" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, opts.threads))
    plan = load_plan(opts.plan)
    stage = find_stage(plan, opts.stage)
    sources = stage_sources(plan, stage)
    mode = trainable_mode(plan, stage, opts.trainable)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(out)
    ckpt = out / "checkpoint"
    if opts.grad_accum < 1:
        raise CurationError("--grad-accum must be at least 1")
    attention = resolve_backend(opts.attention, device)
    identity = {"arch": opts.arch, "size": opts.size, "stage": stage["name"], "trainable": mode,
                "batch_size": opts.batch_size, "grad_accum": opts.grad_accum, "workers": opts.workers,
                "seed": opts.seed, "world_size": dist["world_size"], "steps": opts.steps}

    resume = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").is_file() else None
    torch.manual_seed(opts.seed)
    if resume:
        saved_identity = {"grad_accum": 1, **resume}  # checkpoints from before --grad-accum
        changed = {k: (saved_identity.get(k), v) for k, v in identity.items() if saved_identity.get(k) != v}
        if changed:
            detail = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise CurationError(f"{out} holds a run with other settings ({detail}); use another --out to start fresh")
        model, tok, _ = load_run(out)
        cfg = model.cfg
    else:
        if opts.init:
            model, tok, init_state = load_run(opts.init)
            if init_state["arch"] != opts.arch:
                raise CurationError(f"--init {opts.init} is a {init_state['arch']} model, not {opts.arch}")
            cfg = model.cfg
        else:
            cfg = model_config(opts.arch, opts.size, **opts.model_overrides)
            tok = build_tokenizer(plan, cfg)
            model = VLM(cfg, tok.vocab_size, tok.image_id)
    model.to(device)
    model.attention, model.activation_checkpointing = attention, opts.activation_checkpointing
    set_trainable(model, mode)
    vision_lr_scale = opts.vision_lr_scale if opts.vision_lr_scale is not None \
        else default_vision_lr_scale(opts.arch, mode, pretrained_encoder=cfg.vision_id is not None)
    optimizer = make_optimizer(model, opts.lr, vision_lr_scale)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, opts.warmup, opts.steps))
    step = batches_done = 0
    if resume:
        saved = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, batches_done = resume["step"], resume["batches_done"]

    trained = model
    if dist["world_size"] > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    batches = TrainBatches(sources, cfg, tok, model.vision.mean, model.vision.std, opts.batch_size, seed=opts.seed,
                           skip_batches=batches_done, shuffle_buffer=opts.shuffle_buffer, resample=opts.resample)
    loader = DataLoader(batches, batch_size=None, num_workers=opts.workers,
                        prefetch_factor=4 if opts.workers else None, pin_memory=device.type == "cuda")
    is_main = dist["rank"] == 0
    log_path = out / "loss.jsonl"
    if is_main:
        _truncate_log(log_path, step)
    counts = {n: sum(p.numel() for p in model.parameters() if p.requires_grad == t)
              for n, t in (("trainable_params", True), ("frozen_params", False))}
    if is_main:
        print(f"{opts.arch}/{opts.size} stage {stage['name']} ({mode}, encoder lr x{vision_lr_scale:g}): "
              f"{counts['trainable_params']:,} trainable, "
              f"{counts['frozen_params']:,} frozen parameters; {opts.batch_size} x {opts.grad_accum} samples "
              f"per step, {attention} attention{', activation checkpointing' * opts.activation_checkpointing}; "
              + (f"resuming at step {step}" if step else "from scratch"))

    from tqdm import tqdm

    bar = tqdm(total=opts.steps, initial=step, disable=not (is_main and opts.progress), desc="train", unit="step")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _no_autocast()
    started, last = time.time(), None
    trained.train()
    micro_batches: list[dict] = []
    with open(log_path, "a") if is_main else open(os.devnull, "w") as log:
        for batch in loader:
            if step >= opts.steps or (stop_after is not None and step >= stop_after):
                break
            micro_batches.append(to_device(batch, device))
            if len(micro_batches) < opts.grad_accum:
                continue
            last, _ = accumulate_gradients(trained, micro_batches, autocast, dist["world_size"])
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            batches_done += len(micro_batches)
            log.write(json.dumps({"step": step, "loss": round(last, 5), "lr": scheduler.get_last_lr()[0],
                                  "samples": sum(len(b["samples"]) for b in micro_batches),
                                  "tokens": sum(int((b["segment_ids"] > 0).sum()) for b in micro_batches),
                                  "seconds": round(time.time() - started, 3)}) + "\n")
            micro_batches = []
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3f}")
            if is_main and (step % opts.save_every == 0 or step == opts.steps or step == stop_after):
                save_checkpoint(out, model, tok, optimizer, scheduler,
                                {**identity, "step": step, "batches_done": batches_done, "config": cfg.to_dict(),
                                 "plan": str(Path(opts.plan).resolve())})
    bar.close()
    if is_main:
        plot_losses(log_path, out / "loss.png", f"{opts.arch}/{opts.size} {stage['name']}")
    if dist["world_size"] > 1:
        torch.distributed.destroy_process_group()
    return {"out": str(out), "step": step, "last_loss": last, "seconds": round(time.time() - started, 1),
            "stage": stage["name"], "trainable": mode, **counts}


def _setup_distributed() -> dict:
    world = int(os.environ.get("WORLD_SIZE", 1))
    info = {"world_size": world, "rank": int(os.environ.get("RANK", 0)),
            "local_rank": int(os.environ.get("LOCAL_RANK", 0))}
    if world > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(info["local_rank"])
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return info


class _no_autocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def plot_losses(log_path: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    window = max(1, len(rows) // 20)
    smooth = [sum(chunk) / len(chunk) for chunk in (losses[max(0, i - window + 1):i + 1] for i in range(len(losses)))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="answer-token loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
