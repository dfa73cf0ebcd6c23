"""Spec fields that parse but have no effect yet.

"No field that parses but does nothing": ``llmtrain validate`` rejects a manifest that
sets any path listed here, with the reason. Paths are spec leaf paths with list items
written as ``[]`` (``spec.data.sources[].huggingface``); a listed object path covers
everything under it. ``tests/unit/test_spec_coverage.py`` checks that every leaf of the
spec is either listed here or mapped to a test that proves its effect.
"""

from __future__ import annotations

NOT_SUPPORTED_YET: dict[str, str] = {}
