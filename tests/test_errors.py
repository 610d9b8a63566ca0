"""Bad input gets a clear ValueError / TypeError naming the argument, for every implementation."""

import re

import pytest
import torch
from helpers import impl_device, impl_is_available

from fastalign import linear_logprobs

N, H, V = 6, 8, 20
OUT_OF_RANGE = r"targets must lie in \[0, V\)"


def _good(device="cpu"):
    return dict(
        hidden=torch.randn(N, H, device=device),
        weight=torch.randn(V, H, device=device),
        targets=torch.randint(0, V, (N,), device=device),
    )


def _call(impl="auto", **overrides):
    args = _good()
    positional = {k: overrides.pop(k) if k in overrides else args[k] for k in args}
    return linear_logprobs(positional["hidden"], positional["weight"], positional["targets"],
                           impl=impl, **overrides)


BAD_INPUTS = [
    ("mismatched-H", dict(hidden=torch.randn(N, H + 1)), ValueError, "hidden's last dimension"),
    ("weight-1d", dict(weight=torch.randn(V * H)), ValueError, "weight must be 2-D"),
    ("weight-3d", dict(weight=torch.randn(2, V, H)), ValueError, "weight must be 2-D"),
    ("weight-empty", dict(weight=torch.randn(0, H)), ValueError, "at least one row"),
    ("targets-shape", dict(targets=torch.randint(0, V, (N + 1,))), ValueError,
     "targets must have the leading shape"),
    ("targets-float", dict(targets=torch.zeros(N)), TypeError, "targets must be an integer"),
    ("targets-bool", dict(targets=torch.zeros(N, dtype=torch.bool)), TypeError,
     "targets must be an integer"),
    ("target-too-large", dict(targets=torch.full((N,), V)), ValueError, OUT_OF_RANGE),
    ("target-negative", dict(targets=torch.full((N,), -1)), ValueError, OUT_OF_RANGE),
    ("hidden-int", dict(hidden=torch.ones(N, H, dtype=torch.long)), TypeError,
     "hidden must be float"),
    ("hidden-not-tensor", dict(hidden=[[0.0] * H] * N), TypeError, "hidden must be a torch.Tensor"),
    ("dtype-mismatch", dict(hidden=torch.randn(N, H, dtype=torch.float16)), TypeError,
     "same dtype"),
    ("temperature-zero", dict(temperature=0.0), ValueError, "temperature must be"),
    ("temperature-negative", dict(temperature=-1.0), ValueError, "temperature must be"),
    ("temperature-nan", dict(temperature=float("nan")), ValueError, "temperature must be"),
    ("temperature-string", dict(temperature="hot"), TypeError, "temperature must be a float"),
    ("softcap-zero", dict(softcap=0.0), ValueError, "softcap must be"),
    ("softcap-negative", dict(softcap=-30.0), ValueError, "softcap must be"),
    ("bias-shape", dict(bias=torch.randn(V + 1)), ValueError, "bias must have shape"),
    ("bias-dtype", dict(bias=torch.randn(V, dtype=torch.float64)), TypeError, "bias must have"),
    ("ignore-index-float", dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ("unknown-impl", dict(impl="fast"), ValueError, "impl must be one of"),
]


@pytest.mark.parametrize("impl", ["auto", "cpp", "reference"])
@pytest.mark.parametrize("overrides, error, message",
                         [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(impl, overrides, error, message):
    if impl == "cpp" and not impl_is_available("cpp"):
        pytest.skip("C++ extension not built")
    overrides = dict(overrides)
    impl = overrides.pop("impl", impl)
    with pytest.raises(error, match=message):
        _call(impl=impl, **overrides)


def test_tensors_on_different_devices():
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match="same device"):
        _call(weight=torch.randn(V, H, device=other))


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' cannot run here"):
        _call(impl="triton")


def test_triton_refuses_float64():
    if impl_device("triton").type == "cpu" and not impl_is_available("triton"):
        pytest.skip("triton is not available")
    device = impl_device("triton")
    with pytest.raises(ValueError, match="not float64"):
        linear_logprobs(torch.randn(2, 4, dtype=torch.float64, device=device),
                        torch.randn(5, 4, dtype=torch.float64, device=device),
                        torch.zeros(2, dtype=torch.long, device=device), impl="triton")


def test_cpp_kernel_checks_its_own_arguments():
    """Direct callers of the extension get a clear error too, never a crash."""
    from fastalign.ops._extension import EXTENSION

    if EXTENSION is None:
        pytest.skip("C++ extension not built")
    args = _good()
    with pytest.raises((ValueError, TypeError, RuntimeError), match="(?i)hidden|weight|H"):
        EXTENSION.linear_logprobs_forward(args["hidden"], torch.randn(V, H + 1), None,
                                          args["targets"], 1.0, 0.0, -100)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="(?i)targets|int64|long"):
        EXTENSION.linear_logprobs_forward(args["hidden"], args["weight"], None,
                                          args["targets"].int(), 1.0, 0.0, -100)


# ---------------------------------------------------------------------------------------------
# linear_kl
# ---------------------------------------------------------------------------------------------


def _kl_call(**overrides):
    from fastalign import linear_kl

    args = dict(hidden=torch.randn(N, H), weight=torch.randn(V, H), ref_hidden=torch.randn(N, H),
                ref_weight=torch.randn(V, H))
    positional = [overrides.pop(k) if k in overrides else args[k] for k in args]
    return linear_kl(*positional, **overrides)


KL_BAD_INPUTS = [
    ("ref-vocab", dict(ref_weight=torch.randn(V + 1, H)), ValueError, "same vocabulary"),
    ("ref-tokens", dict(ref_hidden=torch.randn(N + 1, H)), ValueError,
     "ref_hidden must have the leading shape"),
    ("ref-H", dict(ref_hidden=torch.randn(N, H + 2)), ValueError, "ref_hidden's last dimension"),
    ("ref-dtype", dict(ref_hidden=torch.randn(N, H, dtype=torch.float64),
                       ref_weight=torch.randn(V, H, dtype=torch.float64)), TypeError,
     "must have hidden's dtype"),
    ("mask-shape", dict(mask=torch.ones(N + 1, dtype=torch.bool)), ValueError,
     "mask must have the leading shape"),
    ("mask-float", dict(mask=torch.ones(N)), TypeError, "mask must be a bool"),
    ("ref-bias-shape", dict(ref_bias=torch.randn(V - 1)), ValueError, "ref_bias must have shape"),
    ("temperature", dict(temperature=-1.0), ValueError, "temperature must be a finite"),
    ("softcap", dict(softcap=0.0), ValueError, "softcap must be None or"),
    ("reverse", dict(reverse="yes"), TypeError, "reverse must be a bool"),
    ("impl", dict(impl="fast"), ValueError, "impl must be one of"),
]


@pytest.mark.parametrize("overrides,error,match", [c[1:] for c in KL_BAD_INPUTS],
                         ids=[c[0] for c in KL_BAD_INPUTS])
def test_linear_kl_bad_input_is_named(overrides, error, match):
    with pytest.raises(error, match=match):
        _kl_call(**overrides)


ENVIRONMENT_ERRORS = [
    ("FASTALIGN_CPU_MATMUL", "blas", "FASTALIGN_CPU_MATMUL must be one of auto, onednn, torch"),
    ("FASTALIGN_BACKWARD_WORKSPACE_MIB", "-3", "WORKSPACE_MIB must be a positive number of MiB"),
    ("FASTALIGN_TRITON_BACKWARD", "fast", "FASTALIGN_TRITON_BACKWARD must be one of"),
    ("FASTALIGN_AUTOTUNE", "yes", "FASTALIGN_AUTOTUNE must be 0 or 1, got 'yes'"),
    ("FASTALIGN_CPU_SCHEDULE", "mine", "FASTALIGN_CPU_SCHEDULE must be owned or shared"),
    ("FASTALIGN_CPU_BLOCK_N", "0", "FASTALIGN_CPU_BLOCK_N must be a positive integer"),
    ("FASTALIGN_CPU_BLOCK_V", "12x", "FASTALIGN_CPU_BLOCK_V must be a positive integer"),
    ("FASTALIGN_CPU_ISA", "sse9", "FASTALIGN_CPU_ISA must be avx512, avx2 or baseline"),
]


@pytest.mark.parametrize("variable, value, message", ENVIRONMENT_ERRORS,
                         ids=[case[0] for case in ENVIRONMENT_ERRORS])
def test_check_environment_names_the_bad_variable(variable, value, message, monkeypatch):
    from fastalign.ops._backends import CPP_ENVIRONMENT, check_environment

    if variable in CPP_ENVIRONMENT and not impl_is_available("cpp"):
        pytest.skip("the C++ extension reads this variable")
    check_environment()
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_environment()


@pytest.mark.parametrize("variable, value", [
    ("FASTALIGN_CPU_MATMUL", "torch"), ("FASTALIGN_BACKWARD_WORKSPACE_MIB", "0.5"),
    ("FASTALIGN_TRITON_BACKWARD", "atomic"), ("FASTALIGN_AUTOTUNE", "0"),
    ("FASTALIGN_CPU_SCHEDULE", "shared"), ("FASTALIGN_CPU_BLOCK_N", "64"),
    ("FASTALIGN_CPU_ISA", "baseline"),
])
def test_check_environment_takes_every_good_value(variable, value, monkeypatch):
    from fastalign.ops._backends import check_environment

    monkeypatch.setenv(variable, value)
    check_environment()
