"""docs/cni.md says what the plugin does: its example parses, its tables match the code."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from dsipam.cni import _config, _errors

DOC = Path(__file__).resolve().parents[2] / "docs" / "cni.md"


def test_the_example_configuration_is_valid() -> None:
    text = DOC.read_text()
    example = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))  # type: ignore[union-attr]
    plugin = example["plugins"][0]
    cfg = _config.parse({"cniVersion": example["cniVersion"], "name": example["name"], **plugin})
    assert (cfg.pool, cfg.target, cfg.policy, cfg.families) == ("pods", "unix:///run/dsipam/dsipam.sock", 3, [1, 2])


def test_every_ipam_key_is_documented_and_read() -> None:
    text = DOC.read_text()
    table = text[text.index("| `ipam` key |"):text.index("Unknown keys")]
    documented = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, re.M):
        documented |= set(re.findall(r"`([A-Za-z]+)`", cell))
    source = inspect.getsource(_config)
    read = set(re.findall(r'"([A-Za-z]+)", "ipam\.\1"', source)) | set(re.findall(r'ipam\.get\("([A-Za-z]+)"', source))
    assert read - {"type"} == documented - {"ipam"}, (read, documented)


def test_every_error_code_is_documented() -> None:
    text = DOC.read_text()
    table = text[text.index("| code | when |"):text.index("## Authentication")]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)}
    in_code = {v for k, v in vars(_errors).items() if k.isupper() and isinstance(v, int)}
    used = in_code - {_errors.UNSUPPORTED_FIELD, _errors.UNKNOWN_CONTAINER, _errors.IO_FAILURE,
                      _errors.NOT_AVAILABLE_LIMITED}  # well-known codes the plugin never returns
    assert documented == used | {999}
