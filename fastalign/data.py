"""TRL-compatible data: loading, validation, tokenization and collation.

Sources: JSONL files (:func:`load_jsonl`), and through the ``datasets`` package Parquet, Arrow,
CSV and JSON files, ``save_to_disk`` folders and hub datasets (:func:`load_records`, which takes
any of them, a split and a column mapping). Every record of every source is validated alike.

Formats (one JSON object a line, as TRL's datasets; extra keys are allowed and ignored):

==============  ==============================================================================
kind            keys
==============  ==============================================================================
``sft``         ``{"text"}`` (a string), ``{"messages"}`` (a list of messages) or
                ``{"prompt", "completion"}``
``preference``  ``{"prompt", "chosen", "rejected"}``; conversational records may leave the prompt
                implicit (``{"chosen", "rejected"}``): it is the longest shared message prefix
``kto``         ``{"prompt", "completion", "label"}`` with a bool label (True = desirable)
``prompt``      ``{"prompt"}`` (for generation: PPO, GRPO)
==============  ==============================================================================

Each text field is either a non-empty string (the *standard* format) or a non-empty list of
``{"role", "content"}`` messages (the *conversational* format); one file uses one format.

Tokenization (``encode_*``) gives plain dicts of python int lists:

* prompt: standard → the text as is; conversational → the chat template with the generation
  prompt. Tokenized without special tokens, then the tokenizer's BOS is prepended if the tokenizer
  adds one by default (and the text does not already start with it).
* completion: standard → the text as is; conversational → the suffix that the chat template of
  prompt + completion messages adds after the rendered prompt (an error if the prompt is not a
  prefix). Tokenized without special tokens; the eos token is appended unless already last.
* truncation: ``max_prompt_length`` keeps the END of the prompt (and its BOS), ``max_length`` caps
  prompt + completion by cutting the END of the completion (its eos may go). A prompt that leaves
  no room for a completion is an error. SFT's ``text``/``messages`` records are cut at the end.

Collators pad to the longest sequence of the batch and give the fused losses' layout: ``labels``
aligned with ``input_ids`` (the scored token ids, -100 on prompt and padding).
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastalign.losses.kto import kto_mismatched_indices
from fastalign.ops._checks import first_line

IGNORE_INDEX = -100
KINDS = ("sft", "preference", "kto", "prompt")
# The `fastalign train` kinds, accepted wherever a data kind is asked for: the CLI's `dpo` reads
# preference data, so `load_jsonl(path, "dpo")` should too.
KIND_ALIASES = {"dpo": "preference", "rm": "preference", "ppo": "prompt", "grpo": "prompt"}


def _data_kind(kind) -> str:
    if kind in KIND_ALIASES:
        return KIND_ALIASES[kind]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} (or a training kind: "
                         f"{', '.join(f'{k} = {v}' for k, v in KIND_ALIASES.items())}), "
                         f"got {kind!r}")
    return kind
_KEYS = {"preference": ("prompt", "chosen", "rejected"), "kto": ("prompt", "completion", "label"),
         "prompt": ("prompt",)}


class DataError(ValueError):
    """Malformed data; the message names the file and line (or the example) and what was expected.
    """


# ----------------------------------------------------------------------------- validation

def _check_unicode(where: str, text: str) -> None:
    """JSON's \\uD800-style escapes can decode to lone surrogates, which no tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where} is not valid Unicode: a lone surrogate "
                        f"{text[err.start]!r} at character {err.start}") from None


def _style(record: dict, key: str) -> str:
    """'standard' for a non-empty string, 'conversational' for a list of messages, else raise."""
    value = record[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"'{key}' is an empty string")
        _check_unicode(f"'{key}'", value)
        return "standard"
    if isinstance(value, list) and value:
        for i, message in enumerate(value):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and message["role"] and isinstance(message.get("content"), str)
                    and message["content"].strip()):
                raise DataError(f"'{key}'[{i}] must be a message {{\"role\": str, \"content\": "
                                f"non-empty str}}, got {message!r:.80}")
            for field in ("role", "content"):
                _check_unicode(f"'{key}'[{i}]['{field}']", message[field])
        return "conversational"
    got = "an empty list" if value == [] else type(value).__name__
    raise DataError(f"'{key}' must be a non-empty string or a list of {{\"role\", \"content\"}} "
                    f"messages, got {got}")


def _require(record: dict, keys: tuple[str, ...], kind: str) -> None:
    for key in keys:
        if key not in record:
            raise DataError(f"missing key '{key}' (a {kind} record needs "
                            f"{', '.join(repr(k) for k in keys)})")


def _same_style(record: dict, keys: tuple[str, ...]) -> str:
    styles = {key: _style(record, key) for key in keys}
    if len(set(styles.values())) > 1:
        raise DataError(f"mixes standard and conversational fields: {styles}")
    return next(iter(styles.values()))


def validate_record(record, kind: str) -> tuple[dict, str]:
    """Check one record of ``kind``; return (normalised copy, format name).

    The format is "standard" or "conversational" (SFT adds the layout: "standard/text",
    "conversational/messages", "<style>/prompt-completion"). An implicit-prompt preference record
    comes back with its shared message prefix as ``prompt`` and the rest as chosen/rejected.
    """
    kind = _data_kind(kind)
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    record = dict(record)
    if kind == "sft":
        if "messages" in record:
            if _style(record, "messages") != "conversational":
                raise DataError("'messages' must be a list of {\"role\", \"content\"} messages, "
                                "got a string (use 'text' for plain text)")
            return record, "conversational/messages"
        if "text" in record:
            if _style(record, "text") != "standard":
                raise DataError("'text' must be a non-empty string, got a list (use 'messages' "
                                "for a conversation)")
            return record, "standard/text"
        if "prompt" not in record and "completion" not in record:
            raise DataError("expected an SFT record: {'text'}, {'messages'} or "
                            "{'prompt', 'completion'}")
        _require(record, ("prompt", "completion"), kind)
        return record, _same_style(record, ("prompt", "completion")) + "/prompt-completion"
    keys = _KEYS[kind]
    if kind == "preference" and "prompt" not in record:
        _require(record, ("chosen", "rejected"), kind)
        if _same_style(record, ("chosen", "rejected")) == "standard":
            raise DataError("missing key 'prompt' (only conversational chosen/rejected may leave "
                            "the prompt implicit)")
        chosen, rejected = record["chosen"], record["rejected"]
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0 or n == len(chosen) or n == len(rejected):
            raise DataError("implicit prompt: chosen and rejected must share a non-empty message "
                            "prefix and each continue it")
        record.update(prompt=chosen[:n], chosen=chosen[n:], rejected=rejected[n:])
    _require(record, keys, kind)
    if kind == "kto" and not isinstance(record["label"], bool):
        raise DataError(f"'label' must be a JSON bool (true = desirable), got "
                        f"{record['label']!r:.40}")
    return record, _same_style(record, tuple(k for k in keys if k != "label"))


def load_jsonl(path: str | Path, kind: str, *,
               columns: dict[str, str] | str | None = None) -> list[dict]:
    """Read and validate a whole JSONL file of ``kind`` ("sft", "preference", "kto", "prompt", or
    a training kind: "dpo" and "rm" read preference data, "ppo" and "grpo" prompts).

    Every line is checked before anything is returned, so a bad line fails the run before training
    starts: invalid JSON or UTF-8, a line that is not an object, missing keys, wrong types, empty
    strings, a format differing from the first line's, or no record at all raise ``DataError``
    with ``path:line``. Blank lines are skipped. ``columns`` renames keys to the format's first
    (see :func:`load_records`). Returns the normalised records (see :func:`validate_record`).
    """
    kind = _data_kind(kind)
    path = Path(path)
    return _checked_records(_jsonl_lines(path), kind, columns, unit="line",
                            empty=f"{path}: no records (the file is empty); expected {kind} "
                                  f"JSONL lines")


def _jsonl_lines(path: Path):
    """(``path:line``, line number, parsed value) for each non-blank line."""
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not valid UTF-8 (byte {err.start} of the line)") from None
        line = line.lstrip("\ufeff") if number == 1 else line
        if not line.strip():
            continue
        try:
            yield where, number, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None


def _checked_records(items, kind: str, columns: dict[str, str] | None, *, unit: str,
                     empty: str) -> list[dict]:
    """Validate every ``(where, number, value)`` of one source (renamed by ``columns`` first):
    one format throughout, at least one record. Errors start with ``where``."""
    records, first = [], None
    for where, number, value in items:
        try:
            if columns and isinstance(value, dict):
                value = _renamed(value, columns)
            record, fmt = validate_record(value, kind)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        if first is None:
            first = (number, fmt)
        elif fmt != first[1]:
            raise DataError(f"{where}: this {unit} uses the {fmt} format but {unit} {first[0]} "
                            f"uses {first[1]}; one file must use one format")
        records.append(record)
    if not records:
        raise DataError(empty)
    return records


# ----------------------------------------------------------------------------- other sources

# A file's suffix -> the `datasets` builder that reads it (.jsonl stays with load_jsonl, which
# names the line of a bad record).
DATASETS_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}
# The keys of every format: the targets a column mapping may rename a column to.
FORMAT_KEYS = ("text", "messages", "prompt", "completion", "chosen", "rejected", "label")


class DatasetsNotInstalled(DataError):
    """A source other than a JSONL file needs the ``datasets`` package, which is missing."""


def parse_columns(columns, *, name: str = "columns") -> dict[str, str] | None:
    """A column mapping, ``{"prompt": "question"}`` or the text ``"prompt=question,..."``, checked:
    each target a format key (``FORMAT_KEYS``), each source named once. Errors start with
    ``name``."""
    if columns is None or columns == "" or columns == {}:
        return None
    if isinstance(columns, str):
        pairs = [part.split("=", 1) for part in columns.split(",") if part.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"{name} must be KEY=COLUMN pairs separated by commas (e.g. "
                             f"prompt=question,completion=answer), got {columns!r}")
        columns = {target.strip(): source.strip() for target, source in pairs}
    if not isinstance(columns, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in columns.items()):
        raise ValueError(f"{name} must map format keys to column names, got {columns!r}")
    unknown = [target for target in columns if target not in FORMAT_KEYS]
    if unknown:
        raise ValueError(f"{name}: {unknown[0]!r} is not a key of any data format (one of "
                         f"{', '.join(FORMAT_KEYS)})")
    if len(set(columns.values())) != len(columns):
        raise ValueError(f"{name}: a column is mapped to two keys in {columns!r}")
    return columns


def _renamed(record: dict, columns: dict[str, str]) -> dict:
    """``record`` with each mapped column under its format key (a swap works: all at once)."""
    missing = [source for source in columns.values() if source not in record]
    if missing:
        target = next(t for t, s in columns.items() if s == missing[0])
        raise DataError(f"missing column '{missing[0]}' (mapped to '{target}')")
    moved = {target: record[source] for target, source in columns.items()}
    rest = {key: value for key, value in record.items() if key not in columns.values()}
    return rest | moved


def _looks_like_a_path(source: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything with a data suffix or a path start is a path."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1
            or Path(source).suffix.lower() in (*DATASETS_BUILDERS, ".jsonl"))


def load_records(source: str | Path, kind: str, *, split: str = "train",
                 columns: dict[str, str] | str | None = None) -> list[dict]:
    """Read and validate every record of ``source`` (a kind as for :func:`load_jsonl`).

    ``source`` is a JSONL file (read by :func:`load_jsonl`), a Parquet, Arrow, CSV or JSON file,
    a folder written by ``datasets``' ``save_to_disk``, or a Hugging Face hub dataset id (read by
    ``datasets.load_dataset``); all but JSONL need the ``datasets`` package. ``split`` picks the
    split of a saved ``DatasetDict`` folder or a hub dataset (a single file is one split).
    ``columns`` (``{"prompt": "question"}`` or ``"prompt=question"``) renames source columns to
    the format's keys. Every record goes through :func:`validate_record`; a bad one raises
    ``DataError`` naming the source and its row index (from 0), or the JSONL line. Missing values
    (Arrow's nulls) count as missing keys.
    """
    kind, columns = _data_kind(kind), parse_columns(columns)
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() not in DATASETS_BUILDERS:
        return load_jsonl(path, kind, columns=columns)
    if not path.exists() and _looks_like_a_path(text):
        raise FileNotFoundError(f"No such file or directory: {text} (give a JSONL, Parquet, "
                                f"Arrow, CSV or JSON file, a save_to_disk folder or a hub "
                                f"dataset id)")
    dataset, name = _open_dataset(text, path, split)
    if columns:
        missing = [c for c in columns.values() if c not in dataset.column_names]
        if missing:
            raise DataError(f"{name}: no column {missing[0]!r} to map (its columns: "
                            f"{', '.join(dataset.column_names)})")
        replaced = [target for target in columns if target in dataset.column_names
                    and target not in columns.values()]
        dataset = dataset.remove_columns(replaced).rename_columns(
            {source: target for target, source in columns.items()})
    # Arrow has a value in every column of every row: null stands for a missing key.
    rows = ((f"{name} row {i}", i, {k: v for k, v in row.items() if v is not None})
            for i, row in enumerate(dataset))
    return _checked_records(rows, kind, None, unit="row",
                            empty=f"{name}: no records (it has no rows); expected {kind} records")


def _open_dataset(text: str, path: Path, split: str):
    """The ``datasets.Dataset`` of one source and the name its errors use."""
    try:
        import datasets
    except ImportError:
        raise DatasetsNotInstalled(f"{text}: reading anything but JSONL needs the datasets "
                                   f"package: pip install datasets") from None
    try:
        if path.is_file():
            builder = DATASETS_BUILDERS[path.suffix.lower()]
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
            return dataset, text
        if path.is_dir() and any((path / name).exists() for name in
                                 ("dataset_dict.json", "dataset_info.json", "state.json")):
            dataset = datasets.load_from_disk(str(path))
        else:  # a hub id, or a folder of data files
            return datasets.load_dataset(text, split=split), f"{text} (split {split})"
    except (OSError, ValueError) as error:
        raise DataError(f"{text}: cannot be read by datasets ({first_line(error)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{text}: no split {split!r} (its splits: "
                            f"{', '.join(dataset)})")
        return dataset[split], f"{text} (split {split})"
    return dataset, text


# ----------------------------------------------------------------------------- tokenization

class _Encoder:
    """Prompt and completion token ids for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer, max_length: int | None, max_prompt_length: int | None) -> None:
        for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if max_length is not None and max_prompt_length is not None \
                and max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be smaller than "
                             f"max_length ({max_length}) to leave room for the completion")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token: completions must end with one")
        self.tokenizer, self.eos = tokenizer, tokenizer.eos_token_id
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        bos = tokenizer.bos_token_id
        adds = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
        self.bos = bos if adds else None

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def template(self, messages: list[dict], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation,
                                                  tokenize=False)

    def with_bos(self, ids: list[int]) -> list[int]:
        return [self.bos, *ids] if self.bos is not None and ids[:1] != [self.bos] else ids

    def prompt(self, prompt) -> list[int]:
        ids = self.with_bos(self.ids(prompt if isinstance(prompt, str)
                                     else self.template(prompt, True)))
        limit = self.max_prompt_length
        if limit is not None and len(ids) > limit:
            head = ids[:1] if self.bos is not None and ids[:1] == [self.bos] else []
            keep = max(limit - len(head), 0)
            ids = head + (ids[len(ids) - keep:] if keep else [])
        return ids

    def completion(self, prompt, completion) -> list[int]:
        if isinstance(completion, str):
            text = completion
        else:
            prompt_text = self.template(prompt, True)
            full = self.template(list(prompt) + list(completion), False)
            if not full.startswith(prompt_text):
                raise DataError("the chat template does not render the prompt (with the "
                                "generation prompt) as a prefix of prompt + completion")
            text = full[len(prompt_text):]
        ids = self.ids(text)
        return ids if ids[-1:] == [self.eos] else [*ids, self.eos]

    def assistant_turns(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """The conversation's ids and a 0/1 mask that is 1 on the assistant turns' tokens.

        Each assistant turn's text is what rendering the conversation up to it adds after the
        rendering of the turns before it with the generation prompt (its content and end of
        turn, not the role header). Chat templates rarely mark assistant text
        (``{% generation %}``), so it is found by rendering prefixes, which works with any
        template that renders each turn the same way whatever follows; one that rewrites earlier
        turns (drops a past turn's reasoning, say) is refused. The pieces are tokenized one by
        one, as prompt and completion are: the ids a model sees when it generates each turn.
        """
        full = self.template(messages, False)
        pieces, done = [], 0  # (text, scored), and how much of `full` they cover
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.template(messages[:i], True)
            through = self.template(messages[:i + 1], False)
            if not (full.startswith(through) and through.startswith(before)
                    and len(before) >= done):
                raise DataError(f"assistant_only_loss: the chat template renders messages "
                                f"0..{i} differently alone than within the whole conversation "
                                f"(it rewrites earlier turns), so message {i}'s tokens cannot "
                                f"be found; train without assistant_only_loss, or on "
                                f"prompt/completion records")
            pieces += [(full[done:len(before)], 0), (through[len(before):], 1)]
            done = len(through)
        if not pieces:
            raise DataError("assistant_only_loss: the conversation has no assistant message "
                            "to train on")
        pieces.append((full[done:], 0))
        ids, mask = [], []
        for text, scored in pieces:
            piece = self.ids(text) if text else []
            ids, mask = ids + piece, mask + [scored] * len(piece)
        with_bos = self.with_bos(ids)  # unless the template wrote it
        ids, mask = with_bos, [0] * (len(with_bos) - len(ids)) + mask
        if ids[-1:] != [self.eos]:  # the eos belongs to the turn it ends
            ids, mask = [*ids, self.eos], [*mask, mask[-1]]
        return ids, mask

    def fit(self, prompt_ids: list[int], *completions: list[int]) -> list[list[int]]:
        """Cut the completions' ends so that prompt + completion <= max_length."""
        if self.max_length is None:
            return list(completions)
        room = self.max_length - len(prompt_ids)
        if room < 1:
            raise DataError(f"the prompt has {len(prompt_ids)} tokens, leaving no room for the "
                            f"completion within max_length={self.max_length}; set "
                            f"max_prompt_length < max_length")
        return [ids[:room] for ids in completions]


def _encode(records, kind: str, tokenizer, max_length, max_prompt_length, encode_one):
    encoder = _Encoder(tokenizer, max_length, max_prompt_length)
    out = []
    for i, record in enumerate(records):
        try:
            out.append(encode_one(encoder, validate_record(record, kind)[0]))
        except DataError as err:
            raise DataError(f"example {i}: {err}") from None
    return out


# The token ids an example of each kind is scored on: what a training step learns from.
_SCORED_IDS = {"sft": ("completion_ids",), "preference": ("chosen_ids", "rejected_ids"),
               "kto": ("completion_ids",), "prompt": ("prompt_ids",)}


def _tokens_to_train_on(example: dict, fields: tuple[str, ...]) -> int:
    """The tokens of an encoded example that a step learns from: its scored ids (under
    ``assistant_mask``, the assistant turns' alone), less the first token of a sequence without
    a prompt, which has nothing before it to be predicted from."""
    lead = 0 if example.get("prompt_ids") else 1
    if "assistant_mask" in example:
        return sum(example["assistant_mask"][lead:])
    return sum(max(0, len(example.get(name) or ()) - lead) for name in fields)


def check_tokens_to_train_on(examples: Sequence[dict], kind: str, path) -> None:
    """Refuse encoded examples that hold no token to train on (an empty tokenizer, every
    completion or every assistant turn truncated away): training would report a loss and learn
    nothing."""
    fields = _SCORED_IDS[_data_kind(kind)]
    if any(_tokens_to_train_on(example, fields) for example in examples):
        return
    if any("assistant_mask" in example for example in examples):
        what = "max-length cuts every assistant turn away (assistant_only_loss)"
    else:
        what = f"{' and '.join(fields)} are all empty, or a lone first token"
    raise DataError(f"{path}: no token to train on in {len(examples)} examples after "
                    f"tokenisation ({what}): is the tokenizer empty, or max-length too short?")


def encode_sft(records, tokenizer, *, max_length: int | None = None,
               max_prompt_length: int | None = None,
               assistant_only_loss: bool = False) -> list[dict]:
    """SFT records → ``{"prompt_ids", "completion_ids"}``; only the completion is scored.

    ``text`` and ``messages`` records score every token: prompt_ids is empty and completion_ids
    holds the BOS (if the tokenizer adds one), the text or rendered conversation, and the eos.
    With ``assistant_only_loss`` (``messages`` records only), the examples also carry
    ``assistant_mask``, 1 on the assistant turns' tokens of completion_ids (see
    ``_Encoder.assistant_turns``): only those are scored.
    """
    if not isinstance(assistant_only_loss, bool):
        raise ValueError(f"assistant_only_loss must be True or False, got "
                         f"{assistant_only_loss!r}")

    def one(enc: _Encoder, record: dict) -> dict:
        if assistant_only_loss:
            if "messages" not in record:
                raise DataError("assistant_only_loss needs conversational records "
                                "{\"messages\": [...]}; prompt/completion records score only "
                                "the completion already (completion_only_loss)")
            ids, mask = enc.assistant_turns(record["messages"])
            return {"prompt_ids": [], "completion_ids": ids[:enc.max_length],
                    "assistant_mask": mask[:enc.max_length]}
        if "messages" in record or "text" in record:
            text = record["text"] if "text" in record else enc.template(record["messages"], False)
            ids = enc.with_bos(enc.ids(text))
            ids = ids if ids[-1:] == [enc.eos] else [*ids, enc.eos]
            return {"prompt_ids": [], "completion_ids": ids[:enc.max_length]}
        prompt = enc.prompt(record["prompt"])
        (completion,) = enc.fit(prompt, enc.completion(record["prompt"], record["completion"]))
        return {"prompt_ids": prompt, "completion_ids": completion}

    return _encode(records, "sft", tokenizer, max_length, max_prompt_length, one)


def encode_preference(records, tokenizer, *, max_length: int | None = None,
                      max_prompt_length: int | None = None) -> list[dict]:
    """Preference records → ``{"prompt_ids", "chosen_ids", "rejected_ids"}``."""
    def one(enc: _Encoder, record: dict) -> dict:
        prompt = enc.prompt(record["prompt"])
        chosen, rejected = enc.fit(prompt, enc.completion(record["prompt"], record["chosen"]),
                                   enc.completion(record["prompt"], record["rejected"]))
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}

    return _encode(records, "preference", tokenizer, max_length, max_prompt_length, one)


def encode_kto(records, tokenizer, *, max_length: int | None = None,
               max_prompt_length: int | None = None) -> list[dict]:
    """KTO records → ``{"prompt_ids", "completion_ids", "desirable"}`` (desirable: bool)."""
    def one(enc: _Encoder, record: dict) -> dict:
        prompt = enc.prompt(record["prompt"])
        (completion,) = enc.fit(prompt, enc.completion(record["prompt"], record["completion"]))
        return {"prompt_ids": prompt, "completion_ids": completion,
                "desirable": record["label"]}

    return _encode(records, "kto", tokenizer, max_length, max_prompt_length, one)


def encode_prompts(records, tokenizer, *, max_prompt_length: int | None = None) -> list[dict]:
    """Prompt records → ``{"prompt_ids"}`` (conversational: with the generation prompt)."""
    return _encode(records, "prompt", tokenizer, None, max_prompt_length,
                   lambda enc, record: {"prompt_ids": enc.prompt(record["prompt"])})


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """SFT examples → rows ``{"packed": [example, ...]}`` of at most ``max_length`` tokens each.

    Best-fit decreasing: the longest examples first, each into the row it leaves the least room
    in (a new row where none has room). Examples stay whole, so no sequence is cut or continued
    in another row; :class:`SFTCollator` takes rows and examples alike, and padding free keeps
    the examples of a row apart.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if not all(isinstance(e, dict) and {"prompt_ids", "completion_ids"} <= set(e)
               for e in examples):
        raise ValueError("pack_examples takes encoded SFT examples ({'prompt_ids', "
                         "'completion_ids'}, from encode_sft)")
    lengths = [len(e["prompt_ids"]) + len(e["completion_ids"]) for e in examples]
    longest = max(lengths, default=0)
    if longest > max_length:
        raise ValueError(f"an example has {longest} tokens, more than the rows' max_length "
                         f"({max_length}); encode with the same max_length")
    rows: list[list[dict]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted: the best fit is a bisection
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(rooms, (lengths[i], -1))
        if at == len(rooms):
            rows.append([])
            room, row = max_length, len(rows) - 1
        else:
            room, row = rooms.pop(at)
        rows[row].append(examples[i])
        bisect.insort(rooms, (room - lengths[i], row))
    return [{"packed": row} for row in rows]


# ----------------------------------------------------------------------------- collation

def _pad(rows: list[list[int]], value: int, *, left: bool = False,
         multiple: int | None = None) -> torch.Tensor:
    """[B, T] int64, T the longest row (rounded up to ``multiple``), padded with ``value``."""
    length = max(len(row) for row in rows)
    if multiple:
        length = -(-length // multiple) * multiple
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            target = out[i, length - len(row):] if left else out[i, :len(row)]
            target.copy_(torch.tensor(row, dtype=torch.long))
    return out


def _labelled(prompt_ids: list[int], completion_ids: list[int],
              scored: list[int] | None = None) -> tuple[list[int], list[int]]:
    """One sequence and its labels: the completion's ids (only where ``scored`` is 1, if given),
    -100 on the prompt."""
    completion = list(completion_ids)
    if scored is not None:
        completion = [token if keep else IGNORE_INDEX for token, keep in zip(completion, scored)]
    return list(prompt_ids) + list(completion_ids), [IGNORE_INDEX] * len(prompt_ids) + completion


def _sequences(rows: list[tuple[list[int], list[int]]], pad_token_id: int,
               multiple: int | None, padding_free: bool = False) -> dict[str, torch.Tensor]:
    """(ids, labels) rows → right-padded input_ids, attention_mask, labels [N, T]; or, padding
    free, input_ids and labels [1, total] back to back, and cu_seqlens [N + 1] (no mask)."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    ids, labels = [row[0] for row in rows], [row[1] for row in rows]
    if padding_free:
        lengths = [len(row) for row in ids]
        return {"input_ids": torch.tensor([list(itertools.chain(*ids))], dtype=torch.long),
                "labels": torch.tensor([list(itertools.chain(*labels))], dtype=torch.long),
                "cu_seqlens": torch.tensor([0, *itertools.accumulate(lengths)],
                                           dtype=torch.long)}
    return {"input_ids": _pad(ids, pad_token_id, multiple=multiple),
            "attention_mask": _pad([[1] * len(row) for row in ids], 0, multiple=multiple),
            "labels": _pad(labels, IGNORE_INDEX, multiple=multiple)}


@dataclass
class _Collator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool):
            raise ValueError(f"{type(self).__name__}: pad_token_id must be an int, got "
                             f"{self.pad_token_id!r} (set tokenizer.pad_token if it has none)")
        multiple = self.pad_to_multiple_of
        if multiple is not None and (not isinstance(multiple, int) or isinstance(multiple, bool)
                                     or multiple < 1):
            raise ValueError(f"{type(self).__name__}: pad_to_multiple_of must be a positive int "
                             f"or None, got {multiple!r}")


@dataclass
class _SequenceCollator(_Collator):
    """``padding_free``: the sequences go back to back in one row [1, total] with their
    boundaries in ``cu_seqlens``, instead of padded rows with an ``attention_mask``."""

    padding_free: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.padding_free and self.pad_to_multiple_of is not None:
            raise ValueError(f"{type(self).__name__}: pad_to_multiple_of pads rows, and "
                             f"padding_free batches have none; set only one of them")

    def collate(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return _sequences(rows, self.pad_token_id, self.pad_to_multiple_of, self.padding_free)


@dataclass
class SFTCollator(_SequenceCollator):
    """``{"prompt_ids", "completion_ids"}`` examples → ``input_ids``, ``attention_mask``,
    ``labels`` [B, T]: right padding, labels = the completion ids, -100 on prompt and padding
    (and on the completion's tokens whose ``assistant_mask`` is 0, where examples carry one)."""

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        examples = [part for e in examples for part in e.get("packed", [e])]  # packed rows
        return self.collate([_labelled(e["prompt_ids"], e["completion_ids"],
                                       e.get("assistant_mask")) for e in examples])


@dataclass
class PreferenceCollator(_SequenceCollator):
    """B preference examples → ``input_ids``, ``attention_mask``, ``labels`` [2B, T]: rows 0..B−1
    are prompt + chosen, rows B..2B−1 prompt + rejected (``FusedDPOLoss``'s stacking)."""

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [_labelled(e["prompt_ids"], e["chosen_ids"]) for e in examples]
        rows += [_labelled(e["prompt_ids"], e["rejected_ids"]) for e in examples]
        return self.collate(rows)


@dataclass
class KTOCollator(_Collator):
    """B KTO examples → ``input_ids``, ``attention_mask``, ``labels`` [B, T], ``desirable`` [B]
    bool, and the mismatched KL batch ``kl_input_ids``, ``kl_attention_mask``, ``kl_labels``
    [B, T_kl]: prompt i with a completion of another example, cut to ``max_length`` tokens if
    given. That completion is example i's own ``kl_completion_ids`` when every example carries
    one (pairs fixed at the dataset level; any B), else the completion of example
    ``kto_mismatched_indices(B)[i]`` of the batch (B >= 2). ``with_kl=False`` (losses without
    KTO's reference point) leaves the KL batch out."""

    max_length: int | None = None
    with_kl: bool = True

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not self.with_kl:
            partners = None
        elif all("kl_completion_ids" in e for e in examples):
            partners = [e["kl_completion_ids"] for e in examples]
        elif len(examples) < 2:
            raise ValueError(f"KTOCollator needs >= 2 examples for the mismatched KL batch, got "
                             f"{len(examples)} (drop the last incomplete batch)")
        else:
            partners = [examples[j]["completion_ids"]
                        for j in kto_mismatched_indices(len(examples)).tolist()]
        batch = _sequences([_labelled(e["prompt_ids"], e["completion_ids"]) for e in examples],
                           self.pad_token_id, self.pad_to_multiple_of)
        batch["desirable"] = torch.tensor([bool(e["desirable"]) for e in examples])
        if partners is None:
            return batch
        kl_rows = []
        for example, completion in zip(examples, partners):
            prompt = example["prompt_ids"]
            if self.max_length is not None:
                completion = completion[:max(self.max_length - len(prompt), 0)]
            kl_rows.append(_labelled(prompt, completion))
        kl = _sequences(kl_rows, self.pad_token_id, self.pad_to_multiple_of)
        batch.update({f"kl_{key}": value for key, value in kl.items()})
        return batch


@dataclass
class PromptCollator(_Collator):
    """``{"prompt_ids"}`` examples → LEFT-padded ``input_ids``, ``attention_mask`` [B, T] for
    ``model.generate`` (completions start at column T) and ``prompt_lengths`` [B] int64."""

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        rows = [list(e["prompt_ids"]) for e in examples]
        return {"input_ids": _pad(rows, self.pad_token_id, left=True,
                                  multiple=self.pad_to_multiple_of),
                "attention_mask": _pad([[1] * len(r) for r in rows], 0, left=True,
                                       multiple=self.pad_to_multiple_of),
                "prompt_lengths": torch.tensor([len(r) for r in rows], dtype=torch.long)}
