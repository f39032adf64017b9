"""Experiments that apply conditions (masked heads, a KV-cache policy) to tasks: mask-eval,
task-eval, kv-eval. Each streams records to a run folder through `runner` and resumes."""
