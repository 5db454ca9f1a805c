"""Instructions per delivery of the receivers of ``bench/receiver_bench.py``,
counted by valgrind's callgrind: the same comparison without the noise of
a shared machine's clock.

Each receiver runs in its own Python process under ``valgrind
--tool=callgrind`` twice: once with ``--events`` deliveries and once with
three times as many, after the same set-up (every environ built, a warm-up
of 500 deliveries on another app of the same kind, ``gc.freeze()``). The
difference of the two counts, divided by the difference of deliveries, is
what one delivery costs: imports, set-up and start-up cancel out.
``PYTHONHASHSEED=0`` makes each count the same from run to run.

The ratios are read like the wall-clock bench's: above ``1.00x``, the
receiver on the left costs fewer instructions than the one on the right.
Instructions are not time (cache misses and branch mispredictions are not
counted), so this bench says where the work is, and the wall-clock bench
says what a quiet machine makes of it.

Needs valgrind (Debian package ``valgrind``). Run:
``.venv/bin/python bench/receiver_instructions.py [--events N] [--accounts N]``
(a few minutes: callgrind runs Python about 50 times slower).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import typing as t
from pathlib import Path

import receiver_bench as bench
from flask import Flask

HERE = Path(__file__).resolve().parent
WARM_UP = 500


def receivers(accounts: int) -> dict[str, tuple[t.Callable[[], Flask], dict[str, str] | None]]:
    """The receivers, by name: each one's app factory and the secrets of
    its accounts (``None`` for an endpoint of one).
    """
    secrets = bench.account_secrets(accounts)
    return {
        "hand-written": (bench.hand_written_app, None),
        "extension": (bench.extension_app, None),
        "many accounts": (bench.many_accounts_app(secrets), secrets),
    }


def drive(name: str, accounts: int, count: int, most: int) -> None:
    """In the child: set up as for ``most`` deliveries, then deliver
    ``count`` of them to a fresh app of receiver ``name``.
    """
    factory, secrets = receivers(accounts)[name]
    templates = bench.build_environs(WARM_UP + most, secrets)
    bench.run(factory(), templates[:WARM_UP])
    app = factory()
    gc.collect()
    gc.freeze()
    bench.run(app, templates[WARM_UP : WARM_UP + count])


def instructions(name: str, accounts: int, count: int, most: int) -> int:
    """Run :func:`drive` in a child under callgrind; return the
    instructions it counted.
    """
    command = [
        *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
        *(sys.executable, __file__, "--child", name),
        *("--accounts", str(accounts), "--events", str(count), "--most", str(most)),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE, check=False)
    collected = re.search(r"Collected : ([\d,]+)", done.stderr)
    if done.returncode != 0 or collected is None:
        raise SystemExit(f"{name} failed under callgrind:\n{done.stderr[-2000:]}")
    return int(collected.group(1).replace(",", ""))


def main() -> None:
    """Count each receiver's instructions per delivery; print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1000, help="deliveries of the shorter run")
    parser.add_argument("--accounts", type=int, default=1000, help="accounts of the endpoint")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--most", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        drive(args.child, args.accounts, args.events, args.most)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("error: valgrind is not installed (apt-get install valgrind)")

    short, long = args.events, 3 * args.events
    per_delivery: dict[str, float] = {}
    for name in receivers(args.accounts):
        counts = [instructions(name, args.accounts, count, long) for count in (short, long)]
        per_delivery[name] = (counts[1] - counts[0]) / (long - short)
        print(f"{name:>13}: {per_delivery[name]:,.0f} instructions per delivery")
    print(f"\npython {sys.version.split()[0]}, {long - short:,} deliveries counted per receiver")
    hand, one, many = (per_delivery[name] for name in receivers(args.accounts))
    print(f"extension / hand-written: {hand / one:.3f}x")
    print(f"many accounts ({args.accounts}) / extension: {one / many:.3f}x")


if __name__ == "__main__":
    main()
