"""transformers integration (issue 17): a Trainer callback that watches retrieval heads. Placeholder."""
