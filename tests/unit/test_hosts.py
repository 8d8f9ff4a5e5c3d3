"""Hosts, pools and reservations read back from etcd: every bad value is
refused naming its key and field; the pool rule; what a container reserves;
and the command line refusing bad flags by name before it reaches etcd."""

from __future__ import annotations

import json
from typing import Any

import pytest

from routerd.cli import EXIT_USAGE, main
from routerd.deploy.engines import reservation, usage_of
from routerd.deploy.host_commands import pairs
from routerd.deploy.hosts import Capacity, Host, Tls, in_pool, pool_tags
from routerd.deploy.placement import Resources
from routerd.deploy.releases import Release, ReleaseSpec
from routerd.deploy.runtime import Limits, _limits
from routerd.errors import ConfigError, InvalidValue

KEY = "hosts/host-a"
GOOD = {
    "docker": "tcp://10.0.1.5:2376",
    "address": "10.0.1.5",
    "tags": {"dataPlane": "true", "high": "true"},
    "capacity": {"cpus": 8, "memory_mb": 16384},
    "tls": {"ca": "/etc/routerd/ca.pem", "cert": "/etc/routerd/cert.pem", "key": "/etc/k.pem"},
}


def read(**changes: Any) -> Host:
    data = {**GOOD, **changes}
    return Host.from_json(
        "host-a", json.dumps({k: v for k, v in data.items() if v is not None}).encode(), key=KEY
    )


def test_a_valid_record_reads_back_as_written() -> None:
    """The example of the etcd layout round-trips; schedulable defaults to true."""
    host = read()
    assert host.capacity == Capacity(8, 16384)
    assert host.tls == Tls("/etc/routerd/ca.pem", "/etc/routerd/cert.pem", "/etc/k.pem")
    assert host.schedulable is True
    again = Host.from_json("host-a", host.to_json(), key=KEY)
    assert again == host


def test_only_docker_and_address_are_required() -> None:
    """A record a cloud-init script writes by hand needs no capacity (the
    engine's figures count), tags or TLS (on a unix socket)."""
    raw = b'{"docker": "unix:///run/docker.sock", "address": "host-a.internal"}'
    host = Host.from_json("host-a", raw, key=KEY)
    assert (host.capacity, host.tags, host.tls) == (None, {}, None)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"docker": "http://10.0.1.5:2376"}, "docker 'http://10.0.1.5:2376' is not unix:///path"),
        ({"docker": "unix://run/docker.sock", "tls": None}, "must be unix:///absolute/path"),
        ({"docker": "unix:///run/docker.sock"}, "tls is only for tcp:// engines"),
        ({"docker": "tcp://10.0.1.5:2376", "tls": None}, "port 2376 is Docker's TLS port"),
        ({"docker": "tcp://10.0.1.5:2375", "tls": None}, "gives root on its host"),
        ({"docker": "tcp://10.0.1.5:99999"}, "has a bad port"),
        ({"docker": "tcp://10.0.1.5:2376/v1"}, "is not tcp://host:port"),
        ({"docker": 5}, "docker 5 is not a URL"),
        ({"address": "10.0.1.256"}, "address '10.0.1.256' is not an IPv4 address"),
        ({"address": "a;b"}, "address 'a;b' is not"),
        ({"address": "[fe80::1%eth0]"}, "address '[fe80::1%eth0]' is not"),
        ({"tags": ["high"]}, "tags must be an object"),
        ({"tags": {"high": True}}, "tags: 'high'=True"),
        ({"tags": {"a b": "1"}}, "tags: 'a b'='1'"),
        ({"capacity": {"cpus": 0, "memory_mb": 1024}}, "cpus 0 is not a number"),
        ({"capacity": {"cpus": 2, "memory_mb": 1.5}}, "memory_mb 1.5 is not a whole number"),
        ({"capacity": {"cpus": 2}}, "capacity must be an object of cpus and memory_mb"),
        ({"schedulable": "yes"}, "schedulable 'yes' must be true or false"),
        ({"tls": {"ca": "ca.pem", "cert": "/c", "key": "/k"}}, "tls 'ca.pem' must be an absolute"),
        ({"tls": "/etc/certs"}, "tls must be an object of ca, cert and key"),
        ({"docker": None}, "docker is missing"),
        ({"labels": {}}, "unknown field 'labels'"),
    ],
)
def test_a_bad_field_is_refused_naming_the_key_and_field(
    changes: dict[str, Any], fragment: str
) -> None:
    """Each way a hosts/ record can be wrong is an InvalidValue naming its key."""
    with pytest.raises(InvalidValue) as refused:
        read(**changes)
    assert refused.value.key == KEY
    assert fragment in str(refused.value), str(refused.value)


@pytest.mark.parametrize("raw", [b"not json", b"[1]", b'"text"'])
def test_a_record_that_is_no_json_object_is_refused(raw: bytes) -> None:
    """Not JSON, or JSON but not an object: refused with the key."""
    with pytest.raises(InvalidValue, match=KEY):
        Host.from_json("host-a", raw, key=KEY)


def test_a_bad_host_name_is_refused() -> None:
    """The name is part of the key: it must be a plain name."""
    with pytest.raises(InvalidValue, match="host name"):
        Host.from_json("-a", json.dumps(GOOD).encode(), key="hosts/-a")


def test_loopback_engines_may_go_without_tls() -> None:
    """A tcp:// engine on loopback (a tunnel, a proxy) needs no TLS files."""
    assert read(docker="tcp://127.0.0.1:2375", tls=None).docker == "tcp://127.0.0.1:2375"


# ------------------------------------------------------------------ pools


def test_the_platforms_cloud_init_tags_pick_each_pool() -> None:
    """Shared hosts (dataPlane,routerMesh,high=false) and dedicated ones
    (dataPlane,high=true) fall in the pool whose pools/ key names them."""
    shared = pool_tags(b'{"hosts": {"dataPlane": "true", "high": "false"}}', key="pools/shared")
    dedicated = pool_tags(b'{"hosts": {"high": "true"}}', key="pools/dedicated")
    shared_host = {"dataPlane": "true", "routerMesh": "true", "high": "false"}
    dedicated_host = {"dataPlane": "true", "high": "true"}
    assert in_pool(shared_host, "shared", shared) and not in_pool(
        shared_host, "dedicated", dedicated
    )
    assert in_pool(dedicated_host, "dedicated", dedicated)
    assert not in_pool(dedicated_host, "shared", shared)


def test_without_a_pool_key_the_tag_pool_decides() -> None:
    """No pools/<pool>: a host is in pool P when its tag pool is P."""
    assert in_pool({"pool": "web"}, "web", None)
    assert not in_pool({"high": "true"}, "web", None)


@pytest.mark.parametrize(
    "raw",
    [b'{"hosts": ["high"]}', b'{"hosts": {"high": "true"}, "extra": 1}', b'{"tags": {}}', b"x"],
)
def test_a_bad_pool_is_refused_naming_its_key(raw: bytes) -> None:
    """pools/<pool> must be {"hosts": {tag: value}} and nothing else."""
    with pytest.raises(InvalidValue, match="pools/dedicated"):
        pool_tags(raw, key="pools/dedicated")


# ----------------------------------------------------------- reservations


def test_a_container_reserves_its_limits_or_the_defaults() -> None:
    """--cpus sets NanoCpus, a CFS quota counts as CPUs too; a container
    without limits reserves 0.25 CPU and 256 MB, routerd's or not."""
    limited = _limits({"HostConfig": {"NanoCpus": 500_000_000, "Memory": 64 * 2**20}})
    quota = _limits({"HostConfig": {"CpuQuota": 150_000, "CpuPeriod": 100_000}})
    bare = _limits({"HostConfig": {}, "Config": {"Labels": {"routerd.app": "shop"}}})
    assert reservation(limited) == Resources(0.5, 64)
    assert reservation(quota) == Resources(1.5, 256)
    assert reservation(bare) == Resources(0.25, 256)
    assert bare.app == "shop"


def test_usage_tells_routerds_containers_from_others() -> None:
    """What routerd's containers reserve and what anyone else's do are counted apart."""
    found = [
        Limits("shop", "r1", 0.5, 128),
        Limits("shop", "r1", 0.5, 128),
        Limits("", "", None, None),
    ]
    usage = usage_of(Resources(2, 1024), found)
    assert (usage.routerd, usage.others) == (Resources(1, 256), Resources(0.25, 256))
    assert usage.free == Resources(0.75, 512)
    assert (usage.containers, usage.replicas) == (3, {("shop", "r1"): 2})


def test_a_release_records_its_reservations_and_reads_them_back() -> None:
    """cpus, memory_mb and constraints survive the history record; an old
    record without them still reads; a bad one is refused naming its key."""
    spec = ReleaseSpec(image="shop:1", cpus=0.5, memory_mb=128, constraints={"zone": "b"})
    again = Release.from_json("r1", Release("r1", spec, "t").to_json(), key="apps/s/history/r1")
    assert again.spec == spec
    old = Release.from_json("r0", b'{"image": "shop:0", "created": "t"}', key="k")
    assert old.spec.reservation == (0.25, 256)
    with pytest.raises(InvalidValue, match="apps/s/history/r2: cpus -1"):
        Release.from_json(
            "r2", b'{"image": "x", "created": "t", "cpus": -1}', key="apps/s/history/r2"
        )
    with pytest.raises(InvalidValue, match="constraints"):
        Release.from_json("r3", b'{"image": "x", "created": "t", "constraints": {"a": 1}}', key="k")


# ------------------------------------------------------------ command line


def test_tags_come_as_written_in_cloud_init() -> None:
    """--tag takes one pair or a comma list of them, fleet's metadata form."""
    assert pairs("--tag", ["dataPlane=true,routerMesh=true", "high=false"]) == {
        "dataPlane": "true",
        "routerMesh": "true",
        "high": "false",
    }
    with pytest.raises(ConfigError, match="--tag"):
        pairs("--tag", ["high"])


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--docker", "tcp://10.0.1.5:2376", "--address", "10.0.1.5"], "--docker"),
        (["--docker", "unix:///x.sock", "--address", "a b"], "--address"),
        (["--docker", "unix:///x.sock", "--address", "a", "--tag", "k"], "--tag"),
        (["--docker", "unix:///x.sock", "--address", "a", "--cpus", "0"], "--cpus"),
        (["--docker", "unix:///x.sock", "--address", "a", "--tls-ca", "/nope"], "--tls-ca"),
    ],
)
def test_hosts_add_refuses_a_bad_flag_by_name(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    """A bad flag exits 2 naming it, before any engine or etcd is reached."""
    assert main(["hosts", "add", "host-a", *argv, "--etcd", "http://127.0.0.1:1"]) == EXIT_USAGE
    assert flag in capsys.readouterr().err


def test_deploy_refuses_bad_reservations_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    """--memory below Docker's smallest limit and a --constraint that is no pair exit 2."""
    base = ["deploy", "shop", "--image", "shop:1", "--etcd", "http://127.0.0.1:1"]
    assert main([*base, "--memory", "2"]) == EXIT_USAGE
    assert "--memory" in capsys.readouterr().err
    assert main([*base, "--constraint", "zone"]) == EXIT_USAGE
    assert "--constraint" in capsys.readouterr().err
