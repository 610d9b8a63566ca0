"""Fixtures the trainer tests share: the shipped tokenizer and the shipped DPO pairs, encoded.

Module-scoped, as each test file had them: a test that changes one changes it for its own file
only.
"""

import pytest

from fastalign import assets, data


@pytest.fixture(scope="module")
def tokenizer():
    return assets.load_default_tokenizer()


@pytest.fixture(scope="module")
def pairs(tokenizer):
    records = data.load_jsonl(assets.default_data_path("dpo"), "preference")
    return data.encode_preference(records, tokenizer, max_length=64, max_prompt_length=32)
