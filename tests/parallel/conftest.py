import os
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance shared by the tests of this package."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp = tempfile.mkdtemp(prefix="ray-mt-", dir="/tmp")
    if not ray.is_initialized():
        ray.init(num_cpus=6, include_dashboard=False, namespace="moetrain", _temp_dir=temp,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
