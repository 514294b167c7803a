"""A deliberately broken build, for the checker's own test only: every run's outcome ignores its fence.

On ``PYTHONPATH`` ahead of the project (``Cluster(broken_fencing=True)``),
Python imports this at start-up in the worker's processes: ``JobStore.move``
then drops the fence, so a run that another took over can still end the job.
The history checker must catch that (``tests/integration/test_cluster.py``).
"""

import stores.jobs

_move = stores.jobs.JobStore.move


def _unfenced(self, job_id, to, allowed_from, fence=None, **fields):
    return _move(self, job_id, to, allowed_from, None, **fields)


stores.jobs.JobStore.move = _unfenced
