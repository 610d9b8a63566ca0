"""The SFT, reward-model and KTO trainers on the shipped tiny Llama and data (CPU, seconds).

Each trainer's ``compute_loss`` is checked against an eager computation written here
independently (``model(...).logits`` → ``log_softmax`` → gather → masked sums → the loss
formula), in value and in the gradient of every parameter.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import eager_sequence_logps
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fastalign import assets
from fastalign.data import KTOCollator, encode_kto, encode_preference, encode_sft, load_jsonl
from fastalign.trainers.kto import (
    KTOConfig,
    KTOTrainer,
    fixed_kl_partners,
)
from fastalign.trainers.reward import RewardConfig, RewardTrainer
from fastalign.trainers.run import load_model
from fastalign.trainers.sft import SFTConfig, SFTTrainer

LENGTHS = dict(max_length=64, max_prompt_length=32)
pytestmark = [
    pytest.mark.filterwarnings("ignore:desirable_weight × "),  # KTO's class-balance advice
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),  # peft
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on a shared, busy
    machine OpenMP threads waiting for each other make a step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return assets.load_default_tokenizer()


def _encoded(kind, data_kind, encode, tok, n):
    return encode(load_jsonl(assets.default_data_path(kind), data_kind)[:n], tok, **LENGTHS)


@pytest.fixture(scope="module")
def sft_data(tok):
    return _encoded("sft", "sft", encode_sft, tok, 64)


@pytest.fixture(scope="module")
def pref_data(tok):
    return _encoded("rm", "preference", encode_preference, tok, 64)


@pytest.fixture(scope="module")
def kto_data(tok):
    return _encoded("kto", "kto", encode_kto, tok, 64)


def config(cls, tmp_path, name="out", **options):
    base = dict(output_dir=str(tmp_path / name), max_steps=20, batch_size=8, lr=1e-3,
                device="cpu", progress=False, plots=False)
    return cls(**(base | options))


def policy(seed=0):
    return assets.build_default_model(seed=seed)


def reward_model(tok, seed=0):
    return load_model(None, seed=seed, sequence_classifier=True, pad_token_id=tok.pad_token_id)


def losses(trainer):
    return [record["loss"] for record in trainer.metrics_log.records]


def assert_decreases(values):
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < first - 0.02 * abs(first), values


def assert_same_state(model, loaded):
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(expected) <= set(got)
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


def gradients(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(model, fused_loss, eager_loss):
    fused, eager = gradients(model, fused_loss), gradients(model, eager_loss)
    assert set(fused) == set(eager) == {n for n, p in model.named_parameters() if p.requires_grad}
    scale = max(g.abs().max() for g in eager.values())
    assert scale > 0
    for name, g in eager.items():
        torch.testing.assert_close(fused[name], g, rtol=1e-4, atol=5e-6 * float(scale),
                                   msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------------ SFT


def test_sft_trains_writes_plots_and_saves(tmp_path, tok, sft_data):
    trainer = SFTTrainer(policy(), tok, sft_data, config(SFTConfig, tmp_path, plots=True),
                         eval_examples=sft_data[:10])
    result = trainer.train()
    assert result.step == 20
    assert_decreases(losses(trainer))
    record = trainer.metrics_log.records[-1]
    assert {"loss", "num_tokens", "entropy", "grad_norm", "learning_rate",
            "mean_token_accuracy"} <= set(record)
    # TRL's num_tokens: every attended input token trained on so far, a running total
    every_token = sum(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in sft_data)
    counts = [r["num_tokens"] for r in trainer.metrics_log.records]
    assert counts == sorted(counts) and counts[0] > 0
    epoch = len(sft_data) // 8  # steps per pass over the data
    assert counts[epoch - 1] == every_token and counts[2 * epoch - 1] == 2 * every_token
    assert 0 < record["entropy"] <= math.log(616) + 1e-4
    assert {"eval/loss", "eval/entropy", "eval/mean_token_accuracy"} <= set(result.eval_metrics)
    for family in ("loss", "entropy", "num_tokens", "grad_norm", "mean_token_accuracy"):
        png = tmp_path / "out" / "plots" / f"{family}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", family
    assert_same_state(trainer.model, AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    assert_token_accuracy_matches_eager(trainer, trainer.batch(range(8)))


def assert_token_accuracy_matches_eager(trainer, batch):
    """``mean_token_accuracy`` against the arg-max of the model's own materialised logits."""
    with torch.no_grad():
        _, metrics = trainer.compute_loss(batch)
        logits = trainer.model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    correct = (logits.argmax(-1) == labels)[scored]
    top_two = logits.topk(2, dim=-1).values[scored]
    assert (top_two[:, 0] - top_two[:, 1] > 1e-5).all()  # no near-tie for float order to decide
    assert 0.1 < float(correct.float().mean()) < 1  # the trained model is right on some tokens
    torch.testing.assert_close(metrics["mean_token_accuracy"], correct.float().mean())


@pytest.mark.parametrize("completion_only", [True, False])
def test_sft_loss_and_gradients_match_eager(tmp_path, tok, sft_data, completion_only):
    trainer = SFTTrainer(policy(), tok, sft_data,
                         config(SFTConfig, tmp_path, completion_only_loss=completion_only))
    batch = trainer.batch(range(8))
    loss, metrics = trainer.compute_loss(batch)

    labels = batch["labels"]
    if not completion_only:
        labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    sums, mask, entropy = eager_sequence_logps(trainer.model, batch["input_ids"],
                                               batch["attention_mask"], labels, entropy=True)
    eager = -sums.sum() / mask.sum()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    assert int((labels[:, 1:] != -100).sum()) == int(mask.sum())
    assert int(mask.sum()) > int((batch["labels"][:, 1:] != -100).sum()) or completion_only
    torch.testing.assert_close(metrics["entropy"], (entropy * mask).sum() / mask.sum(),
                               rtol=1e-5, atol=1e-6)
    assert_same_gradients(trainer.model, loss, eager)


def test_sft_loss_forms_its_gradients_in_forward(tmp_path, tok, sft_data, monkeypatch):
    """SFT's loss goes through linear_nll (6·N·H·V): backward never recomputes the head's logits
    (linear_logprobs' backward), and the metrics come from the same pass."""
    from fastalign.ops.linear_logprobs import LinearLogprobsFunction

    def recompute(*args):
        raise AssertionError("the head's logits were recomputed in backward")

    monkeypatch.setattr(LinearLogprobsFunction, "backward", staticmethod(recompute))
    trainer = SFTTrainer(policy(), tok, sft_data, config(SFTConfig, tmp_path))
    batch = trainer.batch(range(4))
    loss, metrics = trainer.compute_loss(batch)
    loss.backward()
    assert trainer.model.lm_head.weight.grad is not None
    assert 0 < float(metrics["entropy"]) and 0 <= float(metrics["mean_token_accuracy"]) <= 1


class RecordingSFT(SFTTrainer):
    """Records the example indices of every training micro-batch; fails at call ``fail_at``."""

    def __init__(self, *args, fail_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen, self.fail_at = [], fail_at

    def batch(self, indices, examples=None):
        if examples is None:
            if len(self.seen) + 1 == self.fail_at:
                raise RuntimeError("interrupted")
            self.seen.append(list(indices))
        return super().batch(indices, examples)


def test_sft_resume_is_exact(tmp_path, tok, sft_data):
    options = dict(max_steps=6, save_steps=3, batch_size=4, eval_steps=2)
    data, held_out = sft_data[:20], sft_data[20:26]  # 5 batches an epoch: step 6 is in epoch 2

    def trainer(name, **kwargs):
        return RecordingSFT(policy(), tok, data, config(SFTConfig, tmp_path, name, **options,
                                                        **kwargs.pop("cfg", {})),
                            eval_examples=held_out, **kwargs)

    full = trainer("full")
    full.train()
    first = trainer("parts", fail_at=5)
    with pytest.raises(RuntimeError, match="interrupted"):
        first.train()  # steps 1-4 done, the checkpoint is step 3's
    assert first.seen == full.seen[:4]
    second = trainer("parts", cfg={"resume": True})
    second.train()
    assert second.step == 6
    assert first.seen[:3] + second.seen == full.seen  # steps 4-6 again: none lost or repeated
    assert_same_state(full.model, second.model)

    def records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    assert records("parts") == records("full")
    assert [r["step"] for r in records("full")] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------- reward model


def test_reward_trains_and_saves(tmp_path, tok, pref_data):
    trainer = RewardTrainer(reward_model(tok), tok, pref_data, config(RewardConfig, tmp_path),
                            eval_examples=pref_data[:6])
    result = trainer.train()
    assert_decreases(losses(trainer))
    record = trainer.metrics_log.records[-1]
    assert {"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "min_reward",
            "mean_reward", "max_reward", "num_tokens"} <= set(record)
    assert record["margin"] == pytest.approx(record["rewards/chosen"] - record["rewards/rejected"],
                                             abs=1e-5)
    assert record["mean_reward"] == pytest.approx(
        (record["rewards/chosen"] + record["rewards/rejected"]) / 2, abs=1e-5)
    assert record["min_reward"] <= record["mean_reward"] <= record["max_reward"]
    assert "eval/accuracy" in result.eval_metrics
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert_same_state(trainer.model, loaded)
    batch = trainer.batch(range(4))
    with torch.no_grad():
        expected = trainer.model(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected)


def test_reward_loss_and_gradients_match_eager(tmp_path, tok, pref_data):
    trainer = RewardTrainer(reward_model(tok, seed=3), tok, pref_data,
                            config(RewardConfig, tmp_path, center_rewards_coefficient=0.05))
    batch = trainer.batch(range(8))
    loss, metrics = trainer.compute_loss(batch)

    # Independently: the backbone, the score head read at each row's last attended token.
    model, mask = trainer.model, batch["attention_mask"]
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    last = mask.sum(-1) - 1
    scores = model.score(hidden)[torch.arange(len(last)), last, 0]
    chosen, rejected = scores.chunk(2)
    eager = (-F.logsigmoid(chosen - rejected).mean()
             + 0.05 * ((chosen + rejected) ** 2).mean())
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["accuracy"], (chosen > rejected).float().mean())
    torch.testing.assert_close(metrics["margin"], (chosen - rejected).mean().detach())
    torch.testing.assert_close(metrics["rewards/chosen"], chosen.mean().detach())
    torch.testing.assert_close(metrics["rewards/rejected"], rejected.mean().detach())
    assert_same_gradients(model, loss, eager)


# ---------------------------------------------------------------------------------------- KTO


def test_kto_trains_and_saves(tmp_path, tok, kto_data):
    # 5 eval examples in batches of 4: the lone fifth joins the first batch (never B = 1).
    trainer = KTOTrainer(policy(), tok, kto_data, config(KTOConfig, tmp_path, batch_size=4),
                         eval_examples=kto_data[:5])
    assert trainer.reference.mode == "copy"
    result = trainer.train()
    assert_decreases(losses(trainer))
    record = trainer.metrics_log.records[-1]
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "logps/chosen", "logps/rejected", "count/chosen", "count/rejected"} <= set(record)
    assert record["count/chosen"] + record["count/rejected"] == 4
    assert record["rewards/margins"] > 0
    assert {"eval/loss", "eval/kl"} <= set(result.eval_metrics)
    assert_same_state(trainer.model, AutoModelForCausalLM.from_pretrained(tmp_path / "out"))


def eager_kto(policy_model, ref_model, batch, *, beta, w_d, w_u):
    ids = ("input_ids", "attention_mask", "labels")
    kl_ids = tuple(f"kl_{key}" for key in ids)
    logps, _ = eager_sequence_logps(policy_model, *(batch[k] for k in ids))
    with torch.no_grad():
        kl_logps, _ = eager_sequence_logps(policy_model, *(batch[k] for k in kl_ids))
        ref_logps, _ = eager_sequence_logps(ref_model, *(batch[k] for k in ids))
        ref_kl_logps, _ = eager_sequence_logps(ref_model, *(batch[k] for k in kl_ids))
    z = torch.clamp((kl_logps - ref_kl_logps).mean(), min=0)
    r = logps - ref_logps
    good = w_d * (1 - torch.sigmoid(beta * (r - z)))
    bad = w_u * (1 - torch.sigmoid(beta * (z - r)))
    loss = torch.where(batch["desirable"], good, bad).mean()
    return loss, z, beta * r.detach()


@pytest.mark.parametrize("pairing", ["batch", "dataset"])
def test_kto_loss_and_gradients_match_eager(tmp_path, tok, kto_data, pairing):
    ref = scaled_policy()
    options = dict(beta=0.5, desirable_weight=1.3, undesirable_weight=0.7, kl_pairing=pairing)
    trainer = KTOTrainer(policy(seed=0), tok, kto_data, config(KTOConfig, tmp_path, **options),
                         ref_model=ref)
    batch = trainer.batch(range(8))
    assert batch["desirable"].any() and not batch["desirable"].all()
    loss, metrics = trainer.compute_loss(batch)
    eager, z, rewards = eager_kto(trainer.model, ref, batch, beta=0.5, w_d=1.3, w_u=0.7)
    assert float(z) > 0.1
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["kl"], z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["rewards/chosen"], rewards[batch["desirable"]].mean(),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["rewards/rejected"], rewards[~batch["desirable"]].mean(),
                               rtol=1e-4, atol=1e-5)
    assert_same_gradients(trainer.model, loss, eager)


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_kto_apo_zero_unpaired_matches_eager(tmp_path, tok, kto_data, reference):
    """TRL's KTO loss_type "apo_zero_unpaired": no KL pairs, any batch size (here 3, odd)."""
    ref = scaled_policy()
    options = dict(beta=0.5, desirable_weight=1.3, undesirable_weight=0.7, batch_size=3,
                   loss_type="apo_zero_unpaired", reference=reference)
    trainer = KTOTrainer(policy(seed=0), tok, kto_data, config(KTOConfig, tmp_path, **options),
                         ref_model=ref)
    trainer.before_training()
    batch = trainer.batch([0, 5, 2])
    assert "kl_input_ids" not in batch
    loss, metrics = trainer.compute_loss(batch)
    ids = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    logps, _ = eager_sequence_logps(trainer.model, *ids)
    with torch.no_grad():
        ref_logps, _ = eager_sequence_logps(ref, *ids)
    r = logps - ref_logps
    eager = torch.where(batch["desirable"], 1.3 * (1 - torch.sigmoid(0.5 * r)),
                        0.7 * torch.sigmoid(0.5 * r)).mean()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    assert metrics["kl"].item() == 0.0
    assert_same_gradients(trainer.model, loss, eager)


def test_kto_apo_zero_unpaired_trains_with_batches_of_one(tmp_path, tok, kto_data):
    trainer = KTOTrainer(policy(), tok, kto_data[:6],
                         config(KTOConfig, tmp_path, batch_size=1,
                                loss_type="apo_zero_unpaired"),
                         eval_examples=kto_data[:1])
    result = trainer.train()
    assert math.isfinite(result.metrics["loss"]) and "eval/loss" in result.eval_metrics


def test_kto_fixed_pairs(tok, kto_data):
    partners = fixed_kl_partners(10, seed=3)
    assert sorted(partners) == list(range(10))  # every completion used once
    assert all(j != i for i, j in enumerate(partners))
    assert partners == fixed_kl_partners(10, seed=3) != fixed_kl_partners(10, seed=4)
    examples = [dict(e, kl_completion_ids=kto_data[j]["completion_ids"])
                for e, j in zip(kto_data[:3], [1, 2, 0])]
    batch = KTOCollator(pad_token_id=0, max_length=64)(examples[:1])  # B = 1 collates
    row = examples[0]["prompt_ids"] + kto_data[1]["completion_ids"]
    assert batch["kl_input_ids"][0].tolist() == row
    assert batch["kl_labels"][0, len(examples[0]["prompt_ids"]):].tolist() == \
        kto_data[1]["completion_ids"]


def scaled_policy(factor=1.5):
    """A reference that differs from the policy (z_ref > 0 on the shipped data)."""
    model = policy()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model


def test_kto_precomputed_reference_equals_copy(tmp_path, tok, kto_data):
    data = kto_data[:24]

    def run(name, **options):
        trainer = KTOTrainer(policy(), tok, data,
                             config(KTOConfig, tmp_path, name, max_steps=3, batch_size=4,
                                    eval_steps=3, **options),
                             ref_model=scaled_policy(), eval_examples=kto_data[24:30])
        trainer.train()
        return trainer

    copy = run("copy", reference="copy", kl_pairing="dataset")
    precomputed = run("pre", reference="precomputed", save_steps=3)
    assert precomputed.kl_pairing == "dataset" and precomputed.reference.model is None
    assert precomputed.precomputed["train"].shape == (24, 2)
    first, first_pre = copy.metrics_log.records[0], precomputed.metrics_log.records[0]
    assert first_pre["loss"] == pytest.approx(first["loss"], rel=1e-5)
    assert first_pre["kl"] == pytest.approx(first["kl"], abs=1e-5)
    assert first["kl"] > 0.1 and first["rewards/margins"] != 0  # a reference unlike the policy
    # Later steps and the held-out metrics agree too: same pairs, same reference.
    for key in ("loss", "eval/loss", "eval/kl", "rewards/margins"):
        assert precomputed.metrics_log.records[-1][key] == pytest.approx(
            copy.metrics_log.records[-1][key], rel=1e-4, abs=1e-5), key
    # The table survives a checkpoint: a resumed run finds it and never needs a reference model.
    resumed = KTOTrainer(policy(), tok, data,
                         config(KTOConfig, tmp_path, "pre", max_steps=4, batch_size=4,
                                reference="precomputed", resume=True))
    resumed.train()
    assert resumed.reference.model is None
    assert torch.equal(resumed.precomputed["train"], precomputed.precomputed["train"])


def test_kto_adapters_reference(tmp_path, tok, kto_data):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(policy(), peft.LoraConfig(r=4, target_modules=["q_proj",
                                                                                "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = KTOTrainer(model, tok, kto_data,
                         config(KTOConfig, tmp_path, max_steps=4, batch_size=4, lr=1e-2))
    assert trainer.reference.mode == "adapters" and trainer.reference.model is None
    trainer.train()
    records = trainer.metrics_log.records
    assert records[0]["loss"] == pytest.approx(0.5)  # LoRA starts as the identity
    assert records[-1]["rewards/margins"] != 0
    for name, param in model.named_parameters():  # only the adapters moved
        assert torch.equal(param, before[name]) != param.requires_grad, name
    batch = trainer.batch(range(4))
    with torch.no_grad():  # the reference is the untouched base model
        ref = trainer.reference.sequence_logprobs(
            batch["input_ids"], labels=batch["labels"],
            attention_mask=batch["attention_mask"]).sum_logps
        expected, _ = eager_sequence_logps(policy(), batch["input_ids"],
                                           batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-4)
    assert trainer.model.training  # the reference pass restored the mode


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("options, match", [
    (dict(beta=0), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(desirable_weight=-1.0), "desirable_weight"),
    (dict(desirable_weight=0.0, undesirable_weight=0.0), "both 0"),
    (dict(reference="frozen"), "reference must be one of"),
    (dict(kl_pairing="random"), "kl_pairing must be one of"),
    (dict(reference="precomputed", kl_pairing="batch"), "kl_pairing='dataset'"),
    (dict(batch_size=1), "batch_size >= 2"),
    (dict(loss_type="apo_down"), "loss_type must be one of"),
])
def test_kto_bad_options(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        config(KTOConfig, tmp_path, **options)


def test_other_bad_options(tmp_path, tok, kto_data, pref_data):
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        config(RewardConfig, tmp_path, center_rewards_coefficient=-0.01)
    with pytest.raises(ValueError, match="completion_only_loss"):
        config(SFTConfig, tmp_path, completion_only_loss="yes")
    for pairing in ("batch", "dataset"):
        with pytest.raises(ValueError, match="fewer than one batch of 8"):
            KTOTrainer(policy(), tok, kto_data[:5], config(KTOConfig, tmp_path,
                                                           kl_pairing=pairing))
    with pytest.raises(ValueError, match="at least 2 eval examples"):
        KTOTrainer(policy(), tok, kto_data, config(KTOConfig, tmp_path),
                   eval_examples=kto_data[:1])
    with pytest.raises(ValueError, match="adapters"):
        KTOTrainer(policy(), tok, kto_data, config(KTOConfig, tmp_path, reference="adapters"))
    with pytest.warns(UserWarning, match="no undesirable example"):
        KTOTrainer(policy(), tok, [e for e in kto_data if e["desirable"]],
                   config(KTOConfig, tmp_path))
    two_labels = load_model(None, seed=0, sequence_classifier=True, pad_token_id=0)
    two_labels.config.num_labels = 2
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardTrainer(two_labels, tok, pref_data, config(RewardConfig, tmp_path))
    causal_lm = policy()
    causal_lm.config.num_labels = 1
    trainer = RewardTrainer(causal_lm, tok, pref_data, config(RewardConfig, tmp_path))
    with pytest.raises(ValueError, match="one score per sequence"):
        trainer.train()
