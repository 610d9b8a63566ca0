"""The DPO trainer, the shared loop (resume, checkpoints, metrics) and ``fastalign train``.

Everything runs on the tiny Llama, tokenizer and datasets shipped in ``fastalign.assets``. The
eager ground truth is written here independently: the model's own ``logits``, ``log_softmax``,
``gather``, masked sums and DPO's formula.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import eager_sequence_logps
from transformers import AutoModelForCausalLM

from fastalign import assets, data
from fastalign.cli import main as cli_main
from fastalign.trainers import CheckpointError, DPOConfig, DPOTrainer
from fastalign.trainers.checkpoint import checkpoint_dirs, load_latest
from fastalign.trainers.config import TrainingConfig
from fastalign.trainers.data_order import BatchStream
from fastalign.trainers.run import JOBS, run_job


@pytest.fixture(scope="module")
def eval_pairs(tokenizer):
    records = data.load_jsonl(assets.default_data_path("dpo_eval"), "preference")
    return data.encode_preference(records, tokenizer, max_length=64, max_prompt_length=32)


def _config(tmp_path, **options) -> DPOConfig:
    base = dict(output_dir=str(tmp_path), max_steps=4, batch_size=4, lr=1e-3, progress=False,
                plots=False, seed=0)
    return DPOConfig(**(base | options))


# ----------------------------------------------------------------------------------------------
# The eager ground truth
# ----------------------------------------------------------------------------------------------


def _inputs(batch):
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


def eager_dpo_sigmoid(policy, reference, beta):
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margin).mean()


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------
# DPO: the loss and gradients equal the eager computation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference, gradients_in_forward",
                         [("copy", True), ("precomputed", True), ("copy", False)])
def test_dpo_loss_and_gradients_equal_eager(tmp_path, tokenizer, pairs, reference,
                                            gradients_in_forward):
    """Both steps: the head's gradients formed in forward (FusedDPOLoss) and streamed."""
    model = assets.build_default_model(seed=1)
    trainer = DPOTrainer(model, tokenizer, pairs[:16],
                         _config(tmp_path, reference=reference,
                                 gradients_in_forward=gradients_in_forward))
    # Move the policy away from the reference so that every term is non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference_model = assets.build_default_model(seed=1)
    trainer.before_training()
    batch = trainer.batch([3, 0, 7, 12])

    loss, metrics = trainer.compute_loss(batch)
    loss.backward()
    fused_grads = _grads(model)
    model.zero_grad()

    policy_logps, _ = eager_sequence_logps(model, *_inputs(batch))
    with torch.no_grad():
        ref_logps, _ = eager_sequence_logps(reference_model, *_inputs(batch))
    eager = eager_dpo_sigmoid(policy_logps, ref_logps, beta=0.1)
    eager.backward()
    eager_grads = _grads(model)

    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        scale = grad.abs().max().item() + 1e-12
        assert (fused_grads[name] - grad).abs().max().item() <= 1e-4 * scale, name
    chosen, rejected = policy_logps.detach().chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    accuracy = ((chosen - ref_chosen) > (rejected - ref_rejected)).float().mean()
    assert metrics["rewards/accuracies"].item() == pytest.approx(accuracy.item())
    # TRL's logits/chosen, logits/rejected: the vocabulary mean of the materialised logits,
    # averaged over each side's scored (answer) tokens
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    scored = batch["labels"][:, 1:] != -100
    for side, rows in (("chosen", slice(0, 4)), ("rejected", slice(4, 8))):
        want = logits.mean(-1)[rows][scored[rows]].mean()
        torch.testing.assert_close(metrics[f"logits/{side}"].double(), want, rtol=1e-5,
                                   atol=1e-5)


def _eager_token_logps(model, batch):
    """[2B, T − 1] log-probs of the labelled tokens (0 elsewhere), their mask, and the WPO
    weight exp(mean over the answer of log p(y_t) − log Σ_v p_v²) of each sequence."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    token = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
    with torch.no_grad():
        collision = torch.log((log_probs.exp() ** 2).sum(-1))
        weights = torch.exp(((token - collision) * mask).sum(-1) / mask.sum(-1))
    return token, mask, weights


def _eager_ld_sums(token, mask, alpha):
    """LD-DPO: per pair, the first min(n_w, n_l) answer tokens at weight 1, the rest at alpha."""
    pairs = token.shape[0] // 2
    rank = mask.long().cumsum(-1)
    shared = torch.minimum(mask[:pairs].sum(-1), mask[pairs:].sum(-1)).repeat(2)[:, None]
    weights = torch.where(rank <= shared, torch.ones(()), torch.full((), alpha)) * mask
    return (token * weights).sum(-1)


@pytest.mark.parametrize("ld_alpha, use_weighting, gradients_in_forward",
                         [(0.3, False, True), (None, True, True), (0.6, True, True),
                          (0.6, True, False)])
def test_dpo_ld_alpha_and_wpo_equal_eager(tmp_path, tokenizer, pairs, ld_alpha, use_weighting,
                                          gradients_in_forward):
    """TRL's ld_alpha (LD-DPO) and use_weighting (WPO), from the model's own logits."""
    model = assets.build_default_model(seed=1)
    config = _config(tmp_path, reference="precomputed", ld_alpha=ld_alpha,
                     use_weighting=use_weighting, loss_type=("sigmoid", "sft"),
                     loss_weights=(1.0, 0.5), gradients_in_forward=gradients_in_forward)
    trainer = DPOTrainer(model, tokenizer, pairs[:16], config)
    reference_model = assets.build_default_model(seed=1)
    trainer.before_training()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = trainer.batch([3, 0, 7, 12])
    lengths = (batch["labels"][:, 1:] != -100).sum(-1)
    assert (lengths[:4] != lengths[4:]).any()  # the LD weighting has tokens to act on

    loss, _ = trainer.compute_loss(batch)
    loss.backward()
    fused_grads = _grads(model)
    model.zero_grad()

    token, mask, weights = _eager_token_logps(model, batch)
    with torch.no_grad():
        ref_token, _, _ = _eager_token_logps(reference_model, batch)
    if ld_alpha is None:
        policy, reference = token.sum(-1), ref_token.sum(-1)
    else:
        policy = _eager_ld_sums(token, mask, ld_alpha)
        reference = _eager_ld_sums(ref_token, mask, ld_alpha)
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    per_pair = -F.logsigmoid(0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    per_pair = per_pair + 0.5 * -token[:4].sum() / mask[:4].sum()  # sft: the plain token mean
    if use_weighting:
        per_pair = per_pair * weights[:4] * weights[4:]
    eager = per_pair.mean()
    eager.backward()
    eager_grads = _grads(model)

    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        scale = grad.abs().max().item() + 1e-12
        assert (fused_grads[name] - grad).abs().max().item() <= 1e-4 * scale, name


def test_dpo_ld_alpha_and_wpo_options(tmp_path, capsys):
    assert cli_main(["train", "dpo", "--output", str(tmp_path / "run"), "--max-steps", "1",
                     "--batch-size", "2", "--max-length", "48", "--max-prompt-length", "24",
                     "--ld-alpha", "0.5", "--use-weighting", "--no-progress",
                     "--no-plots"]) == 0
    for options, message in [(["--ld-alpha", "2"], "ld_alpha must be a finite number in [0.0"),
                             (["--use-weighting", "--loss-type", "aot"],
                              "use_weighting cannot weight loss_type 'aot'"),
                             (["--ld-alpha", "0.5", "--padding-free"], "padding_free does not")]:
        assert cli_main(["train", "dpo", "--output", str(tmp_path / "bad"), *options]) == 2
        error = capsys.readouterr().err
        assert f"fastalign train dpo: error: {message}" in error and "Traceback" not in error


@pytest.mark.parametrize("loss_type, weights", [("ipo", None), (("sigmoid", "sft"), (1.0, 0.5)),
                                                ("hinge", None)])
def test_dpo_loss_types_run_and_differ(tmp_path, tokenizer, pairs, loss_type, weights):
    config = _config(tmp_path, loss_type=loss_type, loss_weights=weights, max_steps=2)
    result = DPOTrainer(assets.build_default_model(seed=0), tokenizer, pairs[:16], config).train()
    assert math.isfinite(result.metrics["loss"])
    assert result.step == 2


def test_dpo_adapters_reference_equals_copy(tmp_path, tokenizer, pairs):
    peft = pytest.importorskip("peft")
    base = assets.build_default_model(seed=2)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B = 0 at init: give the adapters a non-zero update
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainer = DPOTrainer(lora, tokenizer, pairs[:8], _config(tmp_path / "lora"))
    assert trainer.reference.mode == "adapters" and trainer.reference.model is None
    batch = trainer.batch([0, 1, 2, 3])
    loss, _ = trainer.compute_loss(batch)
    loss.backward()
    trained = [n for n, p in lora.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)

    reference = assets.build_default_model(seed=2)
    policy_logps, _ = eager_sequence_logps(lora, *_inputs(batch))
    with torch.no_grad():
        ref_logps, _ = eager_sequence_logps(reference, *_inputs(batch))
    torch.testing.assert_close(loss, eager_dpo_sigmoid(policy_logps, ref_logps, 0.1),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# DPO learns the shipped preferences (the integration test of the issue)
# ----------------------------------------------------------------------------------------------


def test_dpo_reaches_90_percent_reward_accuracy_on_held_out_pairs(tmp_path, tokenizer, pairs,
                                                                    eval_pairs):
    config = _config(tmp_path, max_steps=30, batch_size=8, lr=5e-4, seed=0, eval_steps=10)
    trainer = DPOTrainer(assets.build_default_model(seed=0), tokenizer, pairs, config,
                         eval_examples=eval_pairs)
    result = trainer.train()
    accuracy = result.eval_metrics["eval/rewards/accuracies"]
    margin = result.eval_metrics["eval/rewards/margins"]
    assert accuracy >= 0.9, result.eval_metrics
    assert margin > 1.0, result.eval_metrics
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    margins = [r["eval/rewards/margins"] for r in records if "eval/rewards/margins" in r]
    assert len(margins) == 3 and margins == sorted(margins)  # the margin grows as it learns


# ----------------------------------------------------------------------------------------------
# Options that users combine: bf16, gradient checkpointing, accumulation
# ----------------------------------------------------------------------------------------------


def test_bf16_autocast_and_gradient_checkpointing_run(tmp_path, tokenizer, pairs):
    config = _config(tmp_path, bf16=True, gradient_checkpointing=True, max_steps=2)
    result = DPOTrainer(assets.build_default_model(seed=0), tokenizer, pairs[:8], config).train()
    assert math.isfinite(result.metrics["loss"])


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tokenizer, pairs):
    """2 micro-batches of 2 pairs accumulate the gradient of one batch of 4 (sigmoid DPO is a
    mean over pairs), so one step gives the same weights."""
    weights = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        config = _config(tmp_path / f"{batch_size}", batch_size=batch_size, max_steps=1,
                         grad_accum_steps=accumulation, max_grad_norm=None)
        trainer = DPOTrainer(assets.build_default_model(seed=0), tokenizer, pairs[:4], config)
        trainer.stream.shuffle = False
        trainer.stream.load_state_dict({"epoch": 0, "position": 0})
        trainer.train()
        weights.append(trainer.model.model.layers[0].self_attn.q_proj.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Exact resume and damaged checkpoints
# ----------------------------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


def _recording_trainer(directory, tokenizer, pairs, seen, *, stop_after=None, **options):
    config = _config(directory, max_steps=6, save_steps=2, batch_size=4, **options)
    trainer = DPOTrainer(assets.build_default_model(seed=0), tokenizer, pairs[:20], config)
    collate = trainer.collator

    def recording(examples):
        if stop_after is not None and len(seen) >= stop_after:
            raise _Interrupt
        seen.append([e["chosen_ids"] for e in examples])
        return collate(examples)

    trainer.collator = recording
    return trainer


def test_resume_gives_the_uninterrupted_weights_metrics_and_data(tmp_path, tokenizer, pairs):
    seen_full: list = []
    full = _recording_trainer(tmp_path / "full", tokenizer, pairs, seen_full)
    full.train()

    seen_first: list = []
    first = _recording_trainer(tmp_path / "cut", tokenizer, pairs, seen_first, stop_after=5)
    with pytest.raises(_Interrupt):
        first.train()  # killed during step 6, after the checkpoint of step 4
    assert [step for step, _ in checkpoint_dirs(tmp_path / "cut" / "checkpoints")] == [2, 4]

    seen_second: list = []
    second = _recording_trainer(tmp_path / "cut", tokenizer, pairs, seen_second, resume=True)
    result = second.train()
    assert result.step == 6
    # Steps 1-4 from the first run, 5-6 from the resumed one: the same batches, none lost.
    assert seen_first[:4] + seen_second == seen_full
    for (name, p), q in zip(full.model.named_parameters(), second.model.parameters()):
        assert torch.equal(p, q), name
    full_log = (tmp_path / "full" / "metrics.jsonl").read_text()
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == full_log


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, tokenizer, pairs):
    trainer = _recording_trainer(tmp_path, tokenizer, pairs, [], stop_after=None)
    trainer.config.max_steps = 4
    trainer.train()
    (_, older), (_, newest) = checkpoint_dirs(tmp_path / "checkpoints")
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.warns(UserWarning, match="truncated"):
        step, _ = load_latest(tmp_path / "checkpoints")
    assert step == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (older / "state.pt").write_bytes(b"garbage")
        with pytest.raises(CheckpointError, match="no usable checkpoint"):
            load_latest(tmp_path / "checkpoints")


def test_batch_stream_covers_every_example_once_per_epoch():
    stream = BatchStream(10, 3, seed=5)
    epoch = [i for _ in range(4) for i in stream.next()]
    assert sorted(epoch) == list(range(10))
    state = stream.state_dict()
    ahead = [stream.next() for _ in range(5)]
    again = BatchStream(10, 3, seed=5)
    again.load_state_dict(state)
    assert [again.next() for _ in range(5)] == ahead


# ----------------------------------------------------------------------------------------------
# Bad options
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(max_steps=0), "max_steps"),
    (dict(batch_size=1.5), "batch_size"),
    (dict(lr=-1.0), "lr"),
    (dict(lr_schedule="step"), "lr_schedule"),
    (dict(adam_betas=(0.9, 1.5)), "adam_betas"),
    (dict(beta=0.0), "beta"),
    (dict(loss_type="nope"), "loss_type"),
    (dict(reference="frozen"), "reference"),
    (dict(device="gpu:7"), "device"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        DPOConfig(**options)


def test_adapters_reference_needs_a_peft_model(tmp_path, tokenizer, pairs):
    with pytest.raises(ValueError, match="PEFT"):
        DPOTrainer(assets.build_default_model(), tokenizer, pairs[:4],
                   _config(tmp_path, reference="adapters"))


def test_training_config_defaults_are_valid():
    TrainingConfig()
    DPOConfig()


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def test_cli_train_dpo_writes_model_metrics_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    status = cli_main(["train", "dpo", "--output", str(out), "--max-steps", "3",
                       "--batch-size", "4", "--lr", "1e-3", "--no-progress",
                       "--loss-type", "sigmoid,sft", "--loss-weights", "1,0.1",
                       "--memory-report"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "rewards/accuracies" in printed and "loss memory" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(assets.load_default_tokenizer())
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 4
    assert len([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]) == 3
    assert (out / "plots" / "loss.png").stat().st_size > 1000


def test_cli_rejects_a_malformed_file_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3,'
                   ' "rejected": "c"}\n')
    out = tmp_path / "run"
    status = cli_main(["train", "dpo", "--data", str(bad), "--output", str(out), "--no-progress"])
    assert status == 2
    error = capsys.readouterr().err
    assert "bad.jsonl:2" in error and "chosen" in error
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists()


def test_cli_refuses_a_bad_environment_variable_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTALIGN_CPU_MATMUL", "blas")
    out = tmp_path / "run"
    assert cli_main(["train", "dpo", "--output", str(out), "--max-steps", "1",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastalign train dpo: error: FASTALIGN_CPU_MATMUL must be one of")
    assert len(err.splitlines()) == 1 and not out.exists()


def test_cli_rejects_bad_option_values(tmp_path, capsys):
    assert cli_main(["train", "dpo", "--beta", "-1", "--output", str(tmp_path)]) == 2
    assert "beta" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train", "dpo", "--max-steps", "many", "--output", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli_main(["train", "nope"])


def test_cli_help_lists_every_kind_and_option(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    for kind in JOBS:
        assert kind in text
    with pytest.raises(SystemExit):
        cli_main(["train", "dpo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--max-steps", "--batch-size", "--lr", "--seed", "--resume", "--beta",
                 "--gradient-checkpointing", "--bf16", "--grad-accum-steps"):
        assert flag in text


def test_run_job_rejects_a_config_of_another_kind(tmp_path):
    with pytest.raises(TypeError, match="DPOConfig"):
        run_job(JOBS["dpo"], TrainingConfig(output_dir=str(tmp_path)))


def test_cli_lora_trains_adapters_and_saves_a_merged_model(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    assert cli_main(["train", "dpo", "--output", str(out), "--max-steps", "2", "--batch-size",
                     "4", "--lr", "1e-2", "--lora-r", "4", "--no-progress", "--no-plots"]) == 0
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = assets.build_default_model(seed=0)
    # The adapters were trained and merged: q_proj moved, the frozen MLP did not.
    layer, base_layer = merged.model.layers[0], base.model.layers[0]
    assert not torch.equal(layer.self_attn.q_proj.weight, base_layer.self_attn.q_proj.weight)
    assert torch.equal(layer.mlp.up_proj.weight, base_layer.mlp.up_proj.weight)
    assert cli_main(["train", "dpo", "--output", str(out), "--lora-r", "0"]) == 2


def test_cli_train_dpo_measures_loss_memory_only_when_asked(tmp_path, capsys):
    """The memory report builds a whole batch's eager logits, on a random 128k-token head too:
    it is opt-in (--memory-report), never part of a plain training run."""
    status = cli_main(["train", "dpo", "--output", str(tmp_path / "run"), "--max-steps", "1",
                       "--batch-size", "2", "--no-progress", "--no-plots"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "rewards/accuracies" in printed and "loss memory" not in printed


def test_cli_list_options_may_have_spaces(tmp_path):
    """``--loss-type "sigmoid, sft"`` is two loss types, as a user would write it."""
    from fastalign.trainers.cli import add_config_options, config_from_args

    parser = argparse.ArgumentParser()
    add_config_options(parser, DPOConfig)
    args = parser.parse_args(["--loss-type", "sigmoid, sft", "--loss-weights", "1, 0.5"])
    config = config_from_args(DPOConfig, args, str(tmp_path))
    assert config.loss_type == ("sigmoid", "sft") and config.loss_weights == (1.0, 0.5)


def test_cli_refuses_a_model_folder_without_tokenizer_files(tmp_path, capsys):
    """transformers 5 builds an empty tokenizer for such a folder; training would run on no
    tokens and exit 0. It is a usage error instead, naming the folder."""
    from transformers import GPT2Config

    folder = tmp_path / "no-tokenizer"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(folder)
    status = cli_main(["train", "sft", "--model", str(folder), "--output", str(tmp_path / "run"),
                       "--max-steps", "1", "--no-progress"])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert str(folder) in error and "tokenizer encodes text to no tokens" in error


def test_python_dash_m_fastalign_runs_the_cli():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fastalign", "train", "--help"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "dpo" in result.stdout and "sft" in result.stdout


class _RunsCodeWhenUnpickled:
    """A pickle payload that creates a file when loaded: what a doctored checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


def test_a_checkpoint_that_would_run_code_on_load_is_refused(tmp_path):
    """Checkpoints hold tensors and plain data and are loaded with weights_only=True: a state.pt
    edited to run code (its manifest rewritten to match, as a deliberate edit would) is refused,
    and the code never runs."""
    from fastalign.trainers.checkpoint import save_checkpoint

    marker = tmp_path / "code-ran"
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 3, {"step": 3, "model": {"w": torch.ones(2)},
                              "payload": _RunsCodeWhenUnpickled(marker)})
    with warnings.catch_warnings(record=True), \
            pytest.raises(CheckpointError, match="cannot load state.pt as tensors and plain data"):
        load_latest(root)
    assert not marker.exists(), "loading the checkpoint ran code"


def test_a_real_training_checkpoint_loads_as_plain_data(tmp_path):
    """Everything a trainer saves (model, optimizer, scheduler, data order, RNG states, config)
    passes weights_only loading: a resume needs nothing else."""
    out = tmp_path / "run"
    status = cli_main(["train", "dpo", "--output", str(out), "--max-steps", "2", "--batch-size",
                       "2", "--save-steps", "1", "--no-progress", "--no-plots"])
    assert status == 0
    step, state = load_latest(out / "checkpoints")
    assert step == 2 and state["step"] == 2 and state["trainer"] == "dpo"


def test_the_python_api_says_what_to_pass_instead_of_failing_deep_inside(tmp_path):
    """A model path string or raw JSONL records get an error that says what to do."""
    tokenizer = assets.load_default_tokenizer()
    records = data.load_jsonl(assets.default_data_path("dpo"), "dpo")[:4]
    pairs = data.encode_preference(records, tokenizer, max_length=64, max_prompt_length=32)
    config = DPOConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, progress=False)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str; load it "
                                        r"first, e\.g\. AutoModelForCausalLM\.from_pretrained"):
        DPOTrainer("./my-model", tokenizer, pairs, config)
    with pytest.raises(ValueError, match=r"train_examples must be encoded examples .*got keys "
                                         r"\['chosen', 'prompt', 'rejected'\].*encode_preference"):
        DPOTrainer(assets.build_default_model(), tokenizer, records, config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    status = cli_main(["train", "sft", "--device", "cuda", "--output", str(tmp_path / "run"),
                       "--max-steps", "1", "--no-progress"])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--device cuda" in error and "--device cpu" in error


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """Ctrl-C ends the run with one line that points at --resume, and exit status 130."""
    from fastalign.trainers import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run_job", interrupted)
    status = cli_main(["train", "dpo", "--output", str(tmp_path / "run"), "--save-steps", "5"])
    assert status == 130
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "interrupted" in error and "--resume" in error and "--save-steps 5" in error


def _gpt2_folder(path):
    """A tiny GPT-2 (tied head) with the shipped tokenizer, saved as a user's model folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = assets.load_default_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2,
                        n_positions=512, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_lora_takes_peft_default_targets_for_the_architecture(tmp_path):
    """GPT-2 has no q_proj / v_proj: the default --lora-targets auto lets PEFT pick (c_attn)."""
    pytest.importorskip("peft")
    folder = _gpt2_folder(tmp_path / "gpt2")
    out = tmp_path / "lora"
    assert cli_main(["train", "dpo", "--model", str(folder), "--output", str(out),
                     "--max-steps", "1", "--batch-size", "2", "--lora-r", "4",
                     "--no-progress", "--no-plots"]) == 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["c_attn"]


def test_cli_lora_on_the_head_is_a_usage_error(tmp_path, capsys):
    pytest.importorskip("peft")
    status = cli_main(["train", "dpo", "--output", str(tmp_path / "run"), "--max-steps", "1",
                       "--lora-r", "4", "--lora-targets", "lm_head", "--no-progress"])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "LoRA on the LM head (lm_head)" in error


def test_no_progress_silences_transformers_bars_too(tmp_path, capsys):
    """--no-progress: no tqdm bar at all, transformers' "Writing model shards" included."""
    from transformers.utils import logging as transformers_logging

    status = cli_main(["train", "dpo", "--output", str(tmp_path / "run"), "--max-steps", "1",
                       "--batch-size", "2", "--no-progress", "--no-plots"])
    assert status == 0
    captured = capsys.readouterr()
    assert "Writing model shards" not in captured.err and "it/s" not in captured.err
    assert transformers_logging.is_progress_bar_enabled()  # restored for the rest of the process


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_scored_mean_logits_equal_the_materialised_logits(softcap):
    """TRL's logits metrics of the gradients-in-forward step: the vocabulary mean of each
    scored position's next-token logits (bias, temperature and softcap applied)."""
    from fastalign.trainers.metrics import scored_mean_logits

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 7, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(19, 6, generator=gen, dtype=torch.float64)
    bias = torch.randn(19, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 19, (4, 7), generator=gen)
    labels[:, :3] = -100
    labels[1, 5:] = -100
    result = scored_mean_logits(hidden, weight, labels, bias=bias, temperature=0.7,
                                softcap=softcap)
    logits = hidden[:, :-1] @ weight.T + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    mask = labels[:, 1:] != -100
    want = torch.where(mask, (logits / 0.7).mean(-1), 0.0)
    torch.testing.assert_close(result.token_mean_logits.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(result.token_mask, mask) and result.lengths.tolist() == [4, 2, 4, 4]
