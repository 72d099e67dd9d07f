"""README.md stays true: its two commands come first, and its SDK example runs as written."""

import re
import subprocess
import sys

from support import ROOT


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert [line.split()[0] for line in block] == ["scripts/serve", "scripts/test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nscripts/test\n" in ci  # CI runs the README's test command


def test_readme_sdk_example_allocates_a_pair(target):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Allocate a pair.*?```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('"127.0.0.1:50051"', repr(target))
    answers = []
    for _run in range(2):  # run twice, as a reader does: the pool exists the second time
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        v4, v6 = out.stdout.split()
        assert v4.startswith("198.18.0.") and v4.endswith("/24")
        assert v6.startswith("fd00::") and v6.endswith("/120")
        answers.append((v4, v6))
    assert answers[0] == answers[1]  # the same owner gets the same pair
