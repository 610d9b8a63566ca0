"""Padding-free micro-batches (``padding_free``) for SFT and DPO on the shipped tiny Llama.

The same examples collated padded ([B, T] with an attention mask) and padding free (one row
[1, total], positions restarting at each sequence) must give the same loss, metrics and gradient
of every parameter in float32, while fewer tokens go through the model. A model that would
attend across the packed sequences (OPT derives its positions from the attention mask) is
refused when the trainer is built.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from fastalign import assets, hf
from fastalign.cli import main as cli_main
from fastalign.data import (
    PreferenceCollator,
    SFTCollator,
    encode_preference,
    encode_sft,
    load_jsonl,
    pack_examples,
)
from fastalign.trainers.dpo import DPOConfig, DPOTrainer
from fastalign.trainers.run import JOBS, run_job
from fastalign.trainers.sft import SFTConfig, SFTTrainer

LENGTHS = dict(max_length=64, max_prompt_length=32)


@pytest.fixture(scope="module")
def tok():
    return assets.load_default_tokenizer()


def _examples(tok, kind, encode, n=16):
    records = load_jsonl(assets.default_data_path(kind), kind)[:n]
    return encode(records, tok, **LENGTHS)


def _config(cls, tmp_path, name, **options):
    base = dict(output_dir=str(tmp_path / name), max_steps=2, batch_size=4, lr=1e-3,
                device="cpu", progress=False, plots=False)
    return cls(**(base | options))


def _tokens_into_the_model(model, run):
    """(what ``run()`` returns, the number of token positions the model's embedding saw)."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(args[0].numel()))
    try:
        return run(), sum(seen)
    finally:
        hook.remove()


def _loss_metrics_gradients(trainer, indices):
    batch = trainer.batch(indices)
    trainer.model.zero_grad(set_to_none=True)
    (loss, metrics), tokens = _tokens_into_the_model(trainer.model,
                                                     lambda: trainer.compute_loss(batch))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()
             if p.grad is not None}
    return loss.detach(), {k: float(v) for k, v in metrics.items()}, grads, tokens


def _assert_padding_free_equals_padded(padded, packed, indices):
    loss, metrics, grads, padded_tokens = _loss_metrics_gradients(padded, indices)
    loss_pf, metrics_pf, grads_pf, packed_tokens = _loss_metrics_gradients(packed, indices)
    torch.testing.assert_close(loss_pf, loss, rtol=1e-5, atol=1e-6)
    assert metrics_pf.keys() == metrics.keys()
    for key, value in metrics.items():
        assert metrics_pf[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    trainable = {name for name, p in padded.model.named_parameters() if p.requires_grad}
    assert grads_pf.keys() == grads.keys() == trainable
    for name, grad in grads.items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grads_pf[name], grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # The padded batch runs every row to the longest one; padding free runs the real tokens.
    batch_pf = packed.batch(indices)
    real_tokens = int(batch_pf["cu_seqlens"][-1])
    assert "attention_mask" not in batch_pf and batch_pf["input_ids"].shape == (1, real_tokens)
    assert padded_tokens == padded.batch(indices)["input_ids"].numel()
    assert packed_tokens == real_tokens < padded_tokens


def test_sft_padding_free_equals_padded(tmp_path, tok):
    examples = _examples(tok, "sft", encode_sft)
    for completion_only in (True, False):
        trainers = [SFTTrainer(assets.build_default_model(seed=3), tok, examples,
                               _config(SFTConfig, tmp_path, f"{completion_only}{free}",
                                       padding_free=free, completion_only_loss=completion_only))
                    for free in (False, True)]
        _assert_padding_free_equals_padded(*trainers, [5, 0, 9, 2])


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_dpo_padding_free_equals_padded(tmp_path, tok, reference):
    examples = _examples(tok, "dpo", encode_preference)
    trainers = []
    for free in (False, True):
        model = assets.build_default_model(seed=4)
        # The sft term needs per-sequence lengths; ipo's mean log-probs do too.
        trainer = DPOTrainer(model, tok, examples, _config(
            DPOConfig, tmp_path, f"{reference}{free}", padding_free=free, reference=reference,
            loss_type=("sigmoid", "ipo", "sft"), loss_weights=(1.0, 0.5, 0.2)))
        trainer.before_training()
        with torch.no_grad():  # away from the reference, so that every term is non-trivial
            generator = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        trainers.append(trainer)
    if reference == "precomputed":
        torch.testing.assert_close(trainers[1].precomputed["train"],
                                   trainers[0].precomputed["train"], rtol=1e-5, atol=1e-5)
    _assert_padding_free_equals_padded(*trainers, [3, 0, 7, 12])


def test_padding_free_and_packing_train_through_the_cli(tmp_path, capsys):
    config = _config(DPOConfig, tmp_path, "run", padding_free=True, memory_report=True)
    result = run_job(JOBS["dpo"], config, print_summary=True)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(v))
                                    for v in result.metrics.values())
    assert "loss memory" in capsys.readouterr().out  # measured, or said to be unmeasurable
    for flag in ("--padding-free", "--packing"):
        out = tmp_path / flag
        assert cli_main(["train", "sft", flag, "--output", str(out), "--max-steps", "2",
                         "--no-progress", "--no-plots"]) == 0
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_collators_put_the_sequences_back_to_back():
    examples = [{"prompt_ids": [1, 5], "completion_ids": [7, 2]},
                {"prompt_ids": [1], "completion_ids": [8, 9, 2]}]
    batch = SFTCollator(pad_token_id=0, padding_free=True)(examples)
    assert batch["input_ids"].tolist() == [[1, 5, 7, 2, 1, 8, 9, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 2, -100, 8, 9, 2]]
    assert batch["cu_seqlens"].tolist() == [0, 4, 8] and "attention_mask" not in batch
    pairs = [{"prompt_ids": [1, 5], "chosen_ids": [7, 2], "rejected_ids": [8]}]
    batch = PreferenceCollator(pad_token_id=0, padding_free=True)(pairs)
    assert batch["input_ids"].tolist() == [[1, 5, 7, 2, 1, 5, 8]]
    assert batch["cu_seqlens"].tolist() == [0, 4, 7]
    with pytest.raises(ValueError, match="pad_to_multiple_of pads rows.*set only one"):
        SFTCollator(pad_token_id=0, pad_to_multiple_of=8, padding_free=True)


def _opt(tok):
    config = transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    ffn_dim=64, word_embed_proj_dim=32, vocab_size=len(tok),
                                    pad_token_id=tok.pad_token_id)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_a_model_that_attends_across_packed_sequences_is_refused(tmp_path, tok):
    hf.check_packed_attention(assets.build_default_model())  # the tiny Llama keeps them apart
    sft = _examples(tok, "sft", encode_sft, 4)
    with pytest.raises(ValueError, match=r"padding_free: OPTForCausalLM \(attention '\w+'\) "
                                         r"attends across sequences packed"):
        SFTTrainer(_opt(tok), tok, sft, _config(SFTConfig, tmp_path, "opt", padding_free=True))
    SFTTrainer(_opt(tok), tok, sft, _config(SFTConfig, tmp_path, "opt-padded"))
    pairs = _examples(tok, "dpo", encode_preference, 4)
    with pytest.raises(ValueError, match="padding_free: OPTForCausalLM"):  # the reference too
        DPOTrainer(assets.build_default_model(), tok, pairs,
                   _config(DPOConfig, tmp_path, "ref", padding_free=True), ref_model=_opt(tok))


def test_packed_sequence_logprobs_take_no_attention_mask(tok):
    model = assets.build_default_model()
    ids = torch.tensor([[1, 5, 7, 2, 1, 8, 9, 2]])
    with pytest.raises(ValueError, match="take no attention_mask"):
        hf.sequence_logprobs(model, ids, labels=ids, attention_mask=torch.ones_like(ids),
                             cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match=r"input_ids of shape \[1, total\]"):
        hf.sequence_logprobs(model, ids.view(2, 4), labels=ids.view(2, 4),
                             cu_seqlens=torch.tensor([0, 4, 8]))


# ------------------------------------------------------------------------------------- packing


def _example(n):
    return {"prompt_ids": [1] * (n // 2), "completion_ids": [7] * (n - n // 2)}


def test_pack_examples_fills_rows_best_fit_decreasing():
    examples = [_example(n) for n in (3, 5, 1, 4, 3)]
    rows = pack_examples(examples, 8)
    # Longest first, each into the row it fills best: 5+3, then 4+3+1.
    assert [[len(e["prompt_ids"]) + len(e["completion_ids"]) for e in row["packed"]]
            for row in rows] == [[5, 3], [4, 3, 1]]
    placed = [id(e) for row in rows for e in row["packed"]]
    assert sorted(placed) == sorted(map(id, examples))  # every example once, whole
    with pytest.raises(ValueError, match="9 tokens, more than the rows' max_length"):
        pack_examples([_example(9)], 8)
    with pytest.raises(ValueError, match="takes encoded SFT examples"):
        pack_examples([{"prompt": "a", "completion": "b"}], 8)


def test_sft_packing_trains_on_rows_equal_to_their_examples_padded(tmp_path, tok):
    examples = _examples(tok, "sft", encode_sft, 32)
    packed = SFTTrainer(assets.build_default_model(seed=5), tok, examples,
                        _config(SFTConfig, tmp_path, "packed", packing=True, batch_size=2,
                                **LENGTHS))
    rows = packed.train_examples
    assert len(rows) < len(examples) and sum(len(row["packed"]) for row in rows) == len(examples)
    assert all(sum(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in row["packed"]) <= 64
               for row in rows)
    # Two packed rows score exactly what their examples score in an ordinary padded batch.
    members = [e for row in rows[:2] for e in row["packed"]]
    padded = SFTTrainer(assets.build_default_model(seed=5), tok, members,
                        _config(SFTConfig, tmp_path, "padded", batch_size=len(members)))
    loss, metrics, grads, padded_tokens = _loss_metrics_gradients(padded, range(len(members)))
    loss_p, metrics_p, grads_p, packed_tokens = _loss_metrics_gradients(packed, [0, 1])
    torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=1e-6)
    assert metrics_p == pytest.approx(metrics, rel=1e-5, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_p[name], grad, rtol=1e-4,
                                   atol=1e-5 * float(grad.abs().max()))
    assert packed_tokens < padded_tokens
    assert packed.train().step == 2
