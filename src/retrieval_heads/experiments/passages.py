"""Passage ranking experiment (issue 19). Placeholder."""
