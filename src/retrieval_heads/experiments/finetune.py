"""Fine-tuning experiment (issue 17): retrieval heads before and after training. Placeholder."""
