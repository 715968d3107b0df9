"""Prequential evaluation anyone can rerun: a labelled CSV streamed through the real engine in file order.

Each event is scored (with everything learned before it), then learned; its label is revealed to the engine
``label_delay`` events later, as a chargeback or a confirmed outcome would arrive. Figures are computed on the
scores as they were given, with the file's ``weight`` column as sample weights when it has one.
"""

from __future__ import annotations

import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from risk_engine.config import Settings
from risk_engine.datasets import DatasetError, LabelledEvent, ethereum_accounts, opspam_reviews, ulb_payments
from risk_engine.engine import RiskEngine
from risk_engine.errors import InvalidInput
from risk_engine.storage.writer import Ticket
from risk_engine.subjects import SUBJECT_KINDS

SUBJECTS = {
    "payments": "payment",
    "payment": "payment",
    "accounts": "account",
    "account": "account",
    "reviews": "review",
    "review": "review",
}


@dataclass
class Figures:
    """Ranking and alerting quality of one score."""

    roc_auc: float
    average_precision: float
    recall_at_0_5pct: float
    recall_at_1pct: float
    recall_at_5pct: float  # a review queue's hold rate


@dataclass
class EvalResult:
    """What an evaluation run measured."""

    subject: str
    data: str
    events: int
    positives: int
    label_delay: int
    weighted: bool
    events_per_s: float
    risk_score: Figures
    models: dict[str, Figures] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Flat figures for ``--json``: the risk score's, plus each detector's under ``models``."""
        out: dict[str, Any] = {
            "subject": self.subject,
            "data": self.data,
            **asdict(self.risk_score),
            "events_per_s": round(self.events_per_s, 1),
            "events": self.events,
            "positives": self.positives,
            "label_delay": self.label_delay,
            "weighted": self.weighted,
            "models": {name: asdict(f) for name, f in self.models.items()},
        }
        return out


def recall_at_alert_rate(y: np.ndarray, score: np.ndarray, weight: np.ndarray, rate: float) -> float:
    """Share of (weighted) positives among the highest-scored ``rate`` of (weighted) events."""
    order = np.argsort(-score, kind="stable")
    w = weight[order]
    budget = rate * w.sum()
    alerted = np.cumsum(w) <= budget
    if not alerted.any():
        alerted[0] = True
    positives = (w * y[order]).sum()
    return float((w * y[order])[alerted].sum() / positives) if positives else float("nan")


def figures(y: np.ndarray, score: np.ndarray, weight: np.ndarray) -> Figures:
    """ROC AUC, average precision and recall at 0.5% and 1% alert rates."""
    if y.min() == y.max():
        nan = float("nan")
        return Figures(nan, nan, nan, nan, nan)
    return Figures(
        roc_auc=round(float(roc_auc_score(y, score, sample_weight=weight)), 4),
        average_precision=round(float(average_precision_score(y, score, sample_weight=weight)), 4),
        recall_at_0_5pct=round(recall_at_alert_rate(y, score, weight, 0.005), 4),
        recall_at_1pct=round(recall_at_alert_rate(y, score, weight, 0.01), 4),
        recall_at_5pct=round(recall_at_alert_rate(y, score, weight, 0.05), 4),
    )


def _events(subject: str, path: Path) -> Iterator[LabelledEvent]:
    if subject == "payment":
        yield from ulb_payments(path, prefix="eval")
        return
    if subject == "account":
        yield from ethereum_accounts(path, prefix="eval")
        return
    if subject == "review":
        yield from opspam_reviews(path, prefix="eval")
        return
    raise ValueError(f"no evaluation for subject {subject!r} yet; known: {', '.join(sorted(set(SUBJECTS)))}")


def evaluate(
    subject: str,
    data: Path,
    label_delay: int,
    settings: Settings | None = None,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[EvalResult, dict[str, np.ndarray]]:
    """Stream ``data`` through a fresh engine (its own data directory unless ``settings`` says otherwise). A
    DatasetError names the first line that cannot be read or scored."""
    subject = SUBJECTS.get(subject, subject)
    settings = settings or Settings(home=Path(tempfile.mkdtemp(prefix="risk-engine-eval-")))
    engine = RiskEngine.open(settings)
    labels: list[int] = []
    weights: list[float] = []
    risk: list[float] = []
    model_raw: dict[str, list[float]] = {}
    combined: list[float] = []
    kind = SUBJECT_KINDS[subject]
    waiting: deque[tuple[int, str, int, Ticket]] = deque()
    due: list[tuple[str, str, Ticket]] = []
    # labels reach the engine in small batches: at most a fifth of the delay (and 50 events) after they are due
    reveal_batch = max(1, min(50, label_delay // 5))
    started = time.perf_counter()

    def reveal() -> None:
        for _, _, committed in due:
            committed.result()  # a label follows its payment into storage
        engine.record_labels([(pid, label, None) for pid, label, _ in due], source="eval", subject=subject)
        due.clear()

    try:
        for i, event in enumerate(_events(subject, data)):
            if limit is not None and i >= limit:
                break
            try:
                outcome = engine.score_event(subject, kind.model.model_validate(event.body))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise DatasetError(f"{data}:{event.line}: the row makes {where} invalid: {first['msg']}") from None
            except InvalidInput as exc:
                raise DatasetError(f"{data}:{event.line}: the row makes {exc}") from None
            labels.append(event.label)
            weights.append(event.weight)
            risk.append(float(outcome.response["score"]))
            for m in outcome.model_scores:
                model_raw.setdefault(m.name, []).append(m.raw)
            combined.append(outcome.model_score)
            waiting.append((i, event.body[kind.id_field], event.label, outcome.committed))
            while waiting and waiting[0][0] <= i - label_delay:
                _, payment_id, label, committed = waiting.popleft()
                due.append((payment_id, "confirmed_fraud" if label else "legitimate", committed))
            if len(due) >= reveal_batch:
                reveal()
            if progress is not None and i % 1000 == 0:
                progress(i)
        reveal()
        for _, _, _, committed in waiting:
            committed.result()
    finally:
        engine.close()
    elapsed = time.perf_counter() - started
    y = np.asarray(labels, dtype=float)
    w = np.asarray(weights, dtype=float)
    arrays = {"label": y, "weight": w, "risk_score": np.asarray(risk)}
    models = {}
    for name, values in model_raw.items():
        arrays[f"model:{name}"] = np.asarray(values)
        models[name] = figures(y, arrays[f"model:{name}"], w)
    if len(model_raw) > 1:
        arrays["models:combined"] = np.asarray(combined)
        models["combined"] = figures(y, arrays["models:combined"], w)
    result = EvalResult(
        subject=subject,
        data=str(data),
        events=len(labels),
        positives=int(y.sum()),
        label_delay=label_delay,
        weighted=bool((w != 1).any()),
        events_per_s=len(labels) / elapsed if elapsed else 0.0,
        risk_score=figures(y, arrays["risk_score"], w),
        models=models,
    )
    return result, arrays


def write_report(result: EvalResult, arrays: dict[str, np.ndarray], directory: Path) -> list[Path]:
    """PR curves and score histograms by class (PNG), and the figures (JSON)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    y, w = arrays["label"], arrays["weight"]
    scores = {k: v for k, v in arrays.items() if k not in ("label", "weight")}
    written = []
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, s in scores.items():
        if y.min() != y.max():
            precision, recall, _ = precision_recall_curve(y, s, sample_weight=w)
            ax.plot(recall, precision, label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{result.subject}: precision-recall ({Path(result.data).name})")
    ax.legend()
    path = directory / "pr_curve.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    for name, s in scores.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for cls, colour in ((0, "tab:blue"), (1, "tab:red")):
            mask = y == cls
            if mask.any():
                ax.hist(
                    s[mask],
                    bins=50,
                    weights=w[mask],
                    density=True,
                    alpha=0.55,
                    color=colour,
                    label="fraud" if cls else "legitimate",
                )
        ax.set_title(f"{name} by class")
        ax.legend()
        path = directory / f"hist_{name.replace(':', '_')}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    path = directory / "figures.json"
    path.write_text(json.dumps(result.summary(), indent=2) + "\n")
    written.append(path)
    return written
