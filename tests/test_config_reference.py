"""The committed configuration reference matches the schema, and every knob is documented."""
from __future__ import annotations

from fedsim.config.reference import generate, undocumented

from .conftest import ROOT


def test_reference_matches_schema():
    page = (ROOT / "docs" / "config-reference.md").read_text()
    assert page == generate(), "docs/config-reference.md is stale: run `fedsim config-reference -o docs/config-reference.md`"


def test_every_knob_has_documentation():
    assert undocumented() == []
