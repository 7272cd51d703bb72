"""Concept balancing (MetaCLIP-style): the `concepts` operator's matching, the concept
lists, the `concepts` column in sidecars and DuckDB, and the `balanced:t` strategy."""

import dataclasses
import json
import time

import duckdb
import pandas as pd
import pyarrow as pa
import pytest

from curation import config, schemas
from curation.errors import ConfigError
from curation.ops.concepts import ConceptMatcher, Concepts, load_concepts
from curation.tiers.plan import balance, format_bill, make_plan, select


def test_matching_respects_case_and_word_boundaries():
    m = ConceptMatcher(["cat", "Red Circle", "red", "C++", "new york"])
    assert m.match("A cat sat on a concatenated mat") == ["cat"]  # not inside 'concatenated'
    assert m.match("cats and scat") == []  # whole words only
    assert m.match("A RED  circle, in red") == ["Red Circle", "red"]  # overlapping entries both match, list order
    assert m.match("a redcircle") == []
    assert m.match("I write c++ daily") == ["C++"]  # an entry that ends in punctuation needs no boundary there
    assert m.match("flights to New\nYork") == ["new york"]  # whitespace runs are one space
    assert m.match("cat_food cat-food") == ["cat"]  # '_' joins a word, '-' does not
    assert m.match("", None) == []
    assert m.match("red", "a cat") == ["cat", "red"]  # caption and OCR text: each on its own
    assert m.match("new", "york") == []  # an entry never spans caption and OCR text


def test_matching_unicode():
    m = ConceptMatcher(["Straße", "naïve", "猫", "café"])
    assert m.match("STRASSE und straße") == ["Straße"]  # case-folded
    assert m.match("NAÏVE") == ["naïve"]
    assert m.match("naïveté") == []  # é continues the word
    assert m.match("一只猫在睡觉") == ["猫"]  # no spaces in Chinese: no boundary to check
    assert m.match("cafe\u0301 au lait") == ["café"]  # NFC: e + combining acute is é


def test_concepts_operator_writes_a_list_per_row():
    op = Concepts(Concepts.Params())
    batch = pd.DataFrame({
        "uid": [f"{i:016x}" for i in range(4)], "kind": ["image_text", "image_text", "video", "image_text"],
        "text": ["A red circle on the left", "nothing here", "A blue square moves", None],
        "ocr_text": ["", "OPEN", None, "SALE"],
        "status": ["kept", "kept", "kept", "dropped"], "reason": [None, None, None, "x"], "error": [None] * 4})
    out = op(batch)
    assert out["concepts"].tolist() == [["circle", "red"], ["open"], ["square", "blue"], None]  # dropped: untouched
    no_ocr = Concepts(Concepts.Params(include_ocr=False))(batch.drop(columns="concepts"))
    assert no_ocr["concepts"].tolist()[1] == []


def test_concept_lists(tmp_path):
    demo = load_concepts("demo")
    assert {"circle", "open", "simple drawing"} <= set(demo) and len(demo) == len(set(demo))
    txt = tmp_path / "list.txt"
    txt.write_text("# comment\nDog\n  dog \nhot  dog\n\nCat\n", encoding="utf-8")
    assert load_concepts(str(txt)) == ("Dog", "hot dog", "Cat")  # repeats (after case folding) once
    js = tmp_path / "metadata.json"
    js.write_text(json.dumps(["a b", "c"]))
    assert load_concepts(str(js)) == ("a b", "c")
    js.write_text(json.dumps(["a", 3]))
    with pytest.raises(ConfigError, match="strings only"):
        load_concepts(str(js))
    txt.write_text("x" * 300)
    with pytest.raises(ConfigError, match="over 256 characters"):
        load_concepts(str(txt))
    with pytest.raises(ConfigError, match="cannot be read"):
        load_concepts(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="max_chars"):
        Concepts.parse_params({"max_chars": 0}, "ops[0]")


def test_concepts_column_is_a_typed_list_in_parquet_and_duckdb(tmp_path):
    assert schemas.arrow_schema("sidecar").field("concepts").type == pa.list_(pa.string())
    frame = pd.DataFrame({"uid": ["a", "b"], "concepts": [["red", "circle"], []]})
    typed = pa.Table.from_pandas(frame, schema=pa.schema([("uid", pa.string()),
                                                          ("concepts", schemas.arrow_schema("sidecar").field("concepts").type)]))
    path = tmp_path / "s.parquet"
    import pyarrow.parquet as pq

    pq.write_table(typed, path)
    rows = duckdb.sql(f"SELECT uid FROM '{path}' WHERE list_contains(concepts, 'red')").fetchall()
    assert rows == [("a",)]


def test_a_metaclip_size_list_matches_fast():
    entries = [f"w{i:06d}" for i in range(500_000)] + ["red circle", "circle"]
    start = time.perf_counter()
    m = ConceptMatcher(entries)
    built = time.perf_counter() - start
    captions = [f"a red circle next to w{i:06d} and w{i + 7:06d}, in words w{i}x" for i in range(0, 20_000, 10)]
    start = time.perf_counter()
    found = [m.match(c) for c in captions]
    per_caption = (time.perf_counter() - start) / len(captions)
    assert found[3] == ["w000030", "w000037", "red circle", "circle"]
    assert per_caption < 1e-3 and built < 30, (per_caption, built)  # ~10 us per caption, not a loop over 500k


def _frame(groups: dict[tuple[str, ...], int]) -> pd.DataFrame:
    rows = []
    for entries, n in groups.items():
        rows += [list(entries)] * n
    return pd.DataFrame({"uid": [f"{i:016x}" for i in range(len(rows))], "concepts": rows, "i": range(len(rows))})


def test_balanced_caps_the_head_and_keeps_the_tail():
    frame = _frame({("head",): 2000, ("mid",): 300, ("tail_a",): 5, ("tail_b",): 50, ("head", "tail_c"): 3, (): 400})
    chosen = select(frame, "balanced:50", "0/stage/tier")
    kept = chosen["concepts"].map(tuple).value_counts().to_dict()
    assert kept[("tail_a",)] == 5 and kept[("tail_b",)] == 50 and kept[("head", "tail_c")] == 3  # tail: all
    assert 30 <= kept[("head",)] <= 75 and 30 <= kept[("mid",)] <= 75  # about t of a head entry
    assert 30 <= kept[()] <= 75  # no concept: one more bucket, capped like an entry
    assert chosen["i"].is_monotonic_increasing  # tier order is kept
    # the same seed text: the same samples, whatever the row order; another seed: others
    assert chosen["uid"].tolist() == select(frame, "balanced:50", "0/stage/tier")["uid"].tolist()
    shuffled = select(frame.sample(frac=1, random_state=1), "balanced:50", "0/stage/tier")
    assert sorted(shuffled["uid"]) == sorted(chosen["uid"])
    assert set(select(frame, "balanced:50", "1/stage/tier")["uid"]) != set(chosen["uid"])
    assert len(select(frame, "balanced:100000", "x")) == len(frame)  # a cap above every count keeps all


def test_balanced_distribution_summary():
    frame = _frame({("head",): 1000, ("head", "rare"): 2, (): 10})
    con = duckdb.connect()
    con.register("t", pa.table({"uid": frame["uid"].tolist(),
                                "concepts": pa.array(frame["concepts"].tolist(), pa.list_(pa.string()))}))
    kept, summary = balance(con, "t", 20, "s")
    assert summary["samples"] == {"before": 1012, "after": len(kept)}
    assert summary["head"][0]["entry"] == "head" and summary["head"][0]["before"] == 1002
    assert summary["tail"] == {"entries": 1, "max_count": 2, "before": 2, "after": 2}
    assert summary["no_concept"] == {"before": 10, "after": 10}


def test_balanced_strategy_in_recipes():
    doc = {"name": "p", "ops": [{"op": "decode_image"}, {"op": "concepts"}], "tiers": [{"name": "t", "where": "true"}],
           "stages": [{"name": "s", "mix": [{"tier": "t", "strategy": "balanced:30"}]}]}
    assert config.parse(doc).stages[0].mix[0].strategy == "balanced:30"
    for bad in ("balanced:0", "balanced:5%", "balanced:", "balanced:-3"):
        doc["stages"][0]["mix"][0]["strategy"] = bad
        with pytest.raises(ConfigError, match="balanced:t"):
            config.parse(doc)


def test_balanced_stage_on_the_demo_flattens_the_head_and_keeps_the_tail(demo_out):
    """The demo recipe writes `concepts`; its corpus is skewed on purpose (shapes in most
    captions, OPEN and SALE on most signs, a tail of rare sign words)."""
    root = demo_out / "curated"
    cfg = config.for_output(root)
    tiers = ("alignment", "captioned_detail", "ocr_rich")
    stage = config.Stage("balanced", tuple(config.MixEntry(t, "balanced:6") for t in tiers))
    plan = make_plan(dataclasses.replace(cfg, stages=(stage,)), root)
    sidecars = str(root / "tiers" / "*" / "*.parquet")
    for mix in plan["stages"][0]["mix"]:
        c = mix["concepts"]
        assert c["samples"]["after"] == mix["samples"] > 0
        assert c["tail"]["before"] == c["tail"]["after"]  # every tail sample kept
        selected = {k for keys in mix["shards"].values() for k in keys}
        # the tail samples are among the selected keys
        tail_keys = {k for (k,) in duckdb.sql(f"""
            WITH s AS (SELECT key, unnest(concepts) AS e FROM read_parquet('{sidecars}') WHERE tier = '{mix["tier"]}'),
                 n AS (SELECT e, count(*) AS n FROM s GROUP BY e)
            SELECT DISTINCT key FROM s JOIN n USING (e) WHERE n <= 6""").fetchall()}
        assert tail_keys <= selected
    all_mix = {m["tier"]: m["concepts"] for m in plan["stages"][0]["mix"]}
    # A sample stays when any of its entries keeps it, so a head entry whose samples also
    # hold rarer entries keeps more than t: every demo caption has shapes and colours.
    top = all_mix["captioned_detail"]["head"][0]  # a shape, in most captions
    assert top["entry"] in ("circle", "square", "triangle") and top["after"] < 0.75 * top["before"]
    assert all_mix["ocr_rich"]["tail"]["entries"] > 0  # the rare sign words, all kept
    signs = duckdb.sql(f"SELECT count(*) FILTER (list_contains(concepts, 'open')), "
                       f"count(*) FILTER (list_contains(concepts, 'bakery')) FROM read_parquet('{sidecars}')").fetchall()[0]
    assert signs[0] > signs[1]  # the skewed sign words reach the concepts column (caption and OCR)
    text = format_bill(plan)
    assert "concepts of captioned_detail in balanced (balanced:6)" in text and "(no concept)" in text


@pytest.mark.slow
def test_the_onevision_recipes_balanced_stage(onevision_out):
    """pipelines/llava_onevision.yaml's stage1.5_balanced, as `curate plan` resolves it."""
    plan = make_plan(config.for_output(onevision_out), onevision_out)
    stage = next(s for s in plan["stages"] if s["name"] == "stage1.5_balanced")
    for mix in stage["mix"]:
        c = mix["concepts"]
        assert mix["strategy"] == "balanced:20" and 0 < c["samples"]["after"] == mix["samples"]
        assert c["tail"]["before"] == c["tail"]["after"]  # every tail sample kept
    assert stage["mix"][1]["concepts"]["tail"]["entries"] > 0  # the rare sign words of the knowledge tier
    assert stage["totals"]["samples"] < sum(m["concepts"]["samples"]["before"] for m in stage["mix"])  # thinned
    again = make_plan(config.for_output(onevision_out), onevision_out)
    assert again["stages"] == plan["stages"]  # seeded: the same selection every time
