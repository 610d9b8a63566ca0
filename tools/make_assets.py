"""Generate fastalign's shipped assets: a tiny Llama config, its tokenizer, and small datasets.

    python tools/make_assets.py                     # writes fastalign/assets/{tiny-llama,data}
    python tools/make_assets.py --output /tmp/x     # writes /tmp/x/{tiny-llama,data}

Everything is deterministic: running the script again reproduces the files byte for byte (the
tests check it). Nothing is downloaded and no weights are written: the model is built from
``config.json`` with a seeded random init (``fastalign.assets.build_default_model``).

The datasets are synthetic and chosen to be learnable by a randomly initialised 2-layer model in
a few dozen steps. Every prompt asks for help with a topic ("Can you help me with my bike?");
chosen answers are polite and helpful (an opener and a sentence from the "polite" pools), rejected
ones rude and unhelpful (from the "rude" pools); both name the topic. The held-out preference file
uses prompts (template × topic) that never occur in the training file, so generalising means
preferring the polite vocabulary, not memorising pairs.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "fastalign" / "assets"
SEED = 1234
# An upper bound: the trainer stops at 616 tokens, once every word of the corpus is one token.
VOCAB_SIZE = 640

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]  # ids 0..5

# Each message renders as "<|role|>\n{content}<|end|>", turns joined by "\n"; the generation prompt
# is "\n<|assistant|>\n". An assistant turn therefore ends with the eos token itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{% if messages %}{{ '\\n' }}{% endif %}{{ '<|assistant|>\\n' }}"
    "{% endif %}"
)

TOPICS = [
    "bike", "garden", "essay", "code", "recipe", "budget", "email", "trip", "resume", "speech",
    "report", "website", "kitchen", "homework", "painting", "schedule", "workout", "poem",
    "garage", "camera", "laptop", "letter", "project", "plant",
]
PROMPT_TEMPLATES = [
    "Can you help me with my {t}?",
    "How do I fix my {t}?",
    "Any tips for my {t}?",
    "Please look at my {t}.",
    "What should I do about my {t}?",
    "I need advice on my {t}.",
    "Could you check my {t} for me?",
    "My {t} is a mess. Ideas?",
    "Where do I start with my {t}?",
    "Is my {t} any good?",
    "Help me plan my {t}.",
    "What is wrong with my {t}?",
]
POLITE_OPENERS = ["Sure!", "Of course!", "Gladly!", "Happy to help!", "Great question!",
                  "Certainly!"]
POLITE_BODIES = [
    "Here is a simple plan for your {t}.",
    "Let us improve your {t} step by step.",
    "Start by making one small list for your {t}.",
    "Your {t} has a good base, so keep going.",
    "I would be glad to review your {t}.",
    "Try one small change to your {t} today.",
    "First, note what you like about your {t}.",
    "A short checklist will help your {t}.",
]
RUDE_OPENERS = ["No.", "Ugh.", "Whatever.", "Go away.", "Not my problem.", "Seriously?"]
RUDE_BODIES = [
    "Fix your own {t}.",
    "Your {t} is hopeless.",
    "I do not care about your {t}.",
    "Nobody wants to see your {t}.",
    "Stop asking about your {t}.",
    "Your {t} is boring and bad.",
    "Figure out your {t} yourself.",
    "Just throw your {t} away.",
]

N_TRAIN_PAIRS, N_EVAL_PAIRS = 256, 64
N_KTO, N_SFT, N_PROMPTS = 256, 256, 128


def _answer(rng: random.Random, topic: str, polite: bool) -> str:
    openers, bodies = (POLITE_OPENERS, POLITE_BODIES) if polite else (RUDE_OPENERS, RUDE_BODIES)
    return f" {rng.choice(openers)} {rng.choice(bodies).format(t=topic)}"


def make_datasets(seed: int = SEED) -> dict[str, list[dict]]:
    """The records of every shipped JSONL file (standard format: plain strings).

    Prompts are split into disjoint train and held-out sets; completions start with a space (the
    standard format appends them to the prompt text as is).
    """
    rng = random.Random(seed)
    prompts = [(template.format(t=topic), topic)
               for template in PROMPT_TEMPLATES for topic in TOPICS]
    rng.shuffle(prompts)
    eval_prompts, train_prompts = prompts[:N_EVAL_PAIRS], prompts[N_EVAL_PAIRS:]

    def pair(prompt, topic):
        return {"prompt": prompt, "chosen": _answer(rng, topic, True),
                "rejected": _answer(rng, topic, False)}

    train = [pair(*train_prompts[i % len(train_prompts)]) for i in range(N_TRAIN_PAIRS)]
    held_out = [pair(*p) for p in eval_prompts]
    kto = []
    for i in range(N_KTO):
        prompt, topic = train_prompts[(7 * i) % len(train_prompts)]
        desirable = rng.random() < 0.5
        kto.append({"prompt": prompt, "completion": _answer(rng, topic, desirable),
                    "label": desirable})
    sft = []
    for i in range(N_SFT):
        prompt, topic = train_prompts[(5 * i + 3) % len(train_prompts)]
        sft.append({"prompt": prompt, "completion": _answer(rng, topic, True)})
    prompt_only = [{"prompt": prompt} for prompt, _ in train_prompts[:N_PROMPTS]]
    return {"preferences": train, "preferences_eval": held_out, "kto": kto, "sft": sft,
            "prompts": prompt_only}


def _corpus(datasets: dict[str, list[dict]]) -> list[str]:
    """Tokenizer training text: every string of every dataset, in a fixed order."""
    texts = []
    for records in datasets.values():
        for record in records:
            texts.extend(value for value in record.values() if isinstance(value, str))
    return texts


def make_tokenizer(corpus: list[str]) -> Tokenizer:
    """A byte-level BPE (any text encodes) with at most VOCAB_SIZE tokens; adds BOS like Llama."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)],
    )
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 512,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def model_config(tokenizer: Tokenizer) -> dict:
    """A tiny LlamaForCausalLM config; written by hand (no transformers version in the file)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": tokenizer.token_to_id(EOS),
        "pad_token_id": tokenizer.token_to_id(PAD),
    }


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def _json(data) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="assets directory to write (default: fastalign/assets)")
    args = parser.parse_args(argv)

    datasets = make_datasets()
    tokenizer = make_tokenizer(_corpus(datasets))
    model_dir = args.output / "tiny-llama"
    _write(model_dir / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    _write(model_dir / "tokenizer_config.json", _json(tokenizer_config()))
    _write(model_dir / "config.json", _json(model_config(tokenizer)))
    for name, records in datasets.items():
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        _write(args.output / "data" / f"{name}.jsonl", lines)
    print(f"wrote {model_dir} (vocab {tokenizer.get_vocab_size()}) and "
          f"{', '.join(f'{n}.jsonl ({len(r)})' for n, r in datasets.items())} "
          f"under {args.output / 'data'}")


if __name__ == "__main__":
    main()
