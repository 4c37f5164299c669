"""The ports one Ray node of a Slurm job listens on: picked from ``RAY_PORT_RANGE``, free right now.

``slurm/ray-node.sh`` starts Ray on a shared node, where another job's Ray or a user's plain
``ray start`` may already hold any port, so every port is given to ``ray start`` explicitly:

    python -m allcluster.slurm_ports pick SINGLES WORKER_PORTS LOW-HIGH
        prints SINGLES free ports, then the first and last port of a block of WORKER_PORTS free
        ports in a row (Ray's --min/--max-worker-port)
    python -m allcluster.slurm_ports check SINGLES WORKER_PORTS LOW-HIGH
        exit 2 with one line naming RAY_PORT_RANGE when no pick could ever succeed on this node
        (``slurm/ray-cluster.sh`` runs it before anything starts)

Both apply one rule (``usable_spans``): a port comes from LOW-HIGH outside the kernel's ephemeral range
(outgoing connections take their local port from it, so a port there may be gone by the time Ray
binds it) and is none of Ray's fixed defaults (left to other users' plain ``ray start``). A port is
free when binding it on the wildcard address succeeds (a listener on any address makes that fail);
what is left is the short race between this check and Ray binding it.
"""
from __future__ import annotations

import random
import socket
import sys
from typing import Callable

# Ray's fixed defaults: GCS, dashboard, client server, dashboard agent, object manager
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365, 8076})
# Linux's default net.ipv4.ip_local_port_range, for a kernel that does not show it
DEFAULT_EPHEMERAL = (32768, 60999)
BLOCK_TRIES = 200


class NoRoom(ValueError):
    """The range cannot hold the ports asked for, on this node or right now."""


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's ephemeral port range (LOW, HIGH)."""
    try:
        with open(path) as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    return low, high


def parse_range(text: str) -> tuple[int, int]:
    """``"LOW-HIGH"`` as two ints (the job scripts have checked its form already)."""
    low, high = (int(x) for x in text.split("-"))
    return low, high


def usable_spans(low: int, high: int, ephemeral: tuple[int, int]) -> list[tuple[int, int]]:
    """The runs of ports in ``low..high`` (inclusive) outside ``ephemeral`` and Ray's defaults."""
    eph_low, eph_high = ephemeral
    spans = []
    for a, b in ((low, min(high, eph_low - 1)), (max(low, eph_high + 1), high)):
        for cut in sorted(p for p in RAY_DEFAULT_PORTS if a <= p <= b):
            if cut > a:
                spans.append((a, cut - 1))
            a = cut + 1
        if a <= b:
            spans.append((a, b))
    return spans


def _runs_holding(spans: list[tuple[int, int]], block: int) -> list[tuple[int, int]]:
    """The spans with room for ``block`` ports in a row."""
    return [(a, b) for a, b in spans if b - a + 1 >= block]


def room_problem(singles: int, block: int, low: int, high: int, ephemeral: tuple[int, int]) -> str | None:
    """Why ``low..high`` can never hold a block of ``block`` ports and ``singles`` more, or None."""
    spans = usable_spans(low, high, ephemeral)
    fitting = _runs_holding(spans, block)
    # the singles may lie in any span, also in the block's own span beside it
    rest = sum(b - a + 1 for a, b in spans) - block
    if fitting and rest >= singles:
        return None
    widest = max((b - a + 1 for a, b in spans), default=0)
    return (f"leaves no {block} ports in a row (RAY_WORKER_PORTS={block}) and {singles} more outside this node's "
            f"ephemeral port range {ephemeral[0]}-{ephemeral[1]} and Ray's default ports "
            f"{','.join(map(str, sorted(RAY_DEFAULT_PORTS)))}, which Ray's ports must avoid (its longest run "
            f"is {widest} ports): widen it or move it")


def port_is_free(port: int) -> bool:
    """Whether binding ``port`` on every address succeeds now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def pick(singles: int, block: int, low: int, high: int, ephemeral: tuple[int, int],
         is_free: Callable[[int], bool] = port_is_free,
         rng: random.Random | None = None) -> tuple[list[int], int, int]:
    """``singles`` free ports and a block of ``block`` free ports in a row: (singles, first, last).

    Random places, so that Ray nodes of several jobs on one node rarely try the same ports."""
    problem = room_problem(singles, block, low, high, ephemeral)
    if problem:
        raise NoRoom(f"RAY_PORT_RANGE={low}-{high} {problem}")
    rng = rng or random.SystemRandom()
    spans = usable_spans(low, high, ephemeral)
    fitting = _runs_holding(spans, block)
    for _ in range(BLOCK_TRIES):
        a, b = rng.choice(fitting)
        first = rng.randint(a, b - block + 1)
        if all(is_free(p) for p in range(first, first + block)):
            break
    else:
        raise NoRoom(f"no block of {block} free ports in {low}-{high} after {BLOCK_TRIES} tries")
    # every usable port outside the block, in random order (at most 64k numbers): a range with just
    # room enough, which the check accepts, is filled too, not only likely to be
    others = [p for a, b in spans for p in range(a, b + 1) if not first <= p < first + block]
    rng.shuffle(others)
    picked = []
    for port in others:
        if len(picked) == singles:
            break
        if is_free(port):
            picked.append(port)
    if len(picked) < singles:
        raise NoRoom(f"fewer than {singles} free ports in {low}-{high} outside the worker block")
    return picked, first, first + block - 1


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in ("pick", "check"):
        print("usage: python -m allcluster.slurm_ports pick|check SINGLES WORKER_PORTS LOW-HIGH", file=sys.stderr)
        return 2
    singles, block, (low, high) = int(argv[1]), int(argv[2]), parse_range(argv[3])
    if argv[0] == "check":
        problem = room_problem(singles, block, low, high, ephemeral_range())
        if problem:
            print(f"ray-cluster.sh: RAY_PORT_RANGE={argv[3]} {problem}", file=sys.stderr)
            return 2
        return 0
    try:
        picked, first, last = pick(singles, block, low, high, ephemeral_range())
    except NoRoom as err:
        print(f"ray-node.sh: {err}", file=sys.stderr)
        return 1
    print(*picked, first, last)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
