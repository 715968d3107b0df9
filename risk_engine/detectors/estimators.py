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
    ``1/window``, so the model follows slow drift. It scores 0 until it has seen ``min_events`` events. The
    per-feature terms are the explanation: the score is their sum, so each term is exactly that feature's share.
    """

    def __init__(self, clip: float = 10.0, window: int = 20_000, min_events: int = 30) -> None:
        if clip <= 0 or window < 2 or min_events < 2:
            raise ValueError("clip must be positive, window and min_events at least 2")
        self.clip = clip
        self.window = window
        self.min_events = min_events
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
        clip, means, vars_ = self.clip, self.means, self.vars
        share = 1.0 / len(x)
        out: dict[Hashable, float] = {}
        for name, value in x.items():
            var = vars_.get(name, 0.0)
            z = abs(value - means.get(name, 0.0)) / var**0.5 if var > 0.0 else 0.0
            out[name] = (z if z < clip else clip) * share
        return out

    def score_one(self, x: dict[Hashable, Any]) -> float:
        """How unusual ``x`` is: 0 at the means, up to ``clip``; 0 for the first ``min_events`` events, whose
        variances are too rough to rank anything (and would sit in the calibration window as outliers)."""
        if self.n < self.min_events:
            return 0.0
        return sum(self.terms(x).values())


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


class TextNaiveBayes(base.Classifier):
    """Multinomial naive Bayes over a text's n-grams: river's ``BagOfWords | MultinomialNB``, same
    probabilities (a test checks it), about five times faster: one dict per class, the denominators' logs once
    per call, and its own tokenizer. ``x`` holds one text; its key is the detector's text feature.

    Its explanation: the n-grams whose counts pushed the log odds towards fraud most.
    """

    def __init__(self, alpha: float = 1.0, ngram_range: tuple[int, int] = (1, 2)) -> None:
        self.alpha = alpha
        self.ngram_range = tuple(ngram_range)
        self.class_counts: dict[bool | str | int, int] = {}
        self.class_totals: dict[bool | str | int, float] = {}
        self.counts: dict[bool | str | int, dict[str, float]] = {}  # class -> n-gram -> count
        self.log_counts: dict[bool | str | int, dict[str, float]] = {}  # class -> n-gram -> log(count + alpha)
        self.vocabulary: set[str] = set()

    def _grams(self, x: dict[Hashable, Any]) -> Counter[str]:
        text = next((v for v in x.values() if isinstance(v, str)), "")
        last = self.__dict__.get("_last")
        if last is not None and last[0] is text:  # scored, then explained: tokenize once
            return last[1]  # type: ignore[no-any-return]
        low, high = self.ngram_range
        grams = text_ngrams(text, (int(low), int(high)))
        self.__dict__["_last"] = (text, grams)
        return grams

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_last", None)  # a cache, not state
        return state

    def learn_one(self, x: dict[Hashable, Any], y: Any) -> None:
        """Count the text's n-grams under its label."""
        grams = self._grams(x)
        self.class_counts[y] = self.class_counts.get(y, 0) + 1
        counts = self.counts.setdefault(y, {})
        logs = self.log_counts.setdefault(y, {})
        alpha = self.alpha
        for gram, n in grams.items():
            count = counts.get(gram, 0.0) + n
            counts[gram] = count
            logs[gram] = math.log(count + alpha)
            self.vocabulary.add(gram)
        self.class_totals[y] = self.class_totals.get(y, 0.0) + sum(grams.values())

    def _log_likelihoods(self, grams: Counter[str]) -> dict[bool | str | int, float]:
        total = sum(self.class_counts.values())
        alpha, vocabulary = self.alpha, len(self.vocabulary)
        n_tokens = sum(grams.values())
        out = {}
        log_alpha = math.log(alpha)
        for c, n_c in self.class_counts.items():
            logs = self.log_counts.get(c, {}).get
            log_den = math.log(self.class_totals.get(c, 0.0) + alpha * vocabulary)
            ll = math.log(n_c / total) - n_tokens * log_den
            for gram, n in grams.items():
                ll += n * logs(gram, log_alpha)
            out[c] = ll
        return out

    def predict_proba_one(self, x: dict[Hashable, Any], **kwargs: Any) -> dict[bool | str | int, float]:
        """Class probabilities; empty before the first label, as river's."""
        if not self.class_counts:
            return {}
        jll = self._log_likelihoods(self._grams(x))
        top = max(jll.values())
        norm = top + math.log(sum(math.exp(v - top) for v in jll.values()))
        return {c: math.exp(v - norm) for c, v in jll.items()}

    def gram_effects(self, x: dict[Hashable, Any], positive: Any = True, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` n-grams that pushed the log odds of ``positive`` (against the likeliest other class for
        each n-gram) up most, largest first."""
        if positive not in self.counts or len(self.class_counts) < 2:
            return []
        alpha, vocabulary = self.alpha, len(self.vocabulary)
        log_alpha = math.log(alpha)
        pos = self.log_counts[positive].get
        pos_den = math.log(self.class_totals[positive] + alpha * vocabulary)
        others = [
            (self.log_counts.get(c, {}).get, math.log(self.class_totals.get(c, 0.0) + alpha * vocabulary))
            for c in self.class_counts
            if c != positive
        ]
        effects = []
        for gram, n in self._grams(x).items():
            other = max(get(gram, log_alpha) - den for get, den in others)
            effects.append((gram, n * (pos(gram, log_alpha) - pos_den - other)))
        return heapq.nlargest(k, effects, key=lambda t: t[1])
