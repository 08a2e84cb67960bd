"""The command line (``dynascope ...``, :mod:`.cli`) and what its commands run: ``analyze`` on
checkpoints, ``demo``, ``report`` and ``ls``."""
