"""Every name maskq gives a thing it keeps: its Redis keys, and the job folders in object storage.

One home, so that a reader can see the whole keyspace at once and no module
spells a key its own way. The Lua scripts take their key names from here too:
a script written with ``${job}``, ``${lane}``… placeholders is filled in by
:func:`lua` with the prefixes below (a script cannot be handed every key it
touches in ``KEYS``, because it finds some ids only as it runs).

Celery's own keys are theirs (the lane lists are named after the lanes;
``_kombu.binding.*``); the two that recovery reads are named at the end.
flask-limiter's are its own.
"""

from __future__ import annotations

from string import Template

# -- jobs -------------------------------------------------------------------------------------
JOB_PREFIX = "maskq:job:"  # + id: the job's record (a hash, with a TTL)
LANE_PREFIX = "maskq:lane:"  # + lane: ids of the jobs queued in it, by entry time (a sorted set)
DEADLINES = "maskq:deadlines"  # ids of queued jobs with a deadline, by deadline
# Ids of jobs submitted with a Cancel-After, by when they are canceled unless ended (queued or running:
# domain/cancel_after.py); an entry whose job ended in time goes when its time comes.
CANCEL_AT = "maskq:cancel_at"
PROMOTED = "maskq:promoted"  # aged jobs promoted to the interactive lane and still queued
RUNNING = "maskq:running"  # ids of running jobs, by the time they started (recovery reads it)
# Ids of queued jobs whose message may not have been sent yet, by creation time: written with the record,
# removed once the message is out (or the job follows an identical one); recovery sends what is left.
UNSENT = "maskq:unsent"
# Every job ever created, "tenant/job_id" by created_at, kept after the record expires: retention's index.
CREATED = "maskq:jobs:created"
DURATIONS = "maskq:durations"  # how long recent jobs ran (a capped list), for start estimates
# The service-wide job series (stores/job_metrics.py): "name|label values" -> count; histograms add "|b<i>", "|sum".
METRIC_COUNTERS = "maskq:metrics:counters"
METRIC_HISTOGRAMS = "maskq:metrics:histograms"


def job(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}"


def job_events(job_id: str) -> str:
    """The pub/sub channel on which a job's moves are published (for long polls)."""
    return f"{JOB_PREFIX}{job_id}:events"


def lane_index(lane: str) -> str:
    """A sorted set of the ids of the jobs queued in ``lane``, by the time they entered it."""
    return f"{LANE_PREFIX}{lane}"


# -- batches (stores/batches.py) -------------------------------------------------------------------
BATCH_PREFIX = "maskq:batch:"  # + id: the batch (a hash); + id:jobs, + id:pending
# Batches whose last job ended and whose batch.completed event is not queued yet, by when it is due
# (a notifier takes an entry by pushing its time a lease ahead, and removes it once queued).
BATCHES_UNNOTIFIED = "maskq:batches:unnotified"
# Batches still receiving (not sealed), by their last sign of life: upkeep seals the ones gone quiet.
BATCHES_RECEIVING = "maskq:batches:receiving"


def batch(batch_id: str) -> str:
    return f"{BATCH_PREFIX}{batch_id}"


def batch_jobs(batch_id: str) -> str:
    """The batch's jobs in upload order: a list of JSON ``[job id, file name]``."""
    return f"{BATCH_PREFIX}{batch_id}:jobs"


def batch_pending(batch_id: str) -> str:
    """The ids of the batch's jobs that have not ended (a set): the batch completes when it empties."""
    return f"{BATCH_PREFIX}{batch_id}:pending"


# -- the result cache and coalescing ------------------------------------------------------------
CACHE_ENTRY_PREFIX = "maskq:cache:entry:"  # + digest: the id of the job whose result it is
CACHE_INDEX = "maskq:cache:index"  # digests by insertion time, for the size bound
CACHE_INFLIGHT_PREFIX = "maskq:cache:inflight:"  # + digest: the job in flight that identical jobs follow
CACHE_FOLLOWERS_PREFIX = "maskq:cache:followers:"  # + leader id: the jobs waiting on it


def cache_entry(digest: str) -> str:
    return f"{CACHE_ENTRY_PREFIX}{digest}"


def cache_inflight(digest: str) -> str:
    return f"{CACHE_INFLIGHT_PREFIX}{digest}"


def cache_followers(job_id: str) -> str:
    return f"{CACHE_FOLLOWERS_PREFIX}{job_id}"


# -- encoder outputs shared by every worker process (models/encoder_cache.py) ----------------------
ENCODING_PREFIX = "maskq:encoding:"  # + part:tenant:input hash -> a hash: names, <name>:data/dtype/shape
ENCODINGS = "maskq:encodings"  # the entries by last use (a sorted set), for the size bound


def encoding(part: str, tenant: str, input_hash: str) -> str:
    """An encoder part's output (``part``: its file's sha256) for one tenant's input (an image's sha256, a
    phrase's hash)."""
    return f"{ENCODING_PREFIX}{part}:{tenant}:{input_hash}"


# -- images stored ahead of their jobs (POST /v1/images: stores/images.py) ----------------------------
IMAGE_PREFIX = "maskq:image:"  # + tenant:image id (its sha256) -> the image's record (a hash, with a TTL)
# Every stored image, "tenant/image_id" by its last use (an upload or a job naming it), kept after the
# record expires: retention's index, as CREATED is for jobs.
IMAGES_USED = "maskq:images:used"


def image(tenant: str, image_id: str) -> str:
    return f"{IMAGE_PREFIX}{tenant}:{image_id}"


# -- tenants and submissions ----------------------------------------------------------------------
API_KEYS = "maskq:apikeys"  # every key hash (a set), for listing


def api_key(key_hash: str) -> str:
    return f"maskq:apikey:{key_hash}"


def waits(client_id: str) -> str:
    """The long polls one API key (or address) holds now: a sorted set of request tokens by when they end."""
    return f"maskq:waits:{client_id}"


def idempotency(tenant: str, digest: str) -> str:
    return f"maskq:idempotency:{tenant}:{digest}"


# -- webhooks -------------------------------------------------------------------------------------
WEBHOOK_DISABLED_URLS = "maskq:webhook:disabled"  # URLs a 410 answer disabled (a hash)
WEBHOOK_MESSAGE_PREFIX = "maskq:webhook:msg:"  # + message id: one message (a hash); + id:attempts
# Messages whose first delivery attempt may not be queued yet, by when their holder's lease runs out: written
# with the message (by the job's state move itself), removed once queued; upkeep queues what is left
# (stores/outbox.py).
WEBHOOK_OUTBOX = "maskq:webhook:outbox"
WEBHOOK_SEQUENCE = "maskq:webhook:sequence"  # a counter that makes the ids of job event messages unique


def webhook_secret(tenant: str) -> str:
    return f"maskq:webhook:secret:{tenant}"


def webhook_message(message_id: str) -> str:
    return f"{WEBHOOK_MESSAGE_PREFIX}{message_id}"


def webhook_attempts(message_id: str) -> str:
    return f"{WEBHOOK_MESSAGE_PREFIX}{message_id}:attempts"


def job_deliveries(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}:deliveries"


# -- workers, as they record themselves (stores/fleet.py) ---------------------------------------------
# Each kind of record is a hash (member -> JSON) beside a sorted set of when each member lapses, in
# Redis's own clock: read in one call, never by scanning the keyspace.
WORKERS = "maskq:workers"  # "host:pid" -> a pool process's heartbeat
WORKERS_LAPSE = "maskq:workers:lapse"  # "host:pid" -> when its heartbeat lapses
GATES = "maskq:gates"  # worker name -> its resource gate's state
GATES_LAPSE = "maskq:gates:lapse"
GATE_RESERVE_MB = "maskq:gate:reserve_mb"  # an operator's override of the gate's reserve
CLAIM_OWNERS = "maskq:claims"  # the pool processes ("host:pid") holding batch claims now


CLAIMS_PREFIX = "maskq:claimed:"  # + owner: the messages it took off the lanes for a batch


def claims(owner: str) -> str:
    """The messages one pool process took off the lanes for a batch (a hash by job id)."""
    return f"{CLAIMS_PREFIX}{owner}"


# -- the broker's (kombu's Redis transport) ------------------------------------------------------
# Messages delivered to a worker and not yet acknowledged: a hash by delivery tag of
# [message, exchange, routing key], and the time each was delivered.
BROKER_UNACKED = "unacked"
BROKER_UNACKED_INDEX = "unacked_index"


# -- object storage ---------------------------------------------------------------------------------
def job_prefix(tenant: str, job_id: str) -> str:
    """Where one job's objects live in storage: ``tenants/{tenant}/jobs/{job_id}/``."""
    return f"tenants/{tenant}/jobs/{job_id}/"


def image_prefix(tenant: str, image_id: str) -> str:
    """Where one stored image lives in storage: ``tenants/{tenant}/images/{image_id}/`` (its file, ``image.<ext>``)."""
    return f"tenants/{tenant}/images/{image_id}/"


# -- Lua ------------------------------------------------------------------------------------------------
_PREFIXES = {
    "job": JOB_PREFIX,
    "lane": LANE_PREFIX,
    "deadlines": DEADLINES,
    "promoted": PROMOTED,
    "running": RUNNING,
    "batch": BATCH_PREFIX,
    "batches_unnotified": BATCHES_UNNOTIFIED,
    "batches_receiving": BATCHES_RECEIVING,
    "claims": CLAIMS_PREFIX,
    "cache_entry": CACHE_ENTRY_PREFIX,
    "cache_followers": CACHE_FOLLOWERS_PREFIX,
    "metric_counters": METRIC_COUNTERS,
    "metric_histograms": METRIC_HISTOGRAMS,
    "webhook_message": WEBHOOK_MESSAGE_PREFIX,
    "webhook_outbox": WEBHOOK_OUTBOX,
    "webhook_sequence": WEBHOOK_SEQUENCE,
}


def lua(script: str) -> str:
    """``script`` with its ``${job}``-style placeholders replaced by the key names above."""
    return Template(script).substitute(_PREFIXES)
