"""The ground floor: what every other floor may use and which imports none of them.

Robust statistics and the spike rule (:mod:`.robust`), the drift detector (:mod:`.drift`), module and
parameter names (:mod:`.names`), the state guard (:mod:`.guard`), argument checks (:mod:`.checks`),
the coverage table (:mod:`.coverage`), the one-line errors (:mod:`.errors`) and the version
(:mod:`.version`). See docs/architecture.md for the floors above it."""
