"""The metric names each trainer logs are the documented ones (TRL's where TRL has them).

``fastalign.trainers.metrics.LOGGED_METRICS`` is the one list; the README's table must say the
same, and a one-step run of every trainer kind on the shipped tiny model must log exactly those
names (plus the loop's own), no more and no fewer.
"""

import json
import re
from pathlib import Path

import pytest

from fastalign.cli import main as cli_main
from fastalign.trainers.metrics import LOGGED_METRICS, LOOP_METRICS

README = Path(__file__).resolve().parents[2] / "README.md"
# kind -> (the CLI's kind, extra options)
RUNS = {kind: (kind, []) for kind in LOGGED_METRICS}
RUNS["rloo"] = ("ppo", ["--mode", "rloo", "--num-generations", "2"])
RUNS["trpo"] = ("ppo", ["--mode", "trpo", "--num-generations", "2", "--cg-iters", "2"])


def _readme_table() -> dict[str, tuple[str, ...]]:
    lines = README.read_text().splitlines()
    start = lines.index("| trainer | metrics |") + 2
    table = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        kind, names = (cell.strip() for cell in line.strip("|").split("|"))
        table[kind.strip("`")] = tuple(re.findall(r"`([^`]+)`", names))
    return table


def test_the_readme_table_is_the_list_of_logged_metrics():
    assert _readme_table() == LOGGED_METRICS


@pytest.mark.parametrize("kind", list(RUNS))
def test_a_one_step_run_logs_exactly_the_documented_names(tmp_path, kind):
    cli_kind, extra = RUNS[kind]
    out = tmp_path / "run"
    args = ["train", cli_kind, "--output", str(out), "--max-steps", "1", "--batch-size", "2",
            "--no-progress", "--no-plots", *extra]
    if cli_kind in ("ppo", "online-dpo"):
        args += ["--max-new-tokens", "4"]
    assert cli_main(args) == 0
    record, = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    documented = {*LOOP_METRICS, *LOGGED_METRICS[kind]}
    # {reward_fn} stands for the name of each reward function
    patterns = {name: re.compile(re.escape(name).replace(r"\{reward_fn\}", "[^/]+") + "$")
                for name in documented}
    logged = set(record) - {"step"}
    unexpected = {key for key in logged if not any(p.match(key) for p in patterns.values())}
    missing = {name for name, p in patterns.items() if not any(p.match(key) for key in logged)}
    assert not unexpected and not missing, (unexpected, missing)
