"""``fastalign train ppo --mode trpo``: one TRPO step per rollout on the shipped tiny model.

The trust region is checked against materialised logits (``model(...).logits``, independent of
the fused ops the trainer uses); the CLI run writes its metrics and a checkpoint and resumes
from it exactly; bad options are one-line errors naming the option.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from fastalign import assets, data
from fastalign.cli import main as cli_main
from fastalign.trainers.ppo import GRPOConfig, PPOConfig, PPOTrainer, encode_prompt_examples

TRPO_METRICS = ("trpo/kl", "trpo/step_fraction", "trpo/accepted", "trpo/cg_residual",
                "trpo/surrogate_improvement")


@pytest.fixture(scope="module")
def prompts(tokenizer):
    records = data.load_jsonl(assets.default_data_path("grpo"), "prompt")
    return encode_prompt_examples(records, tokenizer, max_length=64, max_prompt_length=32)


def _config(tmp_path, **options):
    base = dict(output_dir=str(tmp_path), max_steps=2, batch_size=2, num_generations=2,
                max_new_tokens=6, progress=False, plots=False, seed=0, max_length=64,
                max_prompt_length=32, mode="trpo", cg_iters=3)
    return PPOConfig(**(base | options))


def _eager_mean_kl(old_model, model, rollout) -> float:
    """mean over completion tokens of KL(π_old ‖ π_new), from materialised logits."""
    with torch.no_grad():
        logits = [m(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask)
                  .logits[:, :-1].double() for m in (old_model, model)]
    log_p, log_q = (torch.log_softmax(z, -1) for z in logits)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return float(kl[rollout.mask].mean())


@pytest.mark.parametrize("max_kl, grad_accum_steps", [(0.01, 1), (1e-3, 2)])
def test_the_step_keeps_the_exact_kl_within_max_kl(tmp_path, tokenizer, prompts, max_kl,
                                                   grad_accum_steps):
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:8],
                         _config(tmp_path, max_kl=max_kl, batch_size=4,
                                 grad_accum_steps=grad_accum_steps))
    rollout = trainer.rollout(range(4), kl_coef=0.05)
    old_model = copy.deepcopy(trainer.model)
    metrics = trainer.trpo_update(rollout, kl_coef=0.05)
    assert metrics["trpo/accepted"] == 1.0 and 0 < metrics["trpo/step_fraction"] <= 1
    assert metrics["trpo/surrogate_improvement"] > 0
    measured = _eager_mean_kl(old_model, trainer.model, rollout)
    assert 0 < measured <= max_kl
    assert measured == pytest.approx(metrics["trpo/kl"], rel=1e-3)
    changed = [not torch.equal(p, q) for p, q in zip(old_model.parameters(),
                                                     trainer.model.parameters())]
    assert any(changed)
    # The surrogate at θ_old is the mean advantage (ρ = 1) minus β·KL to the reference (0 here).
    assert metrics["loss"] == pytest.approx(-float(rollout.advantages.mean()), abs=1e-6)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_a_rejected_step_leaves_the_model_unchanged(tmp_path, tokenizer, prompts):
    # An acceptance ratio no step can meet: the surrogate never gains 100% of its linear model
    # at every fraction (it is concave along the step), so everything is put back.
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:8],
                         _config(tmp_path, max_backtracks=1))
    rollout = trainer.rollout(range(2), kl_coef=0.05)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.config.trpo_options = dataclasses.replace(trainer.config.trpo_options, max_kl=10.0,
                                                      accept_ratio=0.999)
    metrics = trainer.trpo_update(rollout, kl_coef=0.05)
    assert metrics["trpo/accepted"] == 0.0 and metrics["trpo/step_fraction"] == 0.0
    for p, q in zip(before, trainer.model.parameters()):
        assert torch.equal(p, q)


def test_cli_trpo_writes_metrics_and_a_checkpoint_and_resumes(tmp_path, capsys):
    def run(out, *extra):
        return cli_main(["train", "ppo", "--mode", "trpo", "--num-generations", "2",
                         "--output", str(out), "--max-steps", "2", "--batch-size", "2",
                         "--max-new-tokens", "4", "--cg-iters", "2", "--save-steps", "1",
                         "--lr-schedule", "constant",
                         "--no-progress", "--no-plots", *extra])

    assert run(tmp_path / "full") == 0
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        for name in (*TRPO_METRICS, "reward", "kl", "loss", "grad_norm"):
            assert math.isfinite(record[name]), name
        assert record["trpo/kl"] <= 0.01
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())[-1].endswith("2")

    # Cut after step 1 (keep only its checkpoint), resume: the same step 2.
    cut = tmp_path / "cut"
    assert run(cut, "--max-steps", "1") == 0
    assert run(cut, "--resume") == 0
    assert (cut / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    capsys.readouterr()


@pytest.mark.parametrize("options, message", [
    (["--mode", "trpo", "--max-kl", "0"], "max_kl must be a finite number in \\(0.0, inf\\)"),
    (["--mode", "trpo", "--cg-iters", "0"], "cg_iters must be an integer >= 1"),
    (["--mode", "trpo", "--backtrack-ratio", "1"], "backtrack_ratio"),
    (["--mode", "trpo", "--fvp-difference", "backward"], "fvp_difference"),
    (["--mode", "trpo", "--ppo-epochs", "2"], "mode='trpo' takes one TRPO step per rollout.*"
                                              "ppo_epochs=2"),
    (["--mode", "grpo", "--max-kl", "0.1"], "max_kl=0.1 apply to mode='trpo' only"),
    (["--mode", "trpo", "--num-generations", "1"], "num_generations must be >= 2"),
])
def test_cli_bad_trpo_options_are_one_line_errors(tmp_path, capsys, options, message):
    import re

    assert cli_main(["train", "ppo", "--output", str(tmp_path), "--num-generations", "2",
                     *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastalign train ppo: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_config_defaults_and_options():
    config = GRPOConfig(mode="trpo")
    assert config.trpo_options.max_kl == 0.01 and config.trpo_options.cg_damping == 0.1
    assert (config.trpo_options.cg_iters, config.trpo_options.max_backtracks) == (10, 10)
    options = PPOConfig(mode="trpo", num_generations=2, max_kl=0.05, cg_iters=4, cg_damping=0.0,
                        max_backtracks=3, backtrack_ratio=0.8, fvp_difference="forward")
    assert (options.trpo_options.max_kl, options.trpo_options.cg_iters,
            options.trpo_options.cg_damping, options.trpo_options.max_backtracks,
            options.trpo_options.backtrack_ratio, options.trpo_options.fvp_difference) == (
        0.05, 4, 0.0, 3, 0.8, "forward")
