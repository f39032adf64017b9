"""Figures. One module per figure family (detection, mask, task, kv), all built on `common`
(Agg backend, `save_figure`); experiments never import plots: the CLI and the report draw."""
