"""The operator and its uninstall hook load no training stack: torch, numpy and Redis are for peers
and functions, and cost the operator's pod hundreds of MB before its first API call (issue 29,
defect 7; the chart's requests and limits are sized for what is left, see charts/p2ptrain/values.yaml).

Each entry point is imported (or run as far as its help) in a fresh interpreter, so nothing another
test imported can hide or cause a failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

TRAINING_STACK = ("torch", "numpy", "redis")

ENTRY_POINTS = {
    # What the operator's Deployment runs, module by module.
    "p2ptrain_operator.main": "import p2ptrain_operator.main",
    "p2ptrain_operator.handlers": "import p2ptrain_operator.handlers",
    "p2ptrain_operator.cleanup": "import p2ptrain_operator.cleanup",
    # The `p2ptrain` console script dispatching to the operator and to the hook, as far as their
    # own argument parsers (--help stops there, before any connection is made).
    "p2ptrain operator": "run(['operator', '--help'])",
    "p2ptrain operator cleanup": "run(['operator', 'cleanup', '--help'])",
}

PROBE = """
import json, sys

def run(argv):
    from p2ptrain.cli import main
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), f"exit {{exc.code}}"
    else:
        raise AssertionError("--help did not exit")

{entry}
print(json.dumps(sorted(m for m in {stack!r} if m in sys.modules)))
"""


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=list(ENTRY_POINTS))
def test_the_operator_entry_points_import_no_training_stack(entry: str) -> None:
    probe = PROBE.format(entry=ENTRY_POINTS[entry], stack=TRAINING_STACK)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(probe)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], (
        f"{entry} imports {', '.join(loaded)}: `python -X importtime -c 'import p2ptrain_operator.main'` "
        "shows through which module; keep the operator's imports off the training stack"
    )
