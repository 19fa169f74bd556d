"""l4gw.resources: the capacity checks as pure functions of the values, reading a fake /proc,
and raising RLIMIT_NOFILE in a child process (so the test run's own limit is untouched)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4gw.ops import resources
from l4gw.ops.resources import KernelLimits, warnings_for

GOOD = KernelLimits(
    nofile_soft=1048576,
    nofile_hard=1048576,
    somaxconn=4096,
    pipe_user_pages_soft=0,
    pipe_max_size=1048576,
    local_port_range=(10000, 65535),
)


def test_a_well_tuned_machine_has_no_warnings() -> None:
    assert warnings_for(GOOD, 10_000) == []
    assert warnings_for(KernelLimits(), 10_000) == []  # nothing readable: nothing to say


def test_nofile_warning_names_the_numbers_and_the_fix() -> None:
    (warning,) = warnings_for(KernelLimits(nofile_soft=1024, nofile_hard=4096), 10_000)
    assert "RLIMIT_NOFILE) is 1024 (hard limit 4096)" in warning
    assert "need up to 61024" in warning
    assert "LimitNOFILE=1048576" in warning
    assert resources.nofile_warning(70_000, None, 10_000) is None
    assert "hard limit unlimited" in (resources.nofile_warning(100, None, 10) or "")


def test_somaxconn_warning() -> None:
    warning = resources.somaxconn_warning(128)
    assert warning is not None
    assert "net.core.somaxconn is 128" in warning
    assert "`sysctl -w net.core.somaxconn=4096`" in warning
    assert "/etc/sysctl.d/90-l4gw.conf" in warning
    assert resources.somaxconn_warning(4096) is None


def test_pipe_pages_warning() -> None:
    warning = resources.pipe_pages_warning(16384, 10_000)
    assert warning is not None
    assert "fs.pipe-user-pages-soft is 16384 pages (64 MiB per user)" in warning
    assert "past about 512 connections" in warning
    assert "at most 64 pipes can grow to 1 MiB" in warning
    assert "`sysctl -w fs.pipe-user-pages-soft=320000`" in warning
    assert resources.pipe_pages_warning(0, 10**9) is None  # 0 = no limit
    assert resources.pipe_pages_warning(320_000, 10_000) is None


def test_pipe_max_size_warning() -> None:
    warning = resources.pipe_max_size_warning(65536)
    assert warning is not None
    assert "fs.pipe-max-size is 65536 bytes" in warning
    assert "`sysctl -w fs.pipe-max-size=1048576`" in warning
    assert resources.pipe_max_size_warning(1 << 20) is None


def test_port_range_warning() -> None:
    warning = resources.port_range_warning((32768, 60999), 50_000)
    assert warning is not None
    assert "32768-60999 (28232 ports)" in warning
    assert '`sysctl -w net.ipv4.ip_local_port_range="10000 65535"`' in warning
    assert "`net.ipv4.ip_local_port_range = 10000 65535`" in warning
    assert resources.port_range_warning((32768, 60999), 28_232) is None


def test_warnings_come_in_a_stable_order() -> None:
    bad = KernelLimits(1024, 1024, 128, 1024, 4096, (60000, 60999))
    found = warnings_for(bad, 5000)
    assert [w.split()[0] for w in found] == [
        "the",
        "net.core.somaxconn",
        "fs.pipe-user-pages-soft",
        "fs.pipe-max-size",
        "net.ipv4.ip_local_port_range",
    ]


@given(
    soft=st.integers(0, 1 << 22),
    somaxconn=st.integers(0, 1 << 20),
    pages=st.integers(0, 1 << 24),
    low=st.integers(1, 65535),
    span=st.integers(0, 65534),
    expected=st.integers(0, 1 << 20),
)
def test_warnings_never_fail(
    soft: int, somaxconn: int, pages: int, low: int, span: int, expected: int
) -> None:
    limits = KernelLimits(soft, soft, somaxconn, pages, pages * 4096, (low, low + span))
    for warning in warnings_for(limits, expected):
        assert "sysctl -w" in warning or "LimitNOFILE" in warning


def test_read_kernel_limits_from_a_fake_proc(tmp_path: Path) -> None:
    for name, text in {
        "sys/net/core/somaxconn": "128\n",
        "sys/fs/pipe-user-pages-soft": "16384\n",
        "sys/fs/pipe-max-size": "1048576\n",
        "sys/net/ipv4/ip_local_port_range": "32768\t60999\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    limits = resources.read_kernel_limits(tmp_path)
    assert limits.somaxconn == 128
    assert limits.pipe_user_pages_soft == 16384
    assert limits.pipe_max_size == 1048576
    assert limits.local_port_range == (32768, 60999)
    assert limits.nofile_soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_unreadable_or_garbled_proc_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "sys/net/core").mkdir(parents=True)
    (tmp_path / "sys/net/core/somaxconn").write_text("lots\n")
    limits = resources.read_kernel_limits(tmp_path)
    assert limits.somaxconn is None
    assert limits.local_port_range is None


def test_capacity_warnings_on_this_machine() -> None:
    found = resources.capacity_warnings(100)
    assert isinstance(found, list)
    assert all(isinstance(w, str) for w in found)


CHILD = """
import json, resource
from l4gw.ops.resources import raise_nofile_limit
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
first = raise_nofile_limit()
second = raise_nofile_limit()
print(json.dumps([first, second, resource.getrlimit(resource.RLIMIT_NOFILE), hard]))
"""


def test_raise_nofile_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    first, second, now, hard = json.loads(out)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("infinite hard limit: replaced by fs.nr_open")
    assert first == [256, hard]
    assert second == [hard, hard]
    assert now == [hard, hard]
