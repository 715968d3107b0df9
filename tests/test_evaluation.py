"""The evaluation command: prequential figures from a labelled CSV streamed through the real engine."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np

from risk_engine.datasets import DatasetError
from risk_engine.evaluation import evaluate, recall_at_alert_rate
from tests.conftest import make_settings, run_cli, shared_data


def write_ulb_like(path: Path, rows: int, frauds: set[int], seed: int = 5) -> None:
    """A CSV in the ULB layout: ordinary rows near zero, fraud rows far out on every component."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["Time", *[f"V{k}" for k in range(1, 29)], "Amount", "Class"])
        for i in range(rows):
            fraud = i in frauds
            values = [rng.gauss(9 if fraud else 0, 1) for _ in range(28)]
            amount = 2500.0 if fraud else round(rng.uniform(1, 200), 2)
            out.writerow([i * 5, *values, amount, int(fraud)])


def test_recall_at_an_alert_rate_counts_weighted_positives_in_the_top_share() -> None:
    y = np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 0], dtype=float)
    score = np.array([9, 8, 7, 1, 0, 0, 0, 0, 0, 0], dtype=float)
    weight = np.ones(10)
    assert recall_at_alert_rate(y, score, weight, 0.1) == 0.5  # top 1 of 10: one of two positives
    assert recall_at_alert_rate(y, score, weight, 0.3) == 0.5
    assert recall_at_alert_rate(y, score, weight, 0.4) == 1.0


def test_evaluation_scores_before_labels_and_finds_planted_outliers(tmp_path: Path) -> None:
    data = tmp_path / "stream.csv"
    frauds = {300, 420, 555, 610, 777, 850}
    write_ulb_like(data, 900, frauds)
    settings = make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'eval.db'}")
    result, arrays = evaluate("payments", data, label_delay=50, settings=settings)
    assert (result.events, result.positives) == (900, len(frauds))
    assert len(arrays["model:payment_anomaly"]) == 900
    assert result.models["payment_anomaly"].roc_auc > 0.9  # the detector ranks far-out rows high
    assert set(result.models) == {"payment_anomaly", "payment_fraud", "combined"}
    assert len(arrays["models:combined"]) == 900
    summary = result.summary()
    for key in (
        "roc_auc",
        "average_precision",
        "recall_at_0_5pct",
        "recall_at_1pct",
        "events_per_s",
        "events",
        "positives",
    ):
        assert key in summary
    # labels arrive 50 events late: the last 50 (and the fraud at row 850) were never revealed
    from sqlalchemy import create_engine, text

    db = create_engine(f"sqlite:///{tmp_path / 'eval.db'}")
    with db.connect() as conn:
        assert conn.execute(text("select count(*) from labels")).scalar_one() == 850
        assert conn.execute(text("select count(*) from labels where is_fraud")).scalar_one() == len(frauds) - 1
        late = conn.execute(text("select count(*) from labels where event_id = 'eval_850'")).scalar_one()
        assert late == 0
    db.dispose()


def test_eval_command_ends_with_one_json_object(tmp_path: Path) -> None:
    data = tmp_path / "stream.csv"
    write_ulb_like(data, 200, {150, 170})
    report = tmp_path / "report"
    result = run_cli(
        "eval",
        "payments",
        "--data",
        str(data),
        "--label-delay",
        "10",
        "--json",
        "--report",
        str(report),
        home=tmp_path / "var",
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["events"] == 200 and figures["positives"] == 2
    assert (report / "pr_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((report / "figures.json").read_text())["events"] == 200


def test_real_ulb_stream_through_the_engine(tmp_path: Path) -> None:
    path = shared_data("ulb_stream.csv")
    settings = make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'eval.db'}")
    result, _ = evaluate("payments", path, label_delay=100, settings=settings, limit=1500)
    assert result.events == 1500
    assert result.positives >= 1
    assert 0.0 <= result.models["payment_anomaly"].roc_auc <= 1.0


def _ulb_row_with(path: Path, **cells: str) -> None:
    """One ULB-layout row, with ``cells`` replacing its values."""
    write_ulb_like(path, 1, set())
    header, row = path.read_text().splitlines()
    values = dict(zip(header.split(","), row.split(","), strict=True)) | cells
    path.write_text(header + "\n" + ",".join(values.values()) + "\n")


def test_eval_names_the_line_and_reason_of_a_file_it_cannot_take(tmp_path: Path) -> None:
    cases: dict[str, tuple[bytes | None, dict[str, str], str]] = {
        "wrong layout": (b"a,b\n1,2\n", {}, "no column Time, Amount (its header has a, b)"),
        "not text": (b"\xc3\x28 binary", {}, "not UTF-8 text (byte 0xc3 at 0)"),
        "a label that is no number": (None, {"Class": "yes"}, ":2: column Class: 'yes' is not a number"),
        "an amount that is not finite": (None, {"Amount": "nan"}, ":2: column Amount: 'nan' is not a finite number"),
        "an empty time": (None, {"Time": ""}, ":2: column Time is empty"),
        "a negative amount": (None, {"Amount": "-5"}, ":2: the row makes amount.value invalid"),
    }
    for name, (raw, cells, expected) in cases.items():
        data = tmp_path / f"{name}.csv"
        if raw is not None:
            data.write_bytes(raw)
        else:
            _ulb_row_with(data, **cells)
        try:
            evaluate("payments", data, 0, make_settings(tmp_path / name, f"sqlite:///{tmp_path / name}.db"))
        except DatasetError as exc:
            assert expected in str(exc) and str(data) in str(exc), (name, str(exc))
        else:
            raise AssertionError(f"{name}: evaluated")
    result = run_cli("eval", "payments", "--data", str(tmp_path / "wrong layout.csv"), home=tmp_path / "var")
    assert result.returncode == 2 and "cannot evaluate:" in result.stderr and "Traceback" not in result.stderr
    negative = run_cli("eval", "payments", "--data", str(data), "--label-delay", "-1", home=tmp_path / "var")
    assert negative.returncode == 2 and "--label-delay" in negative.stderr
