"""train_captioner on a small trusted set: training lowers the held-out loss, the run is
recorded, and the saved folder is a captioner the `caption` operator loads as it is."""

import json
import random

import pandas as pd
import pytest

from curation.captioner import TRAINING_FILE, caption_metrics, train_captioner
from curation.demo import scenes
from curation.ops.caption import Caption, model_revision
from curation.wds import tar_bytes


def trusted_tar(path, n, seed=0):
    """Like curation/demo/corpus.py writes trusted/trusted-000000.tar."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        sc = scenes.random_scene(rng, with_word=rng.random() < 0.1)
        samples.append((f"trusted{i:06d}", [("jpg", scenes.encode_jpeg(scenes.render(sc))),
                                            ("txt", scenes.caption(sc, rng).encode())]))
    path.write_bytes(tar_bytes(samples))
    return path


@pytest.mark.slow  # about 15 s on two busy cores
def test_training_lowers_held_out_loss_and_the_folder_loads_in_caption(tmp_path):
    shard = trusted_tar(tmp_path / "trusted-000000.tar", 120)
    out = tmp_path / "captioner"
    info = train_captioner([shard], out, steps=30, batch_size=16, lr=2e-3, seed=0, log=lambda _: None)

    metrics = info["metrics"]
    assert info["pairs"] == {"train": 108, "held_out": 12}
    assert metrics["loss"] < 0.6 * metrics["untrained"]["loss"]
    assert metrics["token_accuracy"] > metrics["untrained"]["token_accuracy"]
    recorded = json.loads((out / TRAINING_FILE).read_text())
    assert recorded["steps"] == 30 and recorded["seed"] == 0 and recorded["metrics"] == metrics

    rng = random.Random(99)
    images = [scenes.encode_jpeg(scenes.render(scenes.random_scene(rng))) for _ in range(3)]
    live = pd.DataFrame({"uid": [f"{i:016x}" for i in range(3)], "kind": ["image_text"] * 3, "image_bytes": images,
                         "text": ["x"] * 3, "status": ["kept"] * 3, "reason": [None] * 3, "error": [None] * 3})
    op = Caption(Caption.Params(model=str(out), max_new_tokens=40))
    result = op.process(live)
    assert (result["caption_model"] == f"{out}@{model_revision(str(out))}").all()
    assert all(isinstance(c, str) and c for c in result["caption"])
    # Trained on the demo captions: the operator's output reads like one.
    assert any(w in result["caption"].iloc[0].split() for w in ("circle", "square", "triangle"))


def test_caption_metrics():
    truth = ["A picture of a red circle on the left and a blue square in the middle.",
             "A sign that says HOTEL above a green triangle on the right."]
    generated = ["an image showing a red circle on the left and a blue triangle in the middle.",
                 "a sign that says hotel above a green triangle on the right."]
    m = caption_metrics(generated, truth)
    assert m["exact_match"] == 0.5 and m["description_match"] == 0.5
    assert m["colour_precision"] == 1.0 and m["shape_precision"] == m["shape_recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["object_precision"] == m["object_recall"] == pytest.approx(2 / 3, abs=1e-4) and m["sign_accuracy"] == 1.0
