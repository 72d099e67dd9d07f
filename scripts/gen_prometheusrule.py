#!/usr/bin/env python3
"""Writes deploy/kubernetes/monitoring/prometheusrule.yaml (a prometheus-operator PrometheusRule)
from deploy/observability/alerts.yaml, so that the two hold the same groups.

    python scripts/gen_prometheusrule.py           # (re)write it
    python scripts/gen_prometheusrule.py --check   # exit 1 when it is not what alerts.yaml gives
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "deploy" / "observability" / "alerts.yaml"
TARGET = ROOT / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"
HEADER = """\
# Generated from deploy/observability/alerts.yaml by scripts/gen_prometheusrule.py: edit that
# file and run the script (tests/e2e/test_observability.py fails when the two differ).
# Needs the prometheus-operator's CRDs; label it to match your Prometheus' ruleSelector
# (kube-prometheus-stack: `release: <its release name>`).
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(SOURCE.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "dsipam",
            "namespace": "dsipam-system",
            "labels": {"app.kubernetes.io/name": "dsipam", "app.kubernetes.io/part-of": "dsipam"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=200, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that the file is up to date")
    a = p.parse_args(argv)
    text = render()
    if a.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run python scripts/gen_prometheusrule.py",
                  file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text)
    print(TARGET.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
