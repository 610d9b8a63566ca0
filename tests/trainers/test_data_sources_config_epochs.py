"""`fastalign train` inputs beyond JSONL and max-steps: data read through `datasets` (Parquet,
CSV, JSON, save_to_disk folders, hub ids) with splits and column mappings, `--config` files, and
training for a number of epochs."""

from __future__ import annotations

import json
import sys

import pytest

from fastalign import assets, data
from fastalign.cli import main as cli_main
from fastalign.trainers import DPOConfig, DPOTrainer, GRPOConfig, PPOTrainer
from fastalign.trainers.ppo import encode_prompt_examples

PREFERENCES = [{"question": f"Question {i}?", "good": f" Answer {i}.", "bad": f" No {i}."}
               for i in range(6)]
MAPPING = "prompt=question,chosen=good,rejected=bad"


@pytest.fixture()
def datasets():
    return pytest.importorskip("datasets")


def _records(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Data sources
# ----------------------------------------------------------------------------------------------


def test_every_file_type_and_saved_folder_gives_the_mapped_records(tmp_path, datasets):
    table = datasets.Dataset.from_list(PREFERENCES)
    table.to_parquet(tmp_path / "data.parquet")
    table.to_csv(tmp_path / "data.csv", index=False)
    table.to_json(tmp_path / "data.json")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PREFERENCES))
    table.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": table, "test": table.select([4, 5])}).save_to_disk(
        tmp_path / "splits")
    expected = [{"prompt": r["question"], "chosen": r["good"], "rejected": r["bad"]}
                for r in PREFERENCES]
    for name in ("data.parquet", "data.csv", "data.json", "data.jsonl", "saved", "splits"):
        assert data.load_records(tmp_path / name, "dpo", columns=MAPPING) == expected, name
    assert data.load_records(tmp_path / "splits", "dpo", split="test",
                             columns={"prompt": "question", "chosen": "good",
                                      "rejected": "bad"}) == expected[4:]
    with pytest.raises(data.DataError, match="no split 'validation' .*train, test"):
        data.load_records(tmp_path / "splits", "dpo", split="validation", columns=MAPPING)


def test_a_bad_row_and_a_missing_column_are_named(tmp_path, datasets):
    rows = [dict(r) for r in PREFERENCES]
    rows[3]["good"] = "  "
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(rows).to_parquet(path)
    with pytest.raises(data.DataError, match=rf"^{path} row 3: 'chosen' is an empty string"):
        data.load_records(path, "dpo", columns=MAPPING)
    with pytest.raises(data.DataError, match="no column 'answer' to map .*question, good, bad"):
        data.load_records(path, "dpo", columns="prompt=question,chosen=answer,rejected=bad")
    # Without a mapping the format's keys are missing: named, with the row.
    with pytest.raises(data.DataError, match=rf"{path} row 0: missing key 'chosen'"):
        data.load_records(path, "dpo")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps(PREFERENCES[0]) + "\n" + json.dumps({"question": "Q"}) + "\n")
    with pytest.raises(data.DataError, match=rf"{jsonl}:2: missing column 'good'"):
        data.load_records(jsonl, "dpo", columns=MAPPING)


def test_column_mappings_are_checked(tmp_path, capsys):
    assert cli_main(["train", "sft", "--data-columns", "prompt:q", "--output",
                     str(tmp_path)]) == 2
    assert "error: --data-columns must be KEY=COLUMN pairs" in capsys.readouterr().err
    assert data.parse_columns("prompt=q, completion = a") == {"prompt": "q", "completion": "a"}
    assert data.parse_columns({"prompt": "completion", "completion": "prompt"}) == {
        "prompt": "completion", "completion": "prompt"}
    for bad, message in (("prompt", "KEY=COLUMN"), ("question=prompt", "'question' is not a key"),
                         ("prompt=q,chosen=q", "mapped to two keys")):
        with pytest.raises(ValueError, match=message):
            data.parse_columns(bad)


def test_a_hub_id_is_loaded_with_its_split(monkeypatch, datasets):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(PREFERENCES[:2])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    records = data.load_records("org/prefs", "preference", split="dev", columns=MAPPING)
    assert calls == [("org/prefs", "dev")] and len(records) == 2
    with pytest.raises(FileNotFoundError, match="No such file or directory: org/prefs"):
        data.load_records("org/prefs.parquet", "preference")  # a path, not a hub id


def test_cli_trains_on_parquet_with_a_saved_eval_split(tmp_path, capsys, datasets):
    table = datasets.Dataset.from_list(PREFERENCES)
    table.to_parquet(tmp_path / "train.parquet")
    datasets.DatasetDict({"test": table.select([0, 1])}).save_to_disk(tmp_path / "eval")
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"  # a mapping in a config file is the flag's KEY=COLUMN list
    config.write_text("data_columns: {prompt: question, chosen: good, rejected: bad}\n")
    status = cli_main(["train", "dpo", "--data", str(tmp_path / "train.parquet"),
                       "--eval-data", str(tmp_path / "eval"), "--config", str(config),
                       "--output", str(out), "--max-steps", "2", "--batch-size", "2",
                       "--no-progress", "--no-plots"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "held-out data" in captured.out and len(_records(out)) == 2


def test_cli_refuses_a_bad_row_before_training(tmp_path, capsys, datasets):
    rows = [dict(r) for r in PREFERENCES]
    rows[4]["bad"] = None  # a null: a missing value
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "data.csv", index=False)
    capsys.readouterr()  # the bar of writing the file
    out = tmp_path / "run"
    status = cli_main(["train", "dpo", "--data", str(tmp_path / "data.csv"), "--data-columns",
                       MAPPING, "--output", str(out), "--no-progress"])
    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1 and "data.csv row 4: missing key 'rejected'" in error
    assert not out.exists()


def test_without_datasets_other_sources_are_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets fails
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    status = cli_main(["train", "sft", "--data", str(tmp_path / "data.parquet"),
                       "--output", str(tmp_path / "run"), "--no-progress"])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1
    assert error.startswith("fastalign train sft: error: --data ")
    assert "pip install datasets" in error


# ----------------------------------------------------------------------------------------------
# --config
# ----------------------------------------------------------------------------------------------


def test_config_file_values_are_used_and_flags_override_them(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"max_steps: 3\nbatch-size: 2\nloss_type: [sigmoid, sft]\n"
                      f"loss_weights: [1, 0.5]\nprogress: false\nplots: false\nlr: 1e-3\n"
                      f"output: {tmp_path / 'from-file'}\n")
    assert cli_main(["train", "dpo", "--config", str(config)]) == 0
    records = _records(tmp_path / "from-file")
    assert len(records) == 3 and "loss/sft" in records[0]
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"max_steps": 3, "progress": False, "plots": False,
                                       "loss_type": "sigmoid", "output": "ignored"}))
    out = tmp_path / "flags"
    assert cli_main(["train", "dpo", "--max-steps", "2", "--config", str(json_config),
                     "--output", str(out)]) == 0
    records = _records(out)
    assert len(records) == 2 and "loss/sft" not in records[0]
    capsys.readouterr()


@pytest.mark.parametrize("text, message", [
    ("max_step: 3\n", "unknown key 'max_step' (did you mean 'max_steps'?)"),
    ("max_steps: many\n", "max_steps: expected int, got 'many'"),
    ("progress: 1\n", "progress: expected true or false"),
    ("[1, 2]\n", "expected a mapping"),
    ("max_steps: [\n", "invalid YAML"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "dpo", "--config", str(config), "--output", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert error.startswith(f"fastalign train dpo: error: --config {config}: ")
    assert message in error
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Epochs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size, accumulation, steps", [(4, 1, 6), (4, 3, 2), (5, 2, 2)])
def test_two_epochs_see_every_example_twice(tmp_path, tokenizer, batch_size, accumulation,
                                            steps):
    records = data.load_jsonl(assets.default_data_path("dpo"), "preference")[:10]
    pairs = data.encode_preference(records, tokenizer, max_length=48, max_prompt_length=24)
    for i, pair in enumerate(pairs):
        pair["chosen_ids"] = [*pair["chosen_ids"], i]  # a mark to count each example by
    config = DPOConfig(output_dir=str(tmp_path), num_epochs=2, max_steps=1000,
                       batch_size=batch_size, grad_accum_steps=accumulation, lr=1e-3,
                       progress=False, plots=False)
    trainer = DPOTrainer(assets.build_default_model(seed=0), tokenizer, pairs, config)
    seen: list[int] = []
    sizes: list[int] = []
    collate = trainer.collator

    def recording(examples):
        seen.extend(example["chosen_ids"][-1] for example in examples)
        sizes.append(len(examples))
        return collate(examples)

    trainer.collator = recording
    result = trainer.train()
    assert result.step == trainer.total_steps == steps
    assert sorted(seen) == sorted(list(range(10)) * 2)
    logged = _records(tmp_path)
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    assert logged[-1]["epoch"] == 2.0
    # Fractional epochs: the examples drawn so far over the 10 (an epoch ends on a short batch).
    assert logged[0]["epoch"] == pytest.approx(sum(sizes[:accumulation]) / 10)
    # The linear schedule decays to 0 at the derived last step.
    assert logged[-1]["learning_rate"] == pytest.approx(1e-3 / steps)


def test_grpo_epochs_count_batches_of_prompts(tmp_path, tokenizer):
    records = data.load_jsonl(assets.default_data_path("grpo"), "prompt")[:9]
    prompts = encode_prompt_examples(records, tokenizer, max_length=48, max_prompt_length=24)
    config = GRPOConfig(output_dir=str(tmp_path), num_epochs=1.5, batch_size=4,
                        num_generations=2, grad_accum_steps=2, max_new_tokens=4, max_length=48,
                        max_prompt_length=24, progress=False, plots=False)
    trainer = PPOTrainer(assets.build_default_model(seed=0), tokenizer, prompts, config)
    # 2 full batches of 4 prompts an epoch (the 9th prompt waits for the next epoch's order).
    assert trainer.total_steps == 3
    assert trainer.train().step == 3
    assert [r["epoch"] for r in _records(tmp_path)] == pytest.approx([4 / 9, 8 / 9, 1 + 4 / 9])


def test_num_epochs_is_an_option_and_is_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match="num_epochs must be a finite number > 0"):
        DPOConfig(num_epochs=0)
    assert cli_main(["train", "sft", "--num-epochs", "-1", "--output", str(tmp_path)]) == 2
    assert "num_epochs" in capsys.readouterr().err
