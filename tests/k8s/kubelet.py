"""A test kubelet: runs the pods created in the emulator as local processes.

It is an ordinary API client (HTTP only, like a real kubelet): it watches pods, runs each new
pod's first container (``command`` + ``args``, or an entrypoint registered for its ``image``)
in a working directory, with the container's ``env``/``envFrom`` (plain values, ``$(VAR)``
references, Secret and ConfigMap keys, the downward API's ``fieldRef``/``resourceFieldRef``) on top of
the parent's PATH/PYTHONPATH/HOME, and reports what happens through ``pods/NAME/status``:

* ``Pending`` when seen (``ContainerCreating``; ``CreateContainerConfigError`` while a referenced
  Secret or key is missing, retried until it appears), then ``Running`` with ``startTime`` and a
  running container status, then ``Succeeded``/``Failed`` with ``state.terminated.exitCode``
  and ``reason`` ``Completed``/``Error`` (``OOMKilled`` with exit code 137 when a test asks for it
  with :meth:`LocalKubelet.simulate_oom`; ``StartError`` with 128 when the command is missing);
* a deleted pod's process group gets SIGTERM, then SIGKILL after the grace period;
* ``max_running`` limits concurrent processes (pods wait in ``Pending``); ``peak_running`` tells
  how many ran at once; stdout and stderr go to a log file served as ``kubectl logs``.

Not emulated: restarts (every pod behaves as ``restartPolicy: Never``), containers after the
first, init containers, probes, volumes, resource limits, images (the command runs on the host).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import math
import os
import re
import signal
import threading
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp

from .emulator import EmulatedCluster, now_rfc3339

_PARENT_ENV = ('PATH', 'PYTHONPATH', 'HOME')


class ContainerConfigError(Exception):
    """The pod references something that does not exist (yet): the container cannot be created."""


@dataclasses.dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    task: asyncio.Task[None] | None = None
    process: asyncio.subprocess.Process | None = None
    deleted: bool = False
    oom_killed: bool = False
    grace_period: float = 2.0


class LocalKubelet:
    def __init__(self, cluster: EmulatedCluster, workdir: Path, *, namespace: str | None = None,
                 max_running: int | None = None, grace_period: float = 2.0,
                 entrypoints: Mapping[str, Sequence[str]] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.cluster = cluster
        self.workdir = Path(workdir)
        self.namespace = namespace
        self.max_running = max_running  # may be changed while running
        self.grace_period = grace_period
        self.entrypoints = dict(entrypoints or {})  # image (with or without tag) -> command
        self.extra_env = dict(env or {})
        self.peak_running = 0
        self._runs: dict[str, PodRun] = {}  # by pod uid
        self._oom: dict[tuple[str, str], float] = {}  # (namespace, name) -> seconds after start
        self._logs: dict[tuple[str, str], Path] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name='test-kubelet', daemon=True)
        self._main: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._slot_freed: asyncio.Event | None = None
        self._active = 0  # processes running or starting
        self._background: set[asyncio.Task[None]] = set()

    # --- the test's side (any thread) --------------------------------------------------------

    def start(self) -> LocalKubelet:
        (self.workdir / 'logs').mkdir(parents=True, exist_ok=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.cluster.handler.pod_logs = self.log
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(self.grace_period + 10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()
        if self.cluster.handler.pod_logs == self.log:
            self.cluster.handler.pod_logs = None

    def __enter__(self) -> LocalKubelet:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def simulate_oom(self, name: str, namespace: str = 'default', *, after: float = 0.0) -> None:
        """Kill this pod's process with SIGKILL ``after`` seconds into its run and report OOMKilled."""
        self._oom[namespace, name] = after

    def oom_kill(self, name: str, namespace: str = 'default') -> bool:
        """Kill a running pod's processes now with SIGKILL and report OOMKilled; False if it is not running."""
        for run in list(self._runs.values()):
            if (run.namespace, run.name) == (namespace, name) and run.process and run.process.returncode is None:
                asyncio.run_coroutine_threadsafe(self._oom_kill(run, 0.0), self._loop).result(10)
                return True
        return False

    def pid(self, name: str, namespace: str = 'default') -> int | None:
        """The process id of the pod's container while it runs."""
        for run in list(self._runs.values()):
            if (run.namespace, run.name) == (namespace, name) and run.process and run.process.returncode is None:
                return run.process.pid
        return None

    @property
    def running(self) -> list[str]:
        return sorted(run.name for run in list(self._runs.values())
                      if run.process is not None and run.process.returncode is None)

    def log(self, namespace: str, name: str) -> str | None:
        path = self._logs.get((namespace, name))
        return path.read_text(errors='replace') if path is not None and path.exists() else None

    # --- the kubelet's loop ------------------------------------------------------------------

    async def _start(self) -> None:
        self._slot_freed = asyncio.Event()
        self._session = aiohttp.ClientSession(self.cluster.url, headers={
            'Authorization': f'Bearer {self.cluster.token}', 'Accept': 'application/json',
            'User-Agent': 'strata-test-kubelet'})
        self._main = asyncio.create_task(self._watch_pods())

    async def _stop(self) -> None:
        if self._main is not None:
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        runs = list(self._runs.values())
        await asyncio.gather(*(self._terminate(run) for run in runs), return_exceptions=True)
        tasks = [run.task for run in runs if run.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _pods_path(self) -> str:
        return f'/api/v1/namespaces/{self.namespace}/pods' if self.namespace else '/api/v1/pods'

    async def _watch_pods(self) -> None:
        assert self._session is not None
        since: str | None = None
        while True:
            try:
                if since is None:
                    async with self._session.get(self._pods_path()) as response:
                        listing = await response.json()
                    for pod in listing['items']:
                        self._on_pod('ADDED', pod)
                    since = listing['metadata']['resourceVersion']
                params = {'watch': 'true', 'resourceVersion': since, 'timeoutSeconds': '60'}
                timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
                async with self._session.get(self._pods_path(), params=params, timeout=timeout) as response:
                    async for line in response.content:
                        if line.strip():
                            event = json.loads(line)
                            if event['type'] == 'ERROR':
                                since = None
                                break
                            self._on_pod(event['type'], event['object'])
                            since = event['object']['metadata']['resourceVersion']
            except (aiohttp.ClientError, ConnectionError):
                await asyncio.sleep(0.2)  # the API went away (e.g. at teardown): retry until stopped

    def _on_pod(self, type_: str, pod: dict[str, Any]) -> None:
        meta = pod['metadata']
        run = self._runs.get(meta['uid'])
        if type_ == 'DELETED' or meta.get('deletionTimestamp'):
            if run is not None and not run.deleted:
                run.deleted = True
                self._spawn(self._terminate(run))
            return
        if run is None and (pod.get('status') or {}).get('phase') not in {'Succeeded', 'Failed'}:
            grace = pod['spec'].get('terminationGracePeriodSeconds')
            run = PodRun(meta['namespace'], meta['name'], meta['uid'],
                         grace_period=min(self.grace_period, grace) if grace is not None else self.grace_period)
            self._runs[run.uid] = run
            run.task = asyncio.create_task(self._run(run, pod))

    async def _terminate(self, run: PodRun) -> None:
        run.deleted = True
        process = run.process
        if process is None or process.returncode is not None:
            if run.task is not None and process is None:
                run.task.cancel()  # still waiting for a slot or for a Secret
            return
        _kill_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=run.grace_period)
        except TimeoutError:
            _kill_group(process.pid, signal.SIGKILL)
            await process.wait()

    async def _run(self, run: PodRun, pod: dict[str, Any]) -> None:
        container = pod['spec']['containers'][0]
        await self._report(run, _pending_status(container, 'ContainerCreating', ''))
        while True:
            try:
                argv, env = await self._container_command(pod, container)
                break
            except ContainerConfigError as e:
                await self._report(run, _pending_status(container, 'CreateContainerConfigError', str(e)))
                await asyncio.sleep(0.2)
        await self._acquire_slot()
        try:
            await self._run_process(run, container, argv, env)
        finally:
            self._active -= 1
            assert self._slot_freed is not None
            self._slot_freed.set()
            self._slot_freed = asyncio.Event()

    async def _run_process(self, run: PodRun, container: dict[str, Any], argv: list[str], env: dict[str, str]) -> None:
        log_path = self.workdir / 'logs' / f'{run.namespace}_{run.name}_{run.uid[:8]}.log'
        self._logs[run.namespace, run.name] = log_path
        started = now_rfc3339()
        try:
            if not argv:
                raise OSError(f"no command, and no entrypoint registered for image {container.get('image')!r}")
            with log_path.open('wb') as log:
                run.process = await asyncio.create_subprocess_exec(
                    *argv, cwd=self.workdir, env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            await self._report(run, _terminated_status(container, started, 128, 'StartError', str(e)))
            return
        await self._report(run, _running_status(container, started))
        if (run.namespace, run.name) in self._oom:
            self._spawn(self._oom_kill(run, self._oom[run.namespace, run.name]))
        code = await run.process.wait()
        exit_code = 137 if run.oom_killed else (code if code >= 0 else 128 - code)
        reason = 'OOMKilled' if run.oom_killed else 'Completed' if exit_code == 0 else 'Error'
        await self._report(run, _terminated_status(container, started, exit_code, reason, ''))

    async def _acquire_slot(self) -> None:
        # No await between the check and the increment: concurrent pods cannot both take the last slot.
        while self.max_running is not None and self._active >= self.max_running:
            assert self._slot_freed is not None
            try:
                await asyncio.wait_for(self._slot_freed.wait(), timeout=0.2)  # also sees max_running changes
            except TimeoutError:
                pass
        self._active += 1
        self.peak_running = max(self.peak_running, self._active)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _oom_kill(self, run: PodRun, after: float) -> None:
        await asyncio.sleep(after)
        if run.process is not None and run.process.returncode is None:
            run.oom_killed = True
            _kill_group(run.process.pid, signal.SIGKILL)

    async def _report(self, run: PodRun, status: dict[str, Any]) -> None:
        if run.deleted and status.get('phase') != 'Failed':
            return
        assert self._session is not None
        path = f'/api/v1/namespaces/{run.namespace}/pods/{run.name}/status'
        patch = {'metadata': {'uid': run.uid}, 'status': status}
        async with self._session.patch(path, data=json.dumps(patch),
                                       headers={'Content-Type': 'application/merge-patch+json'}) as response:
            await response.read()  # 404: the pod is gone; nothing to report to

    # --- the container's command and environment ---------------------------------------------

    async def _container_command(self, pod: dict[str, Any], container: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        namespace = pod['metadata']['namespace']
        env = {key: os.environ[key] for key in _PARENT_ENV if key in os.environ} | self.extra_env
        for source in container.get('envFrom') or []:
            prefix = source.get('prefix', '')
            for kind, ref in (('secrets', source.get('secretRef')), ('configmaps', source.get('configMapRef'))):
                if ref:
                    data = await self._read_data(kind, namespace, ref['name'], ref.get('optional', False))
                    env.update({prefix + key: value for key, value in data.items()})
        for item in container.get('env') or []:
            value = await self._env_value(pod, container, item, env)
            if value is not None:
                env[item['name']] = value
        image = container.get('image', '')
        entrypoint = self.entrypoints.get(image) or self.entrypoints.get(_untagged(image)) or []
        command = list(container.get('command') or entrypoint)
        if not command:
            return [], env  # reported as a StartError
        return [_expand(arg, env) for arg in command + list(container.get('args') or [])], env

    async def _env_value(self, pod: dict[str, Any], container: dict[str, Any], item: dict[str, Any],
                         env: dict[str, str]) -> str | None:
        if 'value' in item or 'valueFrom' not in item:
            return _expand(str(item.get('value', '')), env)
        source, namespace = item['valueFrom'], pod['metadata']['namespace']
        for kind, ref in (('secrets', source.get('secretKeyRef')), ('configmaps', source.get('configMapKeyRef'))):
            if ref:
                data = await self._read_data(kind, namespace, ref['name'], ref.get('optional', False))
                if ref['key'] not in data:
                    if ref.get('optional', False):
                        return None
                    what = 'Secret' if kind == 'secrets' else 'ConfigMap'
                    raise ContainerConfigError(f"couldn't find key {ref['key']} in {what} {namespace}/{ref['name']}")
                return data[ref['key']]
        if 'fieldRef' in source:
            return _pod_field(pod, source['fieldRef']['fieldPath'])
        if 'resourceFieldRef' in source:
            return _resource_field(pod, container, source['resourceFieldRef'])
        raise ContainerConfigError(f'unsupported valueFrom for {item["name"]}: {sorted(source)}')

    async def _read_data(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, str]:
        assert self._session is not None
        async with self._session.get(f'/api/v1/namespaces/{namespace}/{kind}/{name}') as response:
            if response.status == 404:
                if optional:
                    return {}
                raise ContainerConfigError(f'{kind[:-1] if kind == "secrets" else "configmap"} "{name}" not found')
            obj = await response.json()
        if kind == 'secrets':
            return {key: base64.b64decode(value).decode() for key, value in (obj.get('data') or {}).items()}
        return dict(obj.get('data') or {})


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` references (``$$`` escapes); unknown references stay as they are."""
    return re.sub(r'\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)',
                  lambda m: '$' if m.group(0) == '$$' else env.get(m.group(1), m.group(0)), text)


def _pod_field(pod: dict[str, Any], path: str) -> str:
    """The downward API's ``fieldRef``: ``metadata.name``, ``metadata.labels['k']``, ``status.podIP``..."""
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
        return str((pod['metadata'].get(m.group(1)) or {}).get(m.group(2), ''))
    if path in {'status.podIP', 'status.hostIP', 'status.podIPs'}:
        return '127.0.0.1'  # the processes run on this host
    if path == 'spec.nodeName':
        return pod['spec'].get('nodeName') or 'localhost'
    value: Any = pod
    for part in path.split('.'):
        value = value.get(part) if isinstance(value, dict) else None
    return '' if value is None else str(value)


_QUANTITY_SUFFIXES = {'': 1, 'm': Fraction(1, 1000), 'k': 10**3, 'M': 10**6, 'G': 10**9, 'T': 10**12,
                      'P': 10**15, 'E': 10**18, 'Ki': 2**10, 'Mi': 2**20, 'Gi': 2**30, 'Ti': 2**40,
                      'Pi': 2**50, 'Ei': 2**60}


def _quantity(text: str) -> Fraction:
    m = re.fullmatch(r'([0-9.]+(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)', str(text).strip())
    if not m or m.group(2) not in _QUANTITY_SUFFIXES:
        raise ContainerConfigError(f'invalid quantity {text!r}')
    return Fraction(m.group(1)) * _QUANTITY_SUFFIXES[m.group(2)]


def _resource_field(pod: dict[str, Any], container: dict[str, Any], ref: dict[str, Any]) -> str:
    """The downward API's ``resourceFieldRef``: ``limits.cpu`` -> ``1``, ``limits.memory`` -> bytes.

    As on a node: an unset limit is the host's capacity; an unset request is the limit, or 0.
    """
    if ref.get('containerName'):
        container = next(c for c in pod['spec']['containers'] if c['name'] == ref['containerName'])
    kind, _, resource = ref['resource'].partition('.')
    resources = container.get('resources') or {}
    capacity = {'cpu': str(os.cpu_count() or 1),
                'memory': str(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))}
    limit = (resources.get('limits') or {}).get(resource)
    if kind == 'limits':
        value = limit or capacity.get(resource, '0')
    else:
        value = (resources.get('requests') or {}).get(resource) or limit or '0'
    return str(math.ceil(_quantity(value) / _quantity(ref.get('divisor') or '1')))


def _untagged(image: str) -> str:
    """``registry:5000/strata/trainer:0.1@sha256:...`` -> ``registry:5000/strata/trainer``."""
    image = image.split('@', 1)[0]
    head, _, last = image.rpartition('/')
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(':', 1)[0]


def _kill_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _container_status(container: dict[str, Any], state: dict[str, Any], *, ready: bool) -> dict[str, Any]:
    return {'name': container['name'], 'image': container.get('image', ''), 'imageID': '',
            'ready': ready, 'started': 'running' in state, 'restartCount': 0, 'state': state}


def _conditions(ready: bool, reason: str = '') -> list[dict[str, Any]]:
    now = now_rfc3339()
    conditions = [{'type': 'PodScheduled', 'status': 'True', 'lastTransitionTime': now},
                  {'type': 'Initialized', 'status': 'True', 'lastTransitionTime': now}]
    for type_ in ('ContainersReady', 'Ready'):
        condition = {'type': type_, 'status': 'True' if ready else 'False', 'lastTransitionTime': now}
        conditions.append(condition | ({'reason': reason} if reason else {}))
    return conditions


def _pending_status(container: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    waiting = {'reason': reason} | ({'message': message} if message else {})
    return {'phase': 'Pending', 'hostIP': '127.0.0.1', 'conditions': _conditions(False, 'ContainersNotReady'),
            'containerStatuses': [_container_status(container, {'waiting': waiting}, ready=False)]}


def _running_status(container: dict[str, Any], started: str) -> dict[str, Any]:
    return {'phase': 'Running', 'startTime': started, 'hostIP': '127.0.0.1', 'podIP': '127.0.0.1',
            'conditions': _conditions(True),
            'containerStatuses': [_container_status(container, {'running': {'startedAt': started}}, ready=True)]}


def _terminated_status(container: dict[str, Any], started: str, exit_code: int, reason: str,
                       message: str) -> dict[str, Any]:
    terminated = {'exitCode': exit_code, 'reason': reason, 'startedAt': started, 'finishedAt': now_rfc3339()}
    terminated |= {'message': message} if message else {}
    return {'phase': 'Succeeded' if exit_code == 0 else 'Failed', 'startTime': started,
            'conditions': _conditions(False, 'PodCompleted'),
            'containerStatuses': [_container_status(container, {'terminated': terminated}, ready=False)]}
