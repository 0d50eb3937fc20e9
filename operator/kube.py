"""A small async Kubernetes API client (aiohttp), for the few calls the operator makes besides kopf's own.

It authenticates with the same credentials kopf logged in with (a `kopf.ConnectionInfo`: service account in a pod,
kubeconfig elsewhere), logs in again once on 401 (tokens rotate), and speaks JSON merge patch.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path


DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
JOBS = Resource("batch", "v1", "jobs", "Job")
SERVICES = Resource("", "v1", "services", "Service")
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
PODS = Resource("", "v1", "pods", "Pod")
SECRETS = Resource("", "v1", "secrets", "Secret")
EVENTS = Resource("", "v1", "events", "Event")
# Kueue's unit of admission: one per queued Job, made by Kueue (owner reference to the Job, label JOB_UID_LABEL)
WORKLOADS = Resource("kueue.x-k8s.io", "v1beta1", "workloads", "Workload")
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
LIST_CHUNK = 500  # objects per LIST response (limit/continue), so that no one response holds a whole namespace
BY_KIND = {r.kind: r for r in (DEPLOYMENTS, JOBS, SERVICES, CONFIGMAPS, PODS, SECRETS, EVENTS, WORKLOADS)}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class Kube:
    def __init__(self, login: Callable[[], Any]):
        """`login` returns a kopf.ConnectionInfo (or anything with its fields); it is called again after a 401."""
        self._login = login
        self._info: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._tmp: list[str] = []

    async def _ensure(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._info = self._login()
            if self._info is None:
                raise ApiError(401, "Unauthorized", "no credentials to talk to the Kubernetes API")
            headers = {"Accept": "application/json"}
            info = self._info
            if getattr(info, "token", None):
                headers["Authorization"] = f"{getattr(info, 'scheme', None) or 'Bearer'} {info.token}"
            auth = None
            if getattr(info, "username", None) and getattr(info, "password", None):
                auth = aiohttp.BasicAuth(info.username, info.password)
            connector = aiohttp.TCPConnector(ssl=self._ssl(info), limit=16)
            self._session = aiohttp.ClientSession(base_url=str(info.server).rstrip("/") + "/", headers=headers,
                                                  auth=auth, connector=connector,
                                                  timeout=aiohttp.ClientTimeout(total=60))
        return self._session

    def _file(self, data: str | bytes) -> str:
        raw = data.encode() if isinstance(data, str) else data
        if not raw.lstrip().startswith(b"-----"):
            raw = base64.b64decode(raw)
        fd, path = tempfile.mkstemp(prefix="selflengthen-kube-")
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        self._tmp.append(path)
        return path

    def _ssl(self, info: Any) -> ssl.SSLContext | bool:
        if not str(info.server).startswith("https"):
            return False
        if getattr(info, "insecure", None):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        ca = info.ca_path or (self._file(info.ca_data) if info.ca_data else None)
        ctx = ssl.create_default_context(cafile=ca)
        cert = info.certificate_path or (self._file(info.certificate_data) if info.certificate_data else None)
        key = info.private_key_path or (self._file(info.private_key_data) if info.private_key_data else None)
        if cert:
            ctx.load_cert_chain(cert, key)
        return ctx

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        for path in self._tmp:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._tmp.clear()

    async def request(self, method: str, path: str, *, params: dict | None = None, body: Any = None,
                      content_type: str = "application/json") -> Any:
        for retry in (True, False):
            session = await self._ensure()
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": content_type} if body is not None else {}
            async with session.request(method, path.lstrip("/"), params=params, data=data, headers=headers) as rsp:
                if rsp.status == 401 and retry:
                    await self.close()  # log in again: the token may have rotated
                    continue
                payload = await rsp.json(content_type=None) if rsp.content_length != 0 else None
                if rsp.status >= 400:
                    payload = payload if isinstance(payload, dict) else {}
                    raise ApiError(rsp.status, payload.get("reason") or rsp.reason or "Error",
                                   payload.get("message") or "")
                return payload
        raise AssertionError("unreachable")

    async def get(self, res: Resource, namespace: str, name: str) -> dict | None:
        try:
            return await self.request("GET", res.path(namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def list(self, res: Resource, namespace: str, selector: dict[str, str] | str | None = None, *,
                   chunk: int = LIST_CHUNK) -> list[dict]:
        """The objects matching the label selector (filtered by the server: a dict of equalities, or the selector's
        text), fetched `chunk` at a time."""
        params = {"limit": str(chunk)}
        if isinstance(selector, str):
            params["labelSelector"] = selector
        elif selector:
            params["labelSelector"] = ",".join(f"{k}={v}" for k, v in selector.items())
        items: list[dict] = []
        while True:
            doc = await self.request("GET", res.path(namespace), params=params) or {}
            items.extend(doc.get("items") or [])
            token = (doc.get("metadata") or {}).get("continue")
            if not token:
                return items
            params["continue"] = token

    async def create(self, res: Resource, namespace: str, body: dict) -> dict:
        return await self.request("POST", res.path(namespace), body=body)

    async def patch(self, res: Resource, namespace: str, name: str, patch: dict, *,
                    subresource: str | None = None) -> dict:
        return await self.request("PATCH", res.path(namespace, name, subresource), body=patch,
                                  content_type="application/merge-patch+json")

    async def delete(self, res: Resource, namespace: str, name: str, *, propagation: str = "Background") -> bool:
        """Delete (with the dependants: pods of Jobs and Deployments); False when it was not there."""
        try:
            await self.request("DELETE", res.path(namespace, name),
                               body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
            return True
        except ApiError as err:
            if err.status == 404:
                return False
            raise
