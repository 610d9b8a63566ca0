"""Online DPO (``fastalign.trainers.online_dpo``), its feedback hooks and its MCTS sampler, on the
shipped tiny Llama, tokenizer and prompts."""

from __future__ import annotations

import io
import json
import math
import sys
import threading
import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from fastalign import assets, data
from fastalign.cli import main as cli_main
from fastalign.trainers import OnlineDPOConfig, OnlineDPOTrainer
from fastalign.trainers.config import pad_token_id
from fastalign.trainers.feedback import (
    FeedbackError,
    JSONLQueueFeedback,
    TerminalFeedback,
    check_ranking,
    resolve_feedback,
)
from fastalign.trainers.mcts import mcts_search
from fastalign.trainers.ppo import encode_prompt_examples

K = 3  # candidates per prompt in most tests


@pytest.fixture(scope="module")
def prompts(tokenizer):
    records = data.load_jsonl(assets.default_data_path("ppo"), "prompt")
    return encode_prompt_examples(records, tokenizer, max_length=48, max_prompt_length=24)


def _config(tmp_path, **options):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, max_new_tokens=6,
                num_candidates=K, lr=1e-3, progress=False, plots=False, seed=0, max_length=48,
                max_prompt_length=24)
    return OnlineDPOConfig(**(base | options))


_TRAINER_ARGUMENTS = ("ref_model", "reward_model", "reward_fn", "reward_weights", "feedback",
                      "eval_examples")


def _trainer(tmp_path, prompts, tokenizer, *, examples=8, **kwargs):
    options = {key: kwargs.pop(key) for key in list(kwargs) if key not in _TRAINER_ARGUMENTS}
    return OnlineDPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:examples],
                            _config(tmp_path, **options), **kwargs)


def _completion_text(tokenizer, input_ids, labels) -> str:
    return tokenizer.decode(input_ids[labels != -100].tolist(), skip_special_tokens=True)


def _spy_pairs(trainer, tokenizer) -> list[tuple[list[str], list[str]]]:
    """Records the chosen and rejected completion texts of every pair batch the loss sees."""
    seen = []
    original = trainer.pair_loss

    def pair_loss(batch):
        texts = [_completion_text(tokenizer, ids, labels)
                 for ids, labels in zip(batch["input_ids"], batch["labels"])]
        half = len(texts) // 2
        seen.append((texts[:half], texts[half:]))
        return original(batch)

    trainer.pair_loss = pair_loss
    return seen


class CountingHook:
    """Ranks the shorter candidate text first (ties by index) and records every question."""

    def __init__(self, reverse: bool = False):
        self.asked, self.reverse = [], reverse

    def __call__(self, prompt, candidates, *, step):
        self.asked.append((step, prompt, list(candidates)))
        order = sorted(range(len(candidates)), key=lambda i: len(candidates[i]))
        return order[::-1] if self.reverse else order


# ----------------------------------------------------------------------------------------------
# Judges: reward functions, programmatic hooks, the JSONL queue, the terminal
# ----------------------------------------------------------------------------------------------


def test_reward_function_judge_trains_and_logs_trl_online_dpo_metrics(tmp_path, tokenizer,
                                                                      prompts):
    def fewer_tokens(completion_ids, **kwargs):
        return [-float(len(ids)) for ids in completion_ids]

    trainer = _trainer(tmp_path, prompts, tokenizer, reward_fn=fewer_tokens,
                       eval_examples=prompts[8:10])
    result = trainer.train()
    assert result.step == 2
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward",
                "objective/scores", "objective/scores_margin", "objective/rlhf_reward",
                "rewards/chosen", "rewards/accuracies", "logps/chosen", "loss", "grad_norm"):
        assert math.isfinite(result.metrics[key]), key
    assert result.metrics["beta"] == 0.1
    assert 0.0 <= result.metrics["val/contain_eos_token"] <= 1.0
    assert result.metrics["objective/scores_margin"] >= 0  # best against worst
    assert math.isfinite(result.eval_metrics["eval/reward"])


def test_a_hook_ranks_each_prompts_candidates_and_the_best_is_chosen(tmp_path, tokenizer, prompts):
    hook = CountingHook()
    trainer = _trainer(tmp_path, prompts, tokenizer, feedback=hook)
    seen = _spy_pairs(trainer, tokenizer)
    result = trainer.train()
    assert [step for step, _, _ in hook.asked] == [0, 0, 1, 1]
    assert all(len(candidates) == K for _, _, candidates in hook.asked)
    assert all(prompt in {p["prompt"] for p in prompts} for _, prompt, _ in hook.asked)
    for (chosen, rejected), asks in zip(seen, (hook.asked[:2], hook.asked[2:])):
        for best, worst, (_, _, candidates) in zip(chosen, rejected, asks):
            ranked = sorted(candidates, key=len)
            assert (best, worst) == (ranked[0], ranked[-1])
    # No scores without a scoring judge (TRL logs them only with reward functions).
    assert "objective/scores" not in result.metrics and result.eval_metrics == {}
    log = [json.loads(line) for line in (tmp_path / "run" / "feedback_log.jsonl").open()]
    assert [record["step"] for record in log] == [0, 0, 1, 1]


def test_all_pairs_train_every_ordered_pair_of_the_ranking(tmp_path, tokenizer, prompts):
    hook = CountingHook(reverse=True)
    trainer = _trainer(tmp_path, prompts, tokenizer, feedback=hook, pairs="all", max_steps=1)
    seen = _spy_pairs(trainer, tokenizer)
    trainer.train()
    (chosen, rejected), = seen
    assert len(chosen) == 2 * K * (K - 1) // 2
    for prompt_index, (_, _, candidates) in enumerate(hook.asked):
        ranked = sorted(candidates, key=len, reverse=True)
        pairs = list(zip(chosen, rejected))[prompt_index * 3:(prompt_index + 1) * 3]
        assert pairs == [(ranked[0], ranked[1]), (ranked[0], ranked[2]),
                         (ranked[1], ranked[2])]


@pytest.mark.parametrize(("ranking", "match"), [
    ([0, 0, 1], "ties are not allowed"),
    ([0, 1], "leaves out candidate"),
    ([0, 1, 7], r"\[7\] not among the 3 candidates"),
    ("best", "not all integers"),
    (None, "must return a list"),
    ([True, False, 2], "not all integers"),
])
def test_a_bad_ranking_is_a_clear_error(tmp_path, tokenizer, prompts, ranking, match):
    trainer = _trainer(tmp_path, prompts, tokenizer, feedback=lambda prompt, candidates: ranking,
                       max_steps=1)
    with pytest.raises(FeedbackError, match=match):
        trainer.train()


def test_check_ranking_accepts_any_permutation():
    assert check_ranking((2, 0, 1), 3) == [2, 0, 1]


def test_hooks_by_name(tmp_path, monkeypatch):
    queue = resolve_feedback("jsonl", str(tmp_path))
    assert isinstance(queue, JSONLQueueFeedback)
    assert queue.requests_path == tmp_path / "feedback_requests.jsonl"
    assert queue.responses_path == tmp_path / "feedback_responses.jsonl"
    assert isinstance(resolve_feedback("terminal"), TerminalFeedback)
    (tmp_path / "online_dpo_test_hooks.py").write_text(
        "class Prefer:\n    def __call__(self, prompt, candidates):\n        return [1, 0]\n"
        "def rank(prompt, candidates):\n    return [0, 1]\n")
    monkeypatch.chdir(tmp_path)
    # a class is instantiated
    assert resolve_feedback("online_dpo_test_hooks:Prefer")("x", ["a", "b"]) == [1, 0]
    assert resolve_feedback("online_dpo_test_hooks:rank")("x", ["a", "b"]) == [0, 1]
    with pytest.raises(ValueError, match="feedback 'online_dpo_test_hooks:nope'"):
        resolve_feedback("online_dpo_test_hooks:nope")


def test_jsonl_queue_hook_waits_for_responses_written_by_another_thread(tmp_path, tokenizer,
                                                                        prompts):
    requests, responses = tmp_path / "requests.jsonl", tmp_path / "responses.jsonl"
    done = threading.Event()

    def responder():  # answers every request: the last candidate best
        answered = set()
        while not done.is_set():
            lines = requests.read_text().splitlines() if requests.exists() else []
            for line in lines:
                request = json.loads(line)
                if request["id"] not in answered:
                    answered.add(request["id"])
                    ranking = list(range(len(request["candidates"])))[::-1]
                    with responses.open("a") as file:
                        file.write(json.dumps({"id": request["id"], "ranking": ranking}) + "\n")
            time.sleep(0.01)

    thread = threading.Thread(target=responder, daemon=True)
    thread.start()
    hook = JSONLQueueFeedback(requests, responses, poll_seconds=0.01, timeout=60)
    trainer = _trainer(tmp_path, prompts, tokenizer, feedback=hook, max_steps=1)
    seen = _spy_pairs(trainer, tokenizer)
    try:
        trainer.train()
    finally:
        done.set()
        thread.join()
    asked = [json.loads(line) for line in requests.read_text().splitlines()]
    assert [sorted(request) for request in asked] == [["candidates", "id", "prompt", "step"]] * 2
    assert all(request["step"] == 0 and len(request["candidates"]) == K for request in asked)
    (chosen, rejected), = seen
    assert chosen == [request["candidates"][-1] for request in asked]
    assert rejected == [request["candidates"][0] for request in asked]


def test_jsonl_queue_hook_times_out_and_names_the_bad_response_line(tmp_path):
    requests, responses = tmp_path / "requests.jsonl", tmp_path / "responses.jsonl"
    hook = JSONLQueueFeedback(requests, responses, poll_seconds=0.01, timeout=0.05)
    with pytest.raises(FeedbackError, match="no response to request"):
        hook("Hi?", ["a", "b"])
    request = json.loads(requests.read_text())
    responses.write_text(json.dumps({"id": request["id"], "ranking": [1, 1]}) + "\n")
    with pytest.raises(FeedbackError, match="responses.jsonl:1 ranked .* ties are not allowed"):
        hook("Hi?", ["a", "b"])
    responses.write_text(json.dumps({"id": request["id"], "ranking": [1, 0]}) + "\n")
    assert hook("Hi?", ["a", "b"]) == [1, 0]  # answered already: no new request
    assert len(requests.read_text().splitlines()) == 1  # asked once


def test_terminal_hook_reads_stdin_and_asks_again_after_a_bad_answer(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("one two\n1 1\n3 1\n2 1\n"))
    assert TerminalFeedback()("Hi?", ["first", "second"]) == [1, 0]
    shown = capsys.readouterr().out
    assert "Prompt: Hi?" in shown and "[1] first" in shown and "[2] second" in shown
    assert "'one two' is not a list of numbers" in shown
    assert "ties are not allowed" in shown and "[2] not among the 2 candidates" in shown
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(FeedbackError, match="EOF"):
        TerminalFeedback()("Hi?", ["first", "second"])


def test_terminal_hook_by_name_in_a_run(tmp_path, tokenizer, prompts, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 2\n2 1\n"))
    trainer = _trainer(tmp_path, prompts, tokenizer, feedback="terminal", num_candidates=2,
                       max_steps=1)
    trainer.train()
    assert capsys.readouterr().out.count("Rank the 2 candidates") == 2


# ----------------------------------------------------------------------------------------------
# Resume: exact, and nobody is asked twice
# ----------------------------------------------------------------------------------------------


def _weights(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_a_resumed_run_replays_the_rankings_instead_of_asking_again(tmp_path, tokenizer, prompts):
    common = dict(lr_schedule="constant", num_candidates=2)
    whole_hook = CountingHook()
    whole = _trainer(tmp_path / "whole", prompts, tokenizer, feedback=whole_hook, max_steps=4,
                     **common)
    whole.train()

    first_hook = CountingHook()
    stopped = _trainer(tmp_path / "parts", prompts, tokenizer, feedback=first_hook,
                       max_steps=3, save_steps=2, **common)
    stopped.train()  # the checkpoint is at step 2; step 3's answers are only in the log
    second_hook = CountingHook()
    resumed = _trainer(tmp_path / "parts", prompts, tokenizer, feedback=second_hook,
                       max_steps=4, resume=True, **common)
    resumed.train()

    assert [step for step, _, _ in first_hook.asked] == [0, 0, 1, 1, 2, 2]
    assert [step for step, _, _ in second_hook.asked] == [3, 3]  # step 3 (index 2) replayed
    assert first_hook.asked + second_hook.asked == whole_hook.asked
    for name, tensor in _weights(whole.model).items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


# ----------------------------------------------------------------------------------------------
# The MCTS sampler
# ----------------------------------------------------------------------------------------------

EOS, PREFERRED, VOCAB = 0, 5, 8


def _toy_sampler(seed: int):
    """A uniform policy over VOCAB tokens (EOS among them), seeded."""
    generator = torch.Generator().manual_seed(seed)

    def sample(trees, prefixes, max_new_tokens):
        out = []
        for _ in trees:
            tokens = torch.randint(VOCAB, (max_new_tokens,), generator=generator).tolist()
            out.append(tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens)
        return out

    return sample


def _preferred_count(trees, answers):
    return [float(answer.count(PREFERRED)) for answer in answers]


def _search(seed, trees=20):
    return mcts_search(trees, sample=_toy_sampler(seed), score=_preferred_count, count=2,
                       simulations=24, chunk_tokens=2, max_new_tokens=8, eos_id=EOS,
                       exploration=1.0, branching=2)


def test_mcts_finds_the_token_the_judge_prefers_more_often_than_plain_sampling():
    found = _search(seed=1)
    assert len(found) == 20 and all(len(answers) == 2 for answers in found)
    assert all(len(answer) <= 8 and EOS not in answer[:-1] for answers in found
               for answer in answers)
    assert all(answers[0] != answers[1] for answers in found)  # distinct leaves
    sample = _toy_sampler(seed=1)
    plain = [sample([tree, tree], [[], []], 8) for tree in range(20)]

    def mean_count(groups):
        return sum(a.count(PREFERRED) for answers in groups for a in answers) / (2 * len(groups))

    assert mean_count(found) > mean_count(plain) + 0.5
    assert _search(seed=1) == found  # deterministic given the sampler's seed
    assert _search(seed=2) != found


def test_mcts_sampler_trains_and_is_deterministic(tmp_path, tokenizer, prompts):
    def runs(name):
        trainer = _trainer(tmp_path / name, prompts, tokenizer, sampler="mcts",
                           mcts_simulations=3, mcts_chunk_tokens=3, num_candidates=2,
                           max_steps=1, reward_fn="length", examples=4)
        seen = _spy_pairs(trainer, tokenizer)
        return trainer.train().metrics, seen

    (first, first_pairs), (second, second_pairs) = runs("a"), runs("b")
    assert first == second and first_pairs == second_pairs
    chosen, rejected = first_pairs[0]
    assert all(c != r for c, r in zip(chosen, rejected))  # two distinct answers per prompt
    assert first["objective/scores_margin"] >= 0


# ----------------------------------------------------------------------------------------------
# A judge moves the policy
# ----------------------------------------------------------------------------------------------


def test_a_judge_preferring_low_token_ids_moves_the_policy_towards_them(tmp_path, tokenizer,
                                                                        prompts):
    half = 616 // 2

    def low_mass_after(prefer_low: bool) -> tuple[float, float]:
        def judge(completion_ids, **kwargs):
            return [sum((token < half) == prefer_low for token in ids) / max(len(ids), 1)
                    for ids in completion_ids]

        trainer = _trainer(tmp_path / str(prefer_low), prompts, tokenizer, reward_fn=judge,
                           num_candidates=4, batch_size=4, max_steps=8, lr=1e-2, beta=0.5,
                           examples=16)
        batch = trainer.batch(range(8))

        def low_mass() -> float:  # of the next token after the prompts
            with torch.no_grad():
                logits = trainer.model(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).logits[:, -1]
            return float(logits.softmax(-1)[:, :half].sum(-1).mean())

        before = low_mass()
        trainer.train()
        return before, low_mass()

    before, towards_low = low_mass_after(prefer_low=True)
    _, towards_high = low_mass_after(prefer_low=False)
    assert towards_low > before + 0.02
    assert towards_high < before - 0.02


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "named"), [
    (["--num-candidates", "1"], "num_candidates"),
    (["--sampler", "beam"], "sampler"),
    (["--pairs", "some"], "pairs"),
    (["--mcts-simulations", "1", "--sampler", "mcts"], "mcts_simulations"),
    (["--feedback", "nocolon"], "feedback"),
    (["--feedback", "no_such_module_xyz:rank"], "feedback"),
    (["--feedback", "terminal", "--sampler", "mcts"], "sampler='mcts'"),
    (["--feedback", "terminal", "--reward-fn", "length"], "reward_fn='length'"),
    (["--loss-type", "nope"], "loss_type"),
    (["--reference", "precomputed"], "precomputed"),
    (["--padding-free"], "padding_free"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, args, named):
    code = cli_main(["train", "online-dpo", "--output", str(tmp_path / "run"), "--no-progress",
                     *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fastalign train online-dpo: error: ") and err.count("\n") == 1
    assert named in err


def test_one_judge_only(tmp_path, tokenizer, prompts):
    with pytest.raises(ValueError, match="pass one judge, not reward_fn and feedback"):
        _trainer(tmp_path, prompts, tokenizer, reward_fn="length", feedback=CountingHook())
    with pytest.raises(ValueError, match="feedback must be a name .* OnlineDPOTrainer"):
        _config(tmp_path, feedback=CountingHook())


def test_a_reward_model_judges(tmp_path, tokenizer, prompts):
    config = AutoConfig.from_pretrained(assets.default_model_dir(), num_labels=1)
    config.pad_token_id = pad_token_id(tokenizer)
    torch.manual_seed(3)
    reward_model = AutoModelForSequenceClassification.from_config(config)
    trainer = _trainer(tmp_path, prompts, tokenizer, reward_model=reward_model, max_steps=1)
    seen = _spy_pairs(trainer, tokenizer)
    scored = []
    original = trainer.rank

    def rank(*args):
        rankings, scores = original(*args)
        scored.append((rankings, scores))
        return rankings, scores

    trainer.rank = rank
    result = trainer.train()
    assert math.isfinite(result.metrics["objective/scores"])
    (rankings, scores), = scored
    assert all(scores[p * K + ranking[0]] >= scores[p * K + ranking[-1]]
               for p, ranking in enumerate(rankings))
    assert len(seen[0][0]) == 2
    with pytest.raises(ValueError, match="replaces the reward functions"):
        OnlineDPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts[:4],
                         _config(tmp_path, reward_fn="length"), reward_model=reward_model)
