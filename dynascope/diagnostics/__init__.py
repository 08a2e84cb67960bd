"""Pure diagnostics: ``(model, loss_fn, batch) -> result dataclass``.

No hooks, no files, no global state; each restores the model exactly.
"""
