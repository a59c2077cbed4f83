import os
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance for in-process driver tests (cluster.api.run)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers inherit the driver's environment at ray.init: give them the S3 test server's
    # dummy credentials (tests/conftest.py uses the same) and never probe cloud metadata.
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    if not ray.is_initialized():
        ray.init(num_cpus=6, include_dashboard=False, namespace="moetrain",
                 _temp_dir=tempfile.mkdtemp(prefix="ray-mt-", dir="/tmp"), log_to_driver=False,
                 configure_logging=False)
    yield ray
