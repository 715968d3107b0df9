"""Instructions per payment on the in-process payment path, counted by valgrind's callgrind: a figure that does not
move with the machine's load, to tell a 1% change from noise where wall-clock timings (this machine's vary by a
factor of two from one minute to the next) cannot.

The engine starts and scores a warm-up uninstrumented; callgrind counts only the measured payments (switched on
and off with ``callgrind_control``), split by thread: the request path (the main thread) and the rest (the
group-commit writer, mostly). Instruction counts are not time (SHA-256 or a cache miss costs more per instruction
than a dict look-up), so use this to compare two versions of the code, and the wall-clock benchmark for figures.

Needs valgrind (Debian's ``valgrind`` package). Takes about a minute. Prints the figures, then one JSON object on
the last line.  Usage: python bench/instructions.py [--warmup 500] [--payments 1000] [--tree PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def child(tree: Path, warmup: int, payments: int, signal: Path) -> None:
    """Runs under valgrind: warm up, say so, wait for the go, score the measured payments, say so, wait."""
    sys.path.insert(0, str(tree))
    from risk_engine.config import Settings
    from risk_engine.datasets import ulb_payments
    from risk_engine.engine import RiskEngine
    from risk_engine.payments import PaymentIn

    events = ulb_payments(DATA / "ulb_stream.csv", prefix="p0")
    bodies = [e.body for e, _ in zip(events, range(warmup + payments), strict=False)]
    home = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    # no policy polls: under valgrind a second lasts fifty times as long, and the polls would be counted
    # nor the follower of other workers' events (none here), which polls four times a second (trees before it
    # have no such setting)
    quiet = {"follow_poll_s": 0} if "follow_poll_s" in Settings.model_fields else {}
    settings = Settings(home=home, rules_dir=tree / "rules", models_dir=tree / "models", policy_poll_s=3600, **quiet)
    engine = RiskEngine.open(settings)

    def run(batch: list[dict[str, Any]]) -> None:
        pending: deque[Any] = deque()
        for body in batch:
            pending.append(engine.score_payment(PaymentIn.model_validate(body)).committed)
            if len(pending) > 256:  # as in bench/payments.py: up to 256 payments awaiting their commit
                pending.popleft().result()
        while pending:
            pending.popleft().result()

    run(bodies[:warmup])
    Path(f"{signal}.ready").touch()
    while not signal.exists():
        time.sleep(0.05)
    run(bodies[warmup:])
    Path(f"{signal}.done").touch()
    while signal.exists():
        time.sleep(0.05)
    engine.close()
    shutil.rmtree(home, ignore_errors=True)


def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the engine under valgrind exited with {proc.returncode}")
        time.sleep(0.2)


def count(tree: Path, warmup: int, payments: int) -> dict[str, Any]:
    """Per-thread instructions per measured payment for the code in ``tree``."""
    work = Path(tempfile.mkdtemp(prefix="callgrind-"))
    signal = work / "go"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--separate-threads=yes",
        f"--callgrind-out-file={work / 'out'}",
        sys.executable,
        __file__,
        "--child",
        str(signal),
        "--tree",
        str(tree),
        "--warmup",
        str(warmup),
        "--payments",
        str(payments),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(Path(f"{signal}.ready"), proc)
        for command in (["-z"], ["-i", "on"]):
            subprocess.run(["callgrind_control", *command, str(proc.pid)], check=True, capture_output=True)
        signal.touch()
        _wait_for(Path(f"{signal}.done"), proc)
        for command in (["-i", "off"], ["-d"]):
            subprocess.run(["callgrind_control", *command, str(proc.pid)], check=True, capture_output=True)
        signal.unlink()
        proc.wait(600)
    finally:
        if proc.poll() is None:
            proc.kill()
    threads: dict[int, int] = {}
    for dump in work.glob("out.*-*"):
        match = re.search(r"-(\d+)$", dump.name)
        totals = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.MULTILINE)
        if match and totals and int(totals.group(1)):
            threads[int(match.group(1))] = threads.get(int(match.group(1)), 0) + int(totals.group(1))
    shutil.rmtree(work, ignore_errors=True)
    if 1 not in threads:
        raise RuntimeError("callgrind wrote no counts for the main thread")
    main = threads.pop(1)
    return {
        "payments": payments,
        "request_path_per_payment": round(main / payments),
        "other_threads_per_payment": round(sum(threads.values()) / payments),
        "total_per_payment": round((main + sum(threads.values())) / payments),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=500, help="payments scored before counting starts")
    parser.add_argument("--payments", type=int, default=1000, help="payments counted")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.tree.resolve(), args.warmup, args.payments, args.child)
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind and callgrind_control (Debian: apt-get install valgrind)")
    if not (DATA / "ulb_stream.csv").exists():
        sys.exit(f"needs {DATA / 'ulb_stream.csv'} (../shared/data beside the project)")
    result = count(args.tree.resolve(), args.warmup, args.payments)
    print(f"instructions per payment, {result['payments']} payments of ulb_stream.csv after a warm-up:")
    print(f"  request path (main thread) {result['request_path_per_payment']:>12,}")
    print(f"  other threads (writer)     {result['other_threads_per_payment']:>12,}")
    print(f"  total                      {result['total_per_payment']:>12,}")
    print(json.dumps({"tree": str(args.tree.resolve()), **result}))


if __name__ == "__main__":
    main()
