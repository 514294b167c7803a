"""maskq as ``make run`` starts it (``ServiceStack``: the Procfile's gunicorn, one ``celery worker``, embedded
Redis), driven through its HTTP API."""

from __future__ import annotations

import json
import time

import requests

from bench.common import ENDED, ServiceStack
from bench.peers.common import Outcome, Stack


class MaskqStack(Stack):
    name = "maskq"

    def start(self) -> None:
        self.stack = ServiceStack().start()

    def roots(self) -> list[int]:
        return [pid for pids in self.stack.pids().values() for pid in pids]

    def session(self) -> requests.Session:
        session = requests.Session()
        session.headers.update(self.stack.headers)
        return session

    def call(self, session, data, request, timeout, wait=True, detach=False) -> Outcome:
        started = time.perf_counter()
        deadline = started + timeout
        files = {"image": ("image.jpg", data, "image/jpeg"), "request": (None, json.dumps(request), "application/json")}
        headers = {"Prefer": f"wait={max(1, min(30, int(timeout)))}"} if wait and not detach else {}
        try:
            answer = session.post(f"{self.stack.base_url}/v1/jobs", files=files, headers=headers, timeout=timeout)
            if answer.status_code not in (200, 202):
                return Outcome(time.perf_counter() - started, "rejected")
            job = answer.json()
            if detach:
                return Outcome(time.perf_counter() - started, "ok", accepted=True)
            while job["status"] not in ENDED:
                left = deadline - time.perf_counter()
                if left <= 0:
                    return Outcome(time.perf_counter() - started, "timeout", accepted=True)
                poll = max(1, min(30, int(left)))
                job = session.get(
                    f"{self.stack.base_url}/v1/jobs/{job['id']}", params={"wait": poll}, timeout=poll + 30
                ).json()
        except requests.Timeout:
            return Outcome(time.perf_counter() - started, "timeout")
        except (requests.RequestException, ValueError, KeyError):
            return Outcome(time.perf_counter() - started, "failed")
        status = "ok" if job["status"] == "succeeded" else "failed"
        return Outcome(
            time.perf_counter() - started, status, accepted=True, cached=bool(job.get("cached")), body=job.get("result")
        )

    def stop(self) -> None:
        stack = getattr(self, "stack", None)
        if stack is not None:
            self.tree()
            stack.stop()
        self.kill_leftovers()
