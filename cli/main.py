"""The ``maskq`` command: ``maskq keys create|revoke|list|dev``, ``maskq segment FOLDER --out coco.json`` and
``maskq redis`` (the embedded Redis as one of ``make run``'s processes).

``keys create`` prints the new key alone on stdout (and the rest on stderr),
so ``export MASKQ_API_KEY=$(maskq keys create --tenant acme)`` works.

The keys are the stores' (``KeyStore``); the development key, which ``make run``
prints, is made and kept by ``stores/dev_key.py``; ``segment`` is a client of the
HTTP API (``maskq/folder_run.py``) and writes the service's own COCO format.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import redis

from config.celery import WORKER_CLIENT_NAME
from config.settings import LANES, Settings, load_settings
from domain import keys
from domain.archives import IMAGE_SUFFIXES
from domain.coco import Item, coco_document
from domain.tenants import ApiKey, check_policy
from maskq import folder_run
from runtime.embedded_redis import RedisServer
from runtime.redis_connection import connect
from stores.dev_key import dev_key_path, dev_key_wanted, ensure_dev_key
from stores.tenants import KeyStore

log = logging.getLogger(__name__)


def _describe(record: ApiKey, settings: Settings) -> str:
    created = datetime.fromtimestamp(record.created_at, tz=UTC).strftime("%Y-%m-%d %H:%M")
    lane = record.lane or f"{settings.default_lane} (service default)"
    rate = record.rate or f"{settings.default_rate} (service default)"
    state = "revoked" if record.revoked else "active"
    return (
        f"{record.key_id}  tenant={record.tenant}  lane={lane}  max_lane={record.max_lane}  rate={rate}  "
        f"created={created}  {state}" + (f"  label={record.label!r}" if record.label else "")
    )


def _create(args, settings: Settings, store: KeyStore) -> int:
    check_policy(args.tenant, args.lane, args.max_lane, args.rate)
    key, record = store.create(
        args.tenant, lane=args.lane, max_lane=args.max_lane, rate=args.rate, label=args.label, admin=args.admin
    )
    print(key, flush=True)
    print(
        f"new API key (shown once; only its hash is kept): {_describe(record, settings)}\n"
        f"tenant {args.tenant!r} webhook secret: {_webhook_secret(args.tenant, settings, store)}",
        file=sys.stderr,
    )
    return 0


def _webhook_secret(tenant: str, settings: Settings, store: KeyStore) -> str:
    # The webhooks' own store of it; tenant "default" may have MASKQ_WEBHOOK_SECRET configured.
    from stores.webhooks import tenant_secret

    configured = getattr(settings, "webhook_secret", None) if tenant == "default" else None
    return tenant_secret(store.redis, tenant, configured)


def _revoke(args, settings: Settings, store: KeyStore) -> int:
    record = store.revoke(args.key)
    print(f"revoked: {_describe(record, settings)}")
    return 0


def _list(args, settings: Settings, store: KeyStore) -> int:
    records = store.list(args.tenant)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": r.key_id,
                        "tenant": r.tenant,
                        "lane": r.lane,
                        "max_lane": r.max_lane,
                        "rate": r.rate,
                        "label": r.label,
                        "created_at": r.created_at,
                        "revoked": r.revoked,
                    }
                    for r in records
                ],
                indent=2,
            )
        )
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
    from maskq.folder_run import Progress, find_images, read_prompts_file, segment_each, segment_on_server

    key = settings.api_key or (dev_key_path(settings).read_text().strip() if dev_key_path(settings).exists() else None)
    request: dict = {"lane": args.lane, "outputs": ["rle"]}
    if args.model:
        request["model"] = args.model
    if args.text:
        request["prompts"] = {"text": args.text}
    prompts = read_prompts_file(Path(args.prompts_file)) if args.prompts_file else {}
    folder = Path(args.folder)
    paths = find_images(folder, IMAGE_SUFFIXES)
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
    print(
        f"{len(items) - failures} images, {instances} instances, {failures} failures -> {out} ({args.format})",
        file=sys.stderr,
    )
    return 1 if failures else 0


def write_coco(items: list[folder_run.Item], out: Path) -> None:
    """The run as one COCO results file, as ``GET /v1/batches/{id}/coco`` answers it (``domain/coco.py``)."""
    document = coco_document([Item(i.file_name, job=i.job, error=i.error) for i in items])
    out.write_text(json.dumps(document, ensure_ascii=False))


WRITERS = {"coco": write_coco, "jsonl": folder_run.write_jsonl, "png": folder_run.write_pngs}


def _redis(args, settings: Settings, store: KeyStore) -> int:
    """The embedded Redis as one of `make run`'s processes: started first, stopped last.

    On SIGINT or SIGTERM it waits until no worker is connected any more, at most
    ``MASKQ_EMBEDDED_REDIS_STOP_WAIT_S``: a worker's warm shutdown finishes its job, records it and
    acknowledges its message before Redis goes (``cli/procfile.py`` keeps honcho from cutting
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
    process = server.process
    assert process is not None  # start() started it
    try:
        while not stop.wait(0.2) and process.poll() is None:
            pass
        if stop.is_set():
            _wait_for_workers(redis.Redis.from_url(server.url, socket_timeout=2), settings.embedded_redis_stop_wait_s)
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
                log.info(
                    "waiting for %d running job(s) to end before stopping (%d Celery connection(s) open)",
                    running,
                    workers,
                )
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
    create.add_argument(
        "--max-lane",
        choices=LANES,
        default="interactive",
        help="the highest lane the key may ask for; higher is a 403 (default: %(default)s)",
    )
    create.add_argument("--rate", help="the key's rate limit, e.g. '600/minute' (default: MASKQ_DEFAULT_RATE)")
    create.add_argument("--label", default="", help="a note to tell keys apart in `keys list`")
    create.add_argument(
        "--admin",
        action="store_true",
        help="the key may read the service's internals (GET /v1/admin/status): for operators",
    )
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
    segment = groups.add_parser(
        "segment",
        help="segment every image in a folder through a running service; "
        "write COCO JSON, JSON lines or PNG masks (MASKQ_API_URL, MASKQ_API_KEY or the dev key)",
    )
    segment.add_argument("folder")
    segment.add_argument(
        "--out",
        required=True,
        help="the file to write (coco, jsonl), or the folder (png: one folder of masks per image)",
    )
    segment.add_argument(
        "--format",
        choices=("coco", "jsonl", "png"),
        default="coco",
        help="COCO results JSON, one JSON line per image, or PNG masks in a folder tree (default %(default)s)",
    )
    segment.add_argument(
        "--prompts-file",
        help="per-image prompts by file name: JSON lines "
        '({"file": "a.jpg", "points": [[x, y, 1]]}) or CSV (file,text,points,boxes)',
    )
    segment.add_argument(
        "--server-batch",
        action="store_true",
        help="send the folder as server-side batches (POST /v1/batches) instead of one job each",
    )
    segment.add_argument("--model", help="the model (default: the service's)")
    segment.add_argument(
        "--text",
        action="append",
        help="an object's name, e.g. cup (repeatable; with --model text-regions: text to find in the image)",
    )
    segment.add_argument("--lane", choices=LANES, default="batch")
    segment.add_argument("--concurrency", type=int, default=8, help="jobs in flight at once (default %(default)s)")
    segment.set_defaults(run=_segment)
    serve = groups.add_parser(
        "redis", help="run the embedded Redis until stopped, stopping after the workers (a process of `make run`)"
    )
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
        print(
            f"maskq: cannot reach Redis at {settings.broker_url}: start the service (`make run`) "
            "or set MASKQ_REDIS_URL",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
