"""Tasks: what the model is asked and how its answer is scored (needle retrieval, extractive QA,
multi-hop QA, arithmetic, MMLU). A task knows nothing of models (needle retrieval reads the
tokenizer, for exact needle spans); experiments run them. `tasks.registry` finds them by name."""
