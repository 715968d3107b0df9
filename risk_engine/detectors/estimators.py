"""Estimators of our own, following river's protocol (``learn_one`` / ``score_one``).

``GaussianZScore`` is the default payment anomaly detector. On the ULB card data it ranks fraud better than
HalfSpaceTrees and, unlike it, does not depend on a random seed (first 2,500 rows of ``ulb_stream.csv``,
progressive ROC AUC: 0.966 here against 0.85-0.91 for HalfSpaceTrees over five seeds; see the README).
"""

from __future__ import annotations

import heapq
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Hashable
from typing import Any

from river import base


class GaussianZScore(base.AnomalyDetector):
    """Mean absolute z-score of an event's features against their running means and variances.

    A diagonal Gaussian model of normal traffic: each feature's distance from its mean in standard deviations,
    clipped at ``clip`` so one wild feature cannot drown the others, averaged over the features. Means and
    variances are exact (Welford) for the first ``window`` events, then exponentially weighted with weight
    ``1/window``, so the model follows slow drift; a standard deviation under ``min_std`` counts as ``min_std``
    (so a feature that never moved still flags a jump). It scores 0 until it has seen ``min_events`` events. The
    per-feature terms are the explanation: the score is their sum, so each term is exactly that feature's share.
    """

    def __init__(self, clip: float = 10.0, window: int = 20_000, min_events: int = 30, min_std: float = 0.0) -> None:
        if clip <= 0 or window < 2 or min_events < 2 or min_std < 0:
            raise ValueError("clip must be positive, window and min_events at least 2, min_std not negative")
        self.clip = clip
        self.window = window
        self.min_events = min_events
        self.min_std = min_std
        self.n = 0
        self.means: dict[Hashable, float] = {}
        self.vars: dict[Hashable, float] = {}

    def learn_one(self, x: dict[Hashable, Any]) -> None:
        """Fold an event into the running means and variances."""
        self.n += 1
        alpha = 1.0 / min(self.n, self.window)
        means, vars_ = self.means, self.vars
        for name, value in x.items():
            mean = means.get(name, 0.0)
            delta = value - mean
            mean += alpha * delta
            means[name] = mean
            vars_[name] = (1.0 - alpha) * (vars_.get(name, 0.0) + alpha * delta * delta)

    def terms(self, x: dict[Hashable, Any]) -> dict[Hashable, float]:
        """Each feature's clipped absolute z-score divided by the number of features: the score's summands."""
        if not x:
            return {}
        clip, means, vars_, floor = self.clip, self.means, self.vars, self.min_std * self.min_std
        share = 1.0 / len(x)
        out: dict[Hashable, float] = {}
        for name, value in x.items():
            var = max(vars_.get(name, 0.0), floor)
            z = abs(value - means.get(name, 0.0)) / var**0.5 if var > 0.0 else 0.0
            out[name] = (z if z < clip else clip) * share
        return out

    def score_one(self, x: dict[Hashable, Any]) -> float:
        """How unusual ``x`` is: 0 at the means, up to ``clip``; 0 for the first ``min_events`` events, whose
        variances are too rough to rank anything (and would sit in the calibration window as outliers)."""
        if self.n < self.min_events or not x:
            return 0.0
        # terms() summed without building its dict: this runs for every payment
        clip, means, vars_, floor = self.clip, self.means, self.vars, self.min_std * self.min_std
        total = 0.0
        for name, value in x.items():
            var = vars_.get(name, 0.0)
            if var < floor:
                var = floor
            if var > 0.0:
                z = abs(value - means.get(name, 0.0)) / var**0.5
                total += z if z < clip else clip
        return total / len(x)


_TOKEN = re.compile(r"(?u)\b\w[\w\-]+\b")  # river's default tokenizer pattern


def text_ngrams(text: str, ngram_range: tuple[int, int] = (1, 2)) -> Counter[str]:
    """Counts of a text's n-grams as river's ``BagOfWords`` finds them (accents stripped, lower case, the same
    token pattern), with n-grams as space-joined strings rather than tuples."""
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    tokens = _TOKEN.findall(text.lower())
    low, high = ngram_range
    grams: list[str] = list(tokens) if low == 1 else []
    for n in range(max(low, 2), high + 1):
        grams.extend(map(" ".join, zip(*(tokens[i:] for i in range(n)), strict=False)))
    return Counter(grams)


Label = bool | str | int


class TextNaiveBayes(base.Classifier):
    """Multinomial naive Bayes over a text's n-grams: river's ``BagOfWords | MultinomialNB``, same
    probabilities (a test checks it), several times faster: one table row per n-gram holding every class's
    ``log(count + alpha)``, one look-up per n-gram, and its own tokenizer. ``x`` holds one text.

    ``binary=True`` counts each n-gram once per text (Boolean multinomial NB: Metsis, Androutsopoulos and
    Paliouras 2006; Wang and Manning 2012), which ranks short opinion texts better than raw counts.

    Its explanation: the n-grams whose counts pushed the log odds towards fraud most (from the same look-ups).
    """

    def __init__(self, alpha: float = 1.0, ngram_range: tuple[int, int] = (1, 2), binary: bool = False) -> None:
        self.alpha = alpha
        self.ngram_range = tuple(ngram_range)
        self.binary = binary
        self.classes: list[Label] = []
        self.class_counts: dict[Label, int] = {}
        self.class_totals: list[float] = []
        self.counts: dict[str, list[float]] = {}  # n-gram -> count per class (in ``classes`` order)
        self.logs: dict[str, list[float]] = {}  # n-gram -> log(count + alpha) per class

    def _grams(self, x: dict[Hashable, Any]) -> Counter[str]:
        text = next((v for v in x.values() if isinstance(v, str)), "")
        last = self.__dict__.get("_last")
        if last is not None and last[0] is text:  # scored, then explained: tokenize once
            return last[1]  # type: ignore[no-any-return]
        low, high = self.ngram_range
        grams = text_ngrams(text, (int(low), int(high)))
        if self.binary:
            grams = Counter(dict.fromkeys(grams, 1))
        self.__dict__["_last"] = (text, grams)
        return grams

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_last", None)  # caches, not state
        state.pop("_scan_cache", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("binary", False)  # snapshots from before the option

    def _class_index(self, y: Label) -> int:
        if y not in self.class_counts:
            self.classes.append(y)
            self.class_counts[y] = 0
            self.class_totals.append(0.0)
            log_alpha = math.log(self.alpha)
            for row in self.counts.values():
                row.append(0.0)
            for row in self.logs.values():
                row.append(log_alpha)
        return self.classes.index(y)

    def learn_one(self, x: dict[Hashable, Any], y: Any) -> None:
        """Count the text's n-grams under its label."""
        grams = self._grams(x)
        c = self._class_index(y)
        self.class_counts[y] += 1
        width, alpha, log_alpha = len(self.classes), self.alpha, math.log(self.alpha)
        for gram, n in grams.items():
            counts = self.counts.get(gram)
            if counts is None:
                counts = self.counts[gram] = [0.0] * width
                self.logs[gram] = [log_alpha] * width
            counts[c] += n
            self.logs[gram][c] = math.log(counts[c] + alpha)
        self.class_totals[c] += sum(grams.values())
        self.__dict__.pop("_scan_cache", None)

    def _scan(self, x: dict[Hashable, Any]) -> tuple[list[float], list[tuple[str, int, list[float] | None]]]:
        """Joint log likelihood per class, and each n-gram's row (cached for the explanation)."""
        grams = self._grams(x)
        cached = self.__dict__.get("_scan_cache")
        if cached is not None and cached[0] is grams:
            return cached[1], cached[2]
        total = sum(self.class_counts.values())
        alpha, vocabulary, log_alpha = self.alpha, len(self.counts), math.log(self.alpha)
        n_tokens = sum(grams.values())
        ll = [
            math.log(self.class_counts[c] / total) - n_tokens * math.log(self.class_totals[i] + alpha * vocabulary)
            for i, c in enumerate(self.classes)
        ]
        width = len(ll)
        rows = []
        get = self.logs.get
        unseen = 0
        for gram, n in grams.items():
            row = get(gram)
            rows.append((gram, n, row))
            if row is None:
                unseen += n
            elif width == 2:
                ll[0] += n * row[0]
                ll[1] += n * row[1]
            else:
                for i in range(width):
                    ll[i] += n * row[i]
        if unseen:
            ll = [v + unseen * log_alpha for v in ll]
        self.__dict__["_scan_cache"] = (grams, ll, rows)
        return ll, rows

    def predict_proba_one(self, x: dict[Hashable, Any], **kwargs: Any) -> dict[Label, float]:
        """Class probabilities; empty before the first label, as river's."""
        if not self.classes:
            return {}
        ll, _ = self._scan(x)
        top = max(ll)
        norm = top + math.log(sum(math.exp(v - top) for v in ll))
        return {c: math.exp(v - norm) for c, v in zip(self.classes, ll, strict=True)}

    def gram_effects(self, x: dict[Hashable, Any], positive: Any = True, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` n-grams that pushed the log odds of ``positive`` (against the likeliest other class for
        each n-gram) up most, largest first."""
        if positive not in self.class_counts or len(self.classes) < 2:
            return []
        _, rows = self._scan(x)
        p = self.classes.index(positive)
        vocabulary = len(self.counts)
        dens = [math.log(t + self.alpha * vocabulary) for t in self.class_totals]
        others = [i for i in range(len(self.classes)) if i != p]
        unseen = min(dens[i] for i in others) - dens[p]  # an n-gram never seen: log(alpha) on both sides
        effects = [
            (gram, n * (unseen if row is None else row[p] - dens[p] - max(row[i] - dens[i] for i in others)))
            for gram, n, row in rows
        ]
        return heapq.nlargest(k, effects, key=lambda t: t[1])
