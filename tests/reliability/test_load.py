"""Load through nginx: bounded concurrent traffic, zero failures, latency, memory that levels
off."""
from __future__ import annotations

import pytest

from tests.reliability.load import run_load

pytestmark = pytest.mark.reliability

CLIENTS = 4
WARMUP, ROUND = 60, 150
DURATION = 120.0  # seconds per round, an upper bound; a round normally ends on its count
RSS_GROWTH_LIMIT = 48 * 2**20  # per replica, between two equal rounds


def test_concurrent_load_through_nginx_has_no_failures_and_bounded_memory(cluster, figures):
    nginx = cluster.nginx
    run_load(nginx.url, cluster.calls, CLIENTS, WARMUP, DURATION)  # caches, allocator pools
    rss = [[r.rss() for r in cluster.replicas]]
    offset = nginx.log_offset()
    rounds = []
    for _ in range(2):
        rounds.append(run_load(nginx.url, cluster.calls, CLIENTS, ROUND, DURATION))
        rss.append([r.rss() for r in cluster.replicas])

    for i, stats in enumerate(rounds, 1):
        figures.append(f"load round {i} ({CLIENTS} clients via nginx): {stats.summary()}")
    mib = [[f"{v / 2**20:.0f}" for v in row] for row in rss]
    figures.append("replica RSS MiB (replica-0, replica-1) after warm-up / round 1 / round 2: "
                   + " / ".join(", ".join(row) for row in mib))

    for stats in rounds:
        assert stats.sent == ROUND, f"only {stats.sent} of {ROUND} requests in {DURATION} s"
        assert not stats.failures, stats.failures[:5]
    served = {e["upstream"] for e in nginx.access_log(offset)}
    assert served == {r.address for r in cluster.replicas}, f"traffic went to {served}"
    for i, replica in enumerate(cluster.replicas):
        growth = rss[2][i] - rss[1][i]
        assert growth < RSS_GROWTH_LIMIT, (f"{replica.name} RSS grew by {growth / 2**20:.0f} "
                                           f"MiB over a {ROUND}-request round")
