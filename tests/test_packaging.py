"""Packaging: kernels install as fastalign.kernels, the extension is optional and says so."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_kernels_are_a_subpackage_not_a_top_level_module():
    result = _python(
        "import importlib.util as u, fastalign.kernels as k;"
        "print(k.__name__, u.find_spec('kernels') is None)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["fastalign.kernels", "True"]


def test_cpp_extension_is_built_unless_skipped_on_purpose():
    if os.environ.get("FASTALIGN_BUILD_EXT") == "0":
        pytest.skip("FASTALIGN_BUILD_EXT=0: the build was skipped on purpose")
    from fastalign.ops._extension import EXTENSION, EXTENSION_ERROR

    assert EXTENSION is not None, EXTENSION_ERROR


def test_missing_extension_falls_back_with_one_warning():
    code = (
        "import sys, warnings; sys.modules['fastalign._C'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, fastalign\n"
        "    logp = fastalign.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4),"
        " torch.tensor([0, 1, 4]))\n"
        "ours = [w for w in caught if 'fastalign' in str(w.message)]\n"
        "print(len(ours)); print(ours[0].message); print(tuple(logp.shape))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    count, message, shape = result.stdout.strip().split("\n")
    assert count == "1"
    assert "reference" in message and "fastalign._C" in message
    assert shape == "(3,)"


def test_wheel_layout(tmp_path):
    """A wheel built without build isolation holds fastalign/kernels and no top-level kernels."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, env={**os.environ, "FASTALIGN_BUILD_EXT": "0"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("fastalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("kernels/linear_logprobs.py", "kernels/linear_kl.py", "kernels/gae.py",
                   "losses/dpo.py", "losses/ppo.py", "fused.py", "hf.py", "data.py",
                   "trainers/loop.py", "trainers/dpo.py", "bench/harness.py", "bench/memory.py",
                   "assets/tiny-llama/config.json",
                   "assets/tiny-llama/tokenizer.json", "assets/data/preferences.jsonl"):
        assert f"fastalign/{module}" in names, module
    assert "fastalign/ops/linear_logprobs.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
