"""Shared test fixtures.

The repository root goes on sys.path so tests import the project's packages without an install
(CI runs `pytest` from a checkout).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
