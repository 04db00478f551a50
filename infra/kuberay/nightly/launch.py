"""Start one night's RayJob and wait for it: the command of the CronJob in cronjob.yaml.

It copies the spec of the suspended template RayJob (``EMBED_TEMPLATE``) into a new RayJob
named after this pod's Kubernetes Job (``EMBED_JOB_NAME``), unsuspended and owned by that Job,
so Kubernetes deletes it with the Job. A replacement pod of the same Job finds the RayJob
already there and waits for it instead of starting a second run. Standard library only: it
runs in the embed-images image with the pod's ServiceAccount token.

Exit status: 0 the RayJob succeeded; 3 it ended failed (after its own retries: the CronJob's
Job fails at once); 2 the template or the permissions are wrong; 1 the API could not be
reached for ``EMBED_API_PATIENCE`` seconds (the Job starts another pod, which waits on).
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import Any

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
TERMINAL = {"Complete", "Failed", "ValidationFailed"}


class FatalError(Exception):
    """A failure that another try cannot fix: exit 2."""


class Api:
    """The Kubernetes API, as this pod's ServiceAccount."""

    def __init__(self, env: dict[str, str]) -> None:
        self.account = env.get("EMBED_SERVICE_ACCOUNT_DIR", SERVICE_ACCOUNT)
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        self.base = env.get("EMBED_API_URL") or f"https://{host}:{port}"
        self.patience = float(env.get("EMBED_API_PATIENCE", "600"))
        self.context = None
        if self.base.startswith("https://"):
            self.context = ssl.create_default_context(cafile=f"{self.account}/ca.crt")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request, retried while the API is unreachable or answers 5xx or 429."""
        deadline, pause = time.monotonic() + self.patience, 1.0
        while True:
            with open(f"{self.account}/token") as f:  # the kubelet rotates it
                token = f.read().strip()
            request = urllib.request.Request(
                self.base + path,
                method=method,
                data=None if body is None else json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=30, context=self.context) as r:
                    return r.status, json.loads(r.read() or b"null")
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    return exc.code, json.loads(exc.read() or b"null")
                problem: str = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                problem = str(exc)
            if time.monotonic() + pause > deadline:
                raise TimeoutError(f"{method} {path}: {problem}")
            print(f"launch: {method} {path}: {problem}; trying again", file=sys.stderr, flush=True)
            time.sleep(pause)
            pause = min(pause * 2, 30.0)


def night_rayjob(template: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """The night's RayJob: the template's spec, unsuspended, owned by this pod's Job."""
    labels = dict(template["metadata"].get("labels") or {})
    labels["embed-images/template"] = template["metadata"]["name"]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": env["EMBED_JOB_NAME"],
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": env["EMBED_JOB_NAME"],
                    "uid": env["EMBED_JOB_UID"],
                }
            ],
        },
        "spec": dict(template["spec"], suspend=False),
    }


def launch(env: dict[str, str]) -> int:
    api = Api(env)
    rayjobs = f"/apis/ray.io/v1/namespaces/{env['EMBED_NAMESPACE']}/rayjobs"
    status, template = api.call("GET", f"{rayjobs}/{env['EMBED_TEMPLATE']}")
    if status != 200:
        raise FatalError(f"cannot read the template RayJob {env['EMBED_TEMPLATE']}: HTTP {status}")
    name = env["EMBED_JOB_NAME"]
    status, answer = api.call("POST", rayjobs, night_rayjob(template, env))
    if status == 409:
        print(f"launch: RayJob {name} exists already: waiting for it", flush=True)
    elif status not in (200, 201):
        message = (answer or {}).get("message", "") if isinstance(answer, dict) else ""
        raise FatalError(f"cannot create RayJob {name}: HTTP {status} {message}".strip())
    else:
        print(f"launch: created RayJob {name}", flush=True)
    seen = None
    poll = float(env.get("EMBED_POLL_SECONDS", "30"))
    while True:
        status, rayjob = api.call("GET", f"{rayjobs}/{name}")
        if status == 404:
            print(f"launch: RayJob {name} was deleted before it ended", file=sys.stderr)
            return 1
        state = rayjob.get("status") or {}
        now = (state.get("jobDeploymentStatus"), state.get("jobStatus"))
        if now != seen:
            print(f"launch: RayJob {name}: {now[0] or 'New'}, job {now[1] or '-'}", flush=True)
            seen = now
        if now[0] in TERMINAL:
            if now == ("Complete", "SUCCEEDED"):
                return 0
            reason = " ".join(str(state.get(k, "")) for k in ("reason", "message")).strip()
            print(f"launch: RayJob {name} failed: {reason or now}", file=sys.stderr)
            return 3
        time.sleep(poll)


def main() -> int:
    env = dict(os.environ)
    missing = [k for k in ("EMBED_TEMPLATE", "EMBED_JOB_NAME", "EMBED_JOB_UID") if not env.get(k)]
    if missing or not env.get("EMBED_NAMESPACE"):
        print(f"launch: missing {', '.join(missing or ['EMBED_NAMESPACE'])}", file=sys.stderr)
        return 2
    try:
        return launch(env)
    except FatalError as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"launch: the Kubernetes API did not answer: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
