"""The soak command's pure parts (``bench/soak.py``); the soak itself is a bench run."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bench import tomlw
from bench.soak import parse_duration, soak_config
from l4gw.core.config import load_config


@pytest.mark.parametrize(
    ("text", "seconds"), [("600", 600.0), ("600s", 600.0), ("10m", 600.0), ("1h", 3600.0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-5s", "0", "ten", "5x"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_the_soak_config_is_valid_for_l4gw(tmp_path: Path) -> None:
    """The daemon the soak starts accepts its config: three listeners (tcp, http, https)."""
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    server.cert_chain_pems[0].write_to_path(cert)
    server.private_key_pem.write_to_path(key)
    doc = soak_config({"tcp": 18001, "http": 18002, "https": 18003}, 18004, 18005, cert, key)
    path = tmp_path / "conf.toml"
    path.write_text(tomlw.dumps(doc))
    assert tomllib.loads(path.read_text()) == doc
    config = load_config(path)
    assert [(lc.name, lc.mode, lc.tls is not None) for lc in config.listeners] == [
        ("tcp", "tcp", False),
        ("http", "http", False),
        ("https", "http", True),
    ]
