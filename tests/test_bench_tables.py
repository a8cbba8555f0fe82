"""``bench/bench_w4.py --tables``: saved runs (one JSON per shape) printed as one table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _row(k: int, n: int, m: int, bf16: float, ours: float) -> dict:
    """One speed row with every column the table reads (INT4 faster than FP4 here)."""
    return {
        "K": k, "N": n, "M": m, "bf16": bf16, "fp8_bare": ours / 2, "fp8_q": ours * 2,
        "int4_wo": ours * 3, "w4+lr32_unfused": ours * 1.5, "int4_r32": ours, "fp4_r32": ours + 1,
        "int4_r96": ours * 1.25, "fp4_r96": ours * 2,
    }  # fmt: skip


def _tables(*paths: Path, ranks: str = "32,96") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_w4.py"), "--ranks", ranks, "--tables", *map(str, paths)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_saved_runs_print_as_one_table_sorted_by_m_then_shape(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(
        json.dumps({"speed": [_row(12288, 3072, 16, 40.0, 20.0), _row(12288, 3072, 4608, 500.0, 400.0)]})
    )
    b.write_text(json.dumps({"speed": [_row(3072, 3072, 4608, 120.0, 100.0)]}))
    done = _tables(a, b)
    assert done.returncode == 0, done.stderr
    ratio_rows = [
        line
        for line in done.stdout.split("ratios")[1].splitlines()
        if line.startswith("| 3") or line.startswith("| 1")
    ]
    assert [line.split(" | ")[:2] for line in ratio_rows] == [
        ["| 12288x3072", "16"],
        ["| 3072x3072", "4608"],
        ["| 12288x3072", "4608"],
    ]
    cells = ratio_rows[1].split(" | ")
    assert cells[2] == "1.20x"  # bf16 / ours = 120 / 100
    assert cells[7] == "+25.0%"  # rank 96 over rank 32
    assert cells[8] == "int4"


def test_a_shape_measured_twice_or_a_bad_file_is_refused(tmp_path: Path) -> None:
    a, b, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bad.json"
    a.write_text(json.dumps({"speed": [_row(3072, 3072, 16, 13.0, 8.0)]}))
    b.write_text(json.dumps({"speed": [_row(3072, 3072, 16, 13.5, 7.5)]}))
    bad.write_text("{not json")
    twice = _tables(a, b)
    assert twice.returncode != 0 and "3072x3072 at M = 16 is in two files" in twice.stderr
    broken = _tables(a, bad)
    assert broken.returncode != 0 and "bad.json: not a bench_w4 --json file" in broken.stderr
    no_m = tmp_path / "no_m.json"
    no_m.write_text(json.dumps({"speed": [{"K": 3072, "N": 3072}]}))
    assert "no_m.json: not a bench_w4 --json file" in _tables(no_m).stderr


def test_saved_runs_of_other_ranks_are_named(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"speed": [_row(3072, 3072, 16, 13.0, 8.0)]}))
    done = _tables(a, ranks="32,160")
    assert done.returncode != 0
    assert "no int4_r160, fp4_r160 (was it run with other --ranks than 32,160?)" in done.stderr
