"""Names and strings that end in a newline: Python's ``$`` matches before a trailing newline, so
a pattern anchored with it accepts ``"web\\n"``. The server must refuse such pool and network
names (they break every line-oriented output, ``dsipam pool usage`` among them), and the CLI's
YAML output must not print such a string as a plain scalar (the newline would be lost)."""

from __future__ import annotations

import pytest
import yaml

from dsipam.client._output import render_document
from dsipam.server.domain._errors import InvalidArgument
from dsipam.server.domain._validate import check_network, check_pool_name


@pytest.mark.parametrize("name", ["web\n", "web\r\n", "\nweb", "we\nb"])
def test_pool_name_with_a_newline_is_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="lowercase DNS label"):
        check_pool_name(name)


@pytest.mark.parametrize("network", ["lan\n", "lan.example\n"])
def test_network_name_with_a_newline_is_refused(network: str) -> None:
    with pytest.raises(InvalidArgument):
        check_network(network)


def test_good_names_pass() -> None:
    assert check_pool_name("web-1") == "web-1"
    assert check_network("lan.example") == "lan.example"


@pytest.mark.parametrize("value", ["web\n", "a/b\n", "x\r"])
def test_yaml_output_keeps_a_trailing_newline(value: str) -> None:
    assert yaml.safe_load(render_document({"name": value}, "yaml")) == {"name": value}
