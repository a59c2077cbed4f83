"""The rank's process settings, without Ray: the interface its collectives bind to and its threads."""

from __future__ import annotations

from cluster.worker import bind_collectives, interface_for_ip, threads_for


def test_interface_for_ip_finds_loopback_and_nothing_for_a_foreign_address():
    assert interface_for_ip("127.0.0.1") == "lo"
    assert interface_for_ip("198.18.255.254") is None  # benchmarking range: on no interface here


def test_bind_collectives_sets_gloo_and_nccl_unless_the_user_did():
    env: dict = {}
    assert bind_collectives("127.0.0.1", gpu=False, env=env) == "lo" and env == {"GLOO_SOCKET_IFNAME": "lo"}
    env = {}
    bind_collectives("127.0.0.1", gpu=True, env=env)
    assert env == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    env = {"GLOO_SOCKET_IFNAME": "eth9"}  # the user's choice wins
    assert bind_collectives("127.0.0.1", gpu=False, env=env) == "eth9" and env == {"GLOO_SOCKET_IFNAME": "eth9"}
    env = {}
    assert bind_collectives("198.18.255.254", gpu=False, env=env) == "" and env == {}  # unknown address: gloo's choice


def test_threads_come_from_the_bundle():
    assert threads_for(2.0) == 2 and threads_for(0.5) == 1 and threads_for(3.7) == 3
    assert threads_for(4.0, torch_threads=1) == 1  # cluster.torch_threads overrides
