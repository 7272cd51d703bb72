"""The Python API: `import curation` stays light; a pipeline built from Python objects
is checked as YAML is; an operator of the user's own module adds a typed column that a
real run (local Ray, in a child process as a user's script) writes to its sidecars and
DuckDB reads back; `curate plan` works on that run without the user's module; `curate
ops` lists the operators with their options."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

import curation
from curation import config, schemas
from curation.errors import ConfigError
from curation.ops import MapOp, register
from curation.ops.base import SystematicError

from .conftest import REPO, curate
from .rawgen import CHEAP_RECIPE, write_raw_shards


# ---------------------------------------------------------------- an operator of our own
@register
class GreenShare(MapOp):
    """Share of pixels whose green channel dominates (a test operator)."""

    name = "test_green_share"
    outputs = {"green_share": "float", "green_pixels": "int"}
    kinds = ("image_text",)
    reasons = ("too_green",)  # the report's funnel places its drops at this operator

    @dataclasses.dataclass
    class Params:
        max_share: float = 1.0

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        live["green_share"] = [0.25] * len(live)
        live["green_pixels"] = [np.int64(7)] * len(live)
        self.drop(live, live["green_share"] > self.params.max_share, "too_green")
        return live


class WritesText(GreenShare):
    name = "test_writes_text"  # not registered: only called directly

    def process(self, live):
        live["green_share"] = ["a lot"] * len(live)
        return live


def _batch(n: int) -> pd.DataFrame:
    return pd.DataFrame({"uid": [f"{i:016x}" for i in range(n)], "kind": ["image_text"] * n, "status": ["kept"] * n,
                         "reason": [None] * n, "error": [None] * n})


# ---------------------------------------------------------------- import and building
def test_import_curation_loads_neither_ray_nor_torch():
    code = ("import sys, curation; curation.Pipeline; curation.PipelineConfig; "
            "print(sorted(m for m in ('ray', 'torch', 'open_clip', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert set(curation.__all__) >= {"load_pipeline", "run", "crawl", "connect", "plan", "export", "Pipeline"}


def test_a_pipeline_from_python_objects_is_the_yaml_pipeline():
    """Every op form (name, (name, options), class, instance) gives the recipe the YAML
    gives: same operators, tiers, shard policy and config hash."""
    from curation.ops.image import ImageQuality

    yaml_cfg = config.parse(__import__("yaml").safe_load(CHEAP_RECIPE.format(max_samples=20)), "cheap.yaml")
    cfg = curation.Pipeline(
        name="cheap", seed=3,
        ops=["decode_image", config.registry()["perceptual_hash"], ImageQuality(ImageQuality.Params(min_side=16)),
             ("caption_length", {"min_words": 2}), {"op": "exact_dedup"}, ("near_dedup", {"max_hamming": 4})],
        tiers=[("wide", "width > height"), config.TierRule("rest", "true")], shard=config.ShardPolicy(max_samples=20))
    assert cfg.config_hash == yaml_cfg.config_hash
    assert cfg.describe() == yaml_cfg.describe()
    staged = curation.Pipeline(name="cheap", ops=["decode_image"], tiers=[("wide", "width > height")],
                               stages=[config.Stage("s", (config.MixEntry("wide", "first:10"),))])
    assert staged.stages == (config.Stage("s", (config.MixEntry("wide", "first:10"),)),)
    assert config.PipelineConfig.from_dict(yaml_cfg.describe() | {"ops": [
        {k: v for k, v in o.items() if k != "version"} for o in yaml_cfg.describe()["ops"]]}).config_hash == cfg.config_hash


@pytest.mark.parametrize("ops, tiers, message", [
    (["decode_image", ("image_quality", {"min_sides": 3})], [("all", "true")], r"unknown option\(s\) \['min_sides'\]"),
    (["decode_image", ("caption_length", {"min_words": "3"})], [("all", "true")], "option 'min_words' must be an integer"),
    (["perceptual_hash"], [("all", "true")], "the first operator must be decode_image"),
    (["decode_image", WritesText], [("all", "true")], "WritesText is not registered"),
    (["decode_image", ("caption_length",)], [("all", "true")], r"a tuple must be \(operator, \{option: value\}\)"),
    (["decode_image", 3.5], [("all", "true")], "expected an operator name, class, instance"),
    (["decode_image"], [("green", "green_share > 0.2")], 'column "green_share" not found'),
])
def test_a_python_pipeline_is_checked_as_yaml_is(ops, tiers, message):
    with pytest.raises(ConfigError, match=message):
        curation.Pipeline(name="p", ops=ops, tiers=tiers)


def test_declared_columns_extend_only_this_runs_sidecar_contract():
    cfg = curation.Pipeline(name="p", ops=["decode_image", GreenShare], tiers=[("green", "green_share >= 0.2"), ("rest", "true")])
    assert cfg.declared_columns == (("green_share", "number"), ("green_pixels", "integer"))
    assert cfg.describe()["columns"] == {"green_share": "number", "green_pixels": "integer"}
    extended = schemas.arrow_schema("sidecar", cfg.declared_columns)
    assert [str(extended.field(c).type) for c in ("green_share", "green_pixels")] == ["double", "int64"]
    # The built-in contract is what it was.
    assert "green_share" not in schemas.columns("sidecar")
    assert schemas.arrow_schema("sidecar").names == list(schemas.load("sidecar")["properties"])
    row = {"uid": "0123456789abcdef", "kind": "image_text", "source": "s", "status": "kept", "tier": "t",
           "shard": "t-000000.tar", "key": "k", "sha256": "a" * 64, "width": 4, "height": 4, "pipeline": "p",
           "config_hash": "b" * 16, "op_versions": {}, "green_share": 0.5, "green_pixels": None}
    assert schemas.to_table("sidecar", [row], cfg.declared_columns).column("green_share").to_pylist() == [0.5]
    with pytest.raises(schemas.SchemaViolation, match="green_share"):
        schemas.validate_rows("sidecar", [{**row, "green_share": "high"}], cfg.declared_columns)
    with pytest.raises(schemas.SchemaViolation, match=r"at \(row\)"):  # without the declaration it is unknown
        schemas.validate_rows("sidecar", [row])


@pytest.mark.parametrize("outputs, message", [
    ({"score": "floaty"}, "has type 'floaty'"),
    ({"Bad-Name": "float"}, "must be lowercase letters"),
    ({"width": "str"}, "built-in sidecar column of type integer"),
])
def test_a_bad_column_declaration_fails_where_the_class_is_registered(outputs, message):
    cls = type("Declares", (MapOp,), {"name": "test_declares", "outputs": outputs, "process": lambda self, live: live})
    with pytest.raises(ConfigError, match=message):
        register(cls)
    assert "test_declares" not in config.registry()


def test_a_declared_name_the_job_uses_or_two_types_for_one_column_is_refused():
    raw_key = register(type("RawKey", (MapOp,), {"name": "test_raw_key", "outputs": {"raw_key": "str"}}))
    other = register(type("OtherGreen", (MapOp,), {"name": "test_other_green", "outputs": {"green_share": "str"}}))
    with pytest.raises(ConfigError, match="'raw_key', a name the job uses for itself"):
        curation.Pipeline(name="p", ops=["decode_image", raw_key], tiers=[("all", "true")])
    with pytest.raises(ConfigError, match="declares the column 'green_share' as string, but test_green_share declares it as number"):
        curation.Pipeline(name="p", ops=["decode_image", GreenShare, other], tiers=[("all", "true")])


def test_values_of_a_declared_column_are_checked_row_by_row():
    done = GreenShare(GreenShare.Params())(_batch(3))
    assert done["green_share"].tolist() == [0.25] * 3 and done["green_pixels"].tolist() == [7] * 3
    assert type(done["green_pixels"].iloc[0]) is int  # numpy scalars become what the type holds
    few = WritesText(WritesText.Params())(_batch(3))
    assert (few["status"] == "failed").all() and (few["reason"] == "test_writes_text_error").all()
    assert "wrote 'a lot' (a string) to column 'green_share', which it declares as number" in few["error"].iloc[0]
    with pytest.raises(SystematicError):  # the same mistake on a whole batch is a bug: stop once
        WritesText(WritesText.Params())(_batch(8))


def test_a_recorded_recipe_reads_back_with_the_same_hash(tmp_path):
    cfg = curation.Pipeline(name="p", ops=["decode_image", GreenShare], tiers=[("green", "green_share >= 0.2")],
                            stages=[{"name": "s", "mix": [{"tier": "green", "strategy": "random:50%"}]}])
    work = tmp_path / "_work"
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"config_hash": cfg.config_hash, "recipe": cfg.describe()}))
    recorded = config.for_output(tmp_path)
    assert (recorded.config_hash, recorded.stages, recorded.tiers, recorded.seed) == (cfg.config_hash, cfg.stages, cfg.tiers, cfg.seed)
    (work / "run.json").write_text(json.dumps({"config_hash": cfg.config_hash, "recipe": {**cfg.describe(), "seed": 9}}))
    with pytest.raises(ConfigError, match="recorded recipe hashes to"):
        config.for_output(tmp_path)
    (work / "run.json").write_text(json.dumps({"config_hash": "x", "pipeline_path": str(tmp_path / config.PYTHON_PATH)}))
    with pytest.raises(curation.errors.InputError, match="name the pipeline with --pipeline"):
        config.for_output(tmp_path)


# ---------------------------------------------------------------- curate ops
def test_curate_ops_lists_every_operator_with_its_options():
    out = curate("ops").stdout
    for name in ("decode_image", "image_quality", "caption_length", "clip_score", "exact_dedup", "near_dedup"):
        assert f"\n{name}  (" in "\n" + out
    assert "min_side: int = 32" in out and "max_aspect_ratio: float = 4.0" in out
    assert "max_hamming: int = 6" in out
    assert "min_score: float | 'calibrated' | None = None" in out
    assert "Drop images that are too small, too large or too elongated to train on." in out
    one = curate("ops", "clip_score").stdout
    assert "clip_score: map operator, version 1" in one and "keep_embeddings: bool = False" in one
    assert "writes: clip_score (number), clip_model (string), clip_embedding" in one
    proc = curate("ops", "no_such_op", check=False)
    assert proc.returncode == 2 and "no operator 'no_such_op'" in proc.stderr


def test_an_installed_plugin_module_registers_its_operators(tmp_path):
    """A package that names its module under the curation.ops entry point group is
    imported by the registry: `curate ops` lists its operator and declared columns."""
    (tmp_path / "plugin_ops.py").write_text(textwrap.dedent('''
        import dataclasses
        from curation.ops import MapOp, register

        @register
        class Sharpness(MapOp):
            """Laplacian variance of the thumbnail."""
            name = "plugin_sharpness"
            outputs = {"sharpness": "float"}

            @dataclasses.dataclass
            class Params:
                min_sharpness: float = 0.0

            def process(self, live):
                return live
    '''))
    dist = tmp_path / "plugin_ops-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-ops\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[curation.ops]\nsharpness = plugin_ops\nbroken = plugin_missing_module\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = curate("ops", "plugin_sharpness", env=env)
    assert "from plugin_ops" not in proc.stdout and "(plugin_ops)" in proc.stdout
    assert "min_sharpness: float = 0.0" in proc.stdout and "writes: sharpness (number)" in proc.stdout
    assert "plugin broken = plugin_missing_module failed to import: ModuleNotFoundError" in proc.stderr


# ---------------------------------------------------------------- one real run
USER_MODULE = '''
"""An operator of the user's own: the share of strongly green pixels."""
import dataclasses

import numpy as np

from curation.ops import MapOp, register
from curation.ops.image import images_of


@register
class GreenShare(MapOp):
    """Share of pixels whose green channel beats red and blue by 40."""

    name = "green_share"
    outputs = {"green_share": "float", "green_pixels": "int"}
    kinds = ("image_text",)
    reasons = ("too_green",)
    fusable = False  # its own actor pool: the columns cross into the next stage as Arrow

    @dataclasses.dataclass
    class Params:
        max_share: float = 0.9

    def process(self, live):
        shares, counts = [], []
        for image in images_of(live):
            rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
            green = (rgb[..., 1] - np.maximum(rgb[..., 0], rgb[..., 2])) > 40
            shares.append(float(green.mean()))
            counts.append(int(green.sum()))
        live["green_share"] = shares
        live["green_pixels"] = counts
        self.drop(live, live["green_share"] > self.params.max_share, "too_green")
        return live
'''

USER_SCRIPT = '''
import json, sys
import curation
from green_ops import GreenShare

cfg = curation.Pipeline(
    name="green", seed=3,
    ops=["decode_image", "perceptual_hash", GreenShare(GreenShare.Params(max_share=0.3)),
         ("image_quality", {"min_side": 16}), ("caption_length", {"min_words": 2}), "exact_dedup"],
    tiers=[("greenish", "green_share >= 0.05"), ("rest", "true")],
    stages=[{"name": "warmup", "mix": [{"tier": "greenish", "strategy": "all"}, {"tier": "rest", "strategy": "random:50%"}]}],
    shard={"max_samples": 40})
summary = curation.run(cfg, sys.argv[1], sys.argv[2])
con = curation.connect(sys.argv[2])
types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE samples)").fetchall())
rows = con.sql("SELECT tier, shard, key, green_share, green_pixels FROM samples ORDER BY shard, key").fetchall()
ledger = dict(con.sql("SELECT coalesce(reason, status), count(*) FROM ledger GROUP BY ALL").fetchall())
print(json.dumps({"summary": summary, "types": {c: types.get(c) for c in ("green_share", "green_pixels")},
                  "rows": rows, "ledger": ledger, "plan": curation.plan(sys.argv[2])["stages"][0]["totals"]}))
'''


def _green_share(jpg: bytes) -> tuple[float, int]:
    rgb = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.int16)
    green = (rgb[..., 1] - np.maximum(rgb[..., 0], rgb[..., 2])) > 40
    return float(green.mean()), int(green.sum())


@pytest.fixture(scope="module")
def green_run(tmp_path_factory):
    """A user's project folder (their module, their script), run as they would run it."""
    project = tmp_path_factory.mktemp("project")
    (project / "green_ops.py").write_text(USER_MODULE)
    (project / "run_green.py").write_text(USER_SCRIPT)
    raw, out = project / "raw", project / "out"
    write_raw_shards(raw, shards=3, per_shard=60, seed=5)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("CURATION_MODELS", None)
    proc = subprocess.run([sys.executable, "run_green.py", str(raw), str(out)], capture_output=True, text=True,
                          cwd=project, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_users_operator_adds_a_typed_column_that_duckdb_reads(green_run):
    out, result = green_run
    assert result["types"] == {"green_share": "DOUBLE", "green_pixels": "BIGINT"}
    assert result["summary"]["raw_samples"] == 180 and result["summary"]["ledger_rows"] == 180
    assert result["ledger"].get("too_green", 0) > 0  # the operator's own drops reach the ledger
    rows = result["rows"]
    assert rows and all(r[3] is not None for r in rows)
    assert all((r[0] == "greenish") == (r[3] >= 0.05) for r in rows)  # routed on the new column
    assert all(r[3] <= 0.3 for r in rows)
    # The values are the tier images' own (recomputed here from the tars), and the
    # sidecar and the tar's json carry them.
    checked = 0
    for tier in ("greenish", "rest"):
        for tar_path in sorted((out / "tiers" / tier).glob("*.tar")):
            sidecar = pq.read_table(tar_path.with_suffix(".parquet")).to_pylist()
            with tarfile.open(tar_path) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for row in sidecar:
                share, count = _green_share(members[f"{row['key']}.{row['media'][0]}"])
                assert row["green_share"] == pytest.approx(share, abs=1e-9) and row["green_pixels"] == count
                assert json.loads(members[f"{row['key']}.json"])["green_share"] == row["green_share"]
                checked += 1
    assert checked == len(rows)
    recorded = json.loads((out / "_work" / "run.json").read_text())["recipe"]
    assert recorded["columns"] == {"green_share": "number", "green_pixels": "integer"}


def test_curate_plan_and_export_work_on_a_run_started_from_python(green_run, tmp_path):
    """The CLI process cannot import the user's module and has no recipe file: the plan
    comes from the recipe the run recorded, and matches the one made in Python."""
    out, result = green_run
    proc = curate("plan", "--root", out, env={k: v for k, v in os.environ.items() if k != "CURATION_MODELS"})
    assert "warmup" in proc.stdout and "greenish" in proc.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert plan["pipeline"] == "green" and plan["stages"][0]["totals"] == result["plan"]
    greenish = sum(1 for r in result["rows"] if r[0] == "greenish")
    rest = len(result["rows"]) - greenish
    assert [m["samples"] for m in plan["stages"][0]["mix"]] == [greenish, round(rest * 0.5)]
    query = curate("query", "SELECT count(*) FILTER (WHERE green_share >= 0.05) FROM samples", "--root", out,
                   "--format", "csv")
    assert query.stdout.strip().splitlines()[-1] == str(greenish)
    # A stage export reads the same recorded recipe, and holds exactly the plan's samples.
    exported = curate("export", "sharegpt", "--root", out, "--stage", "warmup", "--out", tmp_path / "lf")
    assert f"exported {plan['stages'][0]['totals']['samples']} samples" in exported.stdout
