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


# ---------------------------------------------------------------- checks moved here (issue 23)
from pathlib import Path  # noqa: E402

from vxnb._checks import (check_bool, check_flag_or_auto, check_fraction, check_int, check_path,  # noqa: E402
                          check_positive_number, check_unique_items)


def test_positive_int_allows_none_only_when_asked():
    assert check_positive_int(None, "n", allow_none=True) is None
    assert check_positive_int(np.int16(4), "n", allow_none=True) == 4
    with pytest.raises(ValueError, match=r"^n: expected a positive int or None, got 0$"):
        check_positive_int(0, "n", allow_none=True)
    with pytest.raises(ValueError, match=r"^n: expected a positive int, got None$"):
        check_positive_int(None, "n")


@pytest.mark.parametrize("low, high, value, expected", [(0, 4, 0, 0), (0, 4, np.int8(4), 4), (2, None, 10**9, 10**9),
                                                         (None, None, -7, -7), (None, 3, 3, 3)])
def test_int_accepts_within_bounds(low, high, value, expected):
    out = check_int(value, "x", low, high)
    assert out == expected and type(out) is int


@pytest.mark.parametrize("low, high, value, exc, message", [
    (0, 4, 5, ValueError, r"^test_fold: expected an int in 0\.\.4, got 5$"),
    (0, 4, -1, ValueError, r"^test_fold: expected an int in 0\.\.4, got -1$"),
    (2, None, 1, ValueError, r"^test_fold: expected an int ≥ 2, got 1$"),
    (None, 3, 4, ValueError, r"^test_fold: expected an int ≤ 3, got 4$"),
    (0, 4, 1.0, TypeError, r"^test_fold: expected an int in 0\.\.4, got float 1\.0$"),
    (0, 4, True, TypeError, r"^test_fold: expected an int in 0\.\.4, got bool True$"),
    (1, None, "2", TypeError, r"^test_fold: expected an int ≥ 1 or None, got str '2'$"),
])
def test_int_rejects_naming_the_argument(low, high, value, exc, message):
    what = "or None" if value == "2" else ""
    with pytest.raises(exc, match=message):
        check_int(value, "test_fold", low, high, what)


def test_bool():
    assert check_bool(True, "resample") is True and check_bool(np.bool_(False), "resample") is False
    for bad in (0, 1, "True", None):
        with pytest.raises(TypeError, match=r"^resample: expected a bool, got "):
            check_bool(bad, "resample")


def test_flag_or_auto():
    assert [check_flag_or_auto(v, "keep_X") for v in (True, False, "auto")] == [True, False, "auto"]
    for bad in (1, 0, "yes", None, np.bool_(True)):
        with pytest.raises(ValueError, match=r"^keep_X: expected True, False or 'auto', got "):
            check_flag_or_auto(bad, "keep_X")


def test_path(tmp_path):
    assert check_path(str(tmp_path), "root") == tmp_path and check_path(tmp_path / "x", "root") == tmp_path / "x"
    assert check_path(None, "cache_dir", allow_none=True) is None
    with pytest.raises(TypeError, match=r"^root: expected a folder path \(str or os.PathLike\), got NoneType None$"):
        check_path(None, "root")
    with pytest.raises(TypeError, match=r"^cache_dir: expected a folder path or None \(str or os.PathLike\), got int 3$"):
        check_path(3, "cache_dir", allow_none=True)
    assert isinstance(check_path("rel", "root"), Path)


@pytest.mark.parametrize("value", [0.5, 10, np.float32(1e-3), np.int64(2)])
def test_positive_number_accepts(value):
    out = check_positive_number(value, "mu")
    assert out == float(value) and type(out) is float


@pytest.mark.parametrize("value, shown", [(0, "0"), (-1.5, "-1.5"), (float("nan"), "nan"), (float("inf"), "inf"),
                                          (True, "bool True"), ("1", "str '1'"), (None, "NoneType None")])
def test_positive_number_rejects(value, shown):
    with pytest.raises(ValueError, match=rf"^mu: expected a positive number \(the paper uses 10\), got {shown}$"):
        check_positive_number(value, "mu", "the paper uses 10")


def test_fraction():
    assert check_fraction(0.25, "val_fraction") == 0.25 and check_fraction(np.float32(0.5), "val_fraction") == 0.5
    for bad in (0, 1, 0.0, 1.0, -0.1, True, "0.5", None, float("nan")):
        with pytest.raises(ValueError, match=r"^val_fraction: expected a number in \(0, 1\), got "):
            check_fraction(bad, "val_fraction")


def _one_of_abc(v, arg):
    if v not in ("a", "b", "c"):
        raise ValueError(f"{arg}: expected one of 'a', 'b', 'c', got {v!r}")
    return v


def _unique(values):
    return check_unique_items(values, "methods", _one_of_abc, is_one=lambda v: isinstance(v, str),
                              what="a sequence of names", known="a, b, c", noun="names")


def test_unique_items():
    assert _unique("b") == ("b",) and _unique(["c", "a"]) == ("c", "a") and _unique(iter("ab")) == ("a", "b")
    with pytest.raises(TypeError, match=r"^methods: expected a sequence of names \(a, b, c\), got int 3$"):
        _unique(3)
    with pytest.raises(ValueError, match=r"^methods: expected at least one of a, b, c, got an empty sequence$"):
        _unique([])
    with pytest.raises(ValueError, match=r"^methods: expected one of 'a', 'b', 'c', got 'd'$"):
        _unique(["a", "d"])
    with pytest.raises(ValueError, match=r"^methods: names must be unique, got \['a', 'b', 'a'\]$"):
        _unique(["a", "b", "a"])
