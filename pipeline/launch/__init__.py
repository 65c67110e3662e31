"""Launching whole experiments: ``genbench run`` (prepare -> fit -> benchmark -> leaderboard in this process)
and ``genbench submit`` (the same as SLURM job arrays with dependencies)."""
