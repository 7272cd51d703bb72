"""Pipeline YAML: valid recipes load; every mistake is one clear error line."""

import textwrap

import pytest

from curation import config
from curation.cli import main
from curation.errors import ConfigError
from curation.paths import RECIPES_DIR

GOOD = """
name: t
ops:
  - op: decode_image
  - op: image_quality
    min_side: 16
  - op: exact_dedup
tiers:
  - name: all
    where: "true"
"""


def write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_pipelines_load(path):
    cfg = config.load(path)
    assert cfg.map_ops[0].name == "decode_image"
    assert len(cfg.config_hash) == 16


def test_hash_ignores_comments_but_not_params(tmp_path):
    a = config.load(write(tmp_path, GOOD)).config_hash
    b = config.load(write(tmp_path, "# comment\n" + GOOD)).config_hash
    c = config.load(write(tmp_path, GOOD.replace("min_side: 16", "min_side: 17"))).config_hash
    assert a == b != c


@pytest.mark.parametrize("text, message", [
    ("ops: [\n  - op: decode", "invalid YAML at line"),
    (GOOD.replace("image_quality", "image_qualty"), "unknown operator 'image_qualty'"),
    (GOOD.replace("min_side: 16", "min_sid: 16"), "unknown option(s) ['min_sid']"),
    (GOOD.replace("min_side: 16", "min_side: big"), "must be an integer"),
    (GOOD.replace('where: "true"', 'where: "widht > 3"'), "bad 'where' predicate"),
    (GOOD.replace("  - op: decode_image\n", ""), "first operator must be decode_image"),
    (GOOD + "\nextra: 1\n", "unknown top-level key"),
    (GOOD.replace("min_side: 16", "min_side: 16.5"), "must be an integer"),
    (GOOD.replace("min_side: 16", "min_side: 16\n    resources: {batch_size: 0}"), "resources.batch_size must be an integer >= 1"),
    (GOOD.replace("min_side: 16", "min_side: 16\n    resources: {num_cpus: two}"), "resources.num_cpus must be a number"),
    (GOOD.replace('where: "true"', 'where: "clip_score > 0.3"'), "clip_score"),  # no operator makes it
    ("- just\n- a list\n", "must be a mapping"),
    (GOOD.replace("  - op: exact_dedup\n", "  - op: exact_dedup\n  - op: caption_length\n"), "map operators must come before global"),
])
def test_bad_pipeline_is_one_clear_line(tmp_path, capsys, text, message):
    p = write(tmp_path, text)
    rc = main(["run", str(p), "--input", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("curate: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err


def test_missing_pipeline_file(tmp_path):
    with pytest.raises(ConfigError, match="pipeline file not found"):
        config.load(tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    p = write(tmp_path, "!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        config.load(p)


def test_pipeline_by_name_or_path(tmp_path, monkeypatch):
    """`curate run demo` and `curate run pipelines/demo.yaml` name the same bundled recipe;
    a file always wins over a name; an unknown name lists the bundled recipes."""
    from curation.paths import find_pipeline

    demo = RECIPES_DIR / "demo.yaml"
    assert find_pipeline("demo") == demo and find_pipeline("demo.yaml") == demo
    assert config.load("demo").name == config.load(demo).name == "demo"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines").mkdir()
    mine = write(tmp_path / "pipelines", GOOD)
    assert find_pipeline("pipelines/p.yaml") == mine.relative_to(tmp_path)
    (tmp_path / "demo.yaml").write_text(GOOD)
    assert config.load("demo.yaml").name == "t"  # the local file, not the bundled recipe
    with pytest.raises(ConfigError, match="bundled recipes, usable by name: demo"):
        find_pipeline("nope")
    with pytest.raises(ConfigError, match="pipeline file not found: elsewhere/demo.yaml"):
        find_pipeline("elsewhere/demo.yaml")  # a path is never looked up in the package
