"""The development key: with the embedded Redis and the web front end on a loopback address, ``make run``
prints a key of tenant ``dev``, and a link to the page that carries it in its fragment.

It is made once and kept in ``data_dir/dev-api-key`` (mode 0600), so the same key works across restarts;
``MASKQ_DEV_KEY=false`` turns it off. gunicorn prints it once it is ready (:func:`announce_dev_key`, from
``webapp/gunicorn_conf.py``); ``maskq keys dev`` prints the key alone (``cli/main.py``). The service itself
hands it to no one: the page reads it from the link's fragment, which a browser never sends.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

import redis

from config.settings import Settings
from domain.tenants import new_key
from runtime.redis_connection import connect
from stores.tenants import KeyStore

DEV_TENANT = "dev"


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


def announce_dev_key(settings: Settings, wait_s: float = 10, out: TextIO = sys.stdout) -> str | None:
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
                print(
                    f"maskq: no development key: Redis is not answering ({exc}); run `maskq keys dev` once it is up",
                    file=sys.stderr,
                    flush=True,
                )
                return None
            time.sleep(0.2)
    host = f"[{settings.host}]" if ":" in settings.host and not settings.host.startswith("[") else settings.host
    url = f"http://{host}:{settings.port}"
    # The page gets the key from the link's fragment, which a browser never sends: the service itself
    # hands no key to anyone (webapp/page.py).
    print(
        f"\nmaskq development API key (tenant {DEV_TENANT!r}, kept in {dev_key_path(settings)}):\n"
        f"    export MASKQ_API_KEY={key}\n"
        f'    curl -H "Authorization: Bearer $MASKQ_API_KEY" {url}/v1/models\n'
        f"the page, with the key filled in: {url}/#key={key}\n",
        file=out,
        flush=True,
    )
    return key
