"""Integrations with other libraries: kvpress presses and a transformers Trainer callback.

Each module imports its library lazily or only when imported itself, so `import retrieval_heads`
never needs them.
"""
