"""A deliberately broken build, for the checker's own test only: every run ignores its fence.

On ``PYTHONPATH`` ahead of the project (``Cluster(broken_fencing=True)``),
Python imports this at start-up in the worker's processes: ``JobStore.move``
then drops the fence, so a run that another took over can still end the job,
and ``JobStore.held_by`` says yes to every run, so it still writes its result
first (workers/pipeline.py asks before writing). The history checker must catch
that (``tests/integration/test_cluster.py``).
"""

import stores.jobs

_move = stores.jobs.JobStore.move


def _unfenced(self, job_id, to, allowed_from, fence=None, **fields):
    return _move(self, job_id, to, allowed_from, None, **fields)


def _always_held(self, job_id, run):
    return True


stores.jobs.JobStore.move = _unfenced
stores.jobs.JobStore.held_by = _always_held
