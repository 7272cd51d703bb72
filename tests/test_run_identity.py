"""A run folder belongs to one recipe, one input and the files its operators read: an
edited concept list or reference set is not resumed as the same run (no Ray here)."""

import json

import pytest

from curation.config import parse
from curation.errors import ConfigError
from curation.inputs import resolve_input
from curation.runner import _check_run_identity

from .rawgen import write_raw_shards


def recipe(concept_list: str) -> dict:
    return {"name": "concepts", "seed": 0,
            "ops": [{"op": "decode_image"}, {"op": "concepts", "concept_list": concept_list}],
            "tiers": [{"name": "all", "where": "true"}], "shard": {"max_samples": 10}}


def test_an_edited_concept_list_starts_an_unfinished_run_over_and_refuses_a_finished_one(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_raw_shards(raw, shards=1, per_shard=3, seed=1)
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("red\nblue\n")
    cfg = parse(recipe(str(concepts)))
    work = tmp_path / "out" / "_work"
    _check_run_identity(work, cfg, resolve_input(raw))
    recorded = json.loads((work / "run.json").read_text())["op_input_files"]
    assert list(recorded) == ["1:concepts"]

    (work / "progress.marker").write_text("x")
    _check_run_identity(work, cfg, resolve_input(raw))  # same files: resumed, state kept
    assert (work / "progress.marker").exists()

    concepts.write_text("red\nblue\ngreen\n")
    _check_run_identity(work, cfg, resolve_input(raw))  # the list changed: starts over
    assert not (work / "progress.marker").exists()
    assert "starting over" in capsys.readouterr().err
    assert json.loads((work / "run.json").read_text())["op_input_files"] != recorded

    (tmp_path / "out" / "_SUCCESS").write_text("")
    concepts.write_text("red\n")
    with pytest.raises(ConfigError, match="read other files"):
        _check_run_identity(work, cfg, resolve_input(raw))


def test_the_recipe_hash_does_not_depend_on_the_files(tmp_path):
    concepts = tmp_path / "a.txt"
    concepts.write_text("red\n")
    before = parse(recipe(str(concepts)))
    files_before = before.op_input_files()
    concepts.write_text("red\nblue\n")
    after = parse(recipe(str(concepts)))
    assert after.config_hash == before.config_hash  # `curate plan` elsewhere reads the same recipe
    assert after.op_input_files() != files_before
    assert parse(recipe("demo")).op_input_files()["1:concepts"]  # a bundled list has an identity too
