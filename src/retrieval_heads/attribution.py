"""Answer attribution (issue 19): where each generated token came from. Placeholder."""
