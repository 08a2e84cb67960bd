"""Analysis of recorded runs: events and forensics (:mod:`.forensics`), comparison with a baseline
(:mod:`.comparison`), the findings rules (:mod:`.findings`) and ``check`` (:mod:`.check`). Runs in,
DataFrames and findings out; no plotting."""
