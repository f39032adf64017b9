"""Grounding experiment (issue 19): does retrieval-head support catch hallucination? Placeholder."""
