"""The port rule of each Ray node of a Slurm job (allcluster/slurm_ports.py), without Slurm or Ray."""
import random
import socket
import subprocess
import sys

import pytest

from allcluster.slurm_ports import NoRoom, RAY_DEFAULT_PORTS, pick, port_is_free, room_problem, usable_spans

EPHEMERAL = (32768, 60999)


def test_spans_leave_out_the_ephemeral_range_and_rays_default_ports():
    assert usable_spans(20000, 65535, EPHEMERAL) == [(20000, 32767), (61000, 65535)]
    assert usable_spans(6000, 9000, EPHEMERAL) == [(6000, 6378), (6380, 8075), (8077, 8264), (8266, 9000)]
    assert usable_spans(40000, 50000, EPHEMERAL) == []
    assert usable_spans(6379, 6380, EPHEMERAL) == [(6380, 6380)]


@pytest.mark.parametrize("port_range, block, room", [
    ((20000, 65535), 1000, True),
    ((6000, 7100), 1000, False),          # 1101 ports, but Ray's 6379 cuts the longest run to 721
    ((6000, 7100), 700, True),
    ((40000, 50000), 2, False),           # all ephemeral
    ((30000, 31008), 1000, True),         # exactly 1000 + 9
    ((30000, 31007), 1000, False),        # one short
])
def test_room_means_a_block_in_a_row_and_nine_more(port_range, block, room):
    problem = room_problem(9, block, *port_range, EPHEMERAL)
    assert (problem is None) == room, problem
    if not room:
        assert "RAY_WORKER_PORTS" in problem and "32768-60999" in problem


def test_picked_ports_are_free_distinct_in_range_and_the_block_is_in_a_row():
    busy = set(range(20000, 20500)) | {20600, 20601}
    for seed in range(20):
        singles, first, last = pick(9, 100, 20000, 21000, EPHEMERAL, is_free=lambda p: p not in busy,
                                    rng=random.Random(seed))
        block = set(range(first, last + 1))
        assert last - first + 1 == 100 and len(set(singles)) == 9 and not block & set(singles)
        assert not (block | set(singles)) & (busy | RAY_DEFAULT_PORTS)
        assert all(20000 <= p <= 21000 for p in block | set(singles))


def test_a_range_with_just_room_enough_is_always_filled():
    """What the check accepts, the pick fills (random single ports alone would rarely find the last few)."""
    for seed in range(30):
        singles, first, last = pick(9, 1000, 30000, 31008, EPHEMERAL, is_free=lambda p: True, rng=random.Random(seed))
        assert sorted([*singles, *range(first, last + 1)]) == list(range(30000, 31009))


def test_no_free_block_is_an_error_naming_the_range():
    with pytest.raises(NoRoom, match="no block of 100 free ports in 20000-21000"):
        pick(9, 100, 20000, 21000, EPHEMERAL, is_free=lambda p: p % 50 != 0, rng=random.Random(1))
    with pytest.raises(NoRoom, match="RAY_PORT_RANGE=6000-7100 leaves no 1000 ports in a row"):
        pick(9, 1000, 6000, 7100, EPHEMERAL)


def test_a_port_someone_listens_on_is_not_free():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert not port_is_free(listener.getsockname()[1])


def test_the_job_scripts_call_pick_and_check_by_their_command_line():
    run = [sys.executable, "-m", "allcluster.slurm_ports"]
    picked = subprocess.run([*run, "pick", "9", "50", "21000-22000"], capture_output=True, text=True, check=True)
    ports = [int(p) for p in picked.stdout.split()]
    assert len(ports) == 11 and ports[-1] - ports[-2] == 49
    refused = subprocess.run([*run, "check", "9", "1000", "06000-7100"], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("ray-cluster.sh: RAY_PORT_RANGE=06000-7100 leaves")
