"""Hostile and mistaken recipes: every one is a single ConfigError line at load time,
before any work, and none prints an environment variable's value."""

import dataclasses
import textwrap
import typing

import pytest

from curation import config
from curation.cli import main
from curation.errors import ConfigError
from curation.ops import registry
from curation.ops.base import _conform, _param_hints
from curation.ops.clip import EMBEDDING_COLUMN
from curation import paths
from curation.rawshards import READ_COLUMNS

HEAD = """
name: t
ops:
  - op: decode_image
  - op: perceptual_hash
"""
TIERS = """
tiers:
  - name: all
    where: "true"
"""


def recipe(ops: str = "", tiers: str = TIERS, head: str = HEAD) -> str:
    return textwrap.dedent(head) + textwrap.indent(textwrap.dedent(ops), "  ") + textwrap.dedent(tiers)


def write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def load_error(tmp_path, text) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message.strip() and "Traceback" not in message
    return message


def cli_error(tmp_path, capsys, text) -> str:
    """`curate run` on the recipe: exit 2 and exactly one `curate: error:` line."""
    p = write(tmp_path, text)
    rc = main(["run", str(p), "--input", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("curate: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # refused before any work
    return err


# --- the file itself ---------------------------------------------------------------

def test_billion_laughs_alias_bomb_is_refused(tmp_path):
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = "\n".join(lines) + "\n"
    assert len(bomb) < 1200
    text = bomb + recipe("- op: language\n  keep: *l8\n")
    message = load_error(tmp_path, text)
    assert "anchors and aliases" in message and "line 1" in message


def test_a_harmless_merge_alias_is_refused_too(tmp_path):
    text = recipe("- op: image_quality\n  <<: *q\n", head=HEAD.replace("name: t", "defaults: &q {min_side: 8}\nname: t"))
    assert "anchors and aliases" in load_error(tmp_path, text)


def test_huge_file_is_refused_before_parsing(tmp_path):
    text = recipe() + "# " + "x" * (config.MAX_RECIPE_BYTES + 10) + "\n"
    assert "larger than 1 MiB" in load_error(tmp_path, text)


def test_non_utf8_recipe_is_one_line(tmp_path, capsys):
    text = recipe().encode() + "# caf\xe9\n".encode("latin-1")
    err = cli_error(tmp_path, capsys, text)
    assert "not UTF-8" in err and "0xe9" in err


def test_utf8_with_bom_loads(tmp_path):
    assert config.load(write(tmp_path, b"\xef\xbb\xbf" + recipe().encode())).name == "t"


@pytest.mark.parametrize("text, message", [
    (recipe().replace("  - op: perceptual_hash", "\t- op: perceptual_hash"), "invalid YAML at line"),   # a tab
    ("ops: [\n  - op: decode", "invalid YAML at line"),
    ("\x00\x01\x02 garbage", "invalid YAML"),
    ("}}}{{{", "invalid YAML"),
    ("[" * 5000, "invalid YAML"),                                                                      # nesting bomb
    ("- " * 3000 + "x\n", "invalid YAML"),
    ("!!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    (recipe("- op: !!python/name:os.system caption_length\n"), "invalid YAML"),
    (recipe("- op: language\n  keep: !!python/object/new:list [[en]]\n"), "invalid YAML"),
    ("", "the top level must be a mapping"),
    ("just a string\n", "the top level must be a mapping"),
])
def test_garbage_yaml_is_one_clear_line(tmp_path, text, message):
    assert message in load_error(tmp_path, text)


def test_repeated_key_is_refused_not_silently_last_wins(tmp_path):
    text = recipe() + "tiers:\n  - name: other\n    where: \"true\"\n"
    assert "key 'tiers' repeats" in load_error(tmp_path, text)


@pytest.mark.parametrize("text", [
    recipe() + "1: x\n",
    recipe("- op: image_quality\n  on: 3\n"),  # YAML 1.1: `on` is a boolean key
])
def test_non_string_keys_are_refused(tmp_path, text):
    assert "keys must be names" in load_error(tmp_path, text)


# --- operators and options -----------------------------------------------------------

def test_unknown_operator(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, recipe("- op: image_qualty\n"))
    assert "unknown operator 'image_qualty'" in err and "image_quality" in err


@pytest.mark.parametrize("op, message", [
    ("- op: language\n  keep: en\n", "option 'keep' must be a list of strings, got 'en' (a string)"),
    ("- op: language\n  keep: [en, 7]\n", "option 'keep' must be a list of strings, got ['en', 7]"),
    ("- op: language\n  keep: [no]\n", "must be a list of strings, got [False]"),  # YAML 1.1: Norway is false
    ("- op: language\n  keep: {en: 1}\n", "got {'en': 1} (a mapping)"),
    ("- op: language\n  keep: [EN]\n", "lower-case ISO 639-1"),
    ("- op: language\n  include_ocr: 'yes'\n", "option 'include_ocr' must be true or false, got 'yes'"),
    ("- op: caption_length\n  min_words: '3'\n", "option 'min_words' must be an integer, got '3' (a string)"),
    ("- op: caption_length\n  min_words: true\n", "option 'min_words' must be an integer, got True"),
    ("- op: image_quality\n  max_aspect_ratio: .nan\n", "option 'max_aspect_ratio' must be a number"),
    ("- op: nsfw\n  threshold: [0.5]\n", "option 'threshold' must be a number, got [0.5] (a list)"),
    ("- op: nsfw\n  action: 3\n", "option 'action' must be a string, got 3 (an integer)"),
    ("- op: video_frames\n  sampling: [uniform]\n", "option 'sampling' must be a string"),
    ("- op: clip_score\n  model: ViT-B-32\n  keep_embeddings: 'true'\n", "option 'keep_embeddings' must be true or false"),
    ("- op: clip_score\n  model: ViT-B-32\n  min_score: high\n", "option 'min_score' must be a number or one of 'calibrated' or null"),
    ("- op: clip_score\n  model: ViT-B-32\n  pretrained: 3\n", "option 'pretrained' must be a string or null"),
    ("- op: clip_score\n  model: {name: ViT-B-32}\n", "option 'model' must be a string"),
])
def test_wrong_option_types_name_op_option_expected_and_got(tmp_path, op, message):
    error = load_error(tmp_path, recipe(op))
    assert message in error, error
    assert "ops[2]" in error


def test_every_option_annotation_is_checkable_and_defaults_fit_it():
    """Annotations are what the generic check reads: each must evaluate, and each
    default must pass it (an annotation that lies would reject a valid recipe)."""
    for name, cls in registry().items():
        hints = _param_hints(cls.Params)
        for f in dataclasses.fields(cls.Params):
            assert f.name in hints, (name, f.name)
            assert hints[f.name] is not typing.Any, f"{name}.{f.name}: annotate it"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert _conform(default, hints[f.name])[0], (name, f.name, default)


# --- columns an operator needs ---------------------------------------------------------

def test_semantic_dedup_without_keep_embeddings(tmp_path, capsys):
    ops = "- op: clip_score\n  model: ViT-B-32\n- op: semantic_dedup\n"
    err = cli_error(tmp_path, capsys, recipe(ops))
    assert f"ops[3] (semantic_dedup) needs the column '{EMBEDDING_COLUMN}'" in err
    assert "clip_score (with keep_embeddings: true)" in err
    cfg = config.load(write(tmp_path, recipe(ops.replace("ViT-B-32\n", "ViT-B-32\n  keep_embeddings: true\n"))))
    assert [s.name for s in cfg.global_ops] == ["semantic_dedup"]


@pytest.mark.parametrize("ops, column", [
    ("- op: near_dedup\n", "phash"),
    ("- op: clip_top_fraction\n", "clip_score"),
    ("- op: caption\n  model: some/model\n  prompt: 'text: {ocr}'\n  ocr_context: true\n", "ocr_text"),
])
def test_missing_requirement_fails_at_parse(tmp_path, ops, column):
    head = HEAD.replace("  - op: perceptual_hash\n", "")
    message = load_error(tmp_path, recipe(ops, head=head))
    assert f"needs the column '{column}'" in message


def test_requirements_met_by_an_earlier_operator(tmp_path):
    ops = ("- op: ocr\n- op: caption\n  model: some/model\n  prompt: 'text: {ocr}'\n  ocr_context: true\n"
           "- op: clip_score\n  model: ViT-B-32\n- op: near_dedup\n- op: clip_top_fraction\n")
    cfg = config.load(write(tmp_path, recipe(ops)))
    assert [s.name for s in cfg.global_ops] == ["near_dedup", "clip_top_fraction"]


def test_requirement_written_later_does_not_count(tmp_path):
    ops = "- op: caption\n  model: m\n  prompt: '{ocr}'\n  ocr_context: true\n- op: ocr\n"
    assert "needs the column 'ocr_text'" in load_error(tmp_path, recipe(ops))


def test_declared_requirements_are_real_columns():
    writable = set(READ_COLUMNS) | {c for cls in registry().values() for c in cls.provides(None)}
    for name, cls in registry().items():
        assert set(cls.requires) <= writable, name
    assert registry()["semantic_dedup"].requires == (EMBEDDING_COLUMN,)


def test_map_operator_after_a_global_one(tmp_path):
    assert "map operators must come before global" in load_error(tmp_path, recipe("- op: exact_dedup\n- op: caption_length\n"))


# --- environment variables ----------------------------------------------------------

SECRET = "hunter2-token-abcdef"


@pytest.mark.parametrize("op", [
    "- op: video_frames\n  max_frames: ${CURATION_TEST_SECRET}\n",
    "- op: clip_score\n  model: ViT-B-32\n  min_score: ${CURATION_TEST_SECRET}\n",
    "- op: clip_score\n  model: ViT-B-32\n  pretrained: ${CURATION_TEST_SECRET}\n  keep_embeddings: maybe\n",
    "- op: nsfw\n  action: x${CURATION_TEST_SECRET}\n",
])
def test_errors_never_print_an_environment_value(tmp_path, capsys, monkeypatch, op):
    monkeypatch.setenv("CURATION_TEST_SECRET", SECRET)
    err = cli_error(tmp_path, capsys, recipe(op))
    assert SECRET not in err and "hunter2" not in err, err


def test_type_error_shows_the_unexpanded_form(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATION_TEST_SECRET", SECRET)
    message = load_error(tmp_path, recipe("- op: video_frames\n  max_frames: ${CURATION_TEST_SECRET}\n"))
    assert "got '${CURATION_TEST_SECRET}'" in message


def test_redaction_covers_any_message():
    expanded, written = {"model": f"/models/{SECRET}/clip"}, {"model": "/models/${CURATION_TEST_SECRET}/clip"}
    import os
    os.environ["CURATION_TEST_SECRET"] = SECRET
    try:
        assert config._redact(f"cannot load /models/{SECRET}/clip; {SECRET}", expanded, written) == \
            "cannot load /models/${CURATION_TEST_SECRET}/clip; ${CURATION_TEST_SECRET}"
    finally:
        del os.environ["CURATION_TEST_SECRET"]


def test_unknown_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("CURATION_TEST_UNSET", raising=False)
    message = load_error(tmp_path, recipe("- op: clip_score\n  model: ${CURATION_TEST_UNSET}/clip\n"))
    assert "${CURATION_TEST_UNSET}" in message and "is not set" in message


# --- tiers and stages ----------------------------------------------------------------

@pytest.mark.parametrize("tiers, message", [
    ('tiers:\n  - name: a\n    where: "widht > 3"\n', "bad 'where' predicate"),
    ('tiers:\n  - name: a\n    where: "true)) --"\n', "tier 'a'"),
    ('tiers:\n  - name: a\n    where: "true); CREATE TABLE x AS SELECT 1; SELECT (1"\n', "one SQL expression"),
    ("tiers:\n  - name: a\n    where: \"(SELECT count(*) FROM read_text('/etc/passwd')) > 0\"\n", "bad 'where' predicate"),
    ('tiers:\n  - name: a\n    where: "true"\n  - name: a\n    where: "false"\n', "tier names repeat"),
    ('tiers:\n  - name: ../x\n    where: "true"\n', "name must match"),
    ('tiers:\n  - name: a\n    where: "true"\nstages:\n  - name: s\n    mix: [{tier: [a]}]\n', "unknown tier ['a']"),
    ('tiers:\n  - name: a\n    where: "true"\nstages:\n  - name: s\n    mix: [{tier: a}]\n  - name: s\n    mix: [{tier: a}]\n',
     "stage name 's' repeats"),
])
def test_bad_tiers_and_stages(tmp_path, tiers, message):
    assert message in load_error(tmp_path, recipe(tiers=tiers))


def test_bad_name(tmp_path):
    assert "name must be a short single-line string" in load_error(tmp_path, recipe().replace("name: t", "name: [t]"))


BUNDLED = sorted((getattr(paths, "RECIPES_DIR", None) or paths.PIPELINES_DIR).glob("*.yaml"))


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_recipes_meet_every_requirement(path):
    cfg = config.load(path)
    assert cfg.map_ops[0].name == "decode_image"
