"""summarize.py on made-up reports: what passes and what fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conformance import summarize


def write_reports(tmp: Path, cases: dict[str, dict[str, object]], n_ok: int) -> Path:
    index: dict[str, dict[str, object]] = {}
    for i in range(n_ok):
        index[f"1.1.{i + 1}"] = {"behavior": "OK", "behaviorClose": "OK"}
    for case, detail in cases.items():
        name = f"etherd_case_{case.replace('.', '_')}.json"
        (tmp / name).write_text(json.dumps(detail))
        index[case] = {
            "behavior": detail["behavior"],
            "behaviorClose": detail.get("behaviorClose", "OK"),
            "reportfile": name,
        }
    (tmp / "index.json").write_text(json.dumps({"etherd": index}))
    return tmp


def test_any_failure_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Two CLOSE frames in one packet (7.1.2): there is no allow-list any more.
    closes = {"behavior": "FAILED", "behaviorClose": "WRONG CODE", "remoteCloseCode": 1002}
    write_reports(tmp_path, {"7.1.2": closes}, summarize.EXPECTED_CASES - 1)
    assert summarize.main([str(tmp_path)]) == 1
    assert "FAIL    7.1.2" in capsys.readouterr().out


def test_another_failure_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = {"behavior": "FAILED", "behaviorClose": "FAILED", "remoteCloseCode": 1002}
    write_reports(tmp_path, {"6.2.3": bad}, summarize.EXPECTED_CASES - 1)
    assert summarize.main([str(tmp_path)]) == 1
    assert "FAIL    6.2.3" in capsys.readouterr().out


def test_non_strict_and_informational_pass(tmp_path: Path) -> None:
    cases: dict[str, dict[str, object]] = {
        "4.1.3": {"behavior": "NON-STRICT"},
        "7.13.1": {"behavior": "INFORMATIONAL"},
    }
    write_reports(tmp_path, cases, summarize.EXPECTED_CASES - 2)
    assert summarize.main([str(tmp_path)]) == 0


def test_short_run_fails(tmp_path: Path) -> None:
    write_reports(tmp_path, {}, 10)
    assert summarize.main([str(tmp_path)]) == 1


def test_server_traceback_fails(tmp_path: Path) -> None:
    write_reports(tmp_path, {}, summarize.EXPECTED_CASES)
    log = tmp_path / "etherd.log"
    log.write_text("Traceback (most recent call last):\n  ...\nValueError: x\n")
    assert summarize.main(["--server-log", str(log), str(tmp_path)]) == 1


def test_missing_index_is_an_input_error(tmp_path: Path) -> None:
    assert summarize.main([str(tmp_path)]) == 2


def test_case_ids_sort_numerically() -> None:
    ids = ["10.1.1", "7.13.2", "7.9.1", "1.1.1"]
    assert sorted(ids, key=summarize.case_key) == ["1.1.1", "7.9.1", "7.13.2", "10.1.1"]
