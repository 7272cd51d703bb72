"""The `curate` command. Every user-fixable problem ends as one `curate: error: ...`
line and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import CurationError, InputError
from .kinds import names as kind_names


def _print_summary(summary: dict, out: Path, url: str | None = None) -> None:
    print()
    print(f"pipeline {summary['pipeline']} (config {summary['config_hash']}): {summary['raw_samples']} raw samples "
          f"in {summary['seconds']} s")
    print(f"{'stage':<8} {'status':<8} {'reason':<22} {'count':>7}")
    for r in summary["by_stage_status_reason"]:
        print(f"{r['stage']:<8} {r['status']:<8} {r['reason'] or '-':<22} {r['count']:>7}")
    print(f"ledger: {summary['ledger_rows']} inputs = "
          + " + ".join(f"{n} {s}" for s, n in _status_totals(summary).items()))
    print(f"{'tier':<20} {'samples':>8} {'shards':>7} {'MB':>8}")
    for tier, t in summary["tiers"].items():
        print(f"{tier:<20} {t['samples']:>8} {t['shards']:>7} {t['bytes'] / 1e6:>8.1f}")
    where = url or str(out)
    print(f"\noutput:  {where}")
    if url:
        print(f"  stage:   {out}  (the local folder the run worked in: query, plan, verify, report, export --root it)")
    print(f"  tiers:   {where}/tiers/<tier>/*.tar (+ .parquet sidecars, manifest.json)")
    print(f"  ledger:  {where}/ledger.parquet")
    print(f"  query:   curate query \"SELECT tier, count(*) FROM samples GROUP BY tier\" --root {out}")


def _status_totals(summary: dict) -> dict:
    totals: dict[str, int] = {}
    for r in summary["by_stage_status_reason"]:
        totals[r["status"]] = totals.get(r["status"], 0) + r["count"]
    return totals


def cmd_demo(args) -> None:
    from .demo.run import run_demo

    out = Path(args.out)
    summary = run_demo(out, small=args.small, ray_address=args.ray_address, samples_per_shard=args.samples_per_shard)
    _print_summary(summary, out / "curated")
    print(f"  report:  {summary['report']}")
    q = summary.get("clip_filter")
    if q:
        print(f"\nCLIP filter vs the planted mismatched captions: precision {q['precision']:.1%}, recall "
              f"{q['recall']:.1%} (chance precision {q['base_rate']:.1%}); score AUC true vs mismatched {q['auc']}")
    o = summary.get("optout_plants")
    if o:
        print("opt-out plants refused by their signal: " + ", ".join(
            f"{signal} {n['refused']}/{n['planted']}" for signal, n in o["signals"].items())
            + f"; other urls refused by an opt-out: {o['others_refused']}")
    print(f"\ndemo finished in {summary['demo_seconds']} s")


def cmd_crawl(args) -> None:
    from .crawl import ledger_name

    import inspect

    from .crawl.optout import OptOutPolicy
    from .kinds import kind_of

    options = dict(url_col=args.url_col, caption_col=args.caption_col, source=args.source,
                   allow_private=args.allow_private, allowed_networks=tuple(args.allow_network),
                   threads=args.threads, timeout=args.timeout, retries=args.retries, ray_address=args.ray_address,
                   processes=args.processes, require_images=args.require_images,
                   optout=OptOutPolicy(**{s: False for s in args.ignore_signal}))
    if args.samples_per_shard:  # else the kind's crawler's own default (500 image_text, 100 documents/video)
        options["samples_per_shard"] = args.samples_per_shard
    crawler = kind_of(args.kind).crawler()
    takes = inspect.signature(crawler).parameters  # each crawler takes the options that apply to it
    ledger = crawler(args.input, args.out, **{k: v for k, v in options.items() if k in takes})
    counts = ledger.fillna({"reason": "-"}).groupby(["status", "reason"]).size()
    print(f"\ncrawled {len(ledger)} urls into {args.out}")
    for (status, reason), n in counts.items():
        print(f"  {status:<8} {reason:<20} {n:>7}")
    attempts = json.loads((Path(args.out) / f"_SUCCESS-{args.kind}").read_text())["attempts"]
    print(f"attempts over all rounds (from the shards' _stats.json): {attempts['count']} in {attempts['shards']} "
          f"shards, {attempts['successes']} succeeded")
    print(f"crawl ledger: {Path(args.out) / ledger_name(args.kind)}")
    print("run the same command again to retry transient failures (successes are never refetched)")


def _memory_size(text: str) -> str:
    import re

    if not re.fullmatch(r"\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)", text.strip(), flags=re.I):
        raise argparse.ArgumentTypeError(f"not a memory size like 512MB or 4GB: {text!r}")
    return text.strip()


def cmd_run(args) -> None:
    from . import config
    from .publish import destination

    dest = destination(args.out, args.stage_dir, args.ray_address)  # what cannot work is refused before any work
    cfg = config.load(args.pipeline)  # every recipe mistake is reported before Ray or the runner is imported
    from .runner import run_pipeline
    from .inputs import InputOptions

    options = InputOptions(format=args.input_format, image_column=args.image_column, video_column=args.video_column,
                           text_column=args.text_column, url_column=args.url_column)
    summary = run_pipeline(cfg, args.input, args.out, ray_address=args.ray_address, memory_limit=args.memory_limit,
                           input_options=options, stage_dir=args.stage_dir)
    _print_summary(summary, dest.local, dest.url)


def cmd_export(args) -> None:
    from .publish import export

    result = export(args.format, args.root, args.out, tier=args.tier, stage=args.stage, pipeline=args.pipeline,
                    sampling_strategy=args.sampling_strategy, stage_dir=args.stage_dir)
    what = f"tier {args.tier}" if args.tier else f"stage {args.stage}"
    print(f"exported {result['records']} samples ({result['files']} media files) of {what} as {args.format}")
    for label, path in result["outputs"].items():
        print(f"  {label + ':':<22} {path}")
    print(f"  load with: {result['use']}")
    if "published" in result:
        print(f"  uploaded to: {result['published']['url']} (paths above are in its local stage folder)")
    for reason, n in result["left_out"].items():
        print(f"left out {n} sample(s): {reason}", file=sys.stderr)
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    skipped = result.get("skipped") or []
    if skipped:  # names from data that would leave --out, or samples that do not add up: never written
        print(f"skipped {len(skipped)} sample(s) or shard(s), nothing of them written:", file=sys.stderr)
        for s in skipped[:20]:
            print(f"  {s['shard']} {s['key'] or ''}: {s['reason']}", file=sys.stderr)
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more", file=sys.stderr)


def cmd_plan(args) -> None:
    from . import config
    from .catalog import find_run_root
    from .tiers.plan import format_bill, make_plan, write_plan

    run_root = find_run_root(args.root)
    # The recipe the run recorded (a run started from Python, or with operators of your
    # own, has no file to reload), unless --pipeline names one.
    plan = make_plan(config.for_output(run_root, args.pipeline), run_root)
    out = Path(args.out or run_root / "plan.json")
    write_plan(plan, out)
    print(format_bill(plan))
    print(f"\nplan: {out}  (visual tokens: AnyRes-Max-9 per single image, 729 per image in documents, "
          "196 per video frame up to 32; text tokens estimated at 4 characters each)")


def cmd_ops(args) -> None:
    from .ops import registry
    from .ops.base import describe_operator, plugin_errors

    ops = registry()
    for name, error in plugin_errors().items():
        print(f"curate: plugin {name} failed to import: {error}", file=sys.stderr)
    if args.name is None:
        for name in sorted(ops):
            info = describe_operator(ops[name])
            note = f"  from {info['module']}" if not info["module"].startswith("curation.") else ""
            print(f"{name}  ({info['kind']}, v{info['version']}){note}")
            if info["doc"]:
                print(f"    {_first_sentence(info['doc'])}")
            print("    options: " + (", ".join(_param_text(p) for p in info["params"]) or "none"))
        print(f"\n{len(ops)} operators; `curate ops NAME` shows one in full")
        return
    if args.name not in ops:
        raise CurationError(f"no operator {args.name!r}; operators are {', '.join(sorted(ops))}")
    info = describe_operator(ops[args.name])
    print(f"{info['name']}: {info['kind']} operator, version {info['version']} ({info['module']})")
    if info["doc"]:
        print()
        print(info["doc"])
    print("\noptions:")
    for p in info["params"] or [{"name": "(none)", "type": "", "default": None, "required": False}]:
        print(f"  {_param_text(p)}")
    if info["kind"] == "map":
        print(f"\napplies to kinds: {', '.join(info['kinds'])}")
        print(f"resources: {', '.join(f'{k}={v}' for k, v in info['resources'].items())}"
              f"{'' if info['fusable'] else ' (own actor pool)'}")
        print("writes: " + (", ".join(f"{c} ({t})" if t else c for c, t in info["outputs"].items()) or "status only"))
    else:
        print("\nruns in stage B over the whole run (status, reason, dup_of)")
    if info["requires"]:
        print(f"reads: {', '.join(info['requires'])}")


def _first_sentence(doc: str, limit: int = 110) -> str:
    text = " ".join(doc.split("\n\n")[0].split())
    sentence = text.split(". ")[0].rstrip(".") + "."
    return sentence if len(sentence) <= limit else sentence[: limit - 3].rstrip() + "..."


def _param_text(p: dict) -> str:
    if p["name"] == "(none)":
        return "(none)"
    return f"{p['name']}: {p['type']} (required)" if p["required"] else f"{p['name']}: {p['type']} = {p['default']!r}"


def cmd_recheck_optout(args) -> int:
    from .crawl.fetch import FetchPolicy
    from .crawl.recheck import recheck_optout

    policy = FetchPolicy(timeout=args.timeout, allow_private=args.allow_private,
                         allowed_networks=tuple(args.allow_network))
    result = recheck_optout(args.root, rules_path=args.rules, refetch=args.refetch, policy=policy)
    print(f"rechecked {result['checked']} kept samples ({result['mode']}): {result['removed']} removed")
    for reason, n in result["reasons"].items():
        print(f"  dropped  {reason:<32} {n:>7}")
    for shard in result["shards_rewritten"]:
        print(f"  rewrote  {shard}")
    if result["robots_unreachable_kept"]:
        print(f"  {result['robots_unreachable_kept']} samples kept although their robots.txt is unreachable now; "
              "run again later")
    return 0


def cmd_verify(args) -> int:
    from .tiers.verify import verify

    checked, problems = verify(args.root)
    for p in problems:
        print(f"MISMATCH {p}")
    if problems:
        print(f"{len(problems)} problem(s) in {checked} shards", file=sys.stderr)
        return 1
    print(f"OK: {checked} shards match their manifests and sidecars")
    return 0


def _trusted_shards(given: list[str]) -> list[Path]:
    shards: list[Path] = []
    for item in given:
        path = Path(item)
        found = sorted(path.glob("*.tar")) if path.is_dir() else sorted(Path().glob(item)) if any(c in item for c in "*?[") else [path]
        shards += [p for p in found if p.is_file()]
    if not shards:
        raise CurationError(f"no trusted shards found in {' '.join(given)} (give .tar files, globs or folders)")
    return shards


def cmd_train_filter(args) -> None:
    from .clipfilter import train_filter

    info = train_filter(_trusted_shards(args.shards), Path(args.out), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, log=lambda m: print(m, file=sys.stderr))
    m = info["metrics"]
    print(f"trained on {info['pairs']['train']} trusted pairs in {info['seconds']}s; held-out "
          f"{info['pairs']['held_out']} pairs: AUC {m['auc']}; calibrated min_score {m['min_score']} keeps "
          f"{1 - m['false_reject']:.0%} of matched pairs and rejects {m['mismatched_rejected']:.0%} of mismatched ones")
    print(f"model: {args.out}  (use it in a pipeline: - op: clip_score, model: {args.out}, min_score: calibrated)")


def cmd_train_captioner(args) -> None:
    from .captioner import train_captioner

    info = train_captioner(_trusted_shards(args.shards), Path(args.out), steps=args.steps, batch_size=args.batch_size,
                           seed=args.seed, log=lambda m: print(m, file=sys.stderr))
    m = info["metrics"]
    print(f"trained on {info['pairs']['train']} trusted pairs in {info['seconds']}s; held-out {info['pairs']['held_out']} "
          f"pairs: loss {m['loss']}, colour precision {m['colour_precision']}, shape precision {m['shape_precision']}, "
          f"whole description right {m['description_match']}")
    print(f"model: {args.out}  (use it in a pipeline: - op: caption, model: {args.out})")


def cmd_report(args) -> None:
    from .report import write_report

    print(write_report(args.root, out=args.out, train_runs=args.train))


def cmd_browse(args) -> None:
    from .browse import serve

    serve(args.root, host=args.host, port=args.port)


def cmd_query(args) -> None:
    import duckdb

    try:
        _run_query(args)
    except duckdb.Error as exc:  # DuckDB binds in sql() but executes on output
        raise CurationError(f"query failed: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    except OSError as exc:
        raise CurationError(f"cannot write {args.output}: {exc.strerror or exc}") from None


def _run_query(args) -> None:
    from .catalog import query

    rel = query(args.sql, args.root)
    if args.format == "table":
        rel.show(max_rows=args.max_rows, max_width=10_000)
        return
    if args.format == "parquet":
        if not args.output:
            raise CurationError("--format parquet needs --output FILE")
        import pyarrow.parquet as pq

        # Written here, not by DuckDB: the catalog's connection may not write files.
        pq.write_table(rel.to_arrow_table(), args.output)
        return
    frame = rel.df()
    target = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.format == "csv":
            frame.to_csv(target, index=False)
        else:
            frame.to_json(target, orient="records", lines=True, force_ascii=False)
            if not args.output:
                target.write("\n")
    finally:
        if args.output:
            target.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curate", description="Build VLM training data: crawl url lists, curate on Ray, "
                                "write WebDataset tiers, query everything with DuckDB.")
    p.add_argument("--version", action="version", version=f"curate {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="build, serve, crawl and curate the bundled demo corpus")
    d.add_argument("--out", default="shards/demo", help="output folder (default: shards/demo)")
    d.add_argument("--small", action="store_true", help="a few hundred samples instead of ~3,000")
    d.add_argument("--ray-address", help="use a running Ray cluster instead of starting Ray locally")
    d.add_argument("--samples-per-shard", type=int, default=500, help="raw shard size for the crawl (default 500)")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("crawl", help="url list (parquet, csv, jsonl or txt) -> raw shards + crawl ledger")
    c.add_argument("--input", required=True,
                   help="url list (image_text, video: parquet/csv/jsonl/txt) or documents (interleaved: jsonl/parquet)")
    c.add_argument("--out", required=True, help="folder for raw shards")
    c.add_argument("--kind", default="image_text", choices=list(kind_names()))
    c.add_argument("--url-col", help="url column (default: guessed, e.g. url or URL)")
    c.add_argument("--caption-col", help="caption column (default: guessed, e.g. caption or TEXT)")
    c.add_argument("--source", help="source name used in uids (default: the file's stem)")
    c.add_argument("--allow-private", action="store_true",
                   help="allow private, loopback and link-local addresses (refused by default)")
    c.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                   help="allow this private network only (repeatable), e.g. 127.0.0.1/32")
    c.add_argument("--ray-address", help="crawl with img2dataset's ray distributor on this cluster")
    c.add_argument("--processes", type=int, help="download processes (default: one per CPU)")
    c.add_argument("--threads", type=int, default=32, help="download threads (per process for image_text; default 32)")
    c.add_argument("--samples-per-shard", type=int, help="samples per raw shard (default 500, 100 for documents/video)")
    c.add_argument("--require-images", choices=["all", "any"], default="all",
                   help="interleaved: keep a document only if all (or any) of its images arrived (default all)")
    c.add_argument("--timeout", type=float, default=10, help="seconds per socket operation (default 10)")
    c.add_argument("--retries", type=int, default=2, help="retries of transient failures, with backoff (default 2)")
    c.add_argument("--ignore-signal", action="append", default=[], choices=["robots", "tdmrep", "ai_txt", "tdm_header"],
                   help="do not check this opt-out signal (repeatable; all are honoured by default)")
    c.set_defaults(func=cmd_crawl)

    r = sub.add_parser("run", help="run (or resume) a curation pipeline over raw shards")
    r.add_argument("pipeline", help="pipeline YAML file, or the name of a bundled recipe (demo, llava_onevision, video_clips)")
    r.add_argument("--input", required=True,
                   help="raw shards (.tar, .tar.gz, .tgz): a folder (searched recursively; curate crawl's --out), "
                        "a glob ('/data/**/*.tar'), a brace pattern ('/data/shard-{00000..00099}.tar'), or "
                        "s3://bucket/prefix/ (endpoint from AWS_ENDPOINT_URL); also Hugging Face parquet files "
                        "(a folder, glob or file), a datasets save_to_disk folder, or a folder of images/videos "
                        "with .txt/.caption/.json sidecars; see README, Bring your own data")
    from .inputs import INPUT_FORMATS

    r.add_argument("--input-format", choices=list(INPUT_FORMATS), default="auto",
                   help="how to read --input (default auto: save_to_disk markers -> hf-disk; any .tar -> webdataset, "
                        "its .parquet being listings; else .parquet -> parquet; else images/videos -> files)")
    r.add_argument("--image-column", help="parquet/hf-disk: the image column (HF Image struct, binary, or a list "
                                          "of them; default: found from the HF features, types and names)")
    r.add_argument("--video-column", help="parquet/hf-disk: the video column (HF Video struct or binary)")
    r.add_argument("--text-column", help="parquet/hf-disk: the text column (default: text, caption, txt, alt, ...)")
    r.add_argument("--url-column", help="parquet/hf-disk: the url column (default: url, image_url, ...); every "
                                        "other column goes into source_meta")
    r.add_argument("--out", required=True, help="output folder, or s3://bucket/prefix (worked on in --stage-dir, "
                                                "then uploaded); running again on it resumes")
    r.add_argument("--stage-dir", help="with --out s3://: the local folder the run works in (default: "
                                       "~/.cache/curation/stage/<hash of the url>; on a cluster, a shared filesystem)")
    r.add_argument("--ray-address", help="Ray cluster address (default: start Ray locally)")
    r.add_argument("--memory-limit", default="512MB", type=_memory_size,
                   help="memory for stage B's DuckDB, which runs in one Ray worker (it spills to OUT/_work beyond it), e.g. 512MB, 4GB")
    r.set_defaults(func=cmd_run)

    ex = sub.add_parser("export", help="export a tier or a training stage for another trainer "
                                       "(llava, sharegpt, messages, cauldron; see README, Exports)")
    from .tiers.export import FORMATS  # names only: the writers load when one runs

    ex.add_argument("format", choices=list(FORMATS),
                    help="llava: LLaVA-NeXT JSON + data YAML; sharegpt: LLaMA-Factory JSONL + dataset_info.json; "
                         "messages: chat messages + images (datasets ImageFolder, TRL); cauldron: nanoVLM parquet")
    ex.add_argument("--root", required=True, help="a `curate run` output (or a `curate demo` folder)")
    which = ex.add_mutually_exclusive_group(required=True)
    which.add_argument("--tier", help="export this tier, whole")
    which.add_argument("--stage", help="export this training stage's mix of tiers (the pipeline's stages:)")
    ex.add_argument("--out", required=True, help="folder for the data files and media (every path in them is relative), "
                                                 "or s3://bucket/prefix (written in --stage-dir, then uploaded)")
    ex.add_argument("--stage-dir", help="with --out s3://: the local folder the export is written in (default: "
                                        "~/.cache/curation/export/<hash of the url>)")
    ex.add_argument("--pipeline", help="with --stage: pipeline YAML with the stages (default: the one that made the output)")
    ex.add_argument("--sampling-strategy", help="llava --tier: written into the YAML (all, first:N, end:N, random:N)")
    ex.set_defaults(func=cmd_export)

    pl = sub.add_parser("plan", help="resolve the pipeline's training stages over an output; print the token bill")
    pl.add_argument("--root", required=True, help="a `curate run` output (or a `curate demo` folder)")
    pl.add_argument("--pipeline", help="pipeline YAML with `stages:` (default: the one that made the output)")
    pl.add_argument("--out", help="plan file to write (default: ROOT/plan.json)")
    pl.set_defaults(func=cmd_plan)

    o = sub.add_parser("ops", help="list the registered operators with their options (or show one in full)")
    o.add_argument("name", nargs="?", help="an operator's name: show its documentation, options and columns")
    o.set_defaults(func=cmd_ops)

    ro = sub.add_parser("recheck-optout", help="re-judge kept samples' opt-out evidence against new rules or a fresh "
                        "fetch; rewrite only the tier shards that lose samples, and the ledger")
    ro.add_argument("--root", required=True, help="a finished `curate run` output")
    how = ro.add_mutually_exclusive_group(required=True)
    how.add_argument("--rules", help="YAML/JSON rules file: hosts: {scheme://host: {robots, tdmrep, ai_txt}}")
    how.add_argument("--refetch", action="store_true", help="fetch robots.txt/tdmrep.json/ai.txt again (fetch policy)")
    ro.add_argument("--allow-private", action="store_true", help="--refetch: allow private addresses")
    ro.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                    help="--refetch: allow this private network only (repeatable)")
    ro.add_argument("--timeout", type=float, default=10, help="--refetch: seconds per socket operation (default 10)")
    ro.set_defaults(func=cmd_recheck_optout)

    v = sub.add_parser("verify", help="recheck every tier shard against its manifest (sha256, size, counts, order)")
    v.add_argument("--root", required=True, help="a `curate run` output (or a `curate demo` folder)")
    v.set_defaults(func=cmd_verify)

    tf = sub.add_parser("train-filter", help="train a small CLIP on trusted image-caption shards (DFN-style filter)")
    tf.add_argument("--shards", nargs="+", required=True,
                    help="trusted WebDataset tars (image + txt per sample): files, globs or folders")
    tf.add_argument("--out", required=True, help="model folder (open_clip local-dir: config, weights, calibration)")
    tf.add_argument("--epochs", type=int, default=12)
    tf.add_argument("--batch-size", type=int, default=64)
    tf.add_argument("--lr", type=float, default=2e-3)
    tf.add_argument("--seed", type=int, default=0)
    tf.set_defaults(func=cmd_train_filter)

    tc = sub.add_parser("train-captioner", help="train the tiny re-captioner on trusted image-caption shards")
    tc.add_argument("--shards", nargs="+", required=True, help="trusted WebDataset tars: files, globs or folders")
    tc.add_argument("--out", required=True, help="model folder (transformers: the caption operator loads it)")
    tc.add_argument("--steps", type=int, default=400)
    tc.add_argument("--batch-size", type=int, default=32)
    tc.add_argument("--seed", type=int, default=0)
    tc.set_defaults(func=cmd_train_captioner)

    from .trainer.cli import add_eval_parser, add_train_parser  # argparse only: no torch import here

    add_train_parser(sub)
    add_eval_parser(sub)

    rp = sub.add_parser("report", help="write report.html (one self-contained page: funnel, tiers, token bill, "
                        "distributions, thumbnails, throughput, training loss) for a run")
    rp.add_argument("--root", required=True, help="a `curate run` output (or a `curate demo` folder)")
    rp.add_argument("--out", help="HTML file to write (default: ROOT/report.html)")
    rp.add_argument("--train", action="append", default=[], metavar="DIR",
                    help="a `curate train --out` folder whose loss.jsonl to plot (repeatable; folders within two "
                         "levels of ROOT's parent that trained on ROOT/plan.json are found without it)")
    rp.set_defaults(func=cmd_report)

    br = sub.add_parser("browse", help="serve a local web app to filter and look at samples, ledger rows and media")
    br.add_argument("--root", required=True, help="a `curate run` output (or a `curate demo` folder)")
    br.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    br.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 picks a free one)")
    br.set_defaults(func=cmd_browse)

    q = sub.add_parser("query", help="SQL over samples, ledger and shards (DuckDB)")
    q.add_argument("sql")
    q.add_argument("--root", required=True, help="a `curate run` output (or a `curate demo` folder)")
    q.add_argument("--format", default="table", choices=["table", "csv", "json", "parquet"])
    q.add_argument("--output", help="write to this file instead of stdout (required for parquet)")
    q.add_argument("--max-rows", type=int, default=100, help="rows shown in table format")
    q.set_defaults(func=cmd_query)
    return p


# Commands whose output option is a local path only (run and export also take s3://).
LOCAL_OUTPUTS = {"demo": "out", "crawl": "out", "train-filter": "out", "train-captioner": "out", "report": "out",
                 "plan": "out", "query": "output"}


def _refuse_url_output(args) -> None:
    """An s3:// (or any scheme://) output given to a command that writes locally would
    become a folder named "s3:"; say so instead."""
    from .publish import url_scheme

    option = LOCAL_OUTPUTS.get(args.command)
    value = getattr(args, option, None) if option else None
    if value and url_scheme(value):
        raise InputError(f"--{option} {value}: curate {args.command} writes to a local path; object storage is for "
                         "`curate run --out s3://...` and `curate export --out s3://...` (or write locally and copy)")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network
    args = build_parser().parse_args(argv)
    try:
        _refuse_url_output(args)
        status = args.func(args)
    except CurationError as exc:
        one_line = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"curate: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curate: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
