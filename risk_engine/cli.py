"""The ``risk-engine`` command line."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from risk_engine.config import Settings, configure_logging

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from risk_engine.engine import RiskEngine
    from risk_engine.features.lists import ListDecl
    from risk_engine.vault import Vault

app = typer.Typer(
    help="risk-engine: trust, risk and fraud control for marketplaces.", no_args_is_help=True, add_completion=False
)
rules_app = typer.Typer(help="Policies in the rules language.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
lists_app = typer.Typer(help="Named lists.", no_args_is_help=True)
models_app = typer.Typer(help="Detectors.", no_args_is_help=True)
merchants_app = typer.Typer(help="Merchants: daily roll-ups and their population detectors.", no_args_is_help=True)
vault_app = typer.Typer(help="The PII vault's keys.", no_args_is_help=True)
pii_app = typer.Typer(help="Stored PII: retention.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
app.add_typer(keys_app, name="keys")
app.add_typer(lists_app, name="lists")
app.add_typer(models_app, name="models")
app.add_typer(merchants_app, name="merchants")
app.add_typer(vault_app, name="vault")
app.add_typer(pii_app, name="pii")


T = TypeVar("T")


WORKER_HEALTHCHECK_S = 60


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind (0: any free one).", min=0, max=65535)] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log each request line (paths only, never bodies).")] = True,
    workers: Annotated[
        int,
        typer.Option(
            help="Worker processes on the one port, each a whole engine sharing the database (README: Several "
            "workers). A worker that dies is replaced; SIGHUP replaces them one by one.",
            min=1,
            max=256,
        ),
    ] = 1,
) -> None:
    """Migrate the database and serve the API."""
    import uvicorn

    configure_logging()
    if workers > 1:
        _open_and_close_apart()
        uvicorn.run(
            "risk_engine.service.app:worker_app",
            factory=True,
            workers=workers,
            host=host,
            port=port,
            log_level=log_level,
            access_log=access_log,
            # how long a worker may take to answer the supervisor, and a new one (SIGHUP) to start serving, before
            # it is replaced (the old one kept): a start restores and replays state, which takes longer than
            # uvicorn's 5 s on a large deployment
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
        )
        return
    from risk_engine.engine import RiskEngine
    from risk_engine.service import create_app

    # opened here rather than in the app's start-up, where uvicorn would print a set-up failure as a traceback;
    # closed by the app's shutdown: after a SIGTERM uvicorn raises the signal again once it has shut down, and the
    # process ends there, so the ``finally`` below only covers a server that never started
    engine = RiskEngine.open(Settings())
    app_ = create_app(engine=engine, close_engine=True)
    try:
        uvicorn.run(app_, host=host, port=port, log_level=log_level, access_log=access_log)
    finally:
        engine.close()


def _open_and_close_apart() -> None:
    """Open the engine once and close it, in a process of its own, before ``serve --workers`` starts any: a
    set-up failure is printed as for one worker (and exits 1), the workers start from the state it writes on
    closing instead of each rebuilding it, and the supervisor, which only watches them, keeps none of its memory."""
    import multiprocessing

    check = multiprocessing.get_context("spawn").Process(target=_open_and_close, name="risk-engine-start")
    check.start()
    check.join()
    if check.exitcode != 0:
        raise typer.Exit(1)


def _open_and_close() -> None:
    from risk_engine.engine import RiskEngine

    configure_logging()
    _as_operator_errors(lambda: RiskEngine.open(Settings()).close())


@app.command()
def migrate() -> None:
    """Bring the database schema up to date."""
    configure_logging()
    _migrated_database(Settings()).dispose()
    typer.echo("ok: schema up to date")


def _migrated_database(settings: Settings) -> Engine:
    """The database of ``settings``, its schema brought up to date (no engine state is loaded)."""
    from risk_engine.storage.db import make_engine
    from risk_engine.storage.db import migrate as run_migrations

    settings.home.mkdir(parents=True, exist_ok=True)
    db = make_engine(settings.resolved_database_url, settings.db_busy_timeout_s)
    try:
        run_migrations(db)
    except BaseException:
        db.dispose()
        raise
    return db


@app.command()
def openapi() -> None:
    """Print the OpenAPI document generated from the app."""
    from risk_engine.service import create_app

    typer.echo(json.dumps(create_app(Settings()).openapi(), indent=2, sort_keys=True))


@rules_app.command("check")
def rules_check(files: Annotated[list[Path], typer.Argument(help="Policy files to check.")]) -> None:
    """Parse and type-check policy files: print every error with line:column, or ok with a rule count."""
    from risk_engine.dsl import DslErrors, compile_policy, read_policy_file
    from risk_engine.engine import load_environments

    envs, _, _ = load_environments(Settings(), check_estimators=False)  # `models check` checks the detectors
    failed = False
    for path in files:
        try:
            policy = compile_policy(read_policy_file(path), envs, str(path))
        except DslErrors as exc:
            failed = True
            for error in exc.errors:
                typer.echo(f"{path}:{error}", err=False)
        except OSError as exc:
            failed = True
            typer.echo(f"{path}: {exc.strerror}")
        else:
            typer.echo(f"{path}: ok ({len(policy.rules)} rules, subject {policy.subject})")
    raise typer.Exit(1 if failed else 0)


def _on_policy_file(file: Path, work: Callable[[RiskEngine, str, str], T]) -> tuple[str, T]:
    """Read and check a policy file, then ``work(engine, subject, text)`` on an engine opened for it; a DSL
    error (line:column) or a missing event ends the command with status 1."""
    from risk_engine.dsl import DslErrors, compile_policy, read_policy_file
    from risk_engine.engine import RiskEngine
    from risk_engine.errors import NotFound

    try:  # before opening the engine, which rebuilds its state from the stored history
        text = read_policy_file(file)
    except DslErrors as exc:
        for error in exc.errors:
            typer.echo(f"{file}:{error}")
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(f"{file}: {exc.strerror}")
        raise typer.Exit(1) from None
    engine = RiskEngine.open(Settings(policy_poll_s=0))
    try:
        subject = compile_policy(text, engine.environments, str(file)).subject
        return subject, work(engine, subject, text)
    except DslErrors as exc:
        for error in exc.errors:
            typer.echo(f"{file}:{error}")
        raise typer.Exit(1) from None
    except NotFound as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.close()


@rules_app.command("backtest")
def rules_backtest(
    file: Annotated[Path, typer.Argument(help="The draft policy to replay.")],
    since: Annotated[str, typer.Option(help="How far back from the latest stored event (30d, 12h, ...).")] = "30d",
) -> None:
    """Replay stored events through FILE and the published policy; print the comparison, then one JSON line."""
    from risk_engine.dsl.parser import parse_duration
    from risk_engine.policies import PolicyWorkflow

    configure_logging(logging.WARNING)
    try:
        since_s = parse_duration(since)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    subject, report = _on_policy_file(
        file, lambda engine, subject, text: PolicyWorkflow(engine).backtest(subject, text, str(file), since_s)
    )
    d, p = report.draft, report.published
    typer.echo(
        f"{report.events} {subject} events ({report.labelled} labelled, {report.fraud} fraud), "
        f"{report.events_per_s:.0f} events/s"
    )
    typer.echo(f"  {'decisions':22s} {p.label}: {p.decisions}   {d.label}: {d.decisions}")
    typer.echo(f"  changed {report.changed}: {report.transitions}")
    for transition, count in report.transitions.items():
        latest = ", ".join(e["event_id"] for e in report.examples[transition])
        typer.echo(
            f"    {transition:18s} {count} ({report.transition_fraud[transition]} labelled fraud), latest: {latest}"
        )
    for name, q_p, q_d in (("block", p.block, d.block), ("block or review", p.block_or_review, d.block_or_review)):
        typer.echo(
            f"  {name:22s} precision {q_p.precision} -> {q_d.precision}   recall {q_p.recall} -> "
            f"{q_d.recall}   FPR {q_p.false_positive_rate} -> {q_d.false_positive_rate}"
        )
    typer.echo(json.dumps(report.as_dict()))


@rules_app.command("evaluate")
def rules_evaluate(
    file: Annotated[Path, typer.Argument(help="The policy (a draft) to try.")],
    event_id: Annotated[str, typer.Argument(help="A stored event of the policy's subject (a payment id, ...).")],
) -> None:
    """What FILE would have decided on one stored event, with the windows it saw, beside the live decision;
    then one JSON line."""
    from risk_engine.policies import PolicyWorkflow

    configure_logging(logging.WARNING)
    subject, answer = _on_policy_file(
        file, lambda engine, subject, text: PolicyWorkflow(engine).evaluate_stored(subject, text, str(file), event_id)
    )
    live = answer["live"]
    typer.echo(f"{subject} {event_id} (label: {answer['label'] or 'none'})")
    typer.echo(f"  live  {live['policy_version']}: {live['decision']} {live['score']}  {', '.join(live['rule_codes'])}")
    codes = ", ".join(r["code"] for r in answer["reasons"])
    typer.echo(f"  {file.name}: {answer['decision']} {answer['score']}  {codes}")
    if answer["rebuilt_aggregates"]:
        typer.echo(f"  rebuilt from stored events: {', '.join(answer['rebuilt_aggregates'])}")
    typer.echo(json.dumps(answer))


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="scorer, analyst or admin.")] = "scorer",
    name: Annotated[str, typer.Option(help="What the key is for.")] = "cli",
) -> None:
    """Create an API key. The key alone is printed on the last line; only its hash is stored."""
    from risk_engine.api_keys import ROLES, create_api_key

    if role not in ROLES:
        typer.echo(f"role must be one of {', '.join(ROLES)}", err=True)
        raise typer.Exit(2)
    configure_logging(logging.WARNING)
    db = _migrated_database(Settings())  # the database only: no velocity or detector rebuild from history
    try:
        key, _ = create_api_key(db, role, name, actor="cli")
    finally:
        db.dispose()
    typer.echo(f"created a {role} key named {name!r}; store it now, it is not shown again:")
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    active: Annotated[bool, typer.Option("--active", help="Only keys that are not revoked.")] = False,
) -> None:
    """List API keys: id, role, name, created, revoked (never a secret). A JSON array on the last line."""
    from risk_engine.api_keys import list_api_keys

    configure_logging(logging.WARNING)
    db = _migrated_database(Settings())
    try:
        keys = list_api_keys(db, include_revoked=not active)
    finally:
        db.dispose()
    for k in keys:
        state = f"revoked {k['revoked_at']}" if k["revoked_at"] else "live"
        typer.echo(f"{k['key_id']}  {k['role']:8s} {k['name']!r:24s} created {k['created_at']}  {state}")
    typer.echo(json.dumps(keys))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id: rk_<id>_... or as `keys list` shows.")],
) -> None:
    """Revoke an API key (audited). Running services refuse it within a few seconds."""
    from risk_engine.api_keys import KEY_CACHE_S, revoke_api_key
    from risk_engine.errors import NotFound

    configure_logging(logging.WARNING)
    if key_id.startswith("rk_"):  # a whole key was pasted: its id is the part after rk_
        key_id = key_id.split("_", 2)[1]
    db = _migrated_database(Settings())
    try:
        view = revoke_api_key(db, key_id, actor="cli")
    except NotFound as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    typer.echo(
        f"revoked {view['key_id']} ({view['role']}, {view['name']!r}) at {view['revoked_at']}; "
        f"running services refuse it within {KEY_CACHE_S:g} s"
    )


@pii_app.command("expire")
def pii_expire(
    older_than_days: Annotated[
        int | None,
        typer.Option(min=1, max=36_500, help="Retention in days (default: RISK_ENGINE_PII_RETENTION_DAYS)."),
    ] = None,
) -> None:
    """Drop the sealed PII of every stored event dated more than the retention period ago, without opening an
    engine (audited as pii.expire, counts only). Records keep their blind indexes: decisions, velocity, lists
    and backtests are unchanged; the events show pii_expired. Prints the counts, JSON last."""
    from datetime import UTC, timedelta

    from risk_engine.storage.erasure import expire
    from risk_engine.subjects import SUBJECT_KINDS

    configure_logging(logging.WARNING)
    settings = Settings()
    days = older_than_days if older_than_days is not None else settings.pii_retention_days
    if days is None:
        typer.echo("no retention period: give --older-than-days or set RISK_ENGINE_PII_RETENTION_DAYS", err=True)
        raise typer.Exit(1)
    before = datetime.now(UTC) - timedelta(days=days)
    db = _migrated_database(settings)
    try:
        expired = expire(db, SUBJECT_KINDS, before, "cli")
    finally:
        db.dispose()
    typer.echo(f"dropped the PII of {sum(expired.values())} events dated before {before.isoformat()}")
    typer.echo(json.dumps({"before": before.isoformat(), "events": sum(expired.values()), "by_subject": expired}))


def _rotation_key(given: bytes | None, pending_file: Path, variable: str) -> bytes:
    """The new key of a rotation of an embedded key file: the one an interrupted rotation left in
    ``pending_file``, else ``given`` (from ``variable``), else a new one, kept in ``pending_file`` until done."""
    from risk_engine.vault import KEY_BYTES, VaultKeyError, write_key_file

    wanted = given if given is not None else secrets.token_bytes(KEY_BYTES)
    new = write_key_file(pending_file, wanted, pending_file.name)
    if given is not None and new != given:
        raise VaultKeyError(
            f"an interrupted rotation's key is in {pending_file}: run this again without {variable} to finish it first"
        )
    return new


@vault_app.command("rotate-master-key")
def vault_rotate_master_key() -> None:
    """Re-wrap every stored data key under a new master key (audited); no PII is re-encrypted. Then restart
    every worker: one still holding the old key cannot open data keys made after the rotation.

    With RISK_ENGINE_MASTER_KEY set, the new key is RISK_ENGINE_NEW_MASTER_KEY; afterwards make it every
    worker's RISK_ENGINE_MASTER_KEY. With the key file of the embedded default ($RISK_ENGINE_HOME/master.key),
    a new key is generated (or RISK_ENGINE_NEW_MASTER_KEY taken), kept in master.key.next until the data keys
    are re-wrapped, then moved over master.key. Interrupted, it finishes when run again.
    """
    from risk_engine.storage.data_keys import rotate_master_key
    from risk_engine.vault import VaultKeyError, decode_key

    configure_logging(logging.WARNING)
    settings = Settings()
    given_new = decode_key(settings.new_master_key, "new_master_key") if settings.new_master_key else None
    key_file = settings.home / "master.key"
    pending_file = settings.home / "master.key.next"
    if settings.master_key:
        old = decode_key(settings.master_key, "master_key")
        if given_new is None:
            raise VaultKeyError(
                "set RISK_ENGINE_NEW_MASTER_KEY to the new master key (base64 of 32 bytes, from your secret store)"
            )
        new = given_new
    else:
        if not key_file.exists():
            raise VaultKeyError(f"no master key: RISK_ENGINE_MASTER_KEY is unset and {key_file} does not exist")
        old = decode_key(key_file.read_text(), "master_key")
        if given_new == old:
            raise VaultKeyError("the new master key is the current one")
        # the key of a rotation that was interrupted wins: data keys may be wrapped under it already
        new = _rotation_key(given_new, pending_file, "RISK_ENGINE_NEW_MASTER_KEY")
    db = _migrated_database(settings)
    try:
        done = rotate_master_key(db, old, new, actor="cli")
    finally:
        db.dispose()
    if not settings.master_key:
        os.replace(pending_file, key_file)  # mode 0600, as written
        where = f"{key_file} holds the new master key"
    else:
        where = "now make RISK_ENGINE_NEW_MASTER_KEY every worker's RISK_ENGINE_MASTER_KEY"
    typer.echo(
        f"re-wrapped {done.rewrapped} data keys under the new master key ({done.already} were under it already); "
        f"{where}, and restart every worker"
    )


@vault_app.command("rotate-blind-index-key")
def vault_rotate_blind_index_key(
    settle_s: Annotated[
        float, typer.Option(help="Seconds running workers get to stop scoring before the rewrite starts.", min=0)
    ] = 3.0,
) -> None:
    """Add a new key to the blind-index key chain and rewrite every stored blind index under it (audited). Stop
    the workers first: any still running stops scoring (503) within a second of the start, and every worker
    must be restarted with the new chain; one with the old chain refuses to start.

    With RISK_ENGINE_BLIND_INDEX_KEY set, the new key is RISK_ENGINE_NEW_BLIND_INDEX_KEY; afterwards append it
    to every worker's RISK_ENGINE_BLIND_INDEX_KEY (comma-separated, oldest first). With the key file of the
    embedded default ($RISK_ENGINE_HOME/blind_index.key), a new key is generated (or the given one taken), kept
    in blind_index.key.next until the rewrite is done, then added to the file's chain. Interrupted, it finishes
    when run again. Prints its counts, then one JSON object.
    """
    from risk_engine.features.lists import load_list_declarations
    from risk_engine.storage.blind_index_rotation import rotate
    from risk_engine.vault import (
        PiiKind,
        Vault,
        VaultKeyError,
        decode_key,
        load_or_create_key_chain,
        replace_key_chain_file,
    )

    configure_logging(logging.WARNING)
    settings = Settings()
    given_new = (
        decode_key(settings.new_blind_index_key, "new_blind_index_key") if settings.new_blind_index_key else None
    )
    key_file = settings.home / "blind_index.key"
    pending_file = settings.home / "blind_index.key.next"
    if settings.blind_index_key:
        if given_new is None:
            raise VaultKeyError(
                "set RISK_ENGINE_NEW_BLIND_INDEX_KEY to the new key (base64 of 32 bytes, from your secret store)"
            )
        new = given_new
    else:
        if not key_file.exists():
            raise VaultKeyError(
                f"no blind-index key: RISK_ENGINE_BLIND_INDEX_KEY is unset and {key_file} does not exist"
            )
        # the key of a rotation that was interrupted wins: tokens may be under it already
        new = _rotation_key(given_new, pending_file, "RISK_ENGINE_NEW_BLIND_INDEX_KEY")
    chain = load_or_create_key_chain(settings.blind_index_key, key_file, "blind_index_key")
    vault = Vault(b"\0" * 32, chain)  # its blind indexes only: no master key is read
    declared = load_list_declarations(settings.rules_dir / "lists.toml")
    pii_lists = [name for name, decl in declared.items() if decl.kind in {k.value for k in PiiKind}]
    db = _migrated_database(settings)
    try:
        done = rotate(db, vault, new, actor="cli", pii_lists=pii_lists, settle_s=settle_s)
    finally:
        db.dispose()
    if not settings.blind_index_key:
        replace_key_chain_file(key_file, (*chain, new))
        pending_file.unlink()
        where = f"{key_file} holds the new chain"
    else:
        where = (
            "now append RISK_ENGINE_NEW_BLIND_INDEX_KEY to every worker's RISK_ENGINE_BLIND_INDEX_KEY (a comma first)"
        )
    typer.echo(
        f"blind indexes now under key generation {done.generation}: rewrote {done.events} event records, "
        f"{done.list_entries} list entries and {done.list_changes} list changes; {where}, and restart every worker"
    )
    typer.echo(json.dumps(asdict(done)))


def _list_context(list_name: str) -> tuple[Engine, Vault, ListDecl]:
    """What editing a list needs without an engine: the migrated database, the vault (for blind indexes) and
    the list's declaration; exits 1 naming the declared lists when there is no such list."""
    from risk_engine.features.lists import load_list_declarations
    from risk_engine.storage.blind_index_rotation import register
    from risk_engine.vault import Vault

    settings = Settings()
    path = settings.rules_dir / "lists.toml"
    decls = load_list_declarations(path)
    if list_name not in decls:
        declared = f"lists: {', '.join(sorted(decls))}" if decls else f"no list is declared in {path}"
        typer.echo(f"no list {list_name}; {declared}", err=True)
        raise typer.Exit(1)
    db = _migrated_database(settings)
    vault = Vault.from_settings(settings)
    register(db, vault)  # its tokens must be under the chain the stored ones are
    return db, vault, decls[list_name]


def _list_token(decl: ListDecl, value: str, vault: Vault) -> str:
    from risk_engine.features.lists import list_value_token

    try:
        return list_value_token(decl, value, vault)
    except ValueError as exc:
        typer.echo(f"value: {exc}", err=True)
        raise typer.Exit(1) from None


@lists_app.command("add")
def lists_add(
    list_name: str,
    value: str,
    expires: Annotated[datetime | None, typer.Option(help="Expiry (ISO 8601, UTC if no zone).")] = None,
    note: Annotated[str | None, typer.Option(help="Why.")] = None,
) -> None:
    """Add a value to a named list (PII lists keep only its blind index); running services enforce it within
    a second. The same value again restates its expiry (none: never) and note. Prints the entry as JSON."""
    from datetime import UTC

    from pydantic import ValidationError

    from risk_engine.features.lists import list_value_display
    from risk_engine.service.schemas import ListEntryIn
    from risk_engine.storage.list_entries import add_entry

    configure_logging(logging.WARNING)
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    try:  # the API's own checks: lengths, no NUL, an expiry within 1970-2200
        entry = ListEntryIn(value=value, expires_at=expires, note=note)
    except ValidationError as exc:
        for e in exc.errors():
            typer.echo(f"{'.'.join(map(str, e['loc']))}: {e['msg']}", err=True)
        raise typer.Exit(1) from None
    db, vault, decl = _list_context(list_name)
    try:
        token = _list_token(decl, entry.value, vault)
        display = list_value_display(decl, entry.value, token)
        row = add_entry(db, list_name, token, display, "cli", entry.expires_at, entry.note)
    finally:
        db.dispose()
    expires_at = row.expires_at.isoformat() if row.expires_at else None
    typer.echo(json.dumps({"list": list_name, "entry": display, "added_by": row.added_by, "expires_at": expires_at}))


@lists_app.command("remove")
def lists_remove(list_name: str, value: str) -> None:
    """Remove a value from a named list (audited); running services stop enforcing it within a second."""
    from risk_engine.storage.list_entries import remove_entry

    configure_logging(logging.WARNING)
    db, vault, decl = _list_context(list_name)
    try:
        removed = remove_entry(db, list_name, _list_token(decl, value, vault), "cli")
    finally:
        db.dispose()
    if not removed:
        typer.echo(f"that value is not on {list_name}", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps({"list": list_name, "removed": True}))


@lists_app.command("import")
def lists_import(
    list_name: str,
    file: Annotated[
        typer.FileText, typer.Argument(help="One value a line (blank lines and # comments skipped); - for stdin.")
    ],
    expires: Annotated[datetime | None, typer.Option(help="Expiry of every value (ISO 8601, UTC if no zone).")] = None,
    note: Annotated[str | None, typer.Option(help="Why.")] = None,
) -> None:
    """Put every value of a file on a named list, as ``lists add`` does each, in transactions of 1,000, audited
    once a transaction (``list.import``). Every line is checked first: any refused, they are printed (file:line:
    reason) and nothing is stored. Interrupted, running it again finishes it. Prints the counts, JSON last."""
    from datetime import UTC

    from pydantic import ValidationError

    from risk_engine.features.lists import list_value_tokens
    from risk_engine.service.schemas import ListEntryIn
    from risk_engine.storage.list_entries import import_entries

    configure_logging(logging.WARNING)
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    lines: list[int] = []
    values: list[str] = []
    refused: list[str] = []
    for number, line in enumerate(file, start=1):
        value = line.strip()
        if not value or value.startswith("#"):
            continue
        try:  # the API's own checks: lengths, no NUL, an expiry within 1970-2200 and in the future
            entry = ListEntryIn(value=value, expires_at=expires, note=note)
        except ValidationError as exc:
            refused += [f"{file.name}:{number}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
            continue
        lines.append(number)
        values.append(entry.value)
    db, vault, decl = _list_context(list_name)
    try:
        pairs, bad = list_value_tokens(decl, values, vault)
        refused += [f"{file.name}:{lines[i]}: {reason}" for i, reason in bad]
        if refused:
            for message in refused[:20]:
                typer.echo(message, err=True)
            more = f" ({len(refused) - 20} more not shown)" if len(refused) > 20 else ""
            typer.echo(f"{len(refused)} lines refused{more}; nothing was imported", err=True)
            raise typer.Exit(1)
        done = import_entries(db, list_name, pairs, "cli", expires, note, source=file.name)
    finally:
        db.dispose()
    typer.echo(
        f"{list_name}: {done.added} added, {done.updated} restated, {done.unchanged} already on it as stated"
        " (running services enforce them within a second)"
    )
    typer.echo(
        json.dumps({"list": list_name, "added": done.added, "updated": done.updated, "unchanged": done.unchanged})
    )


@lists_app.command("show")
def lists_show(list_name: str) -> None:
    """A list's entries, oldest first (PII lists masked): one per line, then a JSON array on the last line."""
    from risk_engine.storage.list_entries import entry_views

    configure_logging(logging.WARNING)
    db, _, _ = _list_context(list_name)
    entries = []
    try:
        for e in entry_views(db, list_name, oldest_first=True):
            entries.append(e)
            expiry = f"until {e['expires_at']}" if e["expires_at"] else "no expiry"
            typer.echo(
                f"{e['entry']}  added by {e['added_by']} at {e['created_at']}, {expiry}"
                + (f": {e['note']}" if e["note"] else "")
            )
    finally:
        db.dispose()
    typer.echo(json.dumps(entries))


@app.command("eval")
def evaluate(
    subject: Annotated[str, typer.Argument(help="payments (reviews and accounts arrive with their subjects).")],
    data: Annotated[Path, typer.Option("--data", help="Labelled CSV (the layouts of ../shared/data).")],
    label_delay: Annotated[int, typer.Option(min=0, help="Reveal each label this many events later.")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N events.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write PNG plots and figures.json here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="End with the figures as one JSON object.")] = False,
) -> None:
    """Stream a labelled CSV through a fresh engine (score, then learn) and print prequential figures."""
    from risk_engine.datasets import DatasetError
    from risk_engine.evaluation import SUBJECTS, evaluate, write_report

    if subject not in SUBJECTS:
        typer.echo(f"unknown subject {subject!r}; known: {', '.join(sorted(SUBJECTS))}", err=True)
        raise typer.Exit(2)
    if not data.exists():
        typer.echo(f"no such file: {data}", err=True)
        raise typer.Exit(2)
    configure_logging(logging.WARNING)
    settings = Settings(home=Path(tempfile.mkdtemp(prefix="risk-engine-eval-")))
    try:
        result, arrays = evaluate(subject, data, label_delay, settings, limit)
    except DatasetError as exc:
        typer.echo(f"cannot evaluate: {exc}", err=True)
        raise typer.Exit(2) from None
    r = result.risk_score
    typer.echo(
        f"{result.subject}: {result.events} events, {result.positives} positives, label delay "
        f"{result.label_delay}{', weighted' if result.weighted else ''}, {result.events_per_s:.0f} events/s"
    )
    typer.echo(
        f"  risk score        ROC AUC {r.roc_auc:.4f}  AP {r.average_precision:.4f}  "
        f"recall@0.5% {r.recall_at_0_5pct:.4f}  recall@1% {r.recall_at_1pct:.4f}  recall@5% {r.recall_at_5pct:.4f}"
    )
    for name, f in result.models.items():
        typer.echo(
            f"  {name:17s} ROC AUC {f.roc_auc:.4f}  AP {f.average_precision:.4f}  "
            f"recall@0.5% {f.recall_at_0_5pct:.4f}  recall@1% {f.recall_at_1pct:.4f}  recall@5% {f.recall_at_5pct:.4f}"
        )
    if report is not None:
        for path in write_report(result, arrays, report):
            typer.echo(f"  wrote {path}")
    if as_json:
        typer.echo(json.dumps(result.summary()))


@models_app.command("check")
def models_check() -> None:
    """Validate every detector spec under models/ (estimators, parameters, features)."""
    from risk_engine.detectors import SpecError
    from risk_engine.dsl import DslErrors
    from risk_engine.engine import load_environments

    try:
        _, models, _ = load_environments(Settings())
    except (SpecError, DslErrors) as exc:
        typer.echo(str(exc))
        raise typer.Exit(1) from None
    for spec in models.specs:
        typer.echo(
            f"{spec.source}: {spec.name} ok ({spec.kind} {spec.estimator}, {len(spec.features)} features,"
            f" weight {spec.weight:g})"
        )
    for subject, c in sorted(models.combine.items()):
        evidence = (
            f"; anomaly ranks as evidence at a base rate of {c.anomaly_base_rate:g}" if c.anomaly_base_rate else ""
        )
        typer.echo(f"[combine.{subject}] ok (up to {c.weight:g} points above a model score of {c.floor:g}{evidence})")


@models_app.command("fit")
def models_fit(
    name: Annotated[str, typer.Argument(help="A population detector declared in models/")],
    events: Annotated[
        int | None, typer.Option(help="How many recent stored events (default: the spec's fit_events)")
    ] = None,
) -> None:
    """Fit a population detector (pyod) on its subject's recent stored events; running workers pick the fit
    up within a poll interval. Prints a summary, ending with one JSON line."""
    from risk_engine.engine import RiskEngine
    from risk_engine.errors import InvalidInput, NotFound

    engine = RiskEngine.open(Settings(policy_poll_s=0))
    try:
        summary = engine.fit_detector(name, actor="cli", max_events=events)
    except (InvalidInput, NotFound) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.close()
    typer.echo(f"fitted {summary['name']} ({summary['estimator']}) on {summary['events']} {summary['subject']} events")
    typer.echo(f"version {summary['version']}; raw-score quantiles {summary['score_quantiles']}")
    typer.echo(json.dumps(summary, sort_keys=True))


@merchants_app.command("rollup")
def merchants_rollup(
    day: Annotated[str | None, typer.Option(help="YYYY-MM-DD (UTC); default: the day before the latest event")] = None,
) -> None:
    """Roll up each merchant's day and score the roll-ups (flags). Ends with one JSON line."""
    from datetime import date

    from risk_engine.engine import RiskEngine
    from risk_engine.errors import NotFound
    from risk_engine.payments import EARLIEST_INSTANT, LATEST_INSTANT

    try:
        when = date.fromisoformat(day) if day else None
    except ValueError:
        typer.echo(f"error: --day {day!r} is not YYYY-MM-DD", err=True)
        raise typer.Exit(2) from None
    if when is not None and not EARLIEST_INSTANT.date() <= when < LATEST_INSTANT.date():
        typer.echo(f"error: --day {day} is outside 1970-01-01..2199-12-31", err=True)
        raise typer.Exit(2)
    engine = RiskEngine.open(Settings(policy_poll_s=0))
    try:
        summary = engine.rollup_merchants(when)
    except NotFound as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.close()
    typer.echo(f"{summary['day']}: {summary['merchants']} merchants rolled up, {len(summary['flagged'])} flagged")
    for flagged in summary["flagged"]:
        typer.echo(f"  {flagged['seller_id']}: {flagged['flag']} ({', '.join(flagged['reasons'])})")
    typer.echo(json.dumps(summary, sort_keys=True))


@merchants_app.command("fit")
def merchants_fit(
    events: Annotated[
        int | None, typer.Option(help="How many recent roll-ups (default: the spec's fit_events)")
    ] = None,
) -> None:
    """Fit the merchant roll-ups' population detectors on the stored roll-ups. Ends with one JSON line."""
    from risk_engine.detectors.population import PopulationDetector
    from risk_engine.engine import RiskEngine
    from risk_engine.errors import InvalidInput

    engine = RiskEngine.open(Settings(policy_poll_s=0))
    fitted = []
    try:
        for det in engine.subjects["merchant_day"].detectors:
            if isinstance(det, PopulationDetector):
                fitted.append(engine.fit_detector(det.name, actor="cli", max_events=events))
    except InvalidInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.close()
    for f in fitted:
        typer.echo(f"fitted {f['name']} ({f['estimator']}) on {f['events']} merchant days")
    typer.echo(json.dumps({"fitted": fitted}, sort_keys=True))


def _operator_error(exc: BaseException) -> str | None:
    """One line for a failure of the set-up (configuration, database, key files) rather than of the code, or
    None. Driver messages name the host and port, never the password."""
    from pydantic import ValidationError
    from sqlalchemy.exc import ArgumentError, OperationalError

    from risk_engine.detectors.spec import SpecError
    from risk_engine.dsl import DslErrors
    from risk_engine.money import CurrencyConfigError
    from risk_engine.schema import ConfigError
    from risk_engine.storage.db import DatabaseUnavailable, lock_wait_timed_out
    from risk_engine.vault import VaultKeyError

    if isinstance(exc, DatabaseUnavailable) and isinstance(exc.__cause__, OperationalError):
        exc = exc.__cause__
    if isinstance(exc, OperationalError):
        first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        if lock_wait_timed_out(exc):
            return (
                f"the database is busy: another client held a lock longer than RISK_ENGINE_DB_BUSY_TIMEOUT_S; "
                f"retry ({first})"
            )
        return f"cannot reach the database: {first}"
    if isinstance(exc, ArgumentError):
        return f"RISK_ENGINE_DATABASE_URL is not a database URL ({exc})"
    if isinstance(exc, VaultKeyError):
        return f"keys: {exc}"
    if isinstance(exc, ConfigError | SpecError | CurrencyConfigError):  # rules/*.toml, models/*.toml
        return str(exc)
    if isinstance(exc, DslErrors):  # a policy in rules/: every error, one line each
        return "a policy does not check (risk-engine rules check FILE):\n" + "\n".join(
            f"error: {exc.source}:{e}" for e in exc.errors
        )
    if isinstance(exc, ValidationError):
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        return f"settings (RISK_ENGINE_*): {fields}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    return None


def main() -> None:
    """Entry point of the console script: a set-up failure is an ``error:`` line on stderr (one per problem)
    and exit status 1 (set RISK_ENGINE_TRACEBACK=1 for the traceback); anything else raises as usual."""
    try:
        _as_operator_errors(app)
    except KeyboardInterrupt:
        sys.exit(130)


def _as_operator_errors(run: Callable[[], object]) -> None:
    """Run ``run``; a set-up failure it raises becomes ``error:`` lines and exit status 1 (``main``)."""
    try:
        run()
    except Exception as exc:
        message = _operator_error(exc)
        if message is None or os.environ.get("RISK_ENGINE_TRACEBACK"):
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
