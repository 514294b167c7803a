"""The ``maskq`` command: ``maskq keys create|revoke|list|dev`` and ``maskq segment FOLDER --out coco.json``.

``keys create`` prints the new key alone on stdout (and the rest on stderr),
so ``export MASKQ_API_KEY=$(maskq keys create --tenant acme)`` works.

The development key: with the embedded Redis and the web front end on a
loopback address, ``make run`` prints a key of tenant ``dev``, and a link to
the page that carries it in its fragment (see :func:`announce_dev_key`, called
by gunicorn once it is ready). It is made
once and kept in ``data_dir/dev-api-key`` (mode 0600), so the same key works
across restarts; ``MASKQ_DEV_KEY=false`` turns it off.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import redis

from config.redis_connection import connect
from config.celery import WORKER_CLIENT_NAME
from config.embedded_redis import RedisServer
from config.settings import LANES, Settings, load_settings
from domain import keys
from domain.tenants import ApiKey, KeyStore, check_policy, new_key

DEV_TENANT = "dev"

log = logging.getLogger(__name__)


def dev_key_path(settings: Settings) -> Path:
    return settings.data_dir / "dev-api-key"


def dev_key_wanted(settings: Settings) -> str | None:
    """None when this setup gets a development key; otherwise why not."""
    if settings.auth != "keys":
        return "MASKQ_AUTH is off: no key is needed"
    if not settings.dev_key:
        return "MASKQ_DEV_KEY is false"
    if not settings.loopback:
        return f"MASKQ_HOST {settings.host!r} is not a loopback address"
    if not settings.embedded:
        # A shared Redis is someone's real key store: a development key there would open their service.
        return "MASKQ_REDIS_URL is set (only the embedded Redis gets a development key)"
    return None


def ensure_dev_key(settings: Settings, store: KeyStore) -> str:
    """The development key: the one in ``dev-api-key`` if it is still good, else a new one."""
    path = dev_key_path(settings)
    key = path.read_text().strip() if path.exists() else ""
    record = store.lookup(key) if key else None
    if record is not None and not record.revoked:
        return key
    if not key or record is not None:  # none yet, or it was revoked: make another
        key = new_key()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
        os.replace(path.with_suffix(".tmp"), path)
    # A key on file that Redis does not know (its data was wiped) is registered again as it is.
    store.add(key, DEV_TENANT, label="development key (make run)")
    return key


def announce_dev_key(settings: Settings, wait_s: float = 10, out=sys.stdout) -> str | None:
    """Make (once) and print the development key, waiting up to ``wait_s`` for Redis to start."""
    if dev_key_wanted(settings) is not None:
        return None
    client = connect(settings.broker_url, settings.redis_sentinel_master, socket_connect_timeout=2, socket_timeout=5)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            key = ensure_dev_key(settings, KeyStore(client))
            break
        except (redis.ConnectionError, redis.BusyLoadingError) as exc:
            if time.monotonic() > deadline:
                print(f"maskq: no development key: Redis is not answering ({exc}); "
                      "run `maskq keys dev` once it is up", file=sys.stderr, flush=True)
                return None
            time.sleep(0.2)
    host = f"[{settings.host}]" if ":" in settings.host and not settings.host.startswith("[") else settings.host
    url = f"http://{host}:{settings.port}"
    # The page gets the key from the link's fragment, which a browser never sends: the service itself
    # hands no key to anyone (webapp/page.py).
    print(f"\nmaskq development API key (tenant {DEV_TENANT!r}, kept in {dev_key_path(settings)}):\n"
          f"    export MASKQ_API_KEY={key}\n"
          f"    curl -H \"Authorization: Bearer $MASKQ_API_KEY\" {url}/v1/models\n"
          f"the page, with the key filled in: {url}/#key={key}\n", file=out, flush=True)
    return key


def _describe(record: ApiKey, settings: Settings) -> str:
    created = datetime.fromtimestamp(record.created_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
    lane = record.lane or f"{settings.default_lane} (service default)"
    rate = record.rate or f"{settings.default_rate} (service default)"
    state = "revoked" if record.revoked else "active"
    return (f"{record.key_id}  tenant={record.tenant}  lane={lane}  max_lane={record.max_lane}  rate={rate}  "
            f"created={created}  {state}" + (f"  label={record.label!r}" if record.label else ""))


def _create(args, settings: Settings, store: KeyStore) -> int:
    check_policy(args.tenant, args.lane, args.max_lane, args.rate)
    key, record = store.create(args.tenant, lane=args.lane, max_lane=args.max_lane, rate=args.rate, label=args.label,
                               admin=args.admin)
    print(key, flush=True)
    print(f"new API key (shown once; only its hash is kept): {_describe(record, settings)}\n"
          f"tenant {args.tenant!r} webhook secret: {_webhook_secret(args.tenant, settings, store)}", file=sys.stderr)
    return 0


def _webhook_secret(tenant: str, settings: Settings, store: KeyStore) -> str:
    # The webhooks' own store of it; tenant "default" may have MASKQ_WEBHOOK_SECRET configured.
    from domain.webhooks import tenant_secret

    configured = getattr(settings, "webhook_secret", None) if tenant == "default" else None
    return tenant_secret(store.redis, tenant, configured)


def _revoke(args, settings: Settings, store: KeyStore) -> int:
    record = store.revoke(args.key)
    print(f"revoked: {_describe(record, settings)}")
    return 0


def _list(args, settings: Settings, store: KeyStore) -> int:
    records = store.list(args.tenant)
    if args.json:
        print(json.dumps([{"id": r.key_id, "tenant": r.tenant, "lane": r.lane, "max_lane": r.max_lane,
                           "rate": r.rate, "label": r.label, "created_at": r.created_at,
                           "revoked": r.revoked} for r in records], indent=2))
    else:
        for record in records:
            print(_describe(record, settings))
        if not records:
            print("no keys", file=sys.stderr)
    return 0


def _dev(args, settings: Settings, store: KeyStore) -> int:
    why_not = dev_key_wanted(settings)
    if why_not:
        print(f"no development key here: {why_not}", file=sys.stderr)
        return 1
    print(ensure_dev_key(settings, store))
    return 0


def _segment(args, settings: Settings, store: KeyStore) -> int:
    from maskq.client import Client
    from webapp.folder_run import WRITERS, Progress, find_images, read_prompts_file, segment_each, segment_on_server

    key = settings.api_key or (dev_key_path(settings).read_text().strip() if dev_key_path(settings).exists() else None)
    request: dict = {"lane": args.lane, "outputs": ["rle"]}
    if args.model:
        request["model"] = args.model
    if args.text:
        request["prompts"] = {"text": args.text}
    prompts = read_prompts_file(Path(args.prompts_file)) if args.prompts_file else {}
    folder = Path(args.folder)
    paths = find_images(folder)
    client = Client(settings.api_url, key)
    progress = Progress(len(paths))
    try:
        if args.server_batch:
            items = segment_on_server(client, folder, paths, request, prompts, progress)
        else:
            items = segment_each(client, folder, paths, request, prompts, args.concurrency, progress)
    finally:
        progress.close()
    out = Path(args.out)
    WRITERS[args.format](items, out)
    failures = sum(1 for item in items if item.error or (item.job or {}).get("status") != "succeeded")
    instances = sum(len(((item.job or {}).get("result") or {}).get("instances", [])) for item in items)
    print(f"{len(items) - failures} images, {instances} instances, {failures} failures -> {out} ({args.format})",
          file=sys.stderr)
    return 1 if failures else 0


def _redis(args, settings: Settings, store: KeyStore) -> int:
    """The embedded Redis as one of `make run`'s processes: started first, stopped last.

    On SIGINT or SIGTERM it waits until no worker is connected any more, at most
    ``MASKQ_EMBEDDED_REDIS_STOP_WAIT_S``: a worker's warm shutdown finishes its job, records it and
    acknowledges its message before Redis goes (``webapp/procfile.py`` keeps honcho from cutting
    this short). With ``MASKQ_REDIS_URL`` set it starts nothing.
    """
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s redis: %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if not settings.embedded:
        log.info("MASKQ_REDIS_URL is set; using that server and starting none")
        stop.wait()
        return 0
    server = RedisServer(settings.embedded_redis_port, settings.data_dir / "redis", die_with_parent=True).start()
    log.info("embedded Redis ready at %s (AOF in %s)", server.url, server.data_dir)
    try:
        while not stop.wait(0.2) and server.process.poll() is None:
            pass
        if stop.is_set():
            _wait_for_workers(redis.Redis.from_url(server.url, socket_timeout=2),
                              settings.embedded_redis_stop_wait_s)
    finally:
        server.stop()
    return 0 if stop.is_set() else 1


def _wait_for_workers(client: redis.Redis, most_s: float) -> None:
    """Until no worker (nor beat, nor Flower) is connected, ``most_s`` at most.

    A worker's main process is the last of it to let go: its warm shutdown waits for the running job
    (recorded by the pool process), acknowledges its message, and only then closes its broker
    connections, which carry a name of their own (``WORKER_CLIENT_NAME``). A job still ``running``
    whose worker is gone has no one to wait for: recovery puts it back at the next start.
    """
    deadline = time.monotonic() + most_s
    said = None
    try:
        while (workers := _worker_connections(client)) and time.monotonic() < deadline:
            running = client.zcard(keys.RUNNING)
            if (workers, running) != said:  # once per change, not ten lines a second
                log.info("waiting for %d running job(s) to end before stopping (%d Celery connection(s) open)",
                         running, workers)
                said = (workers, running)
            time.sleep(0.1)
    except redis.RedisError:
        pass


def _worker_connections(client: redis.Redis) -> int:
    return sum(1 for c in client.client_list() if c.get("name") == WORKER_CLIENT_NAME)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="maskq", description="maskq administration")
    groups = top.add_subparsers(dest="group", required=True)
    keys = groups.add_parser("keys", help="API keys of tenants").add_subparsers(dest="command", required=True)
    create = keys.add_parser("create", help="make a key and print it (once)")
    create.add_argument("--tenant", required=True, help="the tenant the key belongs to (a-z, 0-9, . _ -)")
    create.add_argument("--lane", choices=LANES, help="the lane of a job that names none (default: the service's)")
    create.add_argument("--max-lane", choices=LANES, default="interactive",
                        help="the highest lane the key may ask for; higher is a 403 (default: %(default)s)")
    create.add_argument("--rate", help="the key's rate limit, e.g. '600/minute' (default: MASKQ_DEFAULT_RATE)")
    create.add_argument("--label", default="", help="a note to tell keys apart in `keys list`")
    create.add_argument("--admin", action="store_true",
                        help="the key may read the service's internals (GET /v1/admin/status): for operators")
    create.set_defaults(run=_create)
    revoke = keys.add_parser("revoke", help="revoke a key: it then gets 403")
    revoke.add_argument("key", help="the key itself, or its id from `keys list` (8+ characters)")
    revoke.set_defaults(run=_revoke)
    listing = keys.add_parser("list", help="list keys (ids, never the keys)")
    listing.add_argument("--tenant")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list)
    dev = keys.add_parser("dev", help="print the development key (loopback and embedded Redis only)")
    dev.set_defaults(run=_dev)
    segment = groups.add_parser("segment", help="segment every image in a folder through a running service; "
                                "write COCO JSON, JSON lines or PNG masks (MASKQ_API_URL, MASKQ_API_KEY or the dev key)")
    segment.add_argument("folder")
    segment.add_argument("--out", required=True,
                         help="the file to write (coco, jsonl), or the folder (png: one folder of masks per image)")
    segment.add_argument("--format", choices=("coco", "jsonl", "png"), default="coco",
                         help="COCO results JSON, one JSON line per image, or PNG masks in a folder tree "
                              "(default %(default)s)")
    segment.add_argument("--prompts-file", help="per-image prompts by file name: JSON lines "
                         '({"file": "a.jpg", "points": [[x, y, 1]]}) or CSV (file,text,points,boxes)')
    segment.add_argument("--server-batch", action="store_true",
                         help="send the folder as server-side batches (POST /v1/batches) instead of one job each")
    segment.add_argument("--model", help="the model (default: the service's)")
    segment.add_argument("--text", action="append", help="a text prompt (repeatable)")
    segment.add_argument("--lane", choices=LANES, default="batch")
    segment.add_argument("--concurrency", type=int, default=8, help="jobs in flight at once (default %(default)s)")
    segment.set_defaults(run=_segment)
    serve = groups.add_parser("redis", help="run the embedded Redis until stopped, stopping after the workers "
                              "(a process of `make run`)")
    serve.set_defaults(run=_redis)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
    except ValueError as exc:  # pydantic's ValidationError says which MASKQ_ variable is wrong
        print(f"maskq: bad settings: {exc}", file=sys.stderr)
        return 2
    client = connect(settings.broker_url, settings.redis_sentinel_master, socket_connect_timeout=3, socket_timeout=10)
    try:
        return args.run(args, settings, KeyStore(client))
    except (ValueError, LookupError) as exc:
        print(f"maskq: {exc}", file=sys.stderr)
        return 2
    except redis.ConnectionError:
        print(f"maskq: cannot reach Redis at {settings.broker_url}: start the service (`make run`) "
              "or set MASKQ_REDIS_URL", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
