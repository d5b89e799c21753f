"""dsl.service.ray_session: the one way drivers start or join Ray."""

import os

import pytest

from dsl.errors import UserError
from dsl.service.ray_session import ray_session


@pytest.mark.integration
def test_private_ray_is_loopback_off_6379_reused_inside_and_gone_after(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_session(cpus=1, temp_prefix="ray-test-") as outer:
        host, port = outer.address.rsplit(":", 1)
        assert (host, outer.owned, outer.private) == ("127.0.0.1", True, True) and port != "6379"
        assert os.path.isdir(outer.temp_dir)
        # workers run at the driver's priority, not Ray's default nice 15
        niceness = ray.get(ray.remote(num_cpus=1)(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())
        assert niceness == os.getpriority(os.PRIO_PROCESS, 0)
        with ray_session() as inner:          # a nested session joins the open one and leaves it open
            assert (inner.address, inner.owned) == (outer.address, False)
        assert ray.is_initialized()
    assert not ray.is_initialized()
    assert not os.path.exists(outer.temp_dir)
    assert "RAY_GCS_SERVER_PORT" not in os.environ


def test_a_bad_address_is_one_line_naming_the_key(monkeypatch):
    import ray

    with pytest.raises(UserError) as err, ray_session("not-a-host:port", key="eval.ray_address"):
        pass
    assert str(err.value).startswith("eval.ray_address=not-a-host:port: cannot start or connect to Ray")
    assert "\n" not in str(err.value) and not ray.is_initialized()
