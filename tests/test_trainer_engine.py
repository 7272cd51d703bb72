"""Reference trainer, engine side: packed attention without a dense L x L mask, gradient
accumulation, activation checkpointing and the FLOPs count. Models built in code, no Ray."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from curation.trainer import ARCHS
from curation.trainer.flops import batch_flops, flops_breakdown, peak_flops
from curation.trainer.lm import attend_packed, packed_attention
from curation.trainer.train import accumulate_gradients, answer_tokens, set_trainable

from .test_trainer import TOK, batch_of, build, doc_sample, image_sample, video_sample

torch.set_num_threads(1)


def three_documents() -> list[dict]:
    return [image_sample("a", "red"), doc_sample(), video_sample()]


# ---------------------------------------------------------------- packed attention

def rows_of_samples():
    """Row 0: three samples of different lengths, then padding; row 1: two samples."""
    return torch.tensor([[1] * 7 + [2] * 5 + [3] * 9 + [0] * 3,
                         [1] * 12 + [2] * 12])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["documents", "flex"])
def test_packed_attention_equals_the_dense_mask(backend):
    torch.manual_seed(0)
    segment_ids = rows_of_samples()
    q = torch.randn(2, 4, 24, 8)
    k, v = torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8)  # grouped-query: 2 kv heads for 4 query heads
    dense = attend_packed(q, k, v, packed_attention(segment_ids, "dense"))
    att = packed_attention(segment_ids, backend)
    assert att.dense_mask is None  # no L x L tensor on this path
    with torch.no_grad():  # FlexAttention has no CPU backward in torch 2.13 (it runs on CUDA in training)
        out = attend_packed(q, k, v, att)
    assert torch.allclose(out, dense, atol=1e-5)


def test_no_sample_attends_across_its_boundary():
    torch.manual_seed(0)
    segment_ids = rows_of_samples()
    q, k, v = (torch.randn(2, 4, 24, 8, requires_grad=True) for _ in range(3))
    out = attend_packed(q, k, v, packed_attention(segment_ids, "documents"))
    second = segment_ids[0] == 2
    out[0, :, second].sum().backward()  # the second sample of row 0 only
    for grad in (k.grad, v.grad):
        touched = grad.abs().sum(dim=(1, 3)) > 0  # [rows, L]: keys/values that influenced it
        assert touched[0, second].all() and not touched[0, ~second].any() and not touched[1].any()
    assert not q.grad[0][:, ~second].any()


def test_backend_choice():
    from curation.errors import CurationError
    from curation.trainer.lm import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "documents"  # FlexAttention cannot train on CPU
    assert resolve_backend("dense", torch.device("cpu")) == "dense"
    with pytest.raises(CurationError, match="--attention must be one of"):
        resolve_backend("sparse", torch.device("cpu"))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_gives_the_same_loss_and_grads_with_each_backend(arch):
    model = build(arch)
    set_trainable(model, "full")
    batch = batch_of(model, three_documents(), max_len=2048)
    assert batch["input_ids"].shape[0] == 1 and int(batch["segment_ids"].max()) == 3  # three samples, one row

    def run(backend):
        model.attention = backend
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    dense_logits, dense_grads = run("dense")
    logits, grads = run("documents")
    assert torch.allclose(logits, dense_logits, atol=1e-4)
    assert grads.keys() == dense_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, dense_grads[name], atol=1e-5, rtol=1e-3), name


# ---------------------------------------------------------------- gradient accumulation

def test_accumulated_micro_batches_give_the_gradient_of_one_big_batch():
    model = build("llava")
    set_trainable(model, "full")
    samples = [image_sample("a", "red"), doc_sample(), video_sample(), image_sample("b", "blue", (72, 96)),
               doc_sample("doc2")]
    big = batch_of(model, samples, max_len=512)
    micro = [batch_of(model, samples[:1], max_len=512), batch_of(model, samples[1:], max_len=512)]
    assert answer_tokens(micro[0]) != answer_tokens(micro[1])  # so a per-micro-batch mean would differ

    def grads_after(batches):
        model.zero_grad(set_to_none=True)
        loss, tokens = accumulate_gradients(model, batches)
        return loss, tokens, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    big_loss, big_tokens, big_grads = grads_after([big])
    loss, tokens, grads = grads_after(micro)
    assert tokens == big_tokens and loss == pytest.approx(big_loss, rel=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, big_grads[name], atol=1e-6, rtol=1e-4), name

    # the naive rule (mean loss per micro-batch, averaged) is a different gradient
    model.zero_grad(set_to_none=True)
    for batch in micro:
        (model(batch).loss / len(micro)).backward()
    head = next(n for n, p in model.named_parameters() if p is model.lm.lm_head.weight)  # tied to the embeddings
    assert not torch.allclose(model.lm.lm_head.weight.grad, big_grads[head], atol=1e-5, rtol=1e-3)


# ---------------------------------------------------------------- activation checkpointing

@pytest.mark.parametrize("arch", ["llava", "evlm", "owl3"])
def test_activation_checkpointing_recomputes_layers_with_the_same_loss_and_grads(arch):
    model = build(arch)
    set_trainable(model, "full")
    batch = batch_of(model, three_documents(), max_len=2048)
    calls = []
    # a pre-hook inside the layer (owl3's hyper layers never call the layer module itself), before
    # its MLP: recomputation stops early, as soon as the last saved tensor is rebuilt
    model.lm.model.layers[-1].post_attention_layernorm.register_forward_pre_hook(lambda *_: calls.append(1))

    def run(recompute):
        model.activation_checkpointing = recompute
        model.zero_grad(set_to_none=True)
        calls.clear()
        loss = model(batch).loss
        loss.backward()
        return loss.detach(), len(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, plain_calls, grads = run(False)
    recomputed_loss, recompute_calls, recomputed_grads = run(True)
    assert (plain_calls, recompute_calls) == (1, 2)  # the layer ran again in the backward pass
    assert torch.allclose(recomputed_loss, loss, atol=1e-6)
    assert grads.keys() == recomputed_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(recomputed_grads[name], grad, atol=1e-6, rtol=1e-5), name


# ---------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("arch,mode", [("llava", "connector"), ("omnifusion", "full"), ("evlm", "connector"),
                                       ("owl3", "full")])
def test_weight_flops_match_torch_flop_counter(arch, mode):
    """The analytic weight term against PyTorch's own count of the matmuls actually run
    (forward + backward), for the full model or alignment (connector only). The counter
    does not see CPU attention kernels, so only the weight term is compared; the
    approximations (uniform encoder blocks, LM backward through every layer) stay within 8%."""
    model = build(arch)
    set_trainable(model, mode)
    batch = batch_of(model, three_documents(), max_len=2048)
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch).loss.backward()
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items()
                  if str(op).split(".")[-1] in ("mm", "addmm", "convolution", "convolution_backward"))
    parts = flops_breakdown(model, batch)
    assert 0.92 < parts["weights"] / counted < 1.08, (parts["weights"], counted)
    assert parts["attention"] > 0 and batch_flops(model, batch) == parts["weights"] + parts["attention"]


def test_flops_grow_with_what_trains_and_attention_stays_within_samples():
    model = build("llava")
    batch = batch_of(model, three_documents(), max_len=2048)
    set_trainable(model, "connector")
    aligned = flops_breakdown(model, batch)
    set_trainable(model, "full")
    full = flops_breakdown(model, batch)
    assert full["weights"] > aligned["weights"]  # 6N instead of 4N on the LM, 2N on the encoder
    # the same samples in separate rows: no cross-sample attention, so the same count
    apart = batch_of(model, three_documents(), max_len=100)
    assert apart["input_ids"].shape[0] > 1
    assert flops_breakdown(model, apart) == pytest.approx(full)


def test_peak_table_by_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Future Accelerator") is None


# ---------------------------------------------------------------- the training loop

def tiny_plan(root) -> str:
    """A one-tier plan over one real tier shard (tar + sidecar) of 12 captioned images."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .test_trainer_faithful import held_out_uids, image_png, write_tar

    folder = root / "tiers" / "t"
    folder.mkdir(parents=True)
    colours = ["red", "green", "blue"]
    rows = [(u, f"a {colours[i % 3]} square.") for i, u in enumerate(held_out_uids(12, held=False))]
    write_tar(folder / "000000.tar", [
        {"__key__": u, "json": json.dumps({"uid": u, "kind": "image_text", "caption": text}).encode(),
         "png": image_png((200 * (i % 3 == 0), 200 * (i % 3 == 1), 200 * (i % 3 == 2)))}
        for i, (u, text) in enumerate(rows)])
    pq.write_table(pa.table({"text": [t for _, t in rows], "source_meta": [None] * len(rows)}),
                   folder / "000000.parquet")
    plan = {"root": str(root), "stages": [{"name": "s", "mix": [{"tier": "t", "samples": 12,
                                                                  "shards": {"000000.tar": None}}]}]}
    (root / "plan.json").write_text(json.dumps(plan))
    return str(root / "plan.json")


def test_train_loop_accumulates_micro_batches_like_one_big_batch(tmp_path, monkeypatch):
    import json

    from curation.errors import CurationError
    from curation.trainer import train as train_module
    from curation.trainer.train import TrainOptions, load_run, train

    monkeypatch.setattr(train_module, "plot_losses", lambda *a: None)  # matplotlib is not what this tests

    plan = tiny_plan(tmp_path / "curated")
    common = dict(plan=plan, arch="llava", steps=2, workers=0, shuffle_buffer=1, warmup=1, save_every=100,
                  progress=False, trainable="full")
    train(TrainOptions(out=str(tmp_path / "big"), batch_size=4, **common))
    train(TrainOptions(out=str(tmp_path / "acc"), batch_size=2, grad_accum=2, activation_checkpointing=True,
                       **common))

    def log(run):
        return [json.loads(line) for line in (tmp_path / run / "loss.jsonl").read_text().splitlines()]
    big, acc = log("big"), log("acc")
    assert [r["samples"] for r in acc] == [4, 4] and [r["tokens"] for r in acc] == [r["tokens"] for r in big]
    assert [r["loss"] for r in acc] == pytest.approx([r["loss"] for r in big], abs=2e-4)
    state = json.loads((tmp_path / "acc" / "checkpoint" / "state.json").read_text())
    assert (state["step"], state["batches_done"], state["grad_accum"]) == (2, 4, 2)
    big_model, acc_model = load_run(tmp_path / "big")[0], load_run(tmp_path / "acc")[0]
    for (name, a), b in zip(big_model.state_dict().items(), acc_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name

    with pytest.raises(CurationError, match="grad_accum 2 -> 1"):  # resuming with another effective batch
        train(TrainOptions(out=str(tmp_path / "acc"), batch_size=2, **{**common, "steps": 3}))


def test_train_command_takes_the_engine_flags(tmp_path, monkeypatch, capsys):
    import json

    from curation.trainer import train as train_module
    from curation.trainer.cli import main as trainer_cli

    monkeypatch.setattr(train_module, "plot_losses", lambda *a: None)
    plan, out = tiny_plan(tmp_path / "curated"), tmp_path / "run"
    assert trainer_cli(["train", "--plan", plan, "--arch", "owl3", "--steps", "1", "--batch-size", "2",
                        "--grad-accum", "2", "--activation-checkpointing", "--attention", "dense", "--workers", "0",
                        "--out", str(out), "--no-progress"]) == 0
    assert "2 x 2 samples per step, dense attention, activation checkpointing" in capsys.readouterr().out
    assert [json.loads(line)["samples"] for line in (out / "loss.jsonl").read_text().splitlines()] == [4]
    assert trainer_cli(["train", "--plan", plan, "--arch", "owl3", "--grad-accum", "0", "--out",
                        str(tmp_path / "x")]) == 2
    assert "--grad-accum must be at least 1" in capsys.readouterr().err
