"""SFT's ``assistant_only_loss`` on conversations: only the assistant turns' tokens are scored.

The assistant turns are found by rendering the chat template prefix by prefix; the tests check
the scored tokens against the assistant messages' own text, the loss against all-token SFT, and
the refusals (a template that rewrites earlier turns, records without turns).
"""

from __future__ import annotations

import copy
import json

import pytest

from fastalign import assets
from fastalign.cli import main as cli_main
from fastalign.data import DataError, SFTCollator, encode_sft
from fastalign.ops import next_token_targets
from fastalign.trainers.sft import SFTConfig, SFTTrainer

CONVERSATIONS = [
    [{"role": "system", "content": "Answer kindly."},
     {"role": "user", "content": "Where do I start with my garden?"},
     {"role": "assistant", "content": "Start small: one bed, easy herbs."},
     {"role": "user", "content": "And then?"},
     {"role": "assistant", "content": "Add a vegetable each season."}],
    [{"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Teal."},
     {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "Amber, a warm one."}],
    [{"role": "user", "content": "Say hi."},
     {"role": "assistant", "content": "Hi! Nice to meet you."}],
    [{"role": "user", "content": "Count to three."},
     {"role": "assistant", "content": "One, two, three."},
     {"role": "user", "content": "Backwards?"},
     {"role": "assistant", "content": "Three, two, one."}],
]
RECORDS = [{"messages": messages} for messages in CONVERSATIONS]


@pytest.fixture(scope="module")
def tok():
    return assets.load_default_tokenizer()


def _runs(mask):
    """[(start, stop)] of the runs of 1 in a 0/1 list."""
    runs, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_the_scored_tokens_are_exactly_the_assistant_turns(tok):
    (example,) = encode_sft(RECORDS[1:2], tok, assistant_only_loss=True)
    ids, mask = example["completion_ids"], example["assistant_mask"]
    assert len(ids) == len(mask)
    # One run per assistant turn: its content and the end-of-turn token, nothing else.
    turns = [m["content"] for m in CONVERSATIONS[1] if m["role"] == "assistant"]
    runs = _runs(mask)
    assert [tok.decode(ids[a:b]) for a, b in runs] == [f"{text}<|end|>" for text in turns]
    # The same ids as the all-token encoding, whose rendering the unscored rest makes up.
    (whole,) = encode_sft(RECORDS[1:2], tok)
    assert whole["completion_ids"] == ids
    rest = [token for token, bit in zip(ids, mask) if not bit]
    assert tok.decode(rest) == ("<|bos|><|user|>\nName a colour.<|end|>\n<|assistant|>\n\n"
                                "<|user|>\nAnother one?<|end|>\n<|assistant|>\n")
    # The collator turns the mask into labels: the ids on the runs, -100 elsewhere.
    labels = SFTCollator(pad_token_id=tok.pad_token_id)([example])["labels"][0].tolist()
    assert labels == [token if bit else -100 for token, bit in zip(ids, mask)]


def _config(tmp_path, name, **options):
    return SFTConfig(**dict(output_dir=str(tmp_path / name), max_steps=2, batch_size=4,
                            device="cpu", progress=False, plots=False) | options)


def test_the_loss_scores_only_assistant_tokens_and_differs_from_all_tokens(tmp_path, tok):
    results = {}
    for name, only, free in (("all", False, False), ("assistant", True, False),
                             ("assistant-padding-free", True, True)):
        examples = encode_sft(RECORDS, tok, assistant_only_loss=only)
        trainer = SFTTrainer(assets.build_default_model(seed=2), tok, examples,
                             _config(tmp_path, name, assistant_only_loss=only,
                                     padding_free=free))
        batch = trainer.batch(range(4))
        loss, _ = trainer.compute_loss(batch)
        labels, cu_seqlens = batch["labels"], batch.get("cu_seqlens")
        targets = labels[:, 1:] if cu_seqlens is None else next_token_targets(
            labels.reshape(-1), cu_seqlens=cu_seqlens)
        results[name] = float(loss.detach()), float((targets != -100).sum())
    scored = sum(sum(e["assistant_mask"])
                 for e in encode_sft(RECORDS, tok, assistant_only_loss=True))
    every = sum(len(e["completion_ids"]) - 1 for e in encode_sft(RECORDS, tok))
    assert results["assistant"][1] == scored < results["all"][1] == every
    assert results["assistant"][0] != pytest.approx(results["all"][0], rel=1e-3)
    assert results["assistant-padding-free"] == pytest.approx(results["assistant"], rel=1e-5)


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    # Drops an assistant turn's reasoning once later turns follow (as several reasoning models'
    # templates do): the turn's text alone differs from its text inside the conversation.
    rewriting = copy.deepcopy(tok)
    rewriting.chat_template = (
        "{% for m in messages %}{% set text = m['content'] %}"
        "{% if m['role'] == 'assistant' and not loop.last %}"
        "{% set text = text.split('</think>')[-1] %}{% endif %}"
        "{{ '<|' + m['role'] + '|>\n' + text + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>greet</think>Hello"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"}]
    with pytest.raises(DataError, match=r"example 0: assistant_only_loss: the chat template "
                                        r"renders messages 0..1 differently.*rewrites earlier"):
        encode_sft([{"messages": messages}], rewriting, assistant_only_loss=True)
    encode_sft([{"messages": messages}], rewriting)  # all-token SFT does not need the turns


def test_records_without_assistant_turns_are_refused(tok):
    with pytest.raises(DataError, match=r"needs conversational records \{\"messages\""):
        encode_sft([{"prompt": "a", "completion": "b"}], tok, assistant_only_loss=True)
    with pytest.raises(DataError, match="needs conversational records"):
        encode_sft([{"text": "a b"}], tok, assistant_only_loss=True)
    with pytest.raises(DataError, match="no assistant message to train on"):
        encode_sft([{"messages": [{"role": "user", "content": "Hi"}]}], tok,
                   assistant_only_loss=True)


def test_options_that_contradict_assistant_only_loss_are_refused(tmp_path, tok):
    with pytest.raises(ValueError, match="assistant_only_loss.*completion_only_loss=false"):
        _config(tmp_path, "x", assistant_only_loss=True, completion_only_loss=False)
    with pytest.raises(ValueError, match=r"assistant_only_loss: 4 examples carry no "
                                         r"assistant_mask; encode them with encode_sft"):
        SFTTrainer(assets.build_default_model(), tok, encode_sft(RECORDS, tok),
                   _config(tmp_path, "y", assistant_only_loss=True))


def test_cli_assistant_only_loss(tmp_path, capsys):
    conversations = tmp_path / "chat.jsonl"
    conversations.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    common = ["--no-progress", "--no-plots", "--max-steps", "2", "--batch-size", "2"]
    out = tmp_path / "run"
    assert cli_main(["train", "sft", "--data", str(conversations), "--output", str(out),
                     "--assistant-only-loss", "--padding-free", *common]) == 0
    assert (out / "metrics.jsonl").exists()
    capsys.readouterr()
    assert cli_main(["train", "sft", "--output", str(tmp_path / "bad"), "--assistant-only-loss",
                     *common]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "Traceback" not in error
    assert error.startswith("fastalign train sft: error: ") and "sft.jsonl: example 0" in error
    assert "assistant_only_loss needs conversational records" in error


def test_cli_refuses_a_max_length_that_cuts_every_assistant_turn(tmp_path, tok, capsys):
    """The conversations still have tokens, but none the loss would score: a run would log a
    loss of 0 and learn nothing."""
    first_turn = min(_runs(e["assistant_mask"])[0][0]
                     for e in encode_sft(RECORDS, tok, assistant_only_loss=True))
    conversations = tmp_path / "chat.jsonl"
    conversations.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "run"
    assert cli_main(["train", "sft", "--data", str(conversations), "--output", str(out),
                     "--assistant-only-loss", "--max-length", str(first_turn),
                     "--max-prompt-length", str(first_turn - 1), "--no-progress",
                     "--max-steps", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fastalign train sft: error: ") and error.count("\n") == 0
    assert "no token to train on in 4 examples" in error
    assert "cuts every assistant turn away" in error
    assert not (out / "metrics.jsonl").exists()
