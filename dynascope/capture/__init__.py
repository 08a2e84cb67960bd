"""Capture: the session that owns a live run's instruments (:mod:`.session`), the reducer that
combines ranks under torch.distributed (:mod:`.distributed`), snapshots for replay (:mod:`.snapshot`)
and the listeners that mirror flushed rows (:mod:`.listeners`)."""
