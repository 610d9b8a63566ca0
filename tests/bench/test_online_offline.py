"""The online-vs-offline comparison (``fastalign.bench.online_offline``) on a two-step budget."""

from __future__ import annotations

import csv
import json

import pytest

from fastalign.bench import online_offline


def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_offline_dpo_rows_table_and_plot(tmp_path):
    rows = online_offline.run_comparison(tmp_path, methods=["dpo"], steps=2, eval_every=1,
                                         batch_size=2, held_out=3)
    assert [row["step"] for row in rows] == [0, 1, 2]
    # Step 0 is the reference itself: its exact KL is 0; DPO steps move the policy away.
    assert rows[0]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["kl_to_reference"] > 1e-6
    assert [row["labels"] for row in rows] == [0, 2, 4]  # pairs consumed, no judge calls
    assert all(row["judge_calls"] == 0 for row in rows)
    assert all(-1.0 <= row["judge_reward"] <= 1.0 for row in rows)
    written = _rows(tmp_path / "online_offline.csv")
    assert [r["method"] for r in written] == ["dpo"] * 3
    assert "| dpo |" in (tmp_path / "online_offline.md").read_text()
    assert (tmp_path / "online_offline.png").stat().st_size > 0
    # The evaluations sample from a forked generator: training logs what it logs without them.
    logged = [json.loads(line) for line in
              (tmp_path / "runs" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in logged] == [1, 2]
    assert "eval/judge_reward" in logged[0]


def test_unknown_method_and_bad_budget_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        online_offline.main(["--methods", "dpo,sft"])
    assert exit_info.value.code == 2
    assert "unknown method(s) ['sft']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        online_offline.main(["--steps", "0"])
    assert exit_info.value.code == 2
