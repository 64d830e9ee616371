import warnings

import pytest
from support.devices import detach_leaked_loops, requires_loop
from support.disks import build_disk


@pytest.fixture
def workdir(tmp_path):
    """A fresh temporary directory for the test's files."""
    return tmp_path


@pytest.fixture
def disk_factory(tmp_path):
    """build_disk() into the test's tmp dir: disk_factory("a.img", size, label, partitions, ...)."""
    requires_loop()

    def make_disk(name, size, label="dos", partitions=(), **options):
        return build_disk(tmp_path / name, size, label, partitions, **options)

    return make_disk


@pytest.fixture(autouse=True)
def _detach_leaked_loops():
    yield
    leaked = detach_leaked_loops()
    if leaked:
        warnings.warn(f"test left loop devices attached; detached {leaked}")
