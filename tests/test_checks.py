"""vxnb._checks: the shared integer checks accept ints (numpy ints too) and name the argument otherwise."""
import numpy as np
import pytest

from vxnb._checks import check_nonnegative_int, check_positive_int


@pytest.mark.parametrize("value, expected", [(1, 1), (np.int64(7), 7), (np.uint8(3), 3)])
def test_positive_int_accepts(value, expected):
    out = check_positive_int(value, "k")
    assert out == expected and type(out) is int


@pytest.mark.parametrize("value", [0, -2, True, np.bool_(True), 1.0, "3", None])
def test_positive_int_rejects(value):
    with pytest.raises(ValueError, match=r"^k: expected a positive int \(features\), got "):
        check_positive_int(value, "k", "features")


@pytest.mark.parametrize("value, expected", [(0, 0), (np.int32(5), 5)])
def test_nonnegative_int_accepts(value, expected):
    out = check_nonnegative_int(value, "seed")
    assert out == expected and type(out) is int


@pytest.mark.parametrize("value", [-1, False, 2.0, None])
def test_nonnegative_int_rejects(value):
    with pytest.raises(ValueError, match=rf"^seed: expected a non-negative int, got {value!r}$"):
        check_nonnegative_int(value, "seed")
