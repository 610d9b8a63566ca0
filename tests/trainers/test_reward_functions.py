"""Reward functions of the online trainers as TRL calls them (keyword arguments, the data's other
columns, chat prompts as messages, several weighted functions, None where one does not apply),
loaded from the working directory or a file, and top-p sampling in the rollouts.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

import pytest
import torch

from fastalign import assets, data
from fastalign.trainers import cli
from fastalign.trainers.ppo import GRPOConfig, PPOConfig, PPOTrainer, encode_prompt_examples
from fastalign.trainers.reward_functions import RewardFunctions, TrainingProgress


def _config(tmp_path, config_class=GRPOConfig, **options):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, batch_size=2, num_generations=2,
                max_new_tokens=4, lr=1e-3, progress=False, plots=False, seed=0, max_length=64,
                max_prompt_length=32)
    return config_class(**(base | options))


def _examples(tmp_path, tokenizer, records):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return encode_prompt_examples(data.load_jsonl(path, "prompt"), tokenizer, max_length=64,
                                  max_prompt_length=32)


def _fixed_completions(trainer, tokenizer, words):
    """Make ``generate`` return these completions (one row of token strings each, eos-ended)."""
    eos = tokenizer.eos_token_id
    rows = [[tokenizer.convert_tokens_to_ids(w) for w in row] + [eos] for row in words]
    width = max(map(len, rows))
    fixed = torch.tensor([row + [eos] * (width - len(row)) for row in rows])

    def generate(input_ids, attention_mask, generation_config):
        return torch.cat([input_ids, fixed], dim=1)

    trainer.model.generate = generate


# ----------------------------------------------------------------------------------------------
# TRL's calling convention
# ----------------------------------------------------------------------------------------------


def test_the_data_columns_reach_the_reward_function(tmp_path, tokenizer):
    calls = []

    def correct(prompts, completions, answer, completion_ids, trainer_state, **kwargs):
        calls.append(dict(prompts=prompts, completions=completions, answer=answer,
                          completion_ids=completion_ids, trainer_state=trainer_state, **kwargs))
        return [float(a in c) for a, c in zip(answer, completions)]

    examples = _examples(tmp_path, tokenizer, [
        {"prompt": "What is two plus two?", "answer": "Sure", "level": 1},
        {"prompt": "Name a colour.", "answer": "glad", "level": 2}])
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, examples,
                         _config(tmp_path), reward_fn=correct)
    _fixed_completions(trainer, tokenizer, [["ĠSure"], ["Ġcode"], ["Ġglad"], ["Ġglad", "Ġbad"]])
    rollout = trainer.rollout([0, 1])

    (call,) = calls
    assert call["prompts"] == ["What is two plus two?"] * 2 + ["Name a colour."] * 2
    assert call["completions"] == [" Sure", " code", " glad", " glad bad"]
    assert call["answer"] == ["Sure", "Sure", "glad", "glad"]
    assert call["level"] == [1, 1, 2, 2]
    eos = tokenizer.eos_token_id
    assert call["completion_ids"][3] == [tokenizer.convert_tokens_to_ids("Ġglad"),
                                         tokenizer.convert_tokens_to_ids("Ġbad"), eos]
    assert call["trainer_state"] == TrainingProgress(global_step=0, max_steps=2)
    assert rollout.raw_scores.tolist() == [1.0, 0.0, 1.0, 1.0]


def test_chat_prompts_arrive_as_messages(tmp_path, tokenizer):
    seen = []

    def score(prompts, completions, **kwargs):
        seen.append((prompts, completions))
        return [len(c[0]["content"]) for c in completions]

    conversation = [{"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "How do I fix my budget?"}]
    examples = _examples(tmp_path, tokenizer, [{"prompt": conversation}])
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, examples,
                         _config(tmp_path, batch_size=1), reward_fn=score)
    _fixed_completions(trainer, tokenizer, [["ĠSure"], ["Ġglad", "Ġglad"]])
    trainer.rollout([0])

    (prompts, completions), = seen
    assert prompts == [conversation, conversation]
    assert completions == [[{"role": "assistant", "content": " Sure"}],
                           [{"role": "assistant", "content": " glad glad"}]]
    # The builtins read message completions too.
    assert RewardFunctions("length")(prompts=prompts, completions=completions,
                                     completion_ids=[[], []], columns={},
                                     trainer_state=None)[0].shape == (2,)


def test_weighted_functions_with_none_and_the_older_convention(tmp_path, tokenizer):
    def letters(completions, **kwargs):  # not applicable to an empty completion
        return [len(c) if c.strip() else None for c in completions]

    def named(prompts, completions):  # no **kwargs: gets what it names
        return [1.0] * len(completions)

    def positional(p, c):  # names neither: called as fn(prompts, completions)
        assert isinstance(p[0], str) and isinstance(c[0], str)
        return [-float(len(p))] * len(c)

    examples = _examples(tmp_path, tokenizer, [{"prompt": "Hi there.", "answer": "x"},
                                               {"prompt": "Hello.", "answer": "y"}])
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, examples,
                         _config(tmp_path), reward_fn=[letters, named, positional],
                         reward_weights=(0.5, 2.0, 0.25))
    _fixed_completions(trainer, tokenizer, [["ĠSure"], [], ["Ġglad", "Ġglad"], ["Ġbad"]])
    rollout = trainer.rollout([0, 1])
    # letters: 5, None, 10, 4; named: 1 each; positional: -4 each.
    assert rollout.raw_scores.tolist() == [0.5 * 5 + 2 - 1, 2 - 1, 0.5 * 10 + 2 - 1, 0.5 * 4 + 1]
    metrics = rollout.metrics
    assert metrics["reward"] == pytest.approx(float(rollout.raw_scores.mean()))
    assert metrics["rewards/letters/mean"] == pytest.approx(19 / 3)  # the None left out
    assert metrics["rewards/letters/std"] == pytest.approx(float(torch.tensor([5., 10, 4]).std()))
    assert (metrics["rewards/named/mean"], metrics["rewards/named/std"]) == (1.0, 0.0)
    assert metrics["rewards/positional/mean"] == -4.0

    # A completion no function applies to gets 0, with a warning (as TRL).
    with pytest.warns(UserWarning, match="every reward function returned None for completion 0"):
        rewards, scores = RewardFunctions([letters, letters], (1.0, 3.0))(
            prompts=["a", "b"], completions=[" ", "ab"], completion_ids=[[], []], columns={},
            trainer_state=None)
    assert rewards.tolist() == [0.0, 8.0] and scores.isnan().tolist() == [[True] * 2, [False] * 2]


def test_a_required_argument_the_data_lacks_is_named(tmp_path, tokenizer):
    def needs_solution(completions, solution):
        return [0.0] * len(completions)

    examples = _examples(tmp_path, tokenizer, [{"prompt": "Hi.", "answer": "x"}] * 2)
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, examples,
                         _config(tmp_path), reward_fn=needs_solution)
    with pytest.raises(ValueError, match="needs_solution takes 'solution'.*columns: \\['answer'"):
        trainer.rollout([0, 1])


@pytest.mark.parametrize("options, message", [
    (dict(reward_fn="polite,length", reward_weights=(1.0,)),
     "reward_weights has 1 weights for 2 reward functions of reward_fn"),
    (dict(reward_fn="polite", reward_weights=(float("nan"),)), "reward_weights"),
    (dict(reward_fn="polite,nope"), "reward_fn.*'nope'"),
    (dict(reward_fn=" , "), "reward_fn names no function"),
    (dict(reward_fn=None, reward_weights=(1.0,)), "reward_weights.*reward_fn"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_reward_and_sampling_options(options, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**(dict(batch_size=4, num_generations=4) | options))


# ----------------------------------------------------------------------------------------------
# The command line: a module in the working directory, a file, weights, one-line errors
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def bare_sys_path(tmp_path, monkeypatch):
    """The working directory is tmp_path and, as for the `fastalign` console script, not on
    sys.path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if p not in ("", ".", str(tmp_path), os.getcwd())])
    yield tmp_path
    sys.modules.pop("my_rewards_in_cwd", None)


def _train(tmp_path, *options):
    return cli.main(["grpo", "--output", str(tmp_path / "out"), "--max-steps", "1",
                     "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4",
                     "--no-progress", "--no-plots", *options])


def test_cli_reward_functions_from_the_working_directory_and_a_file(bare_sys_path):
    tmp_path = bare_sys_path
    (tmp_path / "my_rewards_in_cwd.py").write_text(
        "def politeness(completions, **kwargs):\n"
        "    return [1.0 for _ in completions]\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "brevity.py").write_text(
        "def short(prompts, completions):\n"
        "    return [-2.0 for _ in completions]\n")
    assert _train(tmp_path, "--reward-fn", "my_rewards_in_cwd:politeness, lib/brevity.py:short",
                  "--reward-weights", "1,0.5") == 0
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert record["reward"] == 1.0 - 0.5 * 2.0
    assert (record["rewards/politeness/mean"], record["rewards/short/mean"]) == (1.0, -2.0)


@pytest.mark.parametrize("options, message", [
    (["--reward-fn", "polite,length", "--reward-weights", "1,2,3"],
     "reward_weights has 3 weights for 2 reward functions of reward_fn"),
    (["--reward-fn", "no_such_module_here:score"], "reward_fn 'no_such_module_here:score'"),
    (["--reward-fn", "lib/absent.py:score"], "no such file 'lib/absent.py'"),
    (["--top-p", "0"], "top_p must be a finite number in \\(0.0, 1.0\\]"),
])
def test_cli_bad_reward_options_are_one_line_errors(bare_sys_path, capsys, options, message):
    assert _train(bare_sys_path, *options) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastalign train grpo: error: ") and err.count("\n") == 1, err
    assert len(re.findall(message, err)) == 1, err


def test_cli_reward_model_with_reward_functions_is_an_error(tmp_path, tokenizer, capsys):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(assets.default_model_dir(), num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    capsys.readouterr()  # save_pretrained's progress bar
    assert _train(tmp_path, "--reward-model", str(tmp_path / "rm"), "--reward-fn", "length") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--reward-fn" in err and "--reward-model" in err, err


# ----------------------------------------------------------------------------------------------
# Top-p sampling
# ----------------------------------------------------------------------------------------------


def _fixed_logits_trainer(tmp_path, tokenizer, logits: dict[int, float], **options):
    """A policy whose next-token logits are ``logits`` (every other token -1e4) at every step."""
    model = assets.build_default_model(seed=0)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)
        for token, logit in logits.items():
            head.bias[token] = logit
    model.lm_head = head
    examples = _examples(tmp_path, tokenizer, [{"prompt": "Hi."}])
    config = _config(tmp_path, batch_size=1, max_new_tokens=16, **options)
    return PPOTrainer(model, tokenizer, examples, config, reward_fn="length")


def _nucleus(logits: dict[int, float], top_p: float, temperature: float = 1.0) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p."""
    tokens = sorted(logits, key=logits.get, reverse=True)
    probs = torch.tensor([logits[t] / temperature for t in tokens]).softmax(0).tolist()
    kept, total = set(), 0.0
    for token, prob in zip(tokens, probs):
        if total >= top_p:
            break
        kept.add(token)
        total += prob
    return kept


def _sampled(trainer) -> set[int]:
    batch = trainer.batch([0])
    rows = batch["input_ids"].repeat(64, 1)
    torch.manual_seed(0)
    completion, has_eos = trainer.generate(rows, torch.ones_like(rows), sample=True)
    assert not has_eos.any()
    return set(completion.flatten().tolist())


def test_top_p_samples_only_the_nucleus_after_temperature_and_top_k(tmp_path, tokenizer):
    tokens = [tokenizer.convert_tokens_to_ids(t) for t in ("ĠSure", "Ġglad", "Ġbad", "Ġcode",
                                                            "Ġstep", "Ġnote")]
    logits = dict(zip(tokens, [3.0, 2.5, 2.0, 1.0, 0.5, 0.0]))
    everything = _sampled(_fixed_logits_trainer(tmp_path, tokenizer, logits))
    assert everything == set(tokens)  # without top-p every token shows up

    nucleus = _nucleus(logits, 0.7)
    assert nucleus == set(tokens[:2])
    assert _sampled(_fixed_logits_trainer(tmp_path, tokenizer, logits, top_p=0.7)) == nucleus

    # Temperature first: at 3 the distribution is flatter, the nucleus larger.
    hot = _nucleus(logits, 0.7, temperature=3.0)
    assert len(hot) > 2
    assert _sampled(_fixed_logits_trainer(tmp_path, tokenizer, logits, top_p=0.7,
                                          temperature=3.0)) == hot
    # Top-k before top-p: the nucleus is taken of the k tokens left, renormalised.
    top3 = {t: logits[t] for t in tokens[:3]}
    assert _sampled(_fixed_logits_trainer(tmp_path, tokenizer, logits, top_p=0.7, top_k=3,
                                          temperature=3.0)) == _nucleus(top3, 0.7, 3.0)


def test_grpo_trains_with_top_p(tmp_path, tokenizer):
    records = data.load_jsonl(assets.default_data_path("grpo"), "prompt")
    examples = encode_prompt_examples(records[:8], tokenizer, max_length=64, max_prompt_length=32)
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, examples,
                         _config(tmp_path, batch_size=4, top_p=0.9, reward_fn="polite,length",
                                 reward_weights=(1.0, 0.5)))
    seen = []
    generate = trainer.model.generate

    def spy(**kwargs):
        seen.append(kwargs["generation_config"].top_p)
        return generate(**kwargs)

    trainer.model.generate = spy
    result = trainer.train()
    assert seen == [0.9, 0.9]
    for key in ("reward", "rewards/polite/mean", "rewards/length/std", "loss/policy"):
        assert math.isfinite(result.metrics[key]), key


def test_nan_rewards_get_no_advantage_and_stay_out_of_the_baseline(tmp_path, tokenizer):
    """TRL's NaN rewards: a completion no function scores (None or an explicit NaN) gets
    advantage 0 and is left out of its group's mean and std; a rollout without any reward, or
    mode ppo with one missing, is an error."""
    nan = float("nan")
    values = [1.0, nan, 4.0, 0.0, nan, nan, 2.0, 3.0]

    def scored(completions, **kwargs):
        return values[:len(completions)]

    def missing(completions, **kwargs):
        return [None] * len(completions)

    examples = _examples(tmp_path, tokenizer, [{"prompt": "Hi there."}, {"prompt": "Hello."}])
    words = [["ĠSure"], ["Ġglad"], ["Ġbad"], ["Ġglad", "Ġglad"]] * 2
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, examples,
                         _config(tmp_path, num_generations=4), reward_fn=[scored, missing])
    _fixed_completions(trainer, tokenizer, words)
    rollout = trainer.rollout([0, 1])
    expected = []
    for group in (values[:4], values[4:]):
        kept = [v for v in group if not math.isnan(v)]
        mean = sum(kept) / len(kept)
        std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1))
        expected += [0.0 if math.isnan(v) else (v - mean) / (std + 1e-4) for v in group]
    torch.testing.assert_close(rollout.advantages, torch.tensor(expected))
    assert rollout.metrics["reward"] == pytest.approx(10 / 5)  # the scored completions' mean

    rloo = PPOTrainer(assets.build_default_model(seed=0), tokenizer, examples,
                      _config(tmp_path, num_generations=4, mode="rloo", whiten_advantages=False,
                              reward_clip_range=(0.0, 3.0)), reward_fn=scored)
    _fixed_completions(rloo, tokenizer, words)
    advantages = rloo.rollout([0, 1]).advantages.tolist()
    # clipped to [0, 3]: [1, -, 3, 0] and [-, -, 2, 3]; baselines over the other scored ones
    assert advantages == pytest.approx([1 - 1.5, 0.0, 3 - 0.5, 0 - 2, 0.0, 0.0, -1.0, 1.0])

    for mode, reward_fn, message in [("grpo", missing, "every reward of the rollout is NaN"),
                                     ("ppo", scored, "mode='ppo' needs a reward")]:
        config = _config(tmp_path, PPOConfig if mode == "ppo" else GRPOConfig, mode=mode,
                         num_generations=4)
        failing = PPOTrainer(assets.build_default_model(seed=0), tokenizer, examples, config,
                             reward_fn=reward_fn)
        _fixed_completions(failing, tokenizer, words)
        with pytest.raises(ValueError, match=message):
            failing.rollout([0, 1])


def test_normalize_then_sum_reaches_the_advantages(tmp_path, tokenizer):
    from fastalign.losses.grpo import normalize_then_sum_advantages

    def first(completions, **kwargs):
        return [1.0, 2.0, 4.0, 0.0][:len(completions)]

    def second(completions, **kwargs):
        return [10.0, None, 30.0, 0.0][:len(completions)]

    examples = _examples(tmp_path, tokenizer, [{"prompt": "Hi there."}])
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, examples,
                         _config(tmp_path, batch_size=1, num_generations=4,
                                 multi_objective_aggregation="normalize_then_sum"),
                         reward_fn=[first, second], reward_weights=(1.0, 0.5))
    _fixed_completions(trainer, tokenizer, [["ĠSure"], ["Ġglad"], ["Ġbad"], ["Ġglad", "Ġglad"]])
    rollout = trainer.rollout([0])
    per_function = torch.tensor([[1.0, 10.0], [2.0, math.nan], [4.0, 30.0], [0.0, 0.0]])
    expected = normalize_then_sum_advantages(per_function, 4, weights=torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(rollout.advantages, expected)
    assert not torch.allclose(expected, torch.zeros(4))
    summed = torch.tensor([6.0, 2.0, 19.0, 0.0])  # sum_then_normalize would see these
    from fastalign.losses.grpo import grpo_advantages
    assert not torch.allclose(expected, grpo_advantages(summed, 4))
