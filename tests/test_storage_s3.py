"""S3 checkpoint storage: round trip on a real S3 API server (moto, own process), manifest-last
atomicity, corruption fallbacks, and retries with backoff then one clear failure."""

from __future__ import annotations

import pytest
import torch

from dsl.checkpoint import MANIFEST, latest_complete, list_checkpoints, load_checkpoint, save_checkpoint
from dsl.errors import UserError
from dsl.service.local_cluster import free_port
from dsl.service.storage_s3 import S3Storage, parse_s3_uri
from dsl.storage import Storage, open_storage


def _save(storage, step: int, value: float) -> str:
    return save_checkpoint(storage, step, config={"name": "t"}, model_state={"w": torch.full((3, 4), value)},
                           optim_state=None, state={"k": step}, metrics={"valid_nll": 1.0 / step})


class RecordingClient:
    """Passes calls to a real boto3 client; records uploaded keys; can fail the n-th upload."""

    def __init__(self, real, fail_put_at: int | None = None) -> None:
        self.real, self.fail_put_at, self.puts = real, fail_put_at, []

    def put_object(self, **kw):
        from botocore.exceptions import EndpointConnectionError

        if self.fail_put_at is not None and len(self.puts) + 1 >= self.fail_put_at:
            raise EndpointConnectionError(endpoint_url="http://unreachable")
        self.puts.append(kw["Key"])
        return self.real.put_object(**kw)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_uri_parsing_and_rejections():
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("s3://", "s3://AKIA:secret@bucket/x", "s3://bucket/x?access_key=AKIA"):
        with pytest.raises(UserError) as err:
            parse_s3_uri(bad)
        assert "secret" not in str(err.value) and "\n" not in str(err.value)


def test_unreachable_endpoint_is_retried_with_backoff_then_one_clear_failure():
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    sleeps: list[float] = []
    st = S3Storage("s3://bucket/run", endpoint_url=dead, attempts=4, backoff_s=0.1, timeout_s=2,
                   sleep=sleeps.append)
    with pytest.raises(UserError) as err:
        st.put_bytes("step-1/model.safetensors", b"x")
    msg = str(err.value)
    assert "s3://bucket/run/step-1/model.safetensors" in msg and "after 4 attempts" in msg and "\n" not in msg
    assert len(sleeps) == 3
    # exponential with jitter in [0.5, 1] of the nominal 0.1, 0.2, 0.4
    for got, nominal in zip(sleeps, (0.1, 0.2, 0.4)):
        assert 0.5 * nominal <= got <= nominal


@pytest.mark.integration
def test_round_trip_list_delete(s3_bucket):
    st = open_storage(s3_bucket + "/runs/a")
    assert isinstance(st, S3Storage) and st.uri == s3_bucket + "/runs/a"
    st.put_bytes("x/1.bin", b"one")
    st.put_bytes("x/2.bin", b"two")
    st.put_bytes("y.bin", b"three")
    assert st.get_bytes("x/2.bin") == b"two"
    assert st.exists("x/1.bin") and not st.exists("x/3.bin")
    assert st.list() == ["x/1.bin", "x/2.bin", "y.bin"]
    assert st.list("x/") == ["x/1.bin", "x/2.bin"]
    st.delete("x")
    assert st.list() == ["y.bin"]
    with pytest.raises(UserError, match="no such object"):
        st.get_bytes("x/1.bin")
    assert isinstance(st, Storage) and st.local_path("y.bin") is None
    st.put_files("set", {"a.bin": b"a", "manifest.json": b"{}"})
    assert st.sizes("set/") == {"set/a.bin": 1, "set/manifest.json": 2}
    st.delete_prefix("set", first=("manifest.json",))
    assert st.list() == ["y.bin"]


@pytest.mark.integration
def test_checkpoint_on_s3_is_written_manifest_last_and_loads_verified(s3_server, s3_bucket):
    bucket, _ = parse_s3_uri(s3_bucket)
    client = RecordingClient(s3_server.client())
    st = S3Storage(s3_bucket + "/run", client=client)
    uri = _save(st, 5, 0.5)
    assert uri == s3_bucket + "/run/step-5"
    assert client.puts[-1] == "run/step-5/" + MANIFEST
    assert set(client.puts) == {"run/step-5/model.safetensors", "run/step-5/state.json", "run/step-5/manifest.json"}
    ckpt = load_checkpoint(uri)
    assert ckpt.step == 5 and torch.equal(ckpt.model_state["w"], torch.full((3, 4), 0.5))


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["missing-file", "truncated", "flipped-byte", "manifest-without-files"])
def test_corrupt_checkpoint_is_never_loaded_and_latest_falls_back(s3_bucket, damage):
    st = open_storage(s3_bucket + "/run")
    _save(st, 1, 1.0)
    _save(st, 2, 2.0)
    key = "step-2/model.safetensors"
    data = st.get_bytes(key)
    if damage == "missing-file":
        st.delete(key)
    elif damage == "truncated":
        st.put_bytes(key, data[: len(data) // 2])
    elif damage == "flipped-byte":
        st.put_bytes(key, data[:-1] + bytes([data[-1] ^ 0x01]))
    else:
        for k in st.list("step-2/"):
            if not k.endswith(MANIFEST):
                st.delete(k)
    with pytest.raises(UserError) as err:
        load_checkpoint(s3_bucket + "/run/step-2")
    assert s3_bucket + "/run/step-2/" in str(err.value) and "\n" not in str(err.value)
    assert latest_complete(st) == s3_bucket + "/run/step-1"
    assert torch.equal(load_checkpoint(latest_complete(st)).model_state["w"], torch.full((3, 4), 1.0))


@pytest.mark.integration
def test_s3_failing_mid_save_leaves_no_complete_checkpoint(s3_server, s3_bucket):
    good = open_storage(s3_bucket + "/run")
    _save(good, 1, 1.0)
    sleeps: list[float] = []
    flaky = S3Storage(s3_bucket + "/run", client=RecordingClient(s3_server.client(), fail_put_at=2),
                      attempts=3, backoff_s=0.01, sleep=sleeps.append)
    with pytest.raises(UserError, match="after 3 attempts"):
        _save(flaky, 2, 2.0)
    assert len(sleeps) == 2
    assert 2 in list_checkpoints(good)            # debris of the failed save exists...
    assert not good.exists("step-2/" + MANIFEST)  # ...but never a manifest
    assert latest_complete(good) == s3_bucket + "/run/step-1"
    # the next save of the same step cleans the debris and completes
    _save(good, 2, 2.0)
    assert latest_complete(good) == s3_bucket + "/run/step-2"


@pytest.mark.integration
def test_missing_bucket_is_one_clear_line(s3_server, s3_bucket):
    st = open_storage("s3://no-such-bucket-xyz/run")
    with pytest.raises(UserError, match="bucket 'no-such-bucket-xyz' does not exist"):
        st.put_bytes("a", b"x")
