"""A driver SIGKILLed while its embedded Ray runs leaves Ray's agents behind; the next start (or
``reap_orphans``) finds exactly those and ends them, and leaves a live Ray alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cluster.orphans import find_orphans, reap_orphans

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DRIVER = """
import ray, sys, time
ray.init(num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0,
         _temp_dir=sys.argv[1])
print("up", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self"), reason="needs Linux /proc")
def test_agents_of_a_killed_driver_are_found_and_ended(ray_local):
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="mt-orph-", dir="/tmp")  # short: Ray's socket paths are <= 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, temp], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    assert not [o for o in find_orphans() if temp in o.session], "nothing is orphaned while the driver lives"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline, mine = time.monotonic() + 60, []
    while time.monotonic() < deadline and len(mine) < 2:  # raylet and GCS go away first
        time.sleep(1)
        mine = [o for o in find_orphans() if temp in o.session]
    assert sorted(o.name for o in mine) == ["ray::DashboardAgent", "ray::RuntimeEnvAgent"], mine
    reaped = reap_orphans()
    assert {o.pid for o in mine} <= {o.pid for o in reaped}
    from cluster.orphans import _running

    assert not any(_running(o.pid) for o in mine), mine
    assert ray_local.is_initialized() and ray_local.get(ray_local.put(1)) == 1  # the live Ray is untouched
    shutil.rmtree(temp, ignore_errors=True)
