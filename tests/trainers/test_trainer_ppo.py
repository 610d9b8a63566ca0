"""PPO, GRPO and RLOO (``fastalign.trainers.ppo``) and the reward functions, on the shipped tiny
Llama, tokenizer and prompts.

The eager ground truth of the loss is written here independently: the model's own ``logits``,
``log_softmax``, ``gather``, the clipped surrogate, the KL estimators, the exact KL from both
models' logits and the clipped value loss.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from fastalign import assets, data
from fastalign.trainers.config import pad_token_id
from fastalign.trainers.ppo import GRPOConfig, PPOConfig, PPOTrainer, encode_prompt_examples
from fastalign.trainers.reward_functions import (
    BUILTIN_REWARDS,
    POLITE_WORDS,
    RUDE_WORDS,
    length_reward,
    polite_reward,
    resolve_reward_fn,
)


@pytest.fixture(scope="module")
def records():
    return data.load_jsonl(assets.default_data_path("grpo"), "prompt")


@pytest.fixture(scope="module")
def prompts(records, tokenizer):
    return encode_prompt_examples(records, tokenizer, max_length=64, max_prompt_length=32)


def _config(tmp_path, config_class=GRPOConfig, **options):
    base = dict(output_dir=str(tmp_path), max_steps=2, batch_size=4, max_new_tokens=8,
                lr=1e-3, progress=False, plots=False, seed=0, max_length=64,
                max_prompt_length=32)
    return config_class(**(base | options))


def _reward_model(tokenizer, seed=3):
    config = AutoConfig.from_pretrained(assets.default_model_dir(), num_labels=1)
    config.pad_token_id = pad_token_id(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(config)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# The three modes train and write what transformers loads back
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ppo", "grpo", "rloo"])
def test_modes_train_and_save_a_loadable_model(tmp_path, tokenizer, prompts, mode):
    config_class = PPOConfig if mode == "ppo" else GRPOConfig
    config = _config(tmp_path, config_class, mode=mode, num_minibatches=2,
                     num_generations=2 if mode == "ppo" else 4)
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:16], config,
                         eval_examples=prompts[16:20])
    result = trainer.train()
    assert result.step == 2
    for key in ("reward", "reward_std", "kl", "entropy", "loss/policy", "clip_ratio/region_mean",
                "completions/mean_length", "kl_coef", "grad_norm", "loss", "num_tokens"):
        assert math.isfinite(result.metrics[key]), key
    assert 1 <= result.metrics["completions/mean_length"] <= 8
    assert ("loss/value" in result.metrics) == (mode == "ppo")
    assert ("frac_reward_zero_std" in result.metrics) == (mode != "ppo")
    assert set(result.eval_metrics) == {"eval/reward", "eval/reward_std",
                                        "eval/completions/mean_length"}
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2]

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, p), q in zip(trainer.model.named_parameters(), loaded.parameters()):
        assert torch.equal(p.detach(), q), name
    assert (tmp_path / "value_head.pt").exists() == (mode == "ppo")
    if mode == "ppo":
        head = torch.nn.Linear(64, 1)
        head.load_state_dict(torch.load(tmp_path / "value_head.pt"))
        assert torch.equal(head.weight, trainer.value_head.weight.detach())
        # The value head is trained with the model: it left its seeded start.
        start = PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:16],
                           config).value_head.weight
        assert not torch.equal(start, head.weight)


# ----------------------------------------------------------------------------------------------
# Rollouts: prompts, completions cut at eos, scores from a function or a model
# ----------------------------------------------------------------------------------------------


def test_rollout_cuts_at_eos_and_scores_the_decoded_text(tmp_path, tokenizer, prompts, records):
    calls = []

    def reward(prompt_texts, completion_texts):
        calls.append((list(prompt_texts), list(completion_texts)))
        return [float(len(c)) for c in completion_texts]

    config = _config(tmp_path, num_generations=2, missing_eos_penalty=100.0)
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts, config,
                         reward_fn=reward)
    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    words = [tokenizer.convert_tokens_to_ids(t) for t in ("ĠSure", "Ġglad", "Ġbad", "Ġcode")]
    fixed = torch.tensor([[words[0], eos, words[2], words[3]],      # eos second: 2 tokens
                          [words[1], words[1], words[1], words[1]],  # no eos: 4 tokens
                          [eos, words[0], words[0], words[0]],      # eos first: 1 token
                          [words[3], words[2], eos, pad]])           # generate's own padding

    def generate(input_ids, attention_mask, generation_config):
        assert generation_config.do_sample and generation_config.top_k == 0
        return torch.cat([input_ids, fixed], dim=1)

    trainer.model.generate = generate
    rollout = trainer.rollout([5, 9])

    (prompt_texts, completion_texts), = calls
    assert prompt_texts == [records[5]["prompt"]] * 2 + [records[9]["prompt"]] * 2
    assert completion_texts == [" Sure", " glad glad glad glad", "", " code bad"]
    expected_lengths = [2, 4, 1, 3]
    for i, length in enumerate(expected_lengths):
        prompt_length = len(prompts[5 if i < 2 else 9]["prompt_ids"])
        row = rollout.labels[i]
        scored = (row != -100).nonzero().flatten().tolist()
        assert scored == list(range(prompt_length, prompt_length + length))
        assert int(rollout.attention_mask[i].sum()) == prompt_length + length
        assert int(rollout.mask[i].sum()) == length
    raw = torch.tensor([float(len(c)) for c in completion_texts])
    assert rollout.metrics["reward"] == pytest.approx(float(raw.mean()))
    assert rollout.scores.tolist() == (raw - 100.0 * torch.tensor([0, 1, 0, 0])).tolist()
    assert rollout.metrics["completions/mean_length"] == pytest.approx(2.5)
    assert rollout.metrics["completions/clipped_ratio"] == pytest.approx(0.25)
    assert rollout.metrics["completions/min_length"] == 1
    assert rollout.metrics["completions/max_length"] == 4
    # the completion without eos (the second, 4 tokens) is left out of the terminated ones
    assert rollout.metrics["completions/mean_terminated_length"] == pytest.approx(2.0)
    assert rollout.metrics["completions/max_terminated_length"] == 3
    assert rollout.metrics["frac_reward_zero_std"] == (
        (raw[0] == raw[1]).float() + (raw[2] == raw[3]).float()).item() / 2
    # GRPO's advantages: normalised within each group of 2.
    assert rollout.advantages.shape == (4,)
    torch.testing.assert_close(rollout.advantages[0::2], -rollout.advantages[1::2])


def test_reward_from_a_python_function_trains(tmp_path, tokenizer, prompts):
    seen = []

    def reward(prompt_texts, completion_texts):
        seen.append(len(completion_texts))
        return [c.count("e") / 4 for c in completion_texts]

    config = _config(tmp_path, mode="rloo", num_generations=2, reward_fn="length")
    result = PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:8], config,
                        reward_fn=reward).train()
    assert seen == [8, 8]  # batch_size × num_generations per rollout; the callable wins
    assert math.isfinite(result.metrics["reward"])


def test_reward_from_a_reward_model(tmp_path, tokenizer, prompts):
    reward_model = _reward_model(tokenizer)
    config = _config(tmp_path, PPOConfig, num_generations=2)
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:8], config,
                         reward_model=reward_model)
    rollout = trainer.rollout([0, 1, 2])
    # The classifier's own forward on each unpadded sequence, one at a time.
    for i in range(len(rollout)):
        length = int(rollout.attention_mask[i].sum())
        alone = reward_model(input_ids=rollout.input_ids[i:i + 1, :length]).logits[0, 0]
        assert float(rollout.scores[i]) == pytest.approx(float(alone), rel=1e-5, abs=1e-6)
    assert rollout.metrics["reward"] == pytest.approx(float(rollout.scores.mean()), rel=1e-6)
    result = trainer.train()
    assert math.isfinite(result.metrics["reward"]) and "loss/value" in result.metrics


def test_run_job_with_the_proposed_job_entries(tmp_path, tokenizer, capsys):
    """``run_job`` (the CLI's path) with the Job entries proposed for run.py: prompt data,
    ``encode_prompt_examples`` and a reward model loaded from a directory."""
    from fastalign.trainers.run import Job, run_job

    job = Job(kind="grpo", help="GRPO", description="GRPO", config_class=GRPOConfig,
              trainer_class=PPOTrainer, data_kind="prompt", encode=encode_prompt_examples,
              default_data="grpo", extra_arguments={"ref_model": "", "reward_model": ""},
              summary_keys=("reward", "kl", "completions/mean_length", "loss/policy"))
    _reward_model(tokenizer).save_pretrained(tmp_path / "rm")
    config = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, batch_size=4,
                        max_new_tokens=4, progress=False, plots=False)
    result = run_job(job, config, reward_model=str(tmp_path / "rm"), ref_model=None)
    assert result.step == 1
    assert "reward" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# The loss of one minibatch and its gradients equal the eager computation
# ----------------------------------------------------------------------------------------------


def _eager_minibatch_loss(model, value_head, ref_model, rollout, rows, config, kl_coef):
    """The PPO / GRPO objective from materialised logits, written from ALGORITHMS.md §8."""
    input_ids, attention_mask = rollout.input_ids[rows], rollout.attention_mask[rows]
    labels = rollout.labels[rows]
    targets = labels[:, 1:]
    mask = (targets != -100).float()
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = model.lm_head(hidden)[:, :-1].float() / config.temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask

    def aggregate(per_token):
        if config.loss_agg == "grpo":
            return ((per_token * mask).sum(1) / mask.sum(1)).mean()
        return (per_token * mask).sum() / mask.sum()

    advantages = rollout.advantages[rows]
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    ratio = torch.exp(logp - rollout.old_logps[rows])
    clip = config.clip
    surrogate = torch.maximum(-advantages * ratio,
                              -advantages * ratio.clamp(1 - clip, 1 + clip))
    loss = aggregate(surrogate)
    if config.mode == "ppo":
        values = value_head(hidden[:, :-1]).squeeze(-1)
        old_values, returns = rollout.old_values[rows], rollout.returns[rows]
        clipped = old_values + (values - old_values).clamp(-config.vf_clip, config.vf_clip)
        value_loss = 0.5 * aggregate(torch.maximum((values - returns) ** 2,
                                                   (clipped - returns) ** 2))
        return loss + config.vf_coef * value_loss
    with torch.no_grad():
        ref_logits = ref_model(input_ids=input_ids,
                               attention_mask=attention_mask).logits[:, :-1].float()
        ref_logp_all = F.log_softmax(ref_logits / config.temperature, dim=-1)
    if config.kl_estimator == "exact":
        kl = (logp_all.exp() * (logp_all - ref_logp_all)).sum(-1)
    else:
        ref_logp = ref_logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        log_ratio = (ref_logp - logp) * mask
        kl = torch.exp(log_ratio) - 1 - log_ratio  # k3
        if config.use_bias_correction_kl:  # DeepSeek-V3.2: the sampled KL weighted by the ratio
            kl = kl * ratio
    return loss + kl_coef * aggregate(kl)


def _grads(*modules):
    return {f"{i}.{name}": p.grad.clone() for i, module in enumerate(modules)
            for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode, options", [
    ("ppo", dict(kl_estimator="k1", num_generations=2)),
    ("grpo", dict(kl_estimator="k3", temperature=0.8)),
    ("grpo", dict(kl_estimator="exact")),
])
def test_minibatch_loss_and_gradients_equal_eager(tmp_path, tokenizer, prompts, mode, options):
    config_class = PPOConfig if mode == "ppo" else GRPOConfig
    config = _config(tmp_path, config_class, clip=0.05, vf_clip=0.01, **options)
    model = assets.build_default_model(seed=1)
    trainer = PPOTrainer(model, tokenizer, prompts[:8], config)
    reference = assets.build_default_model(seed=1)
    # Policy ≠ reference at the rollout, and the policy moves again before the update: every term
    # (ratio clipping, KL, value clipping) is non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.03 * torch.randn_like(p))
    rollout = trainer.rollout([0, 3, 5, 6])
    with torch.no_grad():  # the rollout's log-probs are the eager ones at the rollout
        logits = model(input_ids=rollout.input_ids,
                       attention_mask=rollout.attention_mask).logits[:, :-1].float()
        targets = rollout.labels[:, 1:]
        eager_old = F.log_softmax(logits / config.temperature, -1).gather(
            -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
        torch.testing.assert_close(rollout.old_logps, eager_old, rtol=1e-5, atol=1e-5)
        for p in model.parameters():
            p.add_(0.03 * torch.randn_like(p))
        if trainer.value_head is not None:
            trainer.value_head.weight.add_(0.2 * torch.randn_like(trainer.value_head.weight))

    rows = torch.tensor([5, 0, 2, 7, 3]) if len(rollout) == 8 else torch.tensor([9, 0, 4, 13])
    kl_coef = 0.3
    loss, metrics = trainer.minibatch_loss(rollout, rows, kl_coef=kl_coef)
    loss.backward()
    modules = (model,) if trainer.value_head is None else (model, trainer.value_head)
    fused_grads = _grads(*modules)
    for module in modules:
        module.zero_grad()

    eager = _eager_minibatch_loss(model, trainer.value_head, reference, rollout, rows, config,
                                  kl_coef)
    eager.backward()
    eager_grads = _grads(*modules)

    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    assert metrics["clip_ratio/region_mean"] > 0
    if mode == "ppo":
        assert metrics["value/clipfrac"] > 0
    assert fused_grads.keys() == eager_grads.keys()
    assert len(fused_grads) == len(list(model.parameters())) + (mode == "ppo") * 2
    for name, grad in eager_grads.items():
        scale = grad.abs().max().item() + 1e-12
        assert (fused_grads[name] - grad).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("options", [
    dict(loss_type="sapo", importance_sampling_level="sequence", top_entropy_quantile=0.5,
         ent_coef=0.01),
    dict(loss_type="vespo", off_policy_mask_threshold=0.001, use_bias_correction_kl=False),
    dict(loss_type="cispo", clip_high=1.02, mode="rloo"),
])
def test_grpo_variant_minibatch_loss_equals_grpo_loss(tmp_path, tokenizer, prompts, options):
    """The trainer's fused update of a GRPO variant equals ``grpo_loss`` on the eager log-probs
    and entropies of the model's own logits (values and gradients)."""
    from fastalign.losses.grpo import grpo_loss, high_entropy_mask

    config = _config(tmp_path, **options)
    model = assets.build_default_model(seed=1)
    trainer = PPOTrainer(model, tokenizer, prompts[:8], config)
    rollout = trainer.rollout([0, 3])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.03 * torch.randn_like(p))
    rows = torch.tensor([5, 0, 2, 7, 3])
    loss, _ = trainer.minibatch_loss(rollout, rows, kl_coef=0.3)
    loss.backward()
    fused_grads = _grads(model)
    model.zero_grad()

    targets = rollout.labels[rows][:, 1:]
    mask = targets != -100
    logits = model(input_ids=rollout.input_ids[rows],
                   attention_mask=rollout.attention_mask[rows]).logits[:, :-1].float()
    logp_all = F.log_softmax(logits / config.temperature, -1)
    logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    names = ("loss_type", "importance_sampling_level", "off_policy_mask_threshold",
             "top_entropy_quantile", "use_bias_correction_kl", "clip_high")
    expected, _ = grpo_loss(logp, rollout.old_logps[rows], rollout.ref_logps[rows],
                            rollout.advantages[rows], mask, beta=0.3, clip=config.clip,
                            entropies=entropy, **{name: getattr(config, name) for name in names})
    if config.ent_coef:
        kept = high_entropy_mask(entropy, mask, config.top_entropy_quantile)
        expected = expected - config.ent_coef * (entropy * kept).sum() / kept.sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, grad in _grads(model).items():
        scale = grad.abs().max().item() + 1e-12
        assert (fused_grads[name] - grad).abs().max().item() <= 1e-4 * scale, name


def test_adaptive_entropy_coefficient_follows_trl():
    from fastalign.trainers.ppo import AdaptiveEntropyCoefficient

    control = AdaptiveEntropyCoefficient(0.1, target=1.0, delta=0.05, low=0.02, high=0.2)
    applied = []
    for entropy in (0.5, 0.9, 3.0, 2.0, 2.0, 2.0, 2.0, 0.4):
        applied.append(control.applied)
        control.update(entropy)
    # nothing before the first measurement; then the coefficient of the step before, while the
    # entropy was at or below the target; it grows (to 0.2 at most) and shrinks (to 0.02 at least)
    assert applied == pytest.approx([0.0, 0.15, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert control.coef == pytest.approx(0.07) and control.last_entropy == 0.4
    restored = AdaptiveEntropyCoefficient(0.0, target=1.0, delta=0.05, low=0.02, high=0.2)
    restored.load_state_dict(control.state_dict())
    assert (restored.coef, restored.applied) == (control.coef, control.coef)


@pytest.mark.parametrize("target, expected", [(100.0, 0.03 + 2 * 0.01), (0.0, 0.03 - 2 * 0.01)])
def test_adaptive_entropy_in_training(tmp_path, tokenizer, prompts, target, expected):
    config = _config(tmp_path, use_adaptive_entropy=True, ent_coef=0.03, entropy_coef_delta=0.01,
                     entropy_target=target, top_entropy_quantile=0.5)
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:8], config)
    seen = []
    minibatch_loss = trainer.minibatch_loss

    def spy(rollout, rows, **kwargs):
        seen.append(kwargs["ent_coef"])
        return minibatch_loss(rollout, rows, **kwargs)

    trainer.minibatch_loss = spy
    result = trainer.train()
    assert result.metrics["entropy_coef"] == pytest.approx(expected)
    assert seen == pytest.approx([0.0, 0.04] if target == 100.0 else [0.0, 0.0])
    assert "_controlled_entropy" not in result.metrics


@pytest.mark.parametrize("estimator", ["k1", "exact"])
def test_ppo_rewards_are_kl_shaped_and_advantages_whitened(tmp_path, tokenizer, prompts,
                                                           estimator):
    config = _config(tmp_path, PPOConfig, kl_coef=0.5, gamma=1.0, lam=1.0,
                     kl_estimator=estimator)
    model = assets.build_default_model(seed=1)
    trainer = PPOTrainer(model, tokenizer, prompts[:8], config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.03 * torch.randn_like(p))
    rollout = trainer.rollout([0, 1, 2, 3])
    mask = rollout.mask
    if estimator == "k1":
        kl = (rollout.old_logps - rollout.ref_logps) * mask
    else:  # the full-vocabulary KL from both models' logits
        with torch.no_grad():
            inputs = dict(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask)
            logp = F.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
            ref = F.log_softmax(
                assets.build_default_model(seed=1)(**inputs).logits[:, :-1].float(), -1)
            kl = (logp.exp() * (logp - ref)).sum(-1) * mask
    # γ = λ = 1: the return of a token is the rest of the row's rewards (score − β·Σ KL).
    expected = rollout.scores[:, None] - 0.5 * kl.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(rollout.returns * mask, expected * mask, rtol=1e-5, atol=1e-5)
    advantages = rollout.advantages[mask]
    assert abs(float(advantages.mean())) < 1e-5 and float(advantages.std()) == pytest.approx(1.0)
    assert rollout.metrics["kl"] > 0 and rollout.metrics["reward/non_score"] < 0


@pytest.mark.parametrize("mode", ["ppo", "grpo"])
def test_gradient_accumulation_gives_the_minibatch_gradient(tmp_path, tokenizer, prompts, mode):
    """Micro-batches weighted by their share of tokens (ppo's token_mean) or of sequences
    (grpo's per-sequence mean) sum to the gradient of the whole minibatch."""
    grads = []
    for accumulation in (1, 3):
        config = _config(tmp_path / str(accumulation), PPOConfig if mode == "ppo" else GRPOConfig,
                         max_steps=1, ppo_epochs=1, grad_accum_steps=accumulation,
                         num_generations=2)
        trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:8], config)
        step = trainer.optimizer_step

        def recording_step(trainer=trainer, step=step):
            grads.append(torch.cat([p.grad.flatten() for p in trainer.trainable_parameters()]))
            return step()

        trainer.optimizer_step = recording_step
        trainer.train()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


def _resume_trainer(directory, tokenizer, prompts, **options):
    config = _config(directory, PPOConfig, max_steps=4, save_steps=2, num_generations=2,
                     ppo_epochs=2, num_minibatches=2, kl_target=0.01, kl_horizon=50.0,
                     **options)
    return PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:12], config)


def test_resume_gives_the_uninterrupted_weights_and_metrics(tmp_path, tokenizer, prompts):
    full = _resume_trainer(tmp_path / "full", tokenizer, prompts)
    full.train()

    first = _resume_trainer(tmp_path / "cut", tokenizer, prompts)
    save = first.save_checkpoint

    def save_then_stop():
        save()
        raise _Interrupt

    first.save_checkpoint = save_then_stop
    with pytest.raises(_Interrupt):
        first.train()
    assert first.step == 2
    torch.manual_seed(1234)  # whatever the RNG did in between, the checkpoint restores it
    second = _resume_trainer(tmp_path / "cut", tokenizer, prompts, resume=True)
    steps_run = []
    step = second.training_step
    second.training_step = lambda: steps_run.append(second.step) or step()
    result = second.train()
    assert result.step == 4 and steps_run == [2, 3]  # it resumed after step 2
    for (name, p), q in zip(full.model.named_parameters(), second.model.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(full.value_head.weight, second.value_head.weight)
    assert full.kl_controller.value == second.kl_controller.value != 0.05
    full_log = (tmp_path / "full" / "metrics.jsonl").read_text()
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == full_log


# ----------------------------------------------------------------------------------------------
# Learning: GRPO raises the polite reward
# ----------------------------------------------------------------------------------------------


def test_grpo_raises_the_polite_reward(tmp_path, tokenizer, prompts):
    config = _config(tmp_path, max_steps=20, batch_size=8, lr=1e-2, lr_schedule="constant")
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts, config)
    trainer.train()
    rewards = [r["reward"] for r in trainer.metrics_log.records]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, rewards


# ----------------------------------------------------------------------------------------------
# Other combinations: LoRA with the adapters as reference, bf16 with gradient checkpointing
# ----------------------------------------------------------------------------------------------


def test_lora_policy_uses_its_disabled_adapters_as_reference(tmp_path, tokenizer, prompts):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(assets.build_default_model(seed=0), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = PPOTrainer(lora, tokenizer, prompts[:8], _config(tmp_path, max_steps=1))
    assert trainer.reference.mode == "adapters" and trainer.reference.model is None
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    trainer.train()
    changed = [n for n, p in lora.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)


def test_bf16_and_gradient_checkpointing_run(tmp_path, tokenizer, prompts):
    config = _config(tmp_path, PPOConfig, bf16=True, gradient_checkpointing=True, max_steps=1,
                     kl_estimator="exact")
    result = PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:8],
                        config).train()
    assert math.isfinite(result.metrics["loss"])


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------


def test_word_lists_come_from_the_shipped_answers():
    pairs = []
    for kind in ("dpo", "dpo_eval"):
        pairs += data.load_jsonl(assets.default_data_path(kind), "preference")

    def words(key):
        return {w.strip(".,!?").lower() for p in pairs for w in p[key].split()}

    chosen, rejected = words("chosen"), words("rejected")
    assert POLITE_WORDS <= chosen and not POLITE_WORDS & rejected
    assert RUDE_WORDS <= rejected and not RUDE_WORDS & chosen
    polite = polite_reward([], [p["chosen"] for p in pairs])
    rude = polite_reward([], [p["rejected"] for p in pairs])
    assert min(polite) > 0 > max(rude)


def test_builtin_rewards():
    assert polite_reward(["x"] * 4, ["Sure, glad to help!", "Ugh. Whatever.", "", "a b"]) == [
        pytest.approx(2 / 4), -1.0, 0.0, 0.0]
    assert length_reward(["x"] * 3, ["a" * 48, "", " " + "a" * 24 + " "]) == [1.0, 0.0, 0.5]
    assert length_reward(["x"], ["a" * 200]) == [-1.0]
    assert set(BUILTIN_REWARDS) == {"polite", "length"}


def test_resolve_reward_fn(tmp_path):
    assert resolve_reward_fn("polite") is polite_reward
    assert resolve_reward_fn("fastalign.trainers.reward_functions:length_reward") is length_reward
    assert resolve_reward_fn(len) is len
    path = tmp_path / "my_reward_functions.py"
    path.write_text("def score(prompts, completions):\n    return [1.0] * len(completions)\n")
    assert resolve_reward_fn(f"{path}:score")(["a"], ["b"]) == [1.0]
    for spec, message in [
        ("nice", "builtin"),
        ("no_such_module_xyz:fn", "cannot import module"),
        ("fastalign.trainers.reward_functions:missing", "no attribute"),
        ("fastalign.trainers.reward_functions:LENGTH_TARGET", "not a function"),
        (f"{tmp_path / 'absent.py'}:score", "no such file"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_reward_fn(spec)
    with pytest.raises(TypeError, match="reward_fn"):
        resolve_reward_fn(3)


# ----------------------------------------------------------------------------------------------
# Bad options and bad rewards
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(mode="a2c"), "mode"),
    (dict(num_generations=0), "num_generations"),
    (dict(mode="grpo", num_generations=1), "num_generations"),
    (dict(mode="rloo", num_generations=1), "num_generations"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_k=-1), "top_k"),
    (dict(ppo_epochs=0), "ppo_epochs"),
    (dict(num_minibatches=17), "num_minibatches"),
    (dict(clip=1.5), "clip"),
    (dict(clip_high=0.0), "clip_high"),
    (dict(kl_coef=-0.1), "kl_coef"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(kl_target=0.0), "kl_target"),
    (dict(kl_target=1.0, kl_coef=0.0), "kl_coef"),
    (dict(kl_horizon=0.0), "kl_horizon"),
    (dict(vf_coef=float("nan")), "vf_coef"),
    (dict(vf_clip=-1.0), "vf_clip"),
    (dict(gamma=1.5), "gamma"),
    (dict(lam=-0.1), "lam"),
    (dict(whiten_advantages="yes"), "whiten_advantages"),
    (dict(loss_agg="sum"), "loss_agg"),
    (dict(ent_coef=-1.0), "ent_coef"),
    (dict(missing_eos_penalty=-1.0), "missing_eos_penalty"),
    (dict(reference="precomputed"), "precomputed.*impossible"),
    (dict(reference="frozen"), "reference"),
    (dict(reward_fn="nice"), "reward_fn"),
    (dict(reward_fn="no_such_module_xyz:fn"), "reward_fn"),
    (dict(max_prompt_length=64, max_length=64), "max_prompt_length"),
    (dict(mode="grpo", loss_type="gspo"), "loss_type"),
    (dict(mode="grpo", loss_type="sapo", loss_agg="dapo"), "loss_type.*loss_agg"),
    (dict(importance_sampling_level="sentence"), "importance_sampling_level"),
    (dict(use_bias_correction_kl="yes"), "use_bias_correction_kl"),
    (dict(off_policy_mask_threshold=0.0), "off_policy_mask_threshold"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    (dict(vespo_k_pos=-1.0), "vespo_k_pos"),
    (dict(vespo_lambda_pos=0.0), "vespo_lambda_pos"),
    (dict(multi_objective_aggregation="sum"), "multi_objective_aggregation"),
    (dict(mode="rloo", multi_objective_aggregation="normalize_then_sum"),
     "multi_objective_aggregation"),
    (dict(mode="grpo", multi_objective_aggregation="normalize_then_sum",
          missing_eos_penalty=1.0), "missing_eos_penalty"),
    (dict(mode="grpo", normalize_advantages=True), "normalize_advantages.*rloo"),
    (dict(mode="rloo", normalize_advantages=True), "whiten_advantages"),
    (dict(mode="rloo", reward_clip_range=(1.0, -1.0)), "reward_clip_range"),
    (dict(mode="rloo", reward_clip_range=(1.0,)), "reward_clip_range"),
    (dict(use_adaptive_entropy=1), "use_adaptive_entropy"),
    (dict(entropy_coef_min=0.5, entropy_coef_max=0.1), "entropy_coef_min"),
    (dict(entropy_coef_delta=0.0), "entropy_coef_delta"),
    (dict(entropy_target=-1.0), "entropy_target"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**(dict(batch_size=4, num_generations=4) | options))


def test_every_option_parses_from_the_command_line():
    import argparse

    from fastalign.trainers.cli import add_config_options, config_from_args

    for config_class in (PPOConfig, GRPOConfig):
        parser = argparse.ArgumentParser()
        add_config_options(parser, config_class)
        args = parser.parse_args([
            "--mode", "rloo", "--num-generations", "3", "--clip-high", "0.28", "--kl-target",
            "none", "--vf-clip", "none", "--reward-fn", "length", "--no-whiten-advantages",
            "--missing-eos-penalty", "1.5", "--kl-estimator", "exact", "--top-k", "5",
            "--loss-agg", "dr_grpo", "--kl-horizon", "500", "--no-whiten-advantages",
            "--importance-sampling-level", "sequence", "--no-use-bias-correction-kl",
            "--off-policy-mask-threshold", "0.5", "--top-entropy-quantile", "0.2",
            "--sapo-temperature-neg", "2", "--vespo-lambda-neg", "1.5",
            "--normalize-advantages", "--reward-clip-range=-1,1"])
        config = config_from_args(config_class, args, "out")
        assert (config.mode, config.num_generations, config.clip_high, config.kl_target,
                config.vf_clip, config.reward_fn, config.whiten_advantages,
                config.missing_eos_penalty, config.kl_estimator, config.top_k, config.loss_agg,
                config.kl_horizon) == ("rloo", 3, 0.28, None, None, "length", False, 1.5,
                                       "exact", 5, "dr_grpo", 500.0)
        assert (config.importance_sampling_level, config.use_bias_correction_kl,
                config.off_policy_mask_threshold, config.top_entropy_quantile,
                config.sapo_temperature_neg, config.vespo_lambda_neg, config.normalize_advantages,
                config.reward_clip_range) == ("sequence", False, 0.5, 0.2, 2.0, 1.5, True,
                                              (-1.0, 1.0))
        args = parser.parse_args(["--mode", "grpo", "--num-generations", "2", "--loss-type",
                                  "vespo", "--multi-objective-aggregation",
                                  "normalize_then_sum"])
        config = config_from_args(config_class, args, "out")
        assert (config.loss_type, config.multi_objective_aggregation) == (
            "vespo", "normalize_then_sum")
        for action in parser._actions[1:]:
            assert action.help and not action.help.startswith(" ("), action.dest


def test_default_configs_are_valid():
    assert PPOConfig().mode == "ppo"
    grpo = GRPOConfig()
    assert (grpo.mode, grpo.num_generations, grpo.kl_coef, grpo.kl_estimator, grpo.loss_agg) == (
        "grpo", 4, 0.04, "k3", "grpo")


def test_bad_trainer_arguments(tmp_path, tokenizer, prompts):
    def build(config=None, **kwargs):
        return PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:8],
                          config or _config(tmp_path), **kwargs)

    with pytest.raises(ValueError, match="either reward_model or reward_fn"):
        build(reward_model=_reward_model(tokenizer), reward_fn=polite_reward)
    unpadded = _reward_model(tokenizer)
    unpadded.config.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id"):
        build(reward_model=unpadded)
    with pytest.raises(ValueError, match="no reward"):
        build(_config(tmp_path, reward_fn=None))
    with pytest.raises(ValueError, match="PEFT"):
        build(_config(tmp_path, reference="adapters"))
    with pytest.raises(ValueError, match="returned 3 scores for 16"):
        build(reward_fn=lambda p, c: [0.0] * 3).train()
    with pytest.raises(ValueError, match="not finite"):
        build(reward_fn=lambda p, c: [float("nan")] * len(c)).train()
