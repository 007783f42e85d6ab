"""The node's store of Forward inputs kept for their Backward (node/kept_inputs.py)."""

from __future__ import annotations

import pytest

from pollinate.node.kept_inputs import KeptInputs, KeptInputsConfig, check_keep_id
from pollinate.protocol.errors import InputNotKept, InvalidRequest, NotFound
from pollinate.protocol.tensors import EncodedTensor


def enc(size: int) -> EncodedTensor:
    return EncodedTensor(name="hidden_states", dtype="float32", shape=(size // 4,), codec="none",
                         payload=bytes(size))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_get_leaves_the_input_until_forget():
    kept = KeptInputs(KeptInputsConfig())
    e = enc(400)
    assert kept.put("t-1", "job", e)
    assert kept.get("t-1", "job") is e
    assert kept.get("t-1", "job") is e  # a refused Backward may come back for it
    kept.forget("t-1")
    with pytest.raises(InputNotKept, match="^input not kept: .*t-1"):
        kept.get("t-1", "job")
    assert kept.bytes == 0 and len(kept) == 0


def test_byte_budget_evicts_the_least_recently_kept():
    kept = KeptInputs(KeptInputsConfig(max_bytes=1000))
    for i in range(3):
        assert kept.put(f"t-{i}", "job", enc(400))
    assert kept.evicted == 1 and kept.bytes == 800
    with pytest.raises(InputNotKept):
        kept.get("t-0", "job")
    assert kept.get("t-1", "job").payload == bytes(400) and kept.get("t-2", "job")
    assert not kept.put("huge", "job", enc(1004))  # alone over the budget: not kept, nothing evicted
    assert kept.bytes == 800 and len(kept) == 2


def test_inputs_expire_after_ttl():
    clock = Clock()
    kept = KeptInputs(KeptInputsConfig(ttl_s=10.0), clock=clock)
    kept.put("old", "job", enc(40))
    clock.now = 6.0
    kept.put("new", "job", enc(40))
    clock.now = 10.5
    with pytest.raises(InputNotKept, match="expired"):
        kept.get("old", "job")
    assert kept.get("new", "job") and kept.expired == 1 and kept.bytes == 40
    clock.now = 16.5
    with pytest.raises(InputNotKept):
        kept.get("new", "job")
    assert kept.bytes == 0


def test_another_jobs_input_is_refused_and_left_in_place():
    kept = KeptInputs(KeptInputsConfig())
    kept.put("t-1", "a", enc(40))
    with pytest.raises(InvalidRequest, match="job 'a', not of job 'b'"):
        kept.get("t-1", "b")
    assert kept.get("t-1", "a")


def test_input_not_kept_is_a_not_found_with_a_recognisable_message():
    import grpc

    from pollinate.protocol.errors import from_rpc_error, status_code_for

    err = InputNotKept("gone")
    assert isinstance(err, NotFound) and status_code_for(err) == grpc.StatusCode.NOT_FOUND

    class Rpc(grpc.RpcError):
        def __init__(self, details: str) -> None:
            self._details = details

        def code(self):
            return grpc.StatusCode.NOT_FOUND

        def details(self):
            return self._details

    assert type(from_rpc_error(Rpc(str(err)))) is InputNotKept
    assert type(from_rpc_error(Rpc("job 'x' is unknown"))) is NotFound


@pytest.mark.parametrize("bad", ["x" * 65, "t\n1", "tö"])
def test_bad_keep_ids_are_invalid(bad):
    with pytest.raises(InvalidRequest, match="keep_id"):
        check_keep_id(bad)


def test_config_names_bad_values():
    with pytest.raises(ValueError, match="max_bytes .*-1"):
        KeptInputsConfig(max_bytes=-1)
    with pytest.raises(ValueError, match="ttl_s .*0"):
        KeptInputsConfig(ttl_s=0)


def test_the_node_command_sets_the_kept_inputs_budget_and_ttl():
    import argparse

    from pollinate.node.cli import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = build_config(parser.parse_args(["--host", "127.0.0.1", "--blocks", "0:2"])).serving.kept_inputs
    assert (default.max_bytes, default.ttl_s) == (256 << 20, 300.0)
    set_ = build_config(parser.parse_args(["--host", "127.0.0.1", "--blocks", "0:2", "--kept-inputs-mb", "0.5",
                                           "--kept-inputs-ttl", "30"])).serving.kept_inputs
    assert (set_.max_bytes, set_.ttl_s) == (1 << 19, 30.0)
    with pytest.raises(ValueError, match="ttl_s"):
        build_config(parser.parse_args(["--host", "127.0.0.1", "--blocks", "0:2", "--kept-inputs-ttl", "0"]))
