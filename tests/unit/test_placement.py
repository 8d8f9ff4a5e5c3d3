"""The placement rule as a pure function: a table of hosts and requests with
the hosts each container must land on, the shortfall a refusal names, and a
property: a request is refused only when no assignment could hold it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routerd.deploy.placement import Candidate, Request, Resources, place
from routerd.errors import Unplaceable

SHARED = {"dataPlane": "true", "routerMesh": "true", "high": "false"}
DEDICATED = {"dataPlane": "true", "high": "true"}
POOLS = {"shared": SHARED, "dedicated": DEDICATED}


def host(
    name: str,
    cpus: float = 2,
    memory: float = 1024,
    *,
    used: tuple[float, float] = (0, 0),
    tags: dict[str, str] | None = None,
    **kwargs: object,
) -> Candidate:
    return Candidate(
        name,
        Resources(cpus, memory),
        Resources(*used),
        tags=SHARED if tags is None else tags,
        **kwargs,  # type: ignore[arg-type]
    )


def ask(
    replicas: int,
    cpus: float = 0.25,
    memory: float = 256,
    *,
    pool: str = "shared",
    constraints: dict[str, str] | None = None,
    by_tag: bool = False,
) -> Request:
    tags = None if by_tag else POOLS.get(pool)
    return Request(replicas, Resources(cpus, memory), pool, tags, constraints or {})


CASES = [
    pytest.param(
        [host("a"), host("b"), host("c")],
        ask(3),
        ["a", "b", "c"],
        id="replicas spread over as many hosts, ties by name",
    ),
    pytest.param(
        [host("a", used=(0.5, 0)), host("b")],
        ask(3, 0.25, 64),
        ["b", "a", "b"],
        id="more replicas than hosts: the third goes where most is left",
    ),
    pytest.param(
        [host("a", used=(1.5, 0)), host("b", used=(0.5, 0))],
        ask(1),
        ["b"],
        id="the host with the most free capacity wins",
    ),
    pytest.param(
        [host("a", used=(0, 900)), host("b", used=(1.0, 0))],
        ask(1, 0.25, 64),
        ["b"],
        id="memory is a's dominant resource: 7% free against b's 38% CPU",
    ),
    pytest.param(
        [host("big", 16, 16384, used=(8, 8192)), host("small", 2, 2048, used=(0.5, 512))],
        ask(1),
        ["small"],
        id="free share is relative: 75% of a small host beats 50% of a big one",
    ),
    pytest.param(
        [host("a"), host("d1", tags=DEDICATED), host("d2", tags=DEDICATED)],
        ask(2, pool="dedicated"),
        ["d1", "d2"],
        id="pools/dedicated's tags pick the dedicated hosts",
    ),
    pytest.param(
        [host("a"), host("d1", tags=DEDICATED)],
        ask(2),
        ["a", "a"],
        id="pools/shared's tags (high=false) keep dedicated hosts out",
    ),
    pytest.param(
        [host("a", tags={"pool": "web"}), host("b", tags={"pool": "batch"})],
        ask(1, pool="web", by_tag=True),
        ["a"],
        id="without pools/<pool>, the tag pool=<pool> decides",
    ),
    pytest.param(
        [host("a", tags={**SHARED, "zone": "1"}), host("b", tags={**SHARED, "zone": "2"})],
        ask(2, constraints={"zone": "2"}),
        ["b", "b"],
        id="a constraint narrows the hosts",
    ),
    pytest.param(
        [host("a", schedulable=False), host("b", unreachable="refused"), host("c")],
        ask(2),
        ["c", "c"],
        id="cordoned and unreachable hosts get nothing",
    ),
    pytest.param(
        [host("a", replicas=2), host("b", replicas=0), host("c", replicas=1)],
        ask(2),
        ["b", "c"],
        id="scaling: hosts with the fewest of the release's containers first",
    ),
    pytest.param(
        [host("a", used=(1.75, 0)), host("b", used=(0, 0))],
        ask(2, 1.0, 256),
        ["b", "b"],
        id="spreading gives way when only one host has room",
    ),
]


@pytest.mark.parametrize(("hosts", "request_", "expected"), CASES)
def test_each_container_lands_where_the_rule_says(
    hosts: list[Candidate], request_: Request, expected: list[str]
) -> None:
    """Candidates by pool, constraints, reachability and cordon; replicas
    spread; then the largest free share after placing (dominant resource)."""
    assert place(hosts, request_) == expected


REFUSALS = [
    pytest.param(
        [
            host("host-a", used=(1.0, 0), tags=DEDICATED),
            host("host-b", used=(1.5, 512), tags=DEDICATED),
        ],
        ask(2, 1.0, 512, pool="dedicated"),
        "needs 2 x 1 CPU, 512 MB in pool dedicated: 1 host(s) fit (host-a, room for 1), "
        "host-b has 0.5 CPU, 512 MB free",
        id="the issue's example: room named, shortfall named",
    ),
    pytest.param(
        [
            host("a", schedulable=False),
            host("b", unreachable="connection refused"),
            host("x", tags={}),
        ],
        ask(1),
        "needs 1 x 0.25 CPU, 256 MB in pool shared: 0 host(s) fit, a is cordoned, "
        "b is unreachable (connection refused), 1 other host(s) are not in pool shared",
        id="cordoned, unreachable, outside the pool",
    ),
    pytest.param(
        [host("a", tags={"pool": "web"})],
        ask(1, pool="batch", by_tag=True),
        "needs 1 x 0.25 CPU, 256 MB in pool batch: 0 host(s) fit, 1 other host(s) are not "
        "in pool batch, no host is tagged pool=batch (and there is no pools/batch)",
        id="no host in the pool at all",
    ),
    pytest.param(
        [host("a", tags={**SHARED, "zone": "1"})],
        ask(1, constraints={"zone": "2"}),
        "needs 1 x 0.25 CPU, 256 MB in pool shared with zone=2: 0 host(s) fit, "
        "a does not carry zone=2",
        id="a constraint no host carries",
    ),
]


@pytest.mark.parametrize(("hosts", "request_", "message"), REFUSALS)
def test_a_request_that_does_not_fit_names_the_shortfall(
    hosts: list[Candidate], request_: Request, message: str
) -> None:
    """Unplaceable says what was asked, which hosts have room and why each
    other host of the pool cannot take a container."""
    with pytest.raises(Unplaceable) as refused:
        place(hosts, request_)
    assert str(refused.value) == message


SIZES = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 4.0])
MEMORY = st.sampled_from([128, 256, 512, 1024, 3072])
CANDIDATES = st.lists(
    st.builds(
        lambda i, cpus, memory, used_cpus, used_memory: host(
            f"h{i}", cpus, memory, used=(min(cpus, used_cpus), min(memory, used_memory))
        ),
        st.integers(0, 1000),
        st.sampled_from([1, 2, 4, 8]),
        st.sampled_from([1024, 2048, 8192]),
        SIZES,
        MEMORY,
    ),
    min_size=1,
    max_size=8,
    unique_by=lambda c: c.name,
)


@settings(max_examples=300, deadline=None)
@given(CANDIDATES, st.integers(1, 12), SIZES, MEMORY)
def test_refused_only_when_no_assignment_could_hold_it(
    hosts: list[Candidate], replicas: int, cpus: float, memory: int
) -> None:
    """Placing one container at a time fails exactly when the hosts' room,
    summed, is short of the request, and never puts more on a host than fits."""
    request_ = ask(replicas, cpus, memory)
    room = sum(request_.each.how_many_in(h.free) for h in hosts)
    try:
        chosen = place(hosts, request_)
    except Unplaceable:
        assert room < replicas
        return
    assert room >= replicas
    for h in hosts:
        taken = chosen.count(h.name)
        assert taken <= request_.each.how_many_in(h.free)
