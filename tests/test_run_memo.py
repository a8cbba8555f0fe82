"""RunMemo: finished runs are kept on disk; parallel workers each keep their own file."""

from __future__ import annotations

import argparse
import json

from studio.run_memo import RunMemo, add_worker_args, memo_for_workers


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_worker_args(p)
    return p.parse_args(list(argv))


def test_a_finished_run_is_not_run_again(tmp_path) -> None:
    calls = []
    memo = RunMemo(tmp_path / "runs.json")
    assert memo({"seed": 0}, lambda: calls.append(1) or {"acc": 0.5}) == {"acc": 0.5}
    again = RunMemo(tmp_path / "runs.json")  # a new process after a crash
    assert again({"seed": 0}, lambda: calls.append(1) or {"acc": 0.9}) == {"acc": 0.5}
    assert calls == [1]


def test_workers_deal_out_seeds_and_the_parent_merges(tmp_path) -> None:
    RunMemo(tmp_path / "runs.json")({"seed": 9}, lambda: "done before")
    for i in range(2):
        memo, seeds = memo_for_workers(
            _args("--workers", "2", "--worker", str(i)), tmp_path, [0, 1, 2], "x", []
        )
        assert seeds == [[0, 2], [1]][i]
        assert memo.path.name == f"runs.w{i}.json"
        assert memo({"seed": 9}, lambda: "ran again") == "done before"  # starts from finished runs
        for s in seeds:
            memo({"seed": s}, lambda s=s: f"run {s}")
    parent = RunMemo(tmp_path / "runs.json")
    assert parent.absorb(sorted(tmp_path.glob("runs.w*.json"))) == 3
    merged = json.loads((tmp_path / "runs.json").read_text())
    assert sorted(merged.values()) == ["done before", "run 0", "run 1", "run 2"]
    memo, seeds = memo_for_workers(_args(), tmp_path, [0, 1, 2], "x", [])  # one process: all seeds
    assert seeds == [0, 1, 2] and memo({"seed": 1}, lambda: "ran again") == "run 1"
