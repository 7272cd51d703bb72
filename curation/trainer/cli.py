"""`curate train` and `curate eval`. curation/cli.py adds these parsers to its own."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CurationError
from . import ARCHS, SIZES


def add_train_parser(subparsers) -> None:
    t = subparsers.add_parser("train", help="train the reference VLM on one stage of a plan (from `curate plan`)")
    t.add_argument("--plan", required=True, help="plan.json written by `curate plan`")
    t.add_argument("--arch", required=True, choices=ARCHS)
    t.add_argument("--size", default="tiny", choices=SIZES, help="model preset built from code (default tiny)")
    t.add_argument("--stage", help="plan stage to train (default: the first, i.e. alignment)")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    t.add_argument("--out", default="shards/train", help="run folder: checkpoint, loss.jsonl, loss.png; "
                   "running again on it resumes (default shards/train)")
    t.add_argument("--batch-size", type=int, default=16, help="samples per loader batch, packed into rows; a step takes "
                   "--grad-accum of them (default 16)")
    t.add_argument("--grad-accum", type=int, default=1,
                   help="loader batches per optimizer step: --batch-size x K samples per step, the loss averaged "
                   "over all their answer tokens (default 1)")
    t.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each LM decoder layer in the backward pass: less activation memory, more compute")
    t.add_argument("--attention", default="auto", choices=["auto", "flex", "documents", "dense"],
                   help="packed attention: flex (FlexAttention document mask, CUDA), documents (causal SDPA per "
                   "packed sample), dense (L x L mask); auto = flex on CUDA, documents on CPU")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    t.add_argument("--vision-lr-scale", type=float,
                   help="encoder learning rate as a fraction of --lr in full stages; 0 freezes it (default per "
                   "paper: llava 0.2, omnifusion/owl3/evlm 0 for a loaded encoder; 1 for a from-code one)")
    t.add_argument("--warmup", type=int, default=20, help="warm-up steps (default 20)")
    t.add_argument("--trainable", choices=["connector", "full"],
                   help="override what trains (default: connector in the plan's first stage, full model after)")
    t.add_argument("--init", help="start from the weights of another run folder (e.g. the previous stage)")
    t.add_argument("--vision", dest="vision_id", help="real encoder: timm:NAME, open_clip:NAME[@TAG], hf:ID, or a folder (open_clip, "
                   "e.g. the demo's models/clip-filter; transformers CLIP/SigLIP; timm)")
    t.add_argument("--lm", dest="lm_id", help="real LM (Qwen2-style): hub id or local path; its tokenizer too")
    t.add_argument("--max-len", type=int, help="tokens per packed row (default from --size)")
    t.add_argument("--vision-feature-layer", type=int,
                   help="encoder hidden state the llava/omnifusion/owl3 connectors read, counted as LLaVA does "
                   "(1 the first block, -1 the last); never the final norm (default -2)")
    t.add_argument("--cross-layers", help="evlm/owl3: 0-based LM layers with cross-/hyper-attention, e.g. 2,5,8 "
                   "(default derived from the LM's depth: owl3 every depth//4+1 from 1, evlm every other, max 8)")
    t.add_argument("--encoder-layers", help="evlm: 0-based encoder blocks whose features are merged, e.g. 5,12,19,26 "
                   "(default: up to 8 spread evenly over the encoder)")
    t.add_argument("--tiled", dest="omni_tiled", action="store_const", const=True,
                   help="omnifusion: encode a 2x2 grid of tiles plus the whole image (default: whole image)")
    t.add_argument("--workers", type=int, default=1, help="data loader worker processes (default 1)")
    t.add_argument("--threads", type=int, default=1,
                   help="CPU threads for compute (default 1; on a busy CPU more threads can be many times slower)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default 50)")
    t.add_argument("--no-resample", action="store_true",
                   help="split shards by node and worker, epoch by epoch, instead of resampling them")
    t.add_argument("--eval", action="store_true", help="evaluate on held-out samples when training ends")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)


def add_eval_parser(subparsers) -> None:
    e = subparsers.add_parser("eval", help="held-out loss per tier, answer accuracy and distractor resistance of a run")
    e.add_argument("--run", required=True, help="a `curate train` --out folder")
    e.add_argument("--plan", help="plan.json (default: the one the run trained on)")
    e.add_argument("--questions", type=int, default=300, help="held-out questions for accuracy (default 300)")
    e.add_argument("--distractors", default="0,1,3,7",
                   help="distractor counts, comma separated; empty for none (default 0,1,3,7)")
    e.add_argument("--distractor-questions", type=int, default=60, help="questions per distractor count (default 60)")
    e.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    e.set_defaults(func=cmd_eval)


def cmd_train(args) -> None:
    from .train import TrainOptions, train

    if args.steps < 1:
        raise CurationError("--steps must be at least 1")
    from .config import parse_layers

    names = ("vision_id", "lm_id", "max_len", "omni_tiled", "vision_feature_layer")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    layers = {"cross_layers": parse_layers(args.cross_layers, "--cross-layers"),
              "evlm_feature_layers": parse_layers(args.encoder_layers, "--encoder-layers")}
    if layers["cross_layers"] is not None and args.arch not in ("evlm", "owl3"):
        raise CurationError("--cross-layers is for --arch evlm or owl3")
    if layers["evlm_feature_layers"] is not None and args.arch != "evlm":
        raise CurationError("--encoder-layers is for --arch evlm")
    overrides.update({k: v for k, v in layers.items() if v is not None})
    opts = TrainOptions(plan=args.plan, out=args.out, arch=args.arch, size=args.size, stage=args.stage,
                        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        activation_checkpointing=args.activation_checkpointing, attention=args.attention,
                        lr=args.lr, vision_lr_scale=args.vision_lr_scale,
                        warmup=args.warmup, trainable=args.trainable, init=args.init, seed=args.seed,
                        workers=args.workers, resample=not args.no_resample, save_every=args.save_every,
                        threads=args.threads, progress=not args.no_progress, model_overrides=overrides)
    summary = train(opts)
    out = Path(args.out)
    print(f"trained {summary['step']} steps of {summary['stage']} ({summary['trainable']}) in {summary['seconds']} s; "
          f"last loss {summary['last_loss']:.4f}" if summary["last_loss"] is not None else "nothing left to train")
    print(f"  checkpoint: {out / 'checkpoint'}\n  loss log:   {out / 'loss.jsonl'}\n  loss curve: {out / 'loss.png'}")
    if args.eval:
        _run_eval(out, args.plan, questions=300, distractors=(0, 1, 3, 7), distractor_questions=60,
                  threads=args.threads)


def cmd_eval(args) -> None:
    counts = tuple(int(x) for x in args.distractors.split(",") if x.strip()) if args.distractors else ()
    _run_eval(Path(args.run), args.plan, args.questions, counts, args.distractor_questions, args.threads)


def _run_eval(run: Path, plan_path, questions, distractors, distractor_questions, threads) -> None:
    import torch

    from .data import load_plan
    from .eval import evaluate
    from .train import load_run

    torch.set_num_threads(max(1, threads))
    model, tok, state = load_run(run)
    plan = load_plan(plan_path or state["plan"])
    report = evaluate(model, tok, plan, run, questions, distractors, distractor_questions,
                      title=f"{state['arch']}/{state['size']} after {state['stage']}")
    print_eval(report)
    print(f"report: {run / 'eval.json'}" + (f", plot: {run / 'distractors.png'}" if distractors else ""))
    a = report["answers"]
    print(json.dumps({k: a.get(k) for k in ("accuracy", "interval", "chance", "grey", "shuffled", "minus_grey")}))


def _interval(r: dict) -> str:
    lo, hi = r["interval"]
    return f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def print_eval(report: dict) -> None:
    """The eval report as tables: held-out loss per tier and task; accuracy with its own,
    a grey and a shuffled image (95% Wilson intervals); the difference to grey and to
    shuffled (95% paired bootstrap); accuracy against distractors."""
    print("held-out loss (targets given away nowhere in their sequence):")
    print(f"  {'tier':<20} {'task':<9} {'loss':>8} {'tokens':>7}")
    for tier, tasks in report["held_out_loss"].items():
        for task, r in tasks.items():
            print(f"  {tier:<20} {task:<9} {r['loss']:>8.4f} {r['tokens']:>7}")
    a = report["answers"]
    if a.get("questions"):
        print(f"answer accuracy on {a['questions']} held-out questions (95% intervals), chance {a['chance']:.3f}:")
        print(f"  {'image':<9} {_interval(a)}")
        print(f"  {'grey':<9} {_interval(a['grey'])}")
        print(f"  {'shuffled':<9} {_interval(a['shuffled'])}")
        for name in ("minus_grey", "minus_shuffled"):
            d = a[name]
            print(f"  accuracy - {name[6:]:<8} {d['difference']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]")
        print(f"  {'question':<32} {'n':>4} {'image':>6} {'grey':>6} {'shuffled':>8} {'chance':>6}")
        for q, r in a["by_question"].items():
            print(f"  {q:<32} {r['n']:>4} {r['accuracy']:>6.3f} {r['grey']:>6.3f} {r['shuffled']:>8.3f} "
                  f"{r['chance']:>6.3f}")
    if report.get("distractors"):
        print("accuracy with N distractor images (target at a random place; same prompt layout for every N):")
        for n, r in report["distractors"].items():
            print(f"  N={n:<3} {_interval(r)}  chance {r['chance']:.3f}  (n={r['questions']})")


def main(argv: list[str] | None = None) -> int:
    """`python -m curation.trainer.cli train|eval ...`: the same commands without the rest of `curate`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="curate")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CurationError as exc:
        print(f"curate: error: {'; '.join(p.strip() for p in str(exc).splitlines() if p.strip())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
