"""The command line, run as a user would run it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from risk_engine.config import Settings
from risk_engine.engine import RiskEngine
from risk_engine.policies import PolicyWorkflow
from tests.conftest import REPO, run_cli
from tests.helpers import writes_blocked

run = run_cli


def test_rules_check_reports_ok_with_a_rule_count(tmp_path: Path) -> None:
    result = run("rules", "check", "rules/payment.rules", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rules/payment.rules: ok (31 rules, subject payment)" in result.stdout


def test_rules_check_knows_the_detectors_without_loading_river_or_pyod(tmp_path: Path) -> None:
    """Checking a policy needs the detectors' names, not their libraries (seconds of imports); a policy that
    names an unknown detector is still refused."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from risk_engine.config import Settings\n"
        "from risk_engine.engine import load_environments\n"
        f"envs, models, _ = load_environments(Settings(home=Path({str(tmp_path)!r}), rules_dir=Path('rules'), "
        "models_dir=Path('models')), check_estimators=False)\n"
        "heavy = ('river.anomaly', 'river.forest', 'pyod', 'scipy.stats')  # river.base, the protocol, is light\n"
        "print(sorted(envs['payment'].models), sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['payment_anomaly', 'payment_fraud'] []"
    unknown = tmp_path / "unknown.rules"
    unknown.write_text('subject payment\nrule a { when model("payment_anomal") > 0.9 then block }\n')
    result = run("rules", "check", str(unknown), home=tmp_path)
    assert result.returncode == 1
    assert "payment_anomal" in result.stdout and "payment_anomaly" in result.stdout


def test_rules_check_prints_every_error_with_its_position(tmp_path: Path) -> None:
    bad = tmp_path / "bad.rules"
    bad.write_text('subject payment\nrule a {\n  when buyer.acount_age < 7d and channel = "app"\n  then block\n}\n')
    result = run("rules", "check", str(bad), home=tmp_path)
    assert result.returncode == 1
    assert f"{bad}:3:42: unexpected character '=' (use '==' to compare)" in result.stdout
    typed = tmp_path / "typed.rules"
    typed.write_text('subject payment\nrule a { when buyer.acount_age < 7d and amount.value > "5" then block }\n')
    result = run("rules", "check", str(typed), home=tmp_path)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert lines == [
        f"{typed}:2:15: unknown field 'buyer.acount_age' for subject payment (did you mean 'buyer.account_age'?)",
        f"{typed}:2:54: cannot compare a number with a string (quote both sides or neither)",
    ]


def test_a_policy_or_config_file_that_does_not_load_is_an_error_line_at_start_up(tmp_path: Path) -> None:
    rules, models = tmp_path / "rules", tmp_path / "models"
    shutil.copytree(REPO / "rules", rules)
    shutil.copytree(REPO / "models", models)
    env = {"RISK_ENGINE_RULES_DIR": str(rules), "RISK_ENGINE_MODELS_DIR": str(models)}
    good_policy = (rules / "payment.rules").read_text()
    broken = {
        rules / "payment.rules": (
            good_policy.replace("buyer.account_age < 1d", "buyer.acount_age < 1d", 1).encode(),
            "(did you mean 'buyer.account_age'?)",
        ),
        rules / "lists.toml": (b"[blocked_devices\n", f"error: {rules / 'lists.toml'}: "),
        models / "payment.toml": (
            (models / "payment.toml").read_bytes() + b"x = '\xe9'\n",
            f"error: {models / 'payment.toml'}: 'utf-8' codec can't decode byte 0xe9",
        ),
    }
    for path, (content, expected) in broken.items():
        original = path.read_bytes()
        path.write_bytes(content)
        try:
            result = run_cli("serve", "--port", "1", home=tmp_path / "var", env=env, timeout=120)
        finally:
            path.write_bytes(original)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert expected in result.stderr, result.stderr
        lines = result.stderr.strip().splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("error: "))
        assert all(line.startswith("error: ") for line in lines[first:]), result.stderr  # nothing after but errors


def test_keys_create_prints_the_key_alone_on_the_last_line(tmp_path: Path) -> None:
    result = run("keys", "create", "--role", "scorer", home=tmp_path)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("rk_") and " " not in key
    engine = RiskEngine.open(Settings(home=tmp_path, rules_dir=REPO / "rules", models_dir=REPO / "models"))
    try:
        principal = engine.authenticate(key)
        assert principal is not None and principal.role == "scorer"
        assert engine.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        from risk_engine.policies import PolicyWorkflow

        created = [e for e in PolicyWorkflow(engine).audit() if e["action"] == "key.create"]
        assert [(e["actor"], e["after"], e["target"].startswith("key:")) for e in created] == [
            ("cli", {"role": "scorer", "name": "cli"}, True)
        ]
    finally:
        engine.close()
    assert run("keys", "create", "--role", "root", home=tmp_path).returncode == 2


def test_keys_list_and_revoke(tmp_path: Path) -> None:
    key = run("keys", "create", "--role", "analyst", "--name", "ops", home=tmp_path).stdout.strip().splitlines()[-1]
    key_id = key.split("_")[1]
    listed = run("keys", "list", home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    keys = json.loads(listed.stdout.strip().splitlines()[-1])
    assert [(k["key_id"], k["role"], k["name"], k["revoked_at"]) for k in keys] == [(key_id, "analyst", "ops", None)]
    assert key.split("_", 2)[2] not in listed.stdout

    revoked = run("keys", "revoke", key, home=tmp_path)  # the whole key pasted: its id is taken from it
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked {key_id}" in revoked.stdout
    after = json.loads(run("keys", "list", home=tmp_path).stdout.strip().splitlines()[-1])
    assert after[0]["revoked_at"] is not None
    assert json.loads(run("keys", "list", "--active", home=tmp_path).stdout.strip().splitlines()[-1]) == []
    unknown = run("keys", "revoke", "000000000000", home=tmp_path)
    assert unknown.returncode == 1 and "no API key 000000000000" in unknown.stderr
    engine = RiskEngine.open(Settings(home=tmp_path, rules_dir=REPO / "rules", models_dir=REPO / "models"))
    try:
        assert engine.authenticate(key) is None
    finally:
        engine.close()


def test_lists_add_show_and_remove_without_opening_an_engine(tmp_path: Path) -> None:
    added = run("lists", "add", "blocked_emails", "Bad.Actor@Example.com", "--note", "incident 42", home=tmp_path)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout.strip().splitlines()[-1])["entry"] == "B****@Example.com"
    assert not (tmp_path / "snapshots").exists()  # no engine ran: none rebuilt its state or wrote it at close
    shown = run("lists", "show", "blocked_emails", home=tmp_path)
    entries = json.loads(shown.stdout.strip().splitlines()[-1])
    assert [(e["entry"], e["added_by"], e["note"]) for e in entries] == [("B****@Example.com", "cli", "incident 42")]
    assert "Bad.Actor" not in shown.stdout and "bad.actor" not in shown.stdout
    # an engine matches the entry the command line stored (the same blind index, case-folded)
    engine = RiskEngine.open(Settings(home=tmp_path, rules_dir=REPO / "rules", models_dir=REPO / "models"))
    try:
        assert len(engine.lists.sets["blocked_emails"]) == 1
        assert engine.remove_list_entry("blocked_emails", "bad.actor@example.com", "test") is True
        engine.add_list_entry("blocked_emails", "bad.actor@example.com", "test")
    finally:
        engine.close()
    removed = run("lists", "remove", "blocked_emails", "BAD.ACTOR@example.com", home=tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(run("lists", "show", "blocked_emails", home=tmp_path).stdout.strip().splitlines()[-1]) == []
    again = run("lists", "remove", "blocked_emails", "bad.actor@example.com", home=tmp_path)
    assert again.returncode == 1 and "not on blocked_emails" in again.stderr
    for args, message in (
        (("add", "no_such_list", "x"), "no list no_such_list; lists: blocked_cards"),
        (("add", "blocked_ips", "300.1.1.1"), "value: not an IPv4 or IPv6 address"),
        (("add", "blocked_devices", "d", "--expires", "2300-01-01"), "expires_at: Input should be less than"),
    ):  # the API's own checks (tested there), as the command reports them
        result = run("lists", *args, home=tmp_path)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    elsewhere = run_cli("lists", "add", "blocked_devices", "d", home=tmp_path, cwd=tmp_path)  # no rules/ here
    assert elsewhere.returncode == 1
    assert f"no list blocked_devices; no list is declared in rules{os.sep}lists.toml" in elsewhere.stderr


def test_models_check_names_each_detector(tmp_path: Path) -> None:
    result = run("models", "check", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "payment_anomaly ok (anomaly GaussianZScore, 30 features, weight 0.25)" in result.stdout
    assert "payment_fraud ok (supervised RefittedLogisticRegression, 29 features, weight 1)" in result.stdout
    assert "account_population ok (population ECOD, 45 features" in result.stdout
    expected = "[combine.payment] ok (up to 60 points above a model score of 0; anomaly ranks as evidence at a base"
    assert f"{expected} rate of 0.002)" in result.stdout
    assert "[combine.review] ok (up to 50 points above a model score of 0)\n" in result.stdout


def test_a_set_up_failure_is_one_line_without_the_password_and_exit_status_1(tmp_path: Path) -> None:
    unreachable = {"RISK_ENGINE_DATABASE_URL": "postgresql+psycopg://ops:s3cret-pw@127.0.0.1:1/risk"}
    # serve fails before it binds, with one worker or several
    for command in (("migrate",), ("serve", "--port", "1"), ("serve", "--port", "1", "--workers", "2")):
        result = run_cli(*command, home=tmp_path / "var", env=unreachable, timeout=120)
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors and errors[-1].startswith("error: cannot reach the database:"), result.stderr
        assert "Traceback" not in result.stderr and "s3cret-pw" not in result.stderr + result.stdout
    bad_setting = run_cli("migrate", home=tmp_path / "var", env={"RISK_ENGINE_POLICY_POLL_S": "often"})
    assert bad_setting.returncode == 1
    assert "error: settings (RISK_ENGINE_*): policy_poll_s:" in bad_setting.stderr
    traced = run_cli("migrate", home=tmp_path / "var", env={**unreachable, "RISK_ENGINE_TRACEBACK": "1"}, timeout=120)
    assert traced.returncode != 0 and "OperationalError" in traced.stderr


def test_a_command_waiting_for_another_clients_lock_says_the_database_is_busy(
    tmp_path: Path, database_url: str
) -> None:
    """A lock held elsewhere for longer than the busy timeout is a busy database, not an unreachable one: one line
    saying so, exit status 1, nothing stored; the same command works once the lock is gone."""
    env = {"RISK_ENGINE_DATABASE_URL": database_url, "RISK_ENGINE_DB_BUSY_TIMEOUT_S": "0.5"}
    assert run("migrate", home=tmp_path / "var", env=env).returncode == 0
    with writes_blocked(database_url, "list_entries"):
        result = run("lists", "add", "blocked_devices", "dev_busy", home=tmp_path / "var", env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors and errors[-1].startswith("error: the database is busy: another client held a lock"), errors
    shown = run("lists", "show", "blocked_devices", home=tmp_path / "var", env=env)
    assert json.loads(shown.stdout.strip().splitlines()[-1]) == []
    added = run("lists", "add", "blocked_devices", "dev_busy", home=tmp_path / "var", env=env)
    assert added.returncode == 0, added.stderr


def test_serve_refuses_a_port_that_cannot_be_bound_before_opening_anything(tmp_path: Path) -> None:
    result = run_cli("serve", "--port", "99999", home=tmp_path / "var", timeout=60)
    assert result.returncode == 2 and "--port" in result.stderr  # it used to start, "running on :99999"
    assert not (tmp_path / "var").exists()  # no database, key files or admin key made for nothing


def test_lists_import_checks_every_line_first_then_imports_and_is_idempotent(tmp_path: Path) -> None:
    feed = tmp_path / "feed.txt"
    feed.write_text("# compromised IPs, feed of 2026-12-07\n203.0.113.7\n\n198.51.100.300\n2001:DB8::1\nnot-an-ip\n")
    refused = run("lists", "import", "blocked_ips", str(feed), home=tmp_path)
    assert refused.returncode == 1
    assert f"{feed}:4: not an IPv4 or IPv6 address" in refused.stderr
    assert f"{feed}:6: not an IPv4 or IPv6 address" in refused.stderr
    assert "2 lines refused; nothing was imported" in refused.stderr
    shown = run("lists", "show", "blocked_ips", home=tmp_path)
    assert json.loads(shown.stdout.strip().splitlines()[-1]) == []

    feed.write_text("203.0.113.7\n2001:DB8::1\n2001:db8::1\n203.0.113.7\n203.0.113.9\n")  # the same IP written twice
    done = run("lists", "import", "blocked_ips", str(feed), "--note", "feed 2026-12-07", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "list": "blocked_ips",
        "added": 3,
        "updated": 0,
        "unchanged": 0,
    }
    again = run("lists", "import", "blocked_ips", str(feed), home=tmp_path)  # no note stated: nothing to restate
    assert json.loads(again.stdout.strip().splitlines()[-1])["unchanged"] == 3
    later = run("lists", "import", "blocked_ips", str(feed), "--expires", "2199-01-01", home=tmp_path)
    assert json.loads(later.stdout.strip().splitlines()[-1])["updated"] == 3
    entries = json.loads(run("lists", "show", "blocked_ips", home=tmp_path).stdout.strip().splitlines()[-1])
    assert len(entries) == 3 and {e["note"] for e in entries} == {"feed 2026-12-07"}
    assert {e["expires_at"] for e in entries} == {"2199-01-01T00:00:00+00:00"}
    assert "203.0.113.7" not in json.dumps(entries)  # PII lists show masked values only
    engine = RiskEngine.open(Settings(home=tmp_path, rules_dir=REPO / "rules", models_dir=REPO / "models"))
    try:
        assert engine.lists.counts()["blocked_ips"] == 3
        audit = PolicyWorkflow(engine).audit(10, action="list.")
        assert [(e["action"], e["after"]["added"], e["after"]["updated"]) for e in audit] == [
            ("list.import", 0, 3),
            ("list.import", 3, 0),
        ]  # the import that changed nothing left no entry
    finally:
        engine.close()
