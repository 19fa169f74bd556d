"""The reload diff (``l4gw check --diff``): identity-matched lists, one line per change."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from l4gw.core.config import load_config
from l4gw.core.config.diff import diff_configs
from l4gw.core.config.files import config_as_dict

EXAMPLE = Path(__file__).resolve().parent.parent / "conf.toml.example"


def example() -> dict[str, Any]:
    return config_as_dict(load_config(EXAMPLE))


def test_identical_configs_have_no_diff() -> None:
    assert diff_configs(example(), example()) == []


def test_addresses_are_written_as_in_the_file() -> None:
    data = example()
    assert data["listeners"][0]["listen"] == "0.0.0.0:8080"
    assert data["upstreams"]["web"]["nodes"][0]["address"] == "10.0.1.10:80"


def test_node_weight_change_is_one_line_keyed_by_address() -> None:
    old, new = example(), example()
    new["upstreams"]["web"]["nodes"][0]["weight"] = 3
    assert diff_configs(old, new) == ["~ upstreams.web.nodes[10.0.1.10:80].weight: 10 -> 3"]


def test_added_removed_and_reordered() -> None:
    old, new = example(), example()
    removed = new["upstreams"]["web"]["nodes"].pop(1)
    new["upstreams"]["web"]["nodes"].reverse()  # order alone is no change
    new["listeners"].append({"name": "extra", "listen": "127.0.0.1:1"})
    lines = diff_configs(old, new)
    assert f"- upstreams.web.nodes[{removed['address']}]" in lines
    assert '+ listeners[extra]: {"listen": "127.0.0.1:1", "name": "extra"}' in lines
    assert len(lines) == 2


def test_removed_key_and_changed_scalar() -> None:
    old, new = example(), example()
    del new["upstreams"]["api"]
    new["daemon"]["log_level"] = "debug"
    lines = diff_configs(old, new)
    assert lines[0] == '~ daemon.log_level: "info" -> "debug"'
    assert lines[1].startswith("- upstreams.api: ")


@given(st.randoms(use_true_random=False), st.integers(min_value=1, max_value=5))
def test_every_change_is_reported_once(rng: random.Random, changes: int) -> None:
    """Changing k distinct node weights yields exactly k lines, each naming its node."""
    old = example()
    new = copy.deepcopy(old)
    nodes = [(name, node) for name, up in new["upstreams"].items() for node in up["nodes"]]
    picked = rng.sample(nodes, min(changes, len(nodes)))
    for _, node in picked:
        node["weight"] = node["weight"] + 1
    lines = diff_configs(old, new)
    assert len(lines) == len(picked)
    for name, node in picked:
        assert any(f"upstreams.{name}.nodes[{node['address']}].weight" in line for line in lines)
