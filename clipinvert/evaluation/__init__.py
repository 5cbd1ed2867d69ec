"""`clipinvert eval`: the paper's metrics on edited images (docs/evaluation.md)."""
