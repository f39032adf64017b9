"""Compatibility with older transformers releases (issue 16). Placeholder."""
