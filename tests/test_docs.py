"""The generated reference pages and the state diagrams stay true to the code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "docs"))
from generate import state_diagram  # noqa: E402


def test_profiles_and_cli_references_are_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind", ["job", "segment"])
def test_the_state_diagrams_match_the_transition_table(kind):
    assert state_diagram(kind) in (ROOT / "docs" / "concepts.md").read_text()


def test_every_doc_link_points_at_a_file():
    import re

    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+\.md)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
