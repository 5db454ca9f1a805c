"""Memory of :class:`~flask_ploints.stores.MemoryStore` under a long stream
of distinct events: it must stop growing once its bound is reached.

Pushes 1,000,000 distinct event ids through a store built with its default
bound (100,000 entries), each claimed then committed with the default
retention (7 days, so nothing expires and the bound alone limits the store),
and prints at every 100,000 ids the entries held, the resident set size now
(``/proc/self/statm``) and its peak so far (``resource.getrusage``). Then it
runs the same stream again in a child process under :mod:`tracemalloc`, whose
count of bytes Python holds is exact where RSS moves in allocator steps (and
which would inflate RSS if both ran in one process).

Run: ``.venv/bin/python bench/memory_peak.py [--events N] [--every N]``.
"""

from __future__ import annotations

import argparse
import gc
import resource
import subprocess
import sys
import time
import tracemalloc
import typing as t
from pathlib import Path

from flask_ploints._config import DEFAULTS
from flask_ploints.stores import MemoryStore

LEASE = DEFAULTS["PLOINTS_CLAIM_LEASE"][1].total_seconds()
RETENTION = DEFAULTS["PLOINTS_DEDUPE_RETENTION"][1].total_seconds()
PAGE = resource.getpagesize()
MIB = 1024 * 1024


def rss_now() -> int:
    """Resident set size of this process now, in bytes (Linux)."""
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * PAGE


def rss_peak() -> int:
    """Peak resident set size of this process so far, in bytes."""
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def stream(store: MemoryStore, events: int, every: int) -> t.Iterator[int]:
    """Claim and commit ``events`` distinct ids; yield the count every
    ``every`` ids.
    """
    payload = b'{"id": "evt_...", "type": "points.earned", "data": {}}'
    for number in range(1, events + 1):
        event_id = f"evt_{number:012x}"
        claim = store.claim(event_id, LEASE, payload)
        store.commit(event_id, claim.token, RETENTION)
        if number % every == 0:
            gc.collect()
            yield number


def growth(values: list[int], bound: int, every: int, events: int, what: str) -> None:
    """Print how much ``values`` grew after the bound was reached."""
    reached = max(1, bound // every)
    if len(values) > reached:
        grown = (values[-1] - values[reached]) / MIB
        print(
            f"{what} grew {grown:+.1f} MiB from {(reached + 1) * every:,} to {events:,} events"
            f" (bound {bound:,} entries)"
        )


def measure_rss(events: int, every: int) -> None:
    """The stream, with RSS now and peak at each step."""
    store = MemoryStore()
    print(
        f"MemoryStore(max_entries={store.max_entries:,}), lease {LEASE:g} s,"
        f" retention {RETENTION:g} s"
    )
    print(f"RSS before: {rss_now() / MIB:.1f} MiB\n")
    print(f"{'events':>10}  {'entries':>8}  {'RSS now':>9}  {'RSS peak':>9}  {'s':>5}")
    peaks: list[int] = []
    started = time.perf_counter()
    for number in stream(store, events, every):
        peaks.append(rss_peak())
        print(
            f"{number:>10,}  {len(store):>8,}  {rss_now() / MIB:>7.1f} M  {peaks[-1] / MIB:>7.1f} M"
            f"  {time.perf_counter() - started:>5.1f}"
        )
    print()
    growth(peaks, store.max_entries, every, events, "peak RSS")


def measure_traced(events: int, every: int) -> None:
    """The stream under tracemalloc, with Python's bytes now and peak."""
    tracemalloc.start()
    store = MemoryStore()
    print(f"\n{'events':>10}  {'entries':>8}  {'traced now':>10}  {'traced peak':>11}")
    currents: list[int] = []
    for number in stream(store, events, every):
        current, peak = tracemalloc.get_traced_memory()
        currents.append(current)
        print(f"{number:>10,}  {len(store):>8,}  {current / MIB:>8.1f} M  {peak / MIB:>9.1f} M")
    print()
    growth(currents, store.max_entries, every, events, "traced memory")


def main() -> None:
    """Run the stream, then again under tracemalloc in a child process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000)
    parser.add_argument("--tracemalloc", action="store_true", help="only the traced pass")
    args = parser.parse_args()
    if args.tracemalloc:
        measure_traced(args.events, args.every)
        return
    measure_rss(args.events, args.every)
    sys.stdout.flush()
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--tracemalloc",
            f"--events={args.events}",
            f"--every={args.every}",
        ],
        check=True,
    )


if __name__ == "__main__":
    main()
