"""Experiments that apply conditions (masked heads, a KV-cache policy) to tasks: task-eval (and its
NIAH form mask-eval, both in `task_eval`), kv-eval, grounding, passages, finetune. Each streams
records to a run folder through `retrieval_heads.runner` and resumes."""
