"""`retrieval-heads finetune-eval` (issue 17). Placeholder."""
