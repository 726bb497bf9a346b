import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nf_lightning.core.memory import budget
from nf_lightning.core.memory.budget import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("300MB", 300 * 10**6),
        ("0.5GiB", 2**29),
        ("512MiB", 512 * 2**20),
        ("1.5 GB", 1_500_000_000),
        ("100kB", 100_000),
        ("2048", 2048),
        ("2048B", 2048),
        ("  64 kib ", 64 * 1024),
        ("300mb", 300 * 10**6),
        ("2TB", 2 * 10**12),
        ("1TiB", 2**40),
        (".5KB", 500),
        ("0.3MB", 300_000),  # exact decimal arithmetic, no float noise
        ("0.1MiB", 104_857),  # 104857.6 bytes rounds down, never above the budget
        (2048, 2048),
        (3e8, 300_000_000),
    ],
)
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "MB", "abc", "-1MB", "0", "0MB", "0.1B", "1.2.3MB", "12 XB", "300 M", "1e9", 0, -5, 0.5, float("nan"),
     float("inf"), True, None, [300]],
)
def test_parse_bytes_rejects_with_accepted_forms(value):
    with pytest.raises(ValueError, match=r'e\.g\. "300MB".*KiB, MiB'):
        parse_bytes(value)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (300_000_000, "300.0 MB"),
        (23_400_000, "23.4 MB"),
        (999_960, "1.0 MB"),
        (2**30, "1.1 GB"),
        (5 * 10**15, "5000.0 TB"),
    ],
)
def test_format_bytes(n, expected):
    assert format_bytes(n) == expected


@given(st.integers(min_value=1, max_value=10**16))
def test_format_bytes_parses_back_within_its_rounding(n):
    assert abs(parse_bytes(format_bytes(n)) - n) <= 0.0501 * n


def test_docstring_examples():
    assert doctest.testmod(budget).failed == 0
