"""Streaming detectors: spec validation, score-then-learn, calibration, signed snapshots."""

from __future__ import annotations

import copy
import pickle
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from risk_engine.detectors import (
    RunningQuantile,
    SnapshotError,
    SpecError,
    StreamingDetector,
    read_snapshot,
    write_snapshot,
)
from risk_engine.detectors.spec import parse_spec_file
from risk_engine.dsl import DslErrors, Environment, compile_features
from risk_engine.engine import load_environments
from risk_engine.payments import PAYMENT_SCHEMA
from tests.conftest import make_settings

SPEC = """
[detectors.d]
subject = "payment"
estimator = "HalfSpaceTrees"
warmup = 5
[detectors.d.params]
seed = 7
[detectors.d.features]
amount = "amount.major"
items = "item_count"
"""


def detector(tmp_path: Path, text: str = SPEC) -> StreamingDetector:
    path = tmp_path / "d.toml"
    path.write_text(text)
    (spec,) = parse_spec_file(path)
    return StreamingDetector(spec, compile_features(spec.features, Environment(PAYMENT_SCHEMA)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SPEC.replace("HalfSpaceTrees", "HalfSpaceTree"), "did you mean 'HalfSpaceTrees'"),
        (SPEC.replace("seed = 7", "sede = 7"), "no parameter 'sede'"),
        (SPEC.replace('estimator = "HalfSpaceTrees"', 'estimator = "HalfSpaceTrees"\nwieght = 3'), "unknown key"),
        (SPEC.replace("scaler", "x") + "\n", ""),
        ('[detectors.d]\nsubject = "payment"\nestimator = "HalfSpaceTrees"\n', "[features]"),
    ],
)
def test_bad_specs_are_refused_with_a_clear_message(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "d.toml"
    path.write_text(text)
    if not message:  # sanity: the base spec parses
        assert parse_spec_file(path)
        return
    with pytest.raises(SpecError, match=message.replace("[", r"\[")):
        parse_spec_file(path)


def test_unknown_feature_is_refused_at_start_up(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "bad.toml").write_text(SPEC.replace('"item_count"', '"item_cuont"'))
    settings = make_settings(tmp_path, "sqlite://", models_dir=models)
    with pytest.raises(DslErrors, match="did you mean 'item_count'"):
        load_environments(settings)


def stream(n: int, seed: int = 1) -> list[dict[str, float]]:
    rng = random.Random(seed)
    return [{"amount": rng.gauss(100, 10), "items": float(rng.randint(1, 3))} for _ in range(n)]


def test_an_event_is_scored_before_it_is_learned(tmp_path: Path) -> None:
    det = detector(tmp_path)
    for i, x in enumerate(stream(300)):
        raw, calibrated = det.score_one(x)
        if i % 25 == 0:  # scoring leaves no trace: a copy taken now scores the same
            assert (raw, calibrated) == copy.deepcopy(det).score_one(x)
        det.learn_one(x, raw, i)
    # the event's own update would change its score: learning must come after scoring
    x = {"amount": 900.0, "items": 9.0}
    before, _ = det.score_one(x)
    for i in range(300):
        det.learn_one(x, before, 1000 + i)
    after, _ = det.score_one(x)
    assert after != before


def test_snapshot_round_trip_gives_identical_scores(tmp_path: Path) -> None:
    det = detector(tmp_path)
    for i, x in enumerate(stream(400)):
        raw, _ = det.score_one(x)
        det.learn_one(x, raw, i)
    path = tmp_path / "snap"
    write_snapshot(path, det.state(), b"k" * 32)
    restored = detector(tmp_path)
    assert restored.restore(read_snapshot(path, b"k" * 32))
    for x in stream(50, seed=2):
        assert restored.score_one(x) == det.score_one(x)
    assert restored.events_seen == 400


def test_workers_sharing_a_snapshot_file_each_replace_it_whole(tmp_path: Path) -> None:
    # workers on one host share RISK_ENGINE_HOME, and so each detector's snapshot file: two that write it at the
    # same moment (at their starts, say) must each put a whole, signed file in place, neither failing
    import threading

    path = tmp_path / "payment_anomaly.snapshot"
    failures: list[BaseException] = []
    go = threading.Barrier(2)

    def write(fill: int) -> None:
        go.wait()
        for round_ in range(40):
            try:
                write_snapshot(path, {"by": fill, "round": round_, "pad": bytes([fill]) * 2_000_000}, b"k" * 32)
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=write, args=(fill,)) for fill in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    state = read_snapshot(path, b"k" * 32)  # whole and signed: one writer's last, not a mix of both
    assert state["pad"] == bytes([state["by"]]) * 2_000_000
    assert not list(tmp_path.glob("*.tmp"))  # no scratch file left behind


def test_a_start_removes_the_scratch_files_of_writers_that_died_mid_write_only(tmp_path: Path) -> None:
    import os
    import time

    from risk_engine.engine import RiskEngine

    settings = make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}")
    settings.snapshot_dir.mkdir(parents=True)
    dead = settings.snapshot_dir / "payment_anomaly.snapshot.dead1234.tmp"
    dead.write_bytes(b"half a snapshot")
    an_hour_ago = time.time() - 3_700
    os.utime(dead, (an_hour_ago, an_hour_ago))
    writing = settings.snapshot_dir / "payment_anomaly.snapshot.live5678.tmp"  # another worker's, under way
    writing.write_bytes(b"a snapshot being written")
    RiskEngine.open(settings).close()
    assert not dead.exists() and writing.exists()


def test_tampered_or_foreign_snapshot_is_refused(tmp_path: Path) -> None:
    det = detector(tmp_path)
    path = tmp_path / "snap"
    write_snapshot(path, det.state(), b"k" * 32)
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(SnapshotError, match="signature"):
        read_snapshot(path, b"k" * 32)
    write_snapshot(path, det.state(), b"k" * 32)
    with pytest.raises(SnapshotError):
        read_snapshot(path, b"other key" + b"\0" * 23)


def test_calibration_keeps_the_alert_rate_when_the_raw_scale_shifts() -> None:
    rng = random.Random(3)
    raw = [rng.random() for _ in range(4000)]

    def alert_rate(scale: float, offset: float) -> float:
        cal = RunningQuantile(window=1000, warmup=50)
        alerts = 0
        for r in raw:
            value = r * scale + offset
            alerts += cal.transform(value) > 0.99
            cal.update(value)
        return alerts / len(raw)

    base = alert_rate(1.0, 0.0)
    shifted = alert_rate(40.0, 7.0)
    assert 0.005 < base < 0.02
    assert shifted == base


SUPERVISED = """
[detectors.s]
subject = "payment"
kind = "supervised"
estimator = "LogisticRegression"
scaler = "StandardScaler"
warmup = 10
[detectors.s.features]
amount = "amount.major"
items = "item_count"
"""


def test_a_supervised_detector_learns_only_from_labels(tmp_path: Path) -> None:
    det = detector(tmp_path, SUPERVISED)
    rng = random.Random(4)
    normal = [{"amount": rng.gauss(100, 10), "items": 1.0} for _ in range(200)]
    fraud = [{"amount": rng.gauss(900, 50), "items": 8.0} for _ in range(40)]
    before = det.score_one(fraud[0])
    for i, x in enumerate(normal + fraud):
        raw, _ = det.score_one(x)
        det.learn_one(x, raw, i)
    assert det.score_one(fraud[0]) == before  # events alone teach it nothing
    assert det.warming_up  # so the combination counts it as 0 (tests/test_combine.py)
    for label_id, (x, y) in enumerate([(x, False) for x in normal] + [(x, True) for x in fraud], start=1):
        det.learn_label(x, y, label_id)
    assert not det.warming_up and det.labels_seen == 240 and det.last_label_id == 240
    fraud_like = det.score_one({"amount": 950.0, "items": 8.0})[1]
    normal_like = det.score_one({"amount": 95.0, "items": 1.0})[1]
    assert fraud_like > 0.7 and fraud_like - normal_like > 0.4
    with pytest.raises(SpecError, match="not a supervised estimator"):
        p = tmp_path / "bad.toml"
        p.write_text(SUPERVISED.replace("LogisticRegression", "HalfSpaceTrees"))
        parse_spec_file(p)


def test_a_snapshot_keeps_the_label_ids_still_missing(tmp_path: Path) -> None:
    det = detector(tmp_path, SUPERVISED)
    for label_id in (1, 2, 5, 4):  # 3 and 5's predecessor 4 were missing when 5 was learned; then 4 came
        det.learn_label({"amount": 100.0, "items": 1.0}, False, label_id)
    assert det.last_label_id == 5 and set(det.label_gaps) == {3}
    assert det.wants_label(3) and not det.wants_label(4) and det.wants_label(6)
    restored = detector(tmp_path, SUPERVISED)
    assert restored.restore(det.state())
    assert set(restored.label_gaps) == {3} and restored.last_label_id == 5  # a restart still looks for 3


def test_explanations_name_the_feature_that_was_made_extreme(tmp_path: Path) -> None:
    spec = SPEC.replace('items = "item_count"', 'items = "item_count"\nage = "days(buyer.account_age)"')
    det = detector(tmp_path, spec)
    rng = random.Random(9)
    for i in range(600):
        x = {"amount": rng.gauss(100, 10), "items": float(rng.randint(1, 3)), "age": rng.gauss(300, 30)}
        raw, _ = det.score_one(x)
        det.learn_one(x, raw, i)
    odd = {"amount": 100.0, "items": 2.0, "age": 5000.0}  # only the account age is unusual
    top = det.explain(odd)
    assert top and top[0][0] == "age", top

    sup = detector(tmp_path, SUPERVISED)
    for label_id in range(1, 401):
        fraud = label_id % 5 == 0
        x = {"amount": 900.0 if fraud else rng.gauss(100, 10), "items": float(rng.randint(1, 3))}
        sup.learn_label(x, fraud, label_id)
    assert sup.explain({"amount": 950.0, "items": 2.0})[0][0] == "amount"


# -- supervised detectors: no opinion before both outcomes, Platt scaling -------------------------------------

TEXT_SPEC = """
[detectors.t]
subject = "review"
kind = "supervised"
estimator = "TextNaiveBayes"
warmup = 0
calibration = "platt"
[detectors.t.params]
binary = true
[detectors.t.text]
text = "text"
"""


def text_detector(tmp_path: Path, text: str = TEXT_SPEC) -> StreamingDetector:
    path = tmp_path / "t.toml"
    path.write_text(text)
    (spec,) = parse_spec_file(path)
    envs, _, _ = load_environments(make_settings(tmp_path, "sqlite:///" + str(tmp_path / "db.sqlite")))
    return StreamingDetector(
        spec, compile_features({**spec.text}, envs["review"], "t", text_names=frozenset(spec.text))
    )


def test_a_classifier_that_has_seen_one_outcome_has_no_opinion(tmp_path: Path) -> None:
    det = text_detector(tmp_path)
    fake, genuine = {"text": "best luxury stay ever"}, {"text": "the room was small and clean"}
    assert det.score_one(fake) == (0.5, 0.5)
    for i in range(5):  # genuine reviews only: naive Bayes alone would call every text genuine for certain
        det.learn_label(genuine, False, i + 1)
    assert det.score_one(fake) == (0.5, 0.5)
    det.learn_label(fake, True, 6)
    raw, score = det.score_one(fake)
    assert raw > 0.5 and score > 0.5
    assert det.score_one(genuine)[0] < 0.5


def test_platt_scaling_tames_an_overconfident_probability() -> None:
    from risk_engine.detectors.calibration import PlattScaling

    rng = random.Random(3)
    platt = PlattScaling()
    # a classifier that says 0.999 or 0.001 and is right only 70% of the time
    for _ in range(5000):
        truth = rng.random() < 0.5
        said = truth if rng.random() < 0.7 else not truth
        platt.learn(0.999 if said else 0.001, truth)
    assert platt.transform(0.999) == pytest.approx(0.7, abs=0.05)
    assert platt.transform(0.001) == pytest.approx(0.3, abs=0.05)
    assert platt.transform(0.5) == pytest.approx(0.5, abs=0.05)  # symmetric errors: no shift


def test_the_platt_scaling_is_learned_before_the_label_and_survives_a_snapshot(tmp_path: Path) -> None:
    det = text_detector(tmp_path)
    rng = random.Random(5)
    words = ["luxury", "husband", "amazing", "room", "floor", "street", "small", "clean", "best", "ever"]
    for i in range(200):
        fake = i % 2 == 0
        pool = words[:5] if fake else words[5:]
        x = {"text": " ".join(rng.choice(pool if rng.random() < 0.6 else words) for _ in range(8))}
        det.learn_label(x, fake, i + 1)
    assert det.platt is not None and det.platt.labels_seen == 198  # from the third label on: both outcomes known
    assert det.platt.a != 1.0
    path = tmp_path / "snap"
    write_snapshot(path, det.state(), b"k" * 32)
    restored = text_detector(tmp_path)
    assert restored.restore(read_snapshot(path, b"k" * 32))
    probe = {"text": "luxury husband amazing street"}
    assert restored.score_one(probe) == det.score_one(probe)
    assert restored.frauds_seen == 100


def test_platt_calibration_is_for_supervised_detectors_only(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text(SPEC.replace("warmup = 5", 'warmup = 5\ncalibration = "platt"'))
    with pytest.raises(SpecError, match='calibration = "platt" is the one choice, for supervised detectors'):
        parse_spec_file(path)
    path.write_text(TEXT_SPEC.replace('"platt"', '"isotonic"'))
    with pytest.raises(SpecError, match="is the one choice"):
        parse_spec_file(path)


def test_a_per_key_detector_keeps_the_most_recently_seen_keys_only(tmp_path: Path) -> None:
    det = detector(tmp_path, SPEC.replace("warmup = 5", 'warmup = 5\nper = "seller_id"\nper_max_keys = 2'))
    x = {"amount": 10.0, "items": 1.0}

    def see(key: str, times: int = 1) -> None:
        for i in range(times):
            det.select(key)
            raw, _ = det.score_one(x)
            det.learn_one(x, raw, i)

    see("a", 3)
    see("b")
    see("a")  # a is now the most recent
    see("c")  # b goes
    assert list(det.models) == ["a", "c"]
    det.select("b")
    assert list(det.models) == ["c", "b"] and det.models["b"] is det.model  # a fresh model for b; a went
    path = tmp_path / "d.toml"
    path.write_text(SPEC.replace("warmup = 5", "warmup = 5\nper_max_keys = 2"))
    with pytest.raises(SpecError, match="per_max_keys is a positive count, for a 'per' detector"):
        parse_spec_file(path)


PER_KEY_SPEC = SPEC.replace("warmup = 5", 'warmup = 5\nper = "seller_id"\nper_max_keys = 3')


def _see(det: StreamingDetector, rng: random.Random, key: str, times: int = 1) -> None:
    for _ in range(times):
        x = {"amount": rng.uniform(1, 100), "items": float(rng.randint(1, 4))}
        det.select(key)
        raw, _ = det.score_one(x)
        det.learn_one(x, raw, det.last_seq + 1)


def _pickled_now(det: StreamingDetector) -> dict[str, bytes]:
    return {key: pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL) for key, model in det.models.items()}


def _per_key_view(det: StreamingDetector) -> dict[str, Any]:
    """What a snapshot of ``det`` now holds of its models (the snapshot writer's part included), copied."""
    view = det.state()["per_key"].apply()
    return {"order": list(view["order"]), "pickled": dict(view["pickled"])}


def test_a_per_key_detectors_snapshot_pickles_only_the_keys_changed_since_the_last_and_restores_exactly(
    tmp_path: Path,
) -> None:
    """A full pickle of 100,000 keys' models took 0.3 s under the state lock; each key's model is now pickled
    once per change, and the snapshot's state carries only the changes, made to the last snapshot's keys off
    the lock (``apply``)."""
    det = detector(tmp_path, PER_KEY_SPEC)
    rng = random.Random(3)
    for key in ("a", "b", "c"):
        _see(det, rng, key, 20)
    first = _per_key_view(det)
    assert first["order"] == ["a", "b", "c"] and set(first["pickled"]) == {"a", "b", "c"}
    _see(det, rng, "b", 5)
    changes = det.state()["per_key"]
    assert set(changes.changed) == {"b"}  # only the key that learned is pickled again, under the lock
    second = changes.apply()
    assert second["order"] == ["a", "c", "b"]
    assert second["pickled"]["a"] is first["pickled"]["a"] and second["pickled"]["c"] is first["pickled"]["c"]
    assert second["pickled"]["b"] != first["pickled"]["b"]
    _see(det, rng, "d", 2)  # a, the least recently seen, goes
    third = det.state()
    third["per_key"] = third["per_key"].apply()
    assert third["per_key"]["order"] == ["c", "b", "d"] and set(third["per_key"]["pickled"]) == {"b", "c", "d"}

    path = tmp_path / "per.snapshot"
    write_snapshot(path, third, b"k" * 32)  # the state as a snapshot holds it
    restored = detector(tmp_path, PER_KEY_SPEC)
    loaded = read_snapshot(path, b"k" * 32)
    assert restored.restore(loaded)
    probe = {"amount": 55.0, "items": 2.0}
    for key in ("c", "b", "d"):
        for one in (det, restored):
            one.select(key)
        assert restored.score_one(probe) == det.score_one(probe), key
    assert list(restored.models) == list(det.models)
    _see(restored, rng, "c")  # the restored detector's bytes are reused until their key changes
    again = restored.state()["per_key"].apply()["pickled"]
    assert again["b"] is loaded["per_key"]["pickled"]["b"] and again["c"] != loaded["per_key"]["pickled"]["c"]


def test_per_key_changes_a_snapshot_never_wrote_go_with_the_next_one(tmp_path: Path) -> None:
    """A snapshot that failed before its write (its changes never applied) loses nothing: the next one takes
    its changes over, and applying the first afterwards does nothing."""
    det = detector(tmp_path, PER_KEY_SPEC)
    rng = random.Random(5)
    for key in ("a", "b"):
        _see(det, rng, key, 10)
    _per_key_view(det)
    _see(det, rng, "c", 3)
    _see(det, rng, "a")
    lost = det.state()["per_key"]  # never applied
    _see(det, rng, "d")  # b goes
    view = _per_key_view(det)
    assert lost.apply() is None
    assert view["order"] == list(det.models) == ["c", "a", "d"]
    assert view["pickled"] == _pickled_now(det)


def test_while_serving_a_per_key_model_is_pickled_as_it_learns_not_under_the_snapshots_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5,000 reviewers' models pickled under the state lock took 25 ms; while serving, each is pickled as it
    learns, and a snapshot pickles only a key that was seen and never learned."""
    import risk_engine.detectors.streaming as streaming

    det = detector(tmp_path, PER_KEY_SPEC)
    det.pickle_on_learn = True
    rng = random.Random(7)
    for key in ("a", "b", "c"):
        _see(det, rng, key, 4)
    det.select("d")  # seen (a, the oldest, goes), never learned
    pickled: list[object] = []
    real_dumps = pickle.dumps
    monkeypatch.setattr(streaming.pickle, "dumps", lambda obj, **kw: pickled.append(obj) or real_dumps(obj, **kw))
    changes = det.state()["per_key"]
    assert pickled == [det.models["d"]]  # under the lock: only the key that never learned
    monkeypatch.undo()
    view = changes.apply()
    assert view["order"] == ["b", "c", "d"] and view["pickled"] == _pickled_now(det)


@settings(max_examples=60, deadline=None)
@given(
    st.booleans(),
    st.lists(
        st.one_of(
            st.tuples(st.just("see"), st.sampled_from("abcdef"), st.integers(1, 3)),
            st.tuples(st.just("snapshot"), st.booleans(), st.just(0)),
        ),
        max_size=40,
    ),
)
def test_a_per_key_snapshot_always_holds_every_kept_model_as_it_is_in_recency_order(
    pickle_on_learn: bool, steps: list[tuple[str, Any, int]]
) -> None:
    """Whatever keys come, go (a cap of 3) and come back, and whichever snapshots are applied or lost, the next
    applied snapshot holds exactly the detector's models, each as it is now, least recently seen first, whether
    the models are pickled as they learn (serving) or at the snapshot (a start's rebuild)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        det = detector(Path(tmp), PER_KEY_SPEC)
    det.pickle_on_learn = pickle_on_learn
    rng = random.Random(11)
    for action, arg, times in steps:
        if action == "see":
            _see(det, rng, arg, times)
        else:
            changes = det.state()["per_key"]
            if arg:  # written; else the snapshot failed before its write
                changes.apply()
    view = _per_key_view(det)
    assert view["order"] == list(det.models)
    assert view["pickled"] == _pickled_now(det)
