"""--device/--dtype resolution, driven with fake CUDA probes so it runs on any CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from pollinate.node.device import CudaProbe, choose_device, choose_dtype, parse_dtype, resolve_placement

NO_GPU = CudaProbe(device_count=0)
H100 = CudaProbe(device_count=1, capabilities=((9, 0),), names=("NVIDIA H100 80GB HBM3",))
# Two older cards: a T4 (7.5) has no native bf16.
TWO_T4 = CudaProbe(device_count=2, capabilities=((7, 5), (7, 5)), names=("Tesla T4", "Tesla T4"))


@pytest.mark.parametrize(
    ("spec", "probe", "expected"),
    [
        ("auto", NO_GPU, torch.device("cpu")),
        ("auto", H100, torch.device("cuda", 0)),
        ("cpu", H100, torch.device("cpu")),
        ("cuda", H100, torch.device("cuda", 0)),
        ("CUDA:1", TWO_T4, torch.device("cuda", 1)),
    ],
)
def test_choose_device(spec, probe, expected):
    device, reason = choose_device(spec, probe)
    assert device == expected
    assert reason


def test_cuda_without_gpu_names_what_torch_sees():
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        choose_device("cuda", NO_GPU)


def test_cuda_index_out_of_range_names_valid_range():
    with pytest.raises(ValueError, match=r"only 2 CUDA device\(s\) \(valid: cuda:0..cuda:1\)"):
        choose_device("cuda:2", TWO_T4)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "mps", ""])
def test_unknown_device_is_refused(spec):
    with pytest.raises(ValueError, match=repr(spec).replace("'", ".")):
        choose_device(spec, H100)


@pytest.mark.parametrize(
    ("spec", "device", "probe", "expected"),
    [
        ("auto", torch.device("cpu"), NO_GPU, torch.float32),
        ("auto", torch.device("cuda", 0), H100, torch.bfloat16),
        ("auto", torch.device("cuda", 1), TWO_T4, torch.float16),
        ("bf16", torch.device("cpu"), NO_GPU, torch.bfloat16),
        ("float32", torch.device("cuda", 0), H100, torch.float32),
        ("half", torch.device("cuda", 0), H100, torch.float16),
    ],
)
def test_choose_dtype(spec, device, probe, expected):
    dtype, _reason = choose_dtype(spec, device, probe)
    assert dtype == expected


def test_float16_on_cpu_is_allowed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pollinate.node.device"):
        dtype, reason = choose_dtype("float16", torch.device("cpu"), NO_GPU)
    assert dtype == torch.float16
    assert "slow" in reason
    assert any("float16 on the CPU" in r.getMessage() for r in caplog.records)


def test_bf16_on_old_gpu_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="pollinate.node.device"):
        dtype, _ = choose_dtype("bfloat16", torch.device("cuda", 0), TWO_T4)
    assert dtype == torch.bfloat16
    assert any("no native bfloat16" in r.getMessage() for r in caplog.records)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown --dtype 'int8'"):
        parse_dtype("int8")


def test_resolve_placement_fake_gpu():
    p = resolve_placement("auto", "auto", probe=H100)
    assert (p.device, p.dtype, p.device_name, p.dtype_name) == (
        torch.device("cuda", 0),
        torch.bfloat16,
        "NVIDIA H100 80GB HBM3",
        "bfloat16",
    )
    assert len(p.reasons) == 2


def test_resolve_placement_on_this_machine_defaults_to_something_usable():
    p = resolve_placement()
    if torch.cuda.is_available():
        assert p.device.type == "cuda"
    else:
        assert (p.device, p.dtype) == (torch.device("cpu"), torch.float32)
        assert p.device_name.startswith("cpu ")


def test_probe_rejects_inconsistent_lengths():
    with pytest.raises(ValueError, match="one entry per device"):
        CudaProbe(device_count=1)
