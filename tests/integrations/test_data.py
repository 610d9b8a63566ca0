"""fastalign.data (TRL-format JSONL → token ids → batches) and the shipped assets."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastalign.assets import (
    ASSETS_DIR,
    DATA_KINDS,
    build_default_model,
    default_data_path,
    default_model_dir,
    load_default_tokenizer,
)
from fastalign.data import (
    DataError,
    KTOCollator,
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    encode_kto,
    encode_preference,
    encode_prompts,
    encode_sft,
    load_jsonl,
)
from fastalign.losses.kto import kto_mismatched_indices

ROOT = Path(__file__).resolve().parents[2]
BOS, EOS, PAD = 1, 2, 0  # the shipped tokenizer's <|bos|>, <|end|>, <|pad|>


@pytest.fixture(scope="module")
def tok():
    return load_default_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n"
                                for line in lines))
    return path


# ----------------------------------------------------------------------------- tokenization

def test_special_tokens(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, PAD)
    assert tok("Hi")["input_ids"] == [BOS, *ids(tok, "Hi")]


def test_preference_standard(tok):
    (ex,) = encode_preference([{"prompt": "Hi there?", "chosen": " Sure!", "rejected": " No."}],
                              tok)
    assert ex == {"prompt_ids": [BOS, *ids(tok, "Hi there?")],
                  "chosen_ids": [*ids(tok, " Sure!"), EOS],
                  "rejected_ids": [*ids(tok, " No."), EOS]}


def test_preference_conversational_and_implicit_prompt(tok):
    prompt = [{"role": "system", "content": "Be kind."}, *user("Hi")]
    explicit = {"prompt": prompt, "chosen": assistant("Sure!"), "rejected": assistant("No.")}
    (ex,) = encode_preference([explicit], tok)
    rendered = "<|system|>\nBe kind.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert ex["prompt_ids"] == [BOS, *ids(tok, rendered)]
    # The template ends an assistant turn with the eos token: no second eos is appended.
    assert ex["chosen_ids"] == ids(tok, "Sure!<|end|>") and ex["chosen_ids"][-1] == EOS
    assert ex["rejected_ids"] == ids(tok, "No.<|end|>")
    implicit = {"chosen": prompt + assistant("Sure!"), "rejected": prompt + assistant("No.")}
    assert encode_preference([implicit], tok) == [ex]


def test_sft_layouts(tok):
    text, messages, pc = encode_sft([
        {"text": "Hello world"},
        {"messages": user("Hi") + assistant("Yo")},
        {"prompt": "Q?", "completion": " A."},
    ], tok)
    assert text == {"prompt_ids": [], "completion_ids": [BOS, *ids(tok, "Hello world"), EOS]}
    assert messages == {"prompt_ids": [],
                        "completion_ids": [BOS, *ids(tok, "<|user|>\nHi<|end|>\n<|assistant|>\nYo"
                                                           "<|end|>")]}
    assert pc == {"prompt_ids": [BOS, *ids(tok, "Q?")], "completion_ids": [*ids(tok, " A."), EOS]}
    (conv,) = encode_sft([{"prompt": user("Q?"), "completion": assistant("A.")}], tok)
    assert conv["completion_ids"] == ids(tok, "A.<|end|>")


def test_kto_and_prompts(tok):
    recs = [{"prompt": "Q?", "completion": " A.", "label": True},
            {"prompt": user("Q?"), "completion": assistant("A."), "label": False}]
    std, conv = encode_kto(recs, tok)
    assert std == {"prompt_ids": [BOS, *ids(tok, "Q?")], "completion_ids": [*ids(tok, " A."), EOS],
                   "desirable": True}
    assert conv["desirable"] is False and conv["completion_ids"] == ids(tok, "A.<|end|>")
    p_std, p_conv = encode_prompts([{"prompt": "Q?", "completion": "extra keys are fine"},
                                    {"prompt": user("Q?")}], tok)
    assert p_std == {"prompt_ids": [BOS, *ids(tok, "Q?")]}
    assert p_conv == {"prompt_ids": [BOS, *ids(tok, "<|user|>\nQ?<|end|>\n<|assistant|>\n")]}


def test_truncation(tok):
    prompt, chosen = "one two three four five six", " seven eight nine ten"
    p, c = [BOS, *ids(tok, prompt)], [*ids(tok, chosen), EOS]
    assert len(p) > 4 and len(c) > 3
    rec = {"prompt": prompt, "chosen": chosen, "rejected": " No."}
    (ex,) = encode_preference([rec], tok, max_prompt_length=4)
    assert ex["prompt_ids"] == [BOS, *p[-3:]]  # the END of the prompt, and its BOS
    assert ex["chosen_ids"] == c
    (ex,) = encode_preference([rec], tok, max_prompt_length=4, max_length=7)
    assert ex["chosen_ids"] == c[:3]  # the completion's end is cut (its eos with it)
    (ex,) = encode_preference([rec], tok, max_length=len(p) + 2)
    assert ex["prompt_ids"] == p and ex["chosen_ids"] == c[:2]
    with pytest.raises(DataError, match=r"example 0: the prompt has \d+ tokens"):
        encode_preference([rec], tok, max_length=len(p))
    with pytest.raises(ValueError, match="max_prompt_length"):
        encode_preference([rec], tok, max_prompt_length=8, max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        encode_sft([rec], tok, max_length=0)
    (sft,) = encode_sft([{"text": prompt}], tok, max_length=3)
    assert sft["completion_ids"] == p[:3]


def test_template_must_render_prompt_as_prefix(tok):
    class Shuffled:  # a tokenizer whose template drops the generation prompt for full chats
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *args, **kwargs):
            return tok(*args, **kwargs)

        def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
            return ("X" if add_generation_prompt else "Y") + messages[-1]["content"]

    with pytest.raises(DataError, match="example 0: the chat template"):
        encode_sft([{"prompt": user("Q"), "completion": assistant("A")}], Shuffled())


# ----------------------------------------------------------------------------- collators

def test_sft_collator_hand_computed():
    batch = SFTCollator(pad_token_id=0)([{"prompt_ids": [1, 5], "completion_ids": [7, 2]},
                                          {"prompt_ids": [1], "completion_ids": [9, 8, 6, 2]}])
    assert batch["input_ids"].tolist() == [[1, 5, 7, 2, 0], [1, 9, 8, 6, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 2, -100], [-100, 9, 8, 6, 2]]
    assert all(t.dtype == torch.long for t in batch.values())
    padded = SFTCollator(pad_token_id=0, pad_to_multiple_of=4)([{"prompt_ids": [1],
                                                                  "completion_ids": [3]}])
    assert padded["input_ids"].tolist() == [[1, 3, 0, 0]]


def test_preference_collator_stacks_chosen_on_rejected():
    examples = [{"prompt_ids": [1, 5], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
                {"prompt_ids": [1], "chosen_ids": [6, 2], "rejected_ids": [4, 4, 4, 2]}]
    batch = PreferenceCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 5, 7, 8, 2], [1, 6, 2, 0, 0],
                                           [1, 5, 9, 2, 0], [1, 4, 4, 4, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 2], [-100, 6, 2, -100, -100],
                                        [-100, -100, 9, 2, -100], [-100, 4, 4, 4, 2]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                                [1] * 5]


def test_kto_collator_mismatched_batch():
    examples = [{"prompt_ids": [1, 10 + i], "completion_ids": [20 + i] * (i + 1) + [2],
                 "desirable": i != 1} for i in range(3)]
    batch = KTOCollator(pad_token_id=0)(examples)
    assert batch["desirable"].tolist() == [True, False, True]
    assert batch["desirable"].dtype == torch.bool
    assert batch["input_ids"].tolist()[1] == [1, 11, 21, 21, 2, 0]
    idx = kto_mismatched_indices(3).tolist()
    assert idx == [2, 0, 1]
    for i, j in enumerate(idx):
        n = 2 + len(examples[j]["completion_ids"])
        assert batch["kl_input_ids"][i, :n].tolist() == [1, 10 + i, *examples[j]["completion_ids"]]
        assert batch["kl_labels"][i, :n].tolist() == [-100, -100, *examples[j]["completion_ids"]]
        assert batch["kl_attention_mask"][i].sum() == n
    cut = KTOCollator(pad_token_id=0, max_length=3)(examples)
    assert cut["kl_input_ids"].tolist() == [[1, 10, 22], [1, 11, 20], [1, 12, 21]]
    with pytest.raises(ValueError, match=">= 2 examples"):
        KTOCollator(pad_token_id=0)(examples[:1])
    with pytest.raises(ValueError, match="pad_token_id"):
        KTOCollator(pad_token_id=None)


def test_prompt_collator_left_pads_for_generate(tok):
    batch = PromptCollator(pad_token_id=0)([{"prompt_ids": [1, 5, 6]}, {"prompt_ids": [1]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [0, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["prompt_lengths"].tolist() == [3, 1]
    prompts = encode_prompts(load_jsonl(default_data_path("ppo"), "prompt")[:2], tok)
    model = build_default_model(seed=0)
    batch = PromptCollator(tok.pad_token_id)(prompts)
    out = model.generate(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                         max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and torch.equal(out[:, :batch["input_ids"].shape[1]],
                                             batch["input_ids"])


# ----------------------------------------------------------------------------- malformed data

PREF = {"prompt": "Q", "chosen": " A", "rejected": " B"}


@pytest.mark.parametrize("kind, lines, line, message", [
    ("preference", [PREF, "{not json}\n"], 2, "invalid JSON"),
    ("preference", [PREF, "\n", {"prompt": "Q", "chosen": " A"}], 3, "missing key 'rejected'"),
    ("preference", [PREF, "[1, 2]\n"], 2, "expected a JSON object, got list"),
    ("preference", [PREF, {**PREF, "chosen": ""}], 2, "'chosen' is an empty string"),
    ("preference", [{**PREF, "chosen": 3}], 1, "'chosen' must be a non-empty string"),
    ("preference", [{**PREF, "chosen": []}], 1, "got an empty list"),
    ("preference", [PREF, {"prompt": user("Q"), "chosen": assistant("A"),
                           "rejected": assistant("B")}], 2, "one file must use one format"),
    ("preference", [{"prompt": user("Q"), "chosen": " A", "rejected": assistant("B")}], 1,
     "mixes standard and conversational"),
    ("preference", [{"prompt": [{"role": "user"}], "chosen": assistant("A"),
                     "rejected": assistant("B")}], 1, r"'prompt'\[0\] must be a message"),
    ("preference", [{"chosen": " A", "rejected": " B"}], 1, "missing key 'prompt'"),
    ("preference", [{"chosen": assistant("A"), "rejected": assistant("B")}], 1,
     "share a non-empty message prefix"),
    ("kto", [{"prompt": "Q", "completion": " A", "label": True},
             {"prompt": "Q", "completion": " A", "label": 1}], 2, "'label' must be a JSON bool"),
    ("kto", [{"prompt": "Q", "label": True}], 1, "missing key 'completion'"),
    ("sft", [{"text": "a"}, {"prompt": "Q", "completion": " A"}], 2, "standard/text"),
    ("sft", [{"prompt": "Q"}], 1, "missing key 'completion'"),
    ("sft", [{"foo": "Q"}], 1, "expected an SFT record"),
    ("prompt", [{"prompt": "Q"}, {"prompt": "  "}], 2, "empty string"),
])
def test_malformed_lines(tmp_path, kind, lines, line, message):
    path = write(tmp_path, lines)
    with pytest.raises(DataError, match=message) as info:
        load_jsonl(path, kind)
    assert f"{path}:{line}:" in str(info.value)


def test_non_utf8_and_empty_files(tmp_path):
    path = write(tmp_path, json.dumps(PREF).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8"):
        load_jsonl(path, "preference")
    for content in (b"", b"\n  \n"):
        path = write(tmp_path, content)
        with pytest.raises(DataError, match=rf"{path}: no records"):
            load_jsonl(path, "preference")
    with pytest.raises(ValueError, match="kind must be one of"):
        load_jsonl(path, "orpo")  # "dpo" is a training kind, read as preference data


def test_blank_lines_and_extra_keys(tmp_path):
    path = write(tmp_path, ["\n", {**PREF, "score": 3}, "\r\n", PREF])
    assert load_jsonl(path, "preference") == [{**PREF, "score": 3}, PREF]


def test_encode_validates_records(tok):
    with pytest.raises(DataError, match="example 1: missing key 'label'"):
        encode_kto([{"prompt": "Q", "completion": " A", "label": True},
                    {"prompt": "Q", "completion": " A"}], tok)


# ----------------------------------------------------------------------------- shipped assets

def test_shipped_tokenizer_and_config(tok):
    from transformers import AutoConfig, PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    config = AutoConfig.from_pretrained(default_model_dir())
    assert config.model_type == "llama" and config.vocab_size == len(tok)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (BOS, EOS, PAD)
    assert config.tie_word_embeddings is False
    assert tok.decode(tok("héllo 日本 🎉 {x}")["input_ids"], skip_special_tokens=True) \
        == "héllo 日本 🎉 {x}"


def test_build_default_model_is_seeded_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = build_default_model(0), build_default_model(0), build_default_model(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()
    half = build_default_model(0, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(half.lm_head.weight, a.lm_head.weight.to(torch.bfloat16))


def test_shipped_datasets(tok):
    loaders = {"dpo": ("preference", encode_preference), "rm": ("preference", encode_preference),
               "dpo_eval": ("preference", encode_preference), "kto": ("kto", encode_kto),
               "sft": ("sft", encode_sft), "ppo": ("prompt", encode_prompts),
               "grpo": ("prompt", encode_prompts)}
    assert set(loaders) == set(DATA_KINDS)
    for name, (kind, encode) in loaders.items():
        examples = encode(load_jsonl(default_data_path(name), kind), tok)
        assert len(examples) >= 64
        for ex in examples:
            assert len(ex["prompt_ids"]) <= 24
            for key in ("chosen_ids", "rejected_ids", "completion_ids"):
                assert len(ex.get(key, [])) <= 16
    train = {r["prompt"] for r in load_jsonl(default_data_path("dpo"), "preference")}
    held_out = {r["prompt"] for r in load_jsonl(default_data_path("dpo_eval"), "preference")}
    assert not train & held_out
    labels = [r["label"] for r in load_jsonl(default_data_path("kto"), "kto")]
    assert 0.3 < sum(labels) / len(labels) < 0.7
    with pytest.raises(ValueError, match="kind must be one of"):
        default_data_path("orpo")


def test_make_assets_reproduces_shipped_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_assets", ROOT / "tools" / "make_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--output", str(tmp_path)])
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "make_assets wrote nothing"
    for rel in generated:
        assert (tmp_path / rel).read_bytes() == (ASSETS_DIR / rel).read_bytes(), rel


def test_load_jsonl_takes_the_training_kinds_too():
    """`fastalign train dpo` reads preference data: so does load_jsonl(path, "dpo")."""
    from fastalign import assets, data

    path = assets.default_data_path("dpo")
    assert data.load_jsonl(path, "dpo") == data.load_jsonl(path, "preference")
    assert data.load_jsonl(path, "rm") == data.load_jsonl(path, "preference")
    prompts = assets.default_data_path("ppo")
    assert data.load_jsonl(prompts, "grpo") == data.load_jsonl(prompts, "prompt")


def test_examples_without_a_token_to_train_on_are_refused():
    """What an empty tokenizer (or max-length 1) leaves: a run would log a loss of 0 and exit 0."""
    from fastalign import assets, data

    records = data.load_jsonl(assets.default_data_path("sft"), "sft")[:3]

    examples = [{"prompt_ids": [], "completion_ids": []} for _ in records]
    with pytest.raises(data.DataError, match=r"sft\.jsonl: no token to train on in 3 examples"):
        data.check_tokens_to_train_on(examples, "sft", "sft.jsonl")
    data.check_tokens_to_train_on([{"prompt_ids": [], "completion_ids": [5, 6]}], "sft", "x")
    data.check_tokens_to_train_on([{"prompt_ids": [1], "completion_ids": [5]}], "sft", "x")
    with pytest.raises(data.DataError, match="lone first token"):  # nothing to predict it from
        data.check_tokens_to_train_on([{"prompt_ids": [], "completion_ids": [5]}], "sft", "x")
    masked = {"prompt_ids": [], "completion_ids": [1, 2, 3, 4], "assistant_mask": [0, 0, 0, 0]}
    with pytest.raises(data.DataError, match="cuts every assistant turn away"):
        data.check_tokens_to_train_on([masked, masked], "sft", "chat.jsonl")
    data.check_tokens_to_train_on([masked, {**masked, "assistant_mask": [0, 0, 1, 1]}], "sft",
                                  "chat.jsonl")
    with pytest.raises(data.DataError, match="chosen_ids and rejected_ids are all empty"):
        data.check_tokens_to_train_on([{"prompt_ids": [1], "chosen_ids": [],
                                        "rejected_ids": []}], "dpo", "prefs.jsonl")
