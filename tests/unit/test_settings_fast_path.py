"""The fast-path batching settings: defaults, and values out of range refused at start."""

import pytest

from dsipam.server.settings import Settings


def test_defaults_and_overrides(monkeypatch):
    monkeypatch.delenv("DSIPAM_FAST_INFLIGHT", raising=False)
    monkeypatch.delenv("DSIPAM_FAST_LINGER_MS", raising=False)
    s = Settings.from_env()
    assert (s.fast_inflight, s.fast_linger_ms) == (2, 3.0)
    monkeypatch.setenv("DSIPAM_FAST_INFLIGHT", "1")
    monkeypatch.setenv("DSIPAM_FAST_LINGER_MS", "0")
    s = Settings.from_env()
    assert (s.fast_inflight, s.fast_linger_ms) == (1, 0.0)


@pytest.mark.parametrize("name, value, message", [
    ("DSIPAM_FAST_INFLIGHT", "0", "DSIPAM_FAST_INFLIGHT: 0 is less than 1"),
    ("DSIPAM_FAST_LINGER_MS", "-1", "DSIPAM_FAST_LINGER_MS: -1.0 is less than 0.0"),
    ("DSIPAM_FAST_LINGER_MS", "soon", "DSIPAM_FAST_LINGER_MS: 'soon' is not a number"),
])
def test_out_of_range_is_refused_naming_the_setting(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=message):
        Settings.from_env()
