"""A Kubernetes API server for tests: kmock 0.8 with the gaps that kubectl and Kopf hit fixed.

kmock (by the author of Kopf) gives the HTTP handler, request recording, API discovery, the
bundled list of built-in resources and a reaction DSL for injecting failures, e.g.
``cluster.handler['post /api/v1/namespaces/default/pods'] << 500``. Its own object store
(``kmock.KubernetesEmulator``) lacks too much for kubectl and Kopf (see /work/shared/INFRA.md),
so this module keeps the object store itself and plugs it in as kmock's fallback reaction:

* metadata: ``uid``, ``creationTimestamp``, an increasing ``resourceVersion`` on every write,
  ``generation`` bumped only when something other than ``metadata``/``status`` changes;
  no-op writes change nothing (no new resourceVersion, no watch event);
* the ``status`` subresource: writes to the main resource keep the old status, writes to
  ``/status`` change only the status; optimistic concurrency (409 on a stale resourceVersion);
* patches: JSON patch (a failed ``test`` is 422, as Kopf expects), RFC 7386 merge patch,
  strategic merge patch (merge-by-key for the well-known lists, ``$patch`` directives
  stripped; plain merge for custom resources), apply-patch as create-or-merge;
* lists carry ``kind: XList`` and ``apiVersion``; ``labelSelector`` (``=``, ``==``, ``!=``,
  ``in``, ``notin``, ``key``, ``!key``) and ``fieldSelector`` (any dotted path, ``=``/``!=``)
  on lists, watches and deletecollection;
* watches: ``application/json`` streams, replay from ``resourceVersion``, ``timeoutSeconds``,
  ``sendInitialEvents`` bookmarks, ADDED/DELETED when an object enters/leaves a selector;
* server-side printing (``Accept: ...;as=Table;g=meta.k8s.io;v=v1``) for lists, gets and
  watches: CRD ``additionalPrinterColumns``, pods (READY/STATUS/RESTARTS), generic NAME/AGE;
* deletion: objects with finalizers get ``deletionTimestamp`` and go once the finalizers are
  gone; garbage collection of dependents (ownerReferences) with Background/Foreground
  (both collected at once) and Orphan propagation; namespaces delete their contents;
* ``/api/v1/namespaces[/NAME]`` (kmock's path parser crashes there), ``default`` and
  ``kube-system`` exist, namespaced objects need an existing namespace (404 otherwise);
* CRDs: creating one serves its resource in discovery (kind, short names, status subresource,
  printer columns) with an Established status; deleting it removes the resource and objects;
* Events: one store for core ``v1`` and ``events.k8s.io/v1`` (converted both ways), so
  ``kubectl describe`` finds events posted through either API;
* label keys and values validated as the API server does (422); ``refuse_creates`` makes the next
  creates of a resource fail with a proper Status body (a quota, an admission webhook, an outage);
* Secrets: ``stringData`` is folded into base64 ``data``; pods start with ``phase: Pending``;
  ``pods/NAME/log`` is served from a log source that the test kubelet plugs in;
* core discovery says ``groupVersion: v1`` (kmock says ``/v1``, which makes kubectl map ``pods``
  to ``metrics.k8s.io``; that group is not loaded either), ``/version`` says v1.32;
* a minimal ``/openapi/v3`` that tells kubectl the server validates fields itself, so
  ``kubectl apply`` works without ``--validate=false``, and publishes each CRD's schema, so
  ``kubectl explain`` shows its fields and descriptions (built-in kinds have no schemas);
* the protobuf bodies of ``kubectl create namespace|secret|configmap`` (kubectl cannot be told to
  send JSON there); other ``kubectl create <kind>`` generators get a 415: use ``create -f``.

Not emulated: schema validation and defaulting, admission, RBAC/authentication (any token
passes, ``kubectl auth can-i`` fails), field managers of server-side apply (it merges),
pagination (``limit`` returns everything), graceful pod termination (pods without finalizers
disappear at once; the test kubelet kills their processes), Foreground deletion order,
multi-version conversion, ``kubectl exec/port-forward/top``.

Failures can be injected with kmock's DSL on ``handler``, which takes precedence over the store:
``cluster.handler['post', re.compile('.*/pods')][:1] << 503`` fails the next pod creation.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import datetime
import gzip
import importlib.resources
import json
import re
import secrets
import threading
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal.rendering import StreamingError  # how kmock wraps errors of started streams

ALL_VERBS = frozenset({'create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch'})

HPOSTUDY = kmock.resource('hpo.strata.dev', 'v1alpha1', 'hpostudies')
HPOSTUDY_INFO = kmock.ResourceInfo(
    kind='HPOStudy', singular='hpostudy', namespaced=True,
    shortnames={'hpo'}, subresources={'status'}, verbs=ALL_VERBS,
)

CORE_EVENTS = kmock.resource('', 'v1', 'events')
NEW_EVENTS = kmock.resource('events.k8s.io', 'v1', 'events')
NAMESPACES = kmock.resource('', 'v1', 'namespaces')
CRDS = kmock.resource('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')

_LABEL_VALUE = re.compile(r'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')
_LABEL_NAME = re.compile(r'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')


def _label_problem(key: str, value: Any) -> str | None:
    """What the API server's label validation says of one label (apimachinery's IsQualifiedName/IsValidLabelValue)."""
    prefix, _, label = key.rpartition('/')
    if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix))) or len(label) > 63 \
            or not _LABEL_NAME.fullmatch(label):
        return f'name part of key {key!r} must be 63 characters or less, alphanumeric at both ends'
    if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        return 'must be no more than 63 characters, empty or alphanumeric (with -, _ or .) at both ends'
    return None


_DNS_SUBDOMAIN = re.compile(r'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def _parse_time(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace('Z', '+00:00'))


def api_error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details or {})


def _gv(resource: kmock.resource) -> str:
    return f'{resource.group}/{resource.version}' if resource.group else resource.version


def _qualified(resource: kmock.resource) -> str:
    return f'{resource.plural}.{resource.group}' if resource.group else resource.plural


# ---------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Route:
    """What a resource URL addresses (discovery URLs are not routes)."""
    resource: kmock.resource
    namespace: str | None
    name: str | None
    subresource: str | None
    watch_prefix: bool  # the legacy /watch/ form


def parse_route(path: str) -> Route | None:
    parts = [part for part in path.split('/') if part]
    if len(parts) >= 2 and parts[0] == 'api':
        group, version, rest = '', parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == 'apis':
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    watch_prefix = bool(rest) and rest[0] == 'watch'
    rest = rest[1:] if watch_prefix else rest
    if not rest:
        return None
    namespace: str | None = None
    is_namespace_subresource = group == '' and len(rest) == 3 and rest[2] in {'status', 'finalize'}
    if rest[0] == 'namespaces' and len(rest) >= 3 and not is_namespace_subresource:
        namespace, rest = rest[1], rest[2:]
    plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), ('/'.join(rest[2:]) or None)
    return Route(kmock.resource(group, version, plural), namespace, name, sub, watch_prefix)


def _discovery_resource(path: str) -> kmock.resource | None:
    """The group/version of a discovery URL (``/api/v1``, ``/apis/G``, ``/apis/G/V``), for kmock."""
    parts = [part for part in path.split('/') if part]
    if len(parts) == 2 and parts[0] == 'api':
        return kmock.resource(group='', version=parts[1])
    if len(parts) in {2, 3} and parts[0] == 'apis':
        return kmock.resource(group=parts[1], version=parts[2] if len(parts) == 3 else None)
    return None


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------

def _split_terms(selector: str) -> list[str]:
    terms, depth, current = [], 0, ''
    for char in selector:
        depth += char == '('
        depth -= char == ')'
        if char == ',' and depth == 0:
            terms.append(current)
            current = ''
        else:
            current += char
    terms.append(current)
    return [term.strip() for term in terms if term.strip()]


def label_selector(selector: str | None) -> Callable[[Mapping[str, str]], bool]:
    """``a=b,c!=d,e in (f,g),h notin (i),j,!k`` -> a predicate on a labels dict."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _split_terms(selector or ''):
        if m := re.fullmatch(r'([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)', term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(',')}
            if op == 'in':
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif m := re.fullmatch(r'([\w./-]+)\s*(!=|==|=)\s*([\w./-]*)', term):
            key, op, value = m.groups()
            if op == '!=':
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif m := re.fullmatch(r'!\s*([\w./-]+)', term):
            checks.append(lambda labels, k=m.group(1): k not in labels)
        elif re.fullmatch(r'[\w./-]+', term):
            checks.append(lambda labels, k=term: k in labels)
        else:
            raise api_error(400, 'BadRequest', f'unable to parse requirement: {term!r}')
    return lambda labels: all(check(labels) for check in checks)


def field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split('.'):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return '' if value is None else str(value)


def field_selector(selector: str | None) -> Callable[[Mapping[str, Any]], bool]:
    """``metadata.name=x,status.phase!=Failed`` -> a predicate on an object (any dotted path)."""
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for term in _split_terms(selector or ''):
        m = re.fullmatch(r'([\w.-]+)\s*(!=|==|=)\s*(.*)', term)
        if not m:
            raise api_error(400, 'BadRequest', f'invalid field selector: {term!r}')
        path, op, value = m.groups()
        if op == '!=':
            checks.append(lambda obj, p=path, v=value: field_value(obj, p) != v)
        else:
            checks.append(lambda obj, p=path, v=value: field_value(obj, p) == v)
    return lambda obj: all(check(obj) for check in checks)


# ---------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, ``null`` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# The list fields of built-in kinds that strategic merge patch merges by a key, not replaces.
_SMP_MERGE_KEYS = {
    'containers': 'name', 'initContainers': 'name', 'ephemeralContainers': 'name',
    'env': 'name', 'volumes': 'name', 'volumeMounts': 'mountPath', 'ports': 'containerPort',
    'imagePullSecrets': 'name', 'conditions': 'type', 'containerStatuses': 'name',
    'initContainerStatuses': 'name', 'ownerReferences': 'uid',
}
_SMP_SET_LISTS = {'finalizers'}


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith('$')}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A small strategic merge patch: enough for ``kubectl apply`` of built-in kinds."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return _strip_directives(patch)
    if patch.get('$patch') == 'replace':
        return _strip_directives(patch)
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if key.startswith('$deleteFromPrimitiveList/'):
            field = key.split('/', 1)[1]
            result[field] = [v for v in result.get(field, []) if v not in value]
        elif key == '$retainKeys':
            result = {k: v for k, v in result.items() if k in value or k in patch}
        elif key.startswith('$'):
            continue  # $setElementOrder/... and friends: ordering only
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = strategic_merge_patch(result[key], value)
        elif isinstance(value, list) and key in _SMP_MERGE_KEYS and isinstance(result.get(key), list):
            merge_key = _SMP_MERGE_KEYS[key]
            merged = list(result[key])
            for item in value:
                index = next((i for i, old in enumerate(merged)
                              if isinstance(old, dict) and isinstance(item, dict)
                              and old.get(merge_key) == item.get(merge_key)), None)
                if isinstance(item, dict) and item.get('$patch') == 'delete':
                    if index is not None:
                        del merged[index]
                elif index is None:
                    merged.append(_strip_directives(item))
                else:
                    merged[index] = strategic_merge_patch(merged[index], item)
            result[key] = merged
        elif isinstance(value, list) and key in _SMP_SET_LISTS and isinstance(result.get(key), list):
            result[key] = result[key] + [v for v in value if v not in result[key]]
        else:
            result[key] = _strip_directives(value)
    return result


def apply_patch(target: dict[str, Any], content_type: str, patch: Any, *, custom: bool) -> dict[str, Any]:
    kind = content_type.split(';')[0].strip().lower()
    if kind == 'application/json-patch+json':
        if not isinstance(patch, list):
            raise api_error(400, 'BadRequest', 'a JSON patch must be a list of operations')
        try:
            return jsonpatch.apply_patch(target, patch, in_place=False)
        except jsonpatch.JsonPatchTestFailed as e:
            raise api_error(422, 'Invalid', f'the server rejected our request due to an error in our request: {e}')
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            raise api_error(422, 'Invalid', f'the server rejected our request due to an error in our request: {e}')
    if not isinstance(patch, dict):
        raise api_error(400, 'BadRequest', 'the patch body must be an object')
    if kind == 'application/merge-patch+json' or kind == 'application/apply-patch+yaml':
        return merge_patch(target, patch)
    if kind == 'application/strategic-merge-patch+json':
        return merge_patch(target, patch) if custom else strategic_merge_patch(target, patch)
    raise api_error(415, 'UnsupportedMediaType', f'the body of the request was in an unknown format: {content_type}')


# ---------------------------------------------------------------------------------------------
# Protobuf: only what ``kubectl create namespace|secret|configmap`` sends (kubectl has no JSON switch)
# ---------------------------------------------------------------------------------------------

def _protobuf_fields(buf: bytes) -> list[tuple[int, Any]]:
    fields, pos = [], 0

    def varint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields.append((number, varint()))
        elif wire == 2:
            size = varint()
            fields.append((number, buf[pos:pos + size]))
            pos += size
        elif wire in {1, 5}:
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f'unsupported protobuf wire type {wire}')
    return fields


def _protobuf_map(entries: list[bytes], *, binary: bool) -> dict[str, str]:
    result = {}
    for entry in entries:
        kv = dict(_protobuf_fields(entry))
        value = kv.get(2, b'')
        result[kv.get(1, b'').decode()] = base64.b64encode(value).decode() if binary else value.decode()
    return result


def decode_protobuf(body: bytes) -> dict[str, Any]:
    """A Namespace, Secret or ConfigMap in Kubernetes' protobuf envelope, as JSON."""
    if not body.startswith(b'k8s\x00'):
        raise ValueError('not a Kubernetes protobuf envelope')
    envelope = dict(_protobuf_fields(body[4:]))
    type_meta = dict(_protobuf_fields(envelope.get(1, b'')))
    kind = type_meta.get(2, b'').decode()
    fields = _protobuf_fields(envelope.get(2, b''))
    meta_fields = _protobuf_fields(next((v for n, v in fields if n == 1), b''))
    meta: dict[str, Any] = {name: value.decode() for number, name in [(1, 'name'), (2, 'generateName'), (3, 'namespace')]
                            for n, value in meta_fields if n == number and value}
    for number, name in [(11, 'labels'), (12, 'annotations')]:
        if entries := [v for n, v in meta_fields if n == number]:
            meta[name] = _protobuf_map(entries, binary=False)
    obj: dict[str, Any] = {'apiVersion': type_meta.get(1, b'v1').decode(), 'kind': kind, 'metadata': meta}
    by_number: dict[int, list[Any]] = {}
    for number, value in fields:
        by_number.setdefault(number, []).append(value)
    if kind == 'Secret':
        obj['data'] = _protobuf_map(by_number.get(2, []), binary=True)
        obj['type'] = by_number.get(3, [b''])[-1].decode() or 'Opaque'
    elif kind == 'ConfigMap':
        obj['data'] = _protobuf_map(by_number.get(2, []), binary=False)
        obj['binaryData'] = _protobuf_map(by_number.get(3, []), binary=True)
    elif kind != 'Namespace':
        raise ValueError(f'protobuf bodies of kind {kind!r} are not emulated')
    return {k: v for k, v in obj.items() if v != {} or k == 'metadata'}


# ---------------------------------------------------------------------------------------------
# Events: one store (core v1), two APIs
# ---------------------------------------------------------------------------------------------

_CORE_TO_NEW_EVENT_FIELDS = {
    'involvedObject': 'regarding', 'message': 'note', 'reportingComponent': 'reportingController',
    'source': 'deprecatedSource', 'firstTimestamp': 'deprecatedFirstTimestamp',
    'lastTimestamp': 'deprecatedLastTimestamp', 'count': 'deprecatedCount',
}
_NEW_TO_CORE_EVENT_FIELDS = {new: core for core, new in _CORE_TO_NEW_EVENT_FIELDS.items()}


def event_to_new_api(event: Mapping[str, Any]) -> dict[str, Any]:
    result = {_CORE_TO_NEW_EVENT_FIELDS.get(k, k): copy.deepcopy(v) for k, v in event.items()}
    result['apiVersion'] = 'events.k8s.io/v1'
    return result


def event_to_core_api(event: Mapping[str, Any]) -> dict[str, Any]:
    result = {_NEW_TO_CORE_EVENT_FIELDS.get(k, k): copy.deepcopy(v) for k, v in event.items()}
    result['apiVersion'] = 'v1'
    if 'source' not in result and result.get('reportingComponent'):
        result['source'] = {'component': result['reportingComponent']}  # "From" in kubectl describe
    return result


# ---------------------------------------------------------------------------------------------
# Server-side printing (Table)
# ---------------------------------------------------------------------------------------------

def human_age(timestamp: str | None) -> str:
    """The AGE column as kubectl shows it (k8s.io/apimachinery/pkg/util/duration, abridged)."""
    if not timestamp:
        return '<unknown>'
    seconds = int((datetime.datetime.now(datetime.UTC) - _parse_time(timestamp)).total_seconds())
    if seconds < 0:
        return '0s'
    if seconds < 120:
        return f'{seconds}s'
    minutes = seconds // 60
    if minutes < 10:
        return f'{minutes}m{seconds % 60}s' if seconds % 60 else f'{minutes}m'
    if minutes < 180:
        return f'{minutes}m'
    hours = minutes // 60
    return f'{hours}h' if hours < 48 else f'{hours // 24}d'


_JSONPATH_STEP = re.compile(
    r'\.([\w-]+)|\[(\d+)\]|\[\'([^\']+)\'\]|\[\?\(@\.([\w.-]+)\s*==\s*["\']([^"\']*)["\']\)\]')


def jsonpath_value(obj: Any, path: str) -> Any:
    """The subset of JSONPath that printer columns use: ``.a.b``, ``[0]``, ``[?(@.type=="X")]``."""
    values = [obj]
    pos, path = 0, path.strip().removeprefix('{').removesuffix('}')
    while pos < len(path):
        m = _JSONPATH_STEP.match(path, pos)
        if not m:
            return None
        key, index, quoted, filter_path, filter_value = m.groups()
        pos = m.end()
        found: list[Any] = []
        for value in values:
            if (key or quoted) and isinstance(value, Mapping) and (key or quoted) in value:
                found.append(value[key or quoted])
            elif index is not None and isinstance(value, list) and int(index) < len(value):
                found.append(value[int(index)])
            elif filter_path and isinstance(value, list):
                found.extend(item for item in value
                             if isinstance(item, Mapping) and field_value(item, filter_path) == filter_value)
        values = found
    return values[0] if values else None


def _name_column() -> dict[str, Any]:
    return {'name': 'Name', 'type': 'string', 'format': 'name', 'priority': 0,
            'description': 'Name must be unique within a namespace.'}


def _age_column() -> dict[str, Any]:
    return {'name': 'Age', 'type': 'string', 'format': '', 'priority': 0,
            'description': 'CreationTimestamp is a timestamp representing the server time when this object was created.'}


def _pod_status_text(pod: Mapping[str, Any]) -> str:
    status = pod.get('status') or {}
    reason = status.get('reason') or status.get('phase') or 'Pending'
    for container in status.get('containerStatuses') or []:
        state = container.get('state') or {}
        if (state.get('waiting') or {}).get('reason'):
            reason = state['waiting']['reason']
        elif 'terminated' in state:
            terminated = state['terminated'] or {}
            reason = terminated.get('reason') or f"ExitCode:{terminated.get('exitCode', 0)}"
    if (pod.get('metadata') or {}).get('deletionTimestamp'):
        reason = 'Terminating'
    return reason


def _pod_columns() -> list[tuple[dict[str, Any], Callable[[Mapping[str, Any]], Any]]]:
    def ready(pod: Mapping[str, Any]) -> str:
        statuses = (pod.get('status') or {}).get('containerStatuses') or []
        total = len((pod.get('spec') or {}).get('containers') or []) or len(statuses)
        return f"{sum(1 for s in statuses if s.get('ready'))}/{total}"

    def restarts(pod: Mapping[str, Any]) -> int:
        return sum(s.get('restartCount', 0) for s in (pod.get('status') or {}).get('containerStatuses') or [])

    def column(name: str, type_: str) -> dict[str, Any]:
        return {'name': name, 'type': type_, 'format': '', 'priority': 0, 'description': name}

    return [
        (column('Ready', 'string'), ready),
        (column('Status', 'string'), _pod_status_text),
        (column('Restarts', 'string'), restarts),
        (_age_column(), lambda pod: human_age(pod['metadata'].get('creationTimestamp'))),
    ]


def _printer_column(spec: Mapping[str, Any]) -> tuple[dict[str, Any], Callable[[Mapping[str, Any]], Any]]:
    definition = {
        'name': spec['name'], 'type': spec.get('type', 'string'), 'format': spec.get('format', ''),
        'description': spec.get('description', ''), 'priority': spec.get('priority', 0),
    }
    if definition['type'] == 'date':
        definition['type'] = 'string'  # the API server renders dates as ages, as kubectl shows them
        return definition, lambda obj: human_age(jsonpath_value(obj, spec['jsonPath']))
    return definition, lambda obj: jsonpath_value(obj, spec['jsonPath'])


def _partial_metadata(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1',
            'metadata': copy.deepcopy(obj.get('metadata', {}))}


# ---------------------------------------------------------------------------------------------
# The API server
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Change:
    """One write, as the watch streams replay it."""
    revision: int
    resource: kmock.resource  # the storage resource (events.k8s.io events are stored as core events)
    type: str  # ADDED, MODIFIED, DELETED
    old: dict[str, Any] | None
    new: dict[str, Any]


@attrs.define(kw_only=True)
class KubernetesAPIEmulator(kmock.KubernetesScaffold):
    """The request handler: kmock's scaffold (discovery, errors, reaction DSL) plus an object store.

    All store methods are synchronous and run on the server's event loop, so every write is atomic
    with respect to other requests and watch streams.
    """

    _objects: kmock.ObjectsArray = attrs.field(factory=kmock.ObjectsArray, init=False)
    _revision: int = attrs.field(default=0, init=False)
    _changes: list[Change] = attrs.field(factory=list, init=False)
    _changed: asyncio.Event | None = attrs.field(default=None, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _printer_columns: dict[kmock.resource, list[dict[str, Any]]] = attrs.field(factory=dict, init=False)
    _schemas: dict[kmock.resource, dict[str, Any]] = attrs.field(factory=dict, init=False)
    _crd_resources: dict[str, list[kmock.resource]] = attrs.field(factory=dict, init=False)
    _pending_propagation: dict[str, str] = attrs.field(factory=dict, init=False)

    # Unexpected exceptions in the emulator itself (500s): the fixture fails the test on them.
    internal_errors: list[str] = attrs.field(factory=list, init=False)
    # (namespace, pod name) -> the pod's log text; the test kubelet plugs itself in here.
    pod_logs: Callable[[str, str], str | None] | None = attrs.field(default=None, init=False)
    # Fault injection: resource -> (status, reason, message, creates left) the next creates are refused with.
    refusals: dict[kmock.resource, tuple[int, str, str, int] | None] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # discovery, /version, and the 404 catch-all from kmock
        self.fallback[self._is_api_request] << self._serve_api_request
        self.fallback['get', re.compile(r'/openapi/v3/?')] << self._serve_openapi_root
        self.fallback['get', re.compile(r'/openapi/v3/.+')] << self._serve_openapi_group_version
        # kmock's load_bundled(), without its importlib.resources.read_binary() DeprecationWarning.
        bundled = importlib.resources.files('kmock._internal').joinpath('resources.json.gz').read_bytes()
        self.resources.load_data(gzip.decompress(bundled))
        for resource in list(self.resources):
            if resource.group == 'metrics.k8s.io':  # nothing serves metrics; it shadows core pods
                del self.resources[resource]
            elif not self.resources[resource].verbs:
                self.resources[resource].verbs = set(ALL_VERBS)
        self.resources[HPOSTUDY] = copy.deepcopy(HPOSTUDY_INFO)
        for namespace in ('default', 'kube-system'):
            self.create(NAMESPACES, None, {'metadata': {'name': namespace}})

    # --- HTTP plumbing -----------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # Like kmock's RawHandler.__call__, but with our own URL parsing (kmock's crashes on
        # /api/v1/namespaces and reads /api/v1/namespaces/NAME as a namespace, not an object).
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            request = await self._parse_request(raw_request)
            self._requests.append(request)
            try:
                return await self._handle(request)
            except StreamingError as e:
                raw_response = e.args[0]
                raise (e.__cause__ or e) from None
        except Exception as exc:
            if not isinstance(exc, kmock.KubernetesError):
                self.internal_errors.append(''.join(traceback.format_exception(exc)))
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(exc)
            await self._stream_error(exc, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def _parse_request(self, raw_request: aiohttp.web.BaseRequest) -> kmock.Request:
        body = await raw_request.read()
        text = body.decode('utf-8', errors='replace')
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        route = parse_route(raw_request.path)
        method = raw_request.method.upper()
        action = None
        resource = route.resource if route else _discovery_resource(raw_request.path)
        if route is not None:
            watching = route.watch_prefix or raw_request.query.get('watch') in {'true', '1'}
            action = (
                kmock.action.WATCH if method == 'GET' and watching else
                kmock.action.FETCH if method == 'GET' and route.name else
                kmock.action.LIST if method == 'GET' else
                kmock.action.CREATE if method == 'POST' and not route.name else
                kmock.action.UPDATE if method in {'PATCH', 'PUT'} and route.name else
                kmock.action.DELETE if method == 'DELETE' and route.name else None
            )
        return kmock.Request(
            id=len(self._requests), raw_request=raw_request, url=raw_request.url, method=method,
            params=dict(raw_request.query), headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies), body=body, text=text, data=data, action=action,
            resource=resource, namespace=route.namespace if route else None,
            name=route.name if route else None, subresource=route.subresource if route else None,
        )

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, kmock.KubernetesError):
            return aiohttp.web.json_response({
                'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
                'message': exc.message, 'reason': exc.reason, 'details': exc.details or {},
                'code': exc.status,
            }, status=exc.status)
        return await super()._render_error(exc)

    @staticmethod
    def _is_api_request(request: kmock.Request) -> bool:
        return parse_route(request.url.path) is not None

    # --- discovery fixes ---------------------------------------------------------------------

    async def _serve_version(self, request: kmock.Request) -> Any:
        assert request.resource is not None
        group, version = request.resource.group, request.resource.version
        found = [r for r in self.resources if r.group == group and r.version == version]
        if not found and group != '':
            raise api_error(404, 'NotFound', 'the server could not find the requested resource')
        entries = []
        for resource in sorted(found, key=lambda r: r.plural):
            info = self.resources[resource]
            for sub in [''] + sorted(info.subresources):
                entries.append({
                    'name': f'{resource.plural}/{sub}' if sub else resource.plural,
                    'singularName': '' if sub else (info.singular or resource.plural),
                    'namespaced': bool(info.namespaced),
                    'kind': info.kind or resource.plural.capitalize(),
                    'verbs': sorted(info.verbs if not sub else {'get', 'patch', 'update'}),
                    **({} if sub else {'shortNames': sorted(info.shortnames),
                                       'categories': sorted(info.categories)}),
                })
        return {'kind': 'APIResourceList', 'apiVersion': 'v1',
                'groupVersion': f'{group}/{version}' if group else version, 'resources': entries}

    async def _serve_server_version(self, request: kmock.Request) -> Any:
        return {'major': '1', 'minor': '32', 'gitVersion': 'v1.32.0-emulated', 'gitTreeState': 'clean',
                'gitCommit': 'emulator', 'buildDate': '2025-01-01T00:00:00Z', 'goVersion': 'go1.23',
                'compiler': 'gc', 'platform': 'linux/amd64'}

    # Just enough OpenAPI v3 for kubectl to see that the server validates fields itself
    # (``fieldValidation``), so ``kubectl apply`` works without ``--validate=false``.
    async def _serve_openapi_root(self, request: kmock.Request) -> Any:
        group_versions = {_gv(resource) for resource in self.resources}
        paths = {('api/' if '/' not in gv else 'apis/') + gv: {'serverRelativeURL': '/openapi/v3/' + (
            'api/' if '/' not in gv else 'apis/') + gv} for gv in sorted(group_versions)}
        return {'paths': paths}

    async def _serve_openapi_group_version(self, request: kmock.Request) -> Any:
        path = request.url.path.removeprefix('/openapi/v3/').strip('/')
        group_version = path.removeprefix('api/').removeprefix('apis/')
        resources = [r for r in self.resources if _gv(r) == group_version]
        if not resources:
            raise api_error(404, 'NotFound', 'the server could not find the requested resource')
        paths, schemas = {}, {}
        for resource in resources:
            info = self.resources[resource]
            prefix = f'/{path}/namespaces/{{namespace}}' if info.namespaced else f'/{path}'
            gvk = {'group': resource.group, 'version': resource.version, 'kind': info.kind}
            paths[f'{prefix}/{resource.plural}/{{name}}'] = {'patch': {
                'x-kubernetes-group-version-kind': gvk,
                'parameters': [{'name': 'fieldValidation', 'in': 'query', 'schema': {'type': 'string'}}],
                'responses': {'200': {'description': 'OK'}},
            }}
            if resource in self._schemas:  # a CRD's schema, as the API server publishes it: kubectl explain
                name = '.'.join([*reversed(resource.group.split('.')), resource.version, info.kind])
                schemas[name] = {**self._schemas[resource], 'x-kubernetes-group-version-kind': [gvk]}
        return {'openapi': '3.0.0', 'info': {'title': 'Kubernetes API emulator', 'version': 'v1.32.0'},
                'paths': paths, 'components': {'schemas': schemas}}

    # --- the store ---------------------------------------------------------------------------

    def info(self, resource: kmock.resource) -> kmock.ResourceInfo:
        if resource not in self.resources:
            raise api_error(404, 'NotFound', 'the server could not find the requested resource')
        return self.resources[resource]

    def _storage(self, resource: kmock.resource) -> kmock.resource:
        return CORE_EVENTS if resource == NEW_EVENTS else resource

    def _to_view(self, resource: kmock.resource, obj: dict[str, Any]) -> dict[str, Any]:
        return event_to_new_api(obj) if resource == NEW_EVENTS else copy.deepcopy(obj)

    def _from_view(self, resource: kmock.resource, obj: dict[str, Any]) -> dict[str, Any]:
        return event_to_core_api(obj) if resource == NEW_EVENTS else copy.deepcopy(obj)

    def current(self, resource: kmock.resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (self._storage(resource), namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return self._to_view(resource, self._objects[key].raw)

    def objects_of(self, resource: kmock.resource, namespace: str | None = None) -> list[dict[str, Any]]:
        storage = self._storage(resource)
        found = [
            (ns or '', name, obj.raw) for (res, ns, name), obj in self._objects.items()
            if res == storage and not obj.deleted and (namespace is None or ns == namespace)
        ]
        return [self._to_view(resource, raw) for _, _, raw in sorted(found, key=lambda t: t[:2])]

    def _not_found(self, resource: kmock.resource, name: str) -> kmock.KubernetesError:
        return api_error(404, 'NotFound', f'{_qualified(resource)} "{name}" not found',
                         name=name, group=resource.group, kind=resource.plural)

    def _commit(self, resource: kmock.resource, namespace: str | None, name: str,
                type_: str, old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
        storage = self._storage(resource)
        new = self._from_view(resource, new)
        self._revision += 1
        new['metadata']['resourceVersion'] = str(self._revision)
        key = (storage, namespace, name)
        if key not in self._objects:
            self._objects[key] = new
        else:
            self._objects[key].history.append(copy.deepcopy(new))
        if type_ == 'DELETED':
            self._objects[key].delete()
        stored_old = self._from_view(resource, old) if old is not None else None
        self._changes.append(Change(self._revision, storage, type_, stored_old, copy.deepcopy(new)))
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()
        return self._to_view(resource, new)

    def create(self, resource: kmock.resource, namespace: str | None, body: Mapping[str, Any],
               *, dry_run: bool = False) -> dict[str, Any]:
        info = self.info(resource)
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault('metadata', {})
        if not meta.get('name') and meta.get('generateName'):
            meta['name'] = meta['generateName'] + secrets.token_hex(3)[:5]
        name = meta.get('name')
        kind = info.kind or resource.plural.capitalize()
        if not name:
            raise api_error(422, 'Invalid', f'{kind} "" is invalid: metadata.name: Required value: '
                                            'name or generateName is required', kind=kind)
        if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            raise api_error(422, 'Invalid', f'{kind}.{resource.group or "core"} "{name}" is invalid: metadata.name: '
                                            f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist '
                                            "of lower case alphanumeric characters, '-' or '.'", name=name, kind=kind)
        for key, value in (meta.get('labels') or {}).items():
            problem = _label_problem(str(key), value)
            if problem:
                raise api_error(422, 'Invalid', f'{kind} "{name}" is invalid: metadata.labels: Invalid value: '
                                                f'"{value}": {problem}', name=name, kind=kind)
        refusal = self.refusals.get(resource)
        if refusal and not dry_run:
            status, reason, message, left = refusal
            self.refusals[resource] = (status, reason, message, left - 1) if left > 1 else None
            raise api_error(status, reason, message, name=name, kind=kind)
        if info.namespaced:
            namespace = namespace or meta.get('namespace') or 'default'
            if meta.get('namespace') and meta['namespace'] != namespace:
                raise api_error(400, 'BadRequest', 'the namespace of the provided object does not match '
                                                   'the namespace sent on the request')
            if self.current(NAMESPACES, None, namespace) is None:
                raise api_error(404, 'NotFound', f'namespaces "{namespace}" not found',
                                name=namespace, kind='namespaces')
            meta['namespace'] = namespace
        else:
            namespace = None
            meta.pop('namespace', None)
        if self.current(resource, namespace, name) is not None:
            raise api_error(409, 'AlreadyExists', f'{_qualified(resource)} "{name}" already exists',
                            name=name, group=resource.group, kind=resource.plural)
        obj = {'apiVersion': _gv(resource), 'kind': kind, 'metadata': meta,
               **{k: v for k, v in obj.items() if k not in {'apiVersion', 'kind', 'metadata'}}}
        for field in ('resourceVersion', 'deletionTimestamp', 'deletionGracePeriodSeconds'):
            meta.pop(field, None)
        self._drop_empty_metadata(meta)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        if 'status' in info.subresources:
            obj.pop('status', None)  # as the API server does: status comes via /status only
        self._apply_kind_defaults(resource, obj)
        if dry_run:
            return self._to_view(resource, obj)
        result = self._commit(resource, namespace, name, 'ADDED', None, obj)
        if resource == CRDS:
            self._register_crd(result)
        return result

    @staticmethod
    def _drop_empty_metadata(meta: dict[str, Any]) -> None:
        # ObjectMeta's maps and lists are `omitempty` in Go: an empty one is never served.
        for field in ('labels', 'annotations', 'finalizers', 'ownerReferences', 'managedFields'):
            if field in meta and not meta[field]:
                del meta[field]

    def _apply_kind_defaults(self, resource: kmock.resource, obj: dict[str, Any]) -> None:
        if resource == kmock.resource('', 'v1', 'secrets'):
            string_data = obj.pop('stringData', None) or {}
            obj.setdefault('data', {}).update({
                k: base64.b64encode(str(v).encode()).decode() for k, v in string_data.items()})
            obj.setdefault('type', 'Opaque')
        elif resource == kmock.resource('', 'v1', 'pods'):
            obj['status'] = {'phase': 'Pending'}
        elif resource == NAMESPACES:
            obj['status'] = {'phase': 'Active'}
        elif resource == CRDS:
            names = obj.get('spec', {}).get('names', {})
            obj['status'] = {
                'acceptedNames': copy.deepcopy(names),
                'storedVersions': [v['name'] for v in obj.get('spec', {}).get('versions', []) if v.get('storage')],
                'conditions': [
                    {'type': t, 'status': 'True', 'reason': r, 'message': m, 'lastTransitionTime': now_rfc3339()}
                    for t, r, m in [('NamesAccepted', 'NoConflicts', 'no conflicts found'),
                                    ('Established', 'InitialNamesAccepted', 'the initial names have been accepted')]
                ],
            }

    def update(self, resource: kmock.resource, namespace: str | None, name: str,
               new: dict[str, Any], *, subresource: str | None = None,
               dry_run: bool = False) -> dict[str, Any]:
        """Store a new full state of an existing object, with the API server's invariants."""
        info = self.info(resource)
        old = self.current(resource, namespace, name)
        if old is None:
            raise self._not_found(resource, name)
        new = copy.deepcopy(new)
        if not isinstance(new.get('metadata'), dict):
            new['metadata'] = {}
        expected = new['metadata'].get('resourceVersion')
        if expected and expected != old['metadata']['resourceVersion']:
            raise api_error(409, 'Conflict', f'Operation cannot be fulfilled on {_qualified(resource)} "{name}": '
                                             'the object has been modified; please apply your changes '
                                             'to the latest version and try again',
                            name=name, group=resource.group, kind=resource.plural)
        if new['metadata'].get('uid') not in (None, old['metadata']['uid']):
            raise api_error(409, 'Conflict', f'Precondition failed: UID in precondition: '
                                             f'{new["metadata"]["uid"]}, UID in object meta: {old["metadata"]["uid"]}')
        if subresource == 'status':
            new = {**copy.deepcopy(old), 'status': new.get('status')}
            if new['status'] is None:
                del new['status']
        elif subresource:
            raise api_error(405, 'MethodNotAllowed', f'the server does not allow this method on {subresource}')
        elif 'status' in info.subresources:
            new.pop('status', None)
            if 'status' in old:
                new['status'] = copy.deepcopy(old['status'])
        meta, old_meta = new['metadata'], old['metadata']
        for field in ('name', 'namespace', 'uid', 'creationTimestamp', 'generation',
                      'deletionTimestamp', 'deletionGracePeriodSeconds', 'resourceVersion'):
            meta.pop(field, None)
            if field in old_meta:
                meta[field] = old_meta[field]
        new['apiVersion'], new['kind'] = old['apiVersion'], old['kind']
        if old_meta.get('deletionTimestamp'):
            added = set(meta.get('finalizers') or []) - set(old_meta.get('finalizers') or [])
            if added:
                raise api_error(422, 'Invalid', f'Forbidden: no new finalizers can be added if the object '
                                                f'is being deleted, found new finalizers {sorted(added)}')
        self._drop_empty_metadata(meta)
        if new == old:
            return old  # a no-op write: no new resourceVersion, no watch event
        if {k: v for k, v in new.items() if k not in {'metadata', 'status'}} != \
                {k: v for k, v in old.items() if k not in {'metadata', 'status'}}:
            meta['generation'] = old_meta.get('generation', 1) + 1
        if dry_run:
            return new
        if resource == kmock.resource('', 'v1', 'secrets'):
            self._apply_kind_defaults(resource, new)
        result = self._commit(resource, namespace, name, 'MODIFIED', old, new)
        if result['metadata'].get('deletionTimestamp') and not result['metadata'].get('finalizers'):
            self._remove(resource, namespace, name)
        return result

    def patch(self, resource: kmock.resource, namespace: str | None, name: str, patch: Any,
              content_type: str = 'application/merge-patch+json', *, subresource: str | None = None,
              dry_run: bool = False) -> dict[str, Any]:
        old = self.current(resource, namespace, name)
        if old is None:
            raise self._not_found(resource, name)
        custom = resource.group not in {'', 'apps', 'batch', 'events.k8s.io', 'apiextensions.k8s.io',
                                        'coordination.k8s.io', 'policy', 'rbac.authorization.k8s.io'}
        new = apply_patch(old, content_type, patch, custom=custom)
        if isinstance(patch, dict):  # a resourceVersion in a merge patch is a precondition
            expected = (patch.get('metadata') or {}).get('resourceVersion')
            new.setdefault('metadata', {})['resourceVersion'] = expected or old['metadata']['resourceVersion']
        else:
            new.setdefault('metadata', {})['resourceVersion'] = old['metadata']['resourceVersion']
        return self.update(resource, namespace, name, new, subresource=subresource, dry_run=dry_run)

    def delete(self, resource: kmock.resource, namespace: str | None, name: str, *,
               propagation: str = 'Background', preconditions: Mapping[str, Any] | None = None,
               dry_run: bool = False) -> dict[str, Any]:
        obj = self.current(resource, namespace, name)
        if obj is None:
            raise self._not_found(resource, name)
        for field in ('uid', 'resourceVersion'):
            if (preconditions or {}).get(field) not in (None, obj['metadata'].get(field)):
                raise api_error(409, 'Conflict', f'Precondition failed: {field} in precondition: '
                                                 f'{preconditions[field]}, {field} in object meta: '
                                                 f'{obj["metadata"].get(field)}')
        if dry_run:
            return obj
        self._pending_propagation[obj['metadata']['uid']] = propagation
        if obj['metadata'].get('finalizers'):
            if obj['metadata'].get('deletionTimestamp'):
                return obj
            new = copy.deepcopy(obj)
            new['metadata'].update(deletionTimestamp=now_rfc3339(), deletionGracePeriodSeconds=0)
            return self._commit(resource, namespace, name, 'MODIFIED', obj, new)
        return self._remove(resource, namespace, name)

    def _remove(self, resource: kmock.resource, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.current(resource, namespace, name)
        assert obj is not None
        result = self._commit(resource, namespace, name, 'DELETED', obj, copy.deepcopy(obj))
        uid = obj['metadata']['uid']
        propagation = self._pending_propagation.pop(uid, 'Background')
        if resource == NAMESPACES:
            for (res, ns, obj_name), stored in list(self._objects.items()):
                if ns == name and not stored.deleted and self.current(res, ns, obj_name) is not None:
                    self.delete(res, ns, obj_name)
        if resource == CRDS:
            self._unregister_crd(result)
        self._collect_garbage(uid, propagation)
        return result

    def _collect_garbage(self, owner_uid: str, propagation: str) -> None:
        """Delete (or orphan) the dependents of a removed owner, as the garbage collector would."""
        live = {stored.raw['metadata'].get('uid') for stored in self._objects.values() if not stored.deleted}
        for (res, ns, name), stored in list(self._objects.items()):
            if stored.deleted:
                continue
            refs = stored.raw['metadata'].get('ownerReferences') or []
            if not any(ref.get('uid') == owner_uid for ref in refs):
                continue
            if self.current(res, ns, name) is None:
                continue  # removed meanwhile by a cascade
            if propagation == 'Orphan':
                remaining = [ref for ref in refs if ref.get('uid') != owner_uid]
                self.patch(res, ns, name, {'metadata': {'ownerReferences': remaining or None}})
            elif all(ref.get('uid') not in live for ref in refs):
                self.delete(res, ns, name)

    def delete_collection(self, resource: kmock.resource, namespace: str | None, *,
                          labels: str | None = None, fields: str | None = None,
                          propagation: str = 'Background') -> list[dict[str, Any]]:
        deleted = []
        for obj in self.select(resource, namespace, labels=labels, fields=fields):
            meta = obj['metadata']
            if self.current(resource, meta.get('namespace'), meta['name']) is not None:
                deleted.append(self.delete(resource, meta.get('namespace'), meta['name'], propagation=propagation))
        return deleted

    def select(self, resource: kmock.resource, namespace: str | None = None, *,
               labels: str | None = None, fields: str | None = None) -> list[dict[str, Any]]:
        match_labels, match_fields = label_selector(labels), field_selector(fields)
        return [obj for obj in self.objects_of(resource, namespace)
                if match_labels(obj['metadata'].get('labels') or {}) and match_fields(obj)]

    # --- CRDs --------------------------------------------------------------------------------

    def _register_crd(self, crd: Mapping[str, Any]) -> None:
        spec, names = crd.get('spec', {}), crd.get('spec', {}).get('names', {})
        registered = []
        for version in spec.get('versions', []):
            if not version.get('served', True):
                continue
            resource = kmock.resource(spec['group'], version['name'], names['plural'])
            self.resources[resource] = kmock.ResourceInfo(
                kind=names.get('kind'), singular=names.get('singular') or names.get('kind', '').lower(),
                namespaced=spec.get('scope', 'Namespaced') == 'Namespaced',
                shortnames=set(names.get('shortNames', [])), categories=set(names.get('categories', [])),
                subresources={s for s in (version.get('subresources') or {})}, verbs=set(ALL_VERBS),
            )
            if version.get('additionalPrinterColumns'):
                self._printer_columns[resource] = copy.deepcopy(version['additionalPrinterColumns'])
            if (version.get('schema') or {}).get('openAPIV3Schema'):
                self._schemas[resource] = copy.deepcopy(version['schema']['openAPIV3Schema'])
            registered.append(resource)
        self._crd_resources[crd['metadata']['name']] = registered

    def _unregister_crd(self, crd: Mapping[str, Any]) -> None:
        for resource in self._crd_resources.pop(crd['metadata']['name'], []):
            self._printer_columns.pop(resource, None)
            self._schemas.pop(resource, None)
            for obj in self.objects_of(resource):
                self._remove(resource, obj['metadata'].get('namespace'), obj['metadata']['name'])
            if resource == HPOSTUDY:  # declared up front: keep serving it, as before the CRD
                self.resources[HPOSTUDY] = copy.deepcopy(HPOSTUDY_INFO)
            else:
                del self.resources[resource]

    # --- printing ----------------------------------------------------------------------------

    def _columns(self, resource: kmock.resource) -> list[tuple[dict[str, Any], Callable[[Mapping[str, Any]], Any]]]:
        if resource in self._printer_columns:
            return [_printer_column(spec) for spec in self._printer_columns[resource]]
        if resource == kmock.resource('', 'v1', 'pods'):
            return _pod_columns()
        if resource == NAMESPACES:
            status = {'name': 'Status', 'type': 'string', 'format': '', 'priority': 0, 'description': 'phase'}
            return [(status, lambda ns: (ns.get('status') or {}).get('phase', '')),
                    (_age_column(), lambda ns: human_age(ns['metadata'].get('creationTimestamp')))]
        return [(_age_column(), lambda obj: human_age(obj['metadata'].get('creationTimestamp')))]

    def _table(self, resource: kmock.resource, objs: list[dict[str, Any]], include_object: str) -> dict[str, Any]:
        columns = [(_name_column(), lambda obj: obj['metadata']['name'])] + self._columns(resource)
        rows = []
        for obj in objs:
            row: dict[str, Any] = {'cells': [getter(obj) for _, getter in columns]}
            if include_object == 'Object':
                row['object'] = obj
            elif include_object != 'None':
                row['object'] = _partial_metadata(obj)
            rows.append(row)
        return {'kind': 'Table', 'apiVersion': 'meta.k8s.io/v1',
                'metadata': {'resourceVersion': str(self._revision)},
                'columnDefinitions': [definition for definition, _ in columns], 'rows': rows}

    # --- request serving ---------------------------------------------------------------------

    async def _serve_api_request(self, request: kmock.Request) -> kmock.Response:
        route = parse_route(request.url.path)
        assert route is not None
        resource, params = route.resource, request.params
        info = self.info(resource)
        namespace = route.namespace if info.namespaced else None
        method = request.method.value if hasattr(request.method, 'value') else str(request.method)
        as_table = 'as=Table' in request.headers.get('Accept', '')
        dry_run = bool(params.get('dryRun'))
        body = request.data if isinstance(request.data, (dict, list)) else None
        content_type = request.headers.get('Content-Type', '')
        if 'protobuf' in content_type:
            try:
                body = decode_protobuf(request.body)
            except (ValueError, IndexError) as e:
                raise api_error(415, 'UnsupportedMediaType', f'{e}; the emulator reads JSON (use kubectl create -f)')
        if body is None and request.text.strip() and 'yaml' in request.headers.get('Content-Type', ''):
            body = yaml.safe_load(request.text)

        if method == 'GET' and (route.watch_prefix or params.get('watch') in {'true', '1'}):
            return kmock.Response(status=200, headers={'Content-Type': 'application/json'},
                                  payload=self._watch(request, route, as_table))
        if method == 'GET' and route.name and route.subresource == 'log':
            return self._serve_log(resource, namespace, route.name, params)
        if method == 'GET' and route.name:
            obj = self.current(resource, namespace, route.name)
            if obj is None:
                raise self._not_found(resource, route.name)
            payload = self._table(resource, [obj], params.get('includeObject', 'Metadata')) if as_table else obj
            return self._json(200, payload)
        if method == 'GET':
            objs = self.select(resource, namespace, labels=params.get('labelSelector'),
                               fields=params.get('fieldSelector'))
            if as_table:
                return self._json(200, self._table(resource, objs, params.get('includeObject', 'Metadata')))
            return self._json(200, self._list(resource, objs))
        if method == 'POST' and not route.name:
            if not isinstance(body, dict):
                raise api_error(400, 'BadRequest', 'the request body must be a JSON object')
            return self._json(201, self.create(resource, namespace, body, dry_run=dry_run))
        if method == 'PUT' and route.name:
            if not isinstance(body, dict):
                raise api_error(400, 'BadRequest', 'the request body must be a JSON object')
            return self._json(200, self.update(resource, namespace, route.name, body,
                                               subresource=route.subresource, dry_run=dry_run))
        if method == 'PATCH' and route.name:
            content_type = request.headers.get('Content-Type', 'application/merge-patch+json')
            if content_type.startswith('application/apply-patch') and \
                    self.current(resource, namespace, route.name) is None and isinstance(body, dict):
                return self._json(201, self.create(resource, namespace, body, dry_run=dry_run))
            return self._json(200, self.patch(resource, namespace, route.name, body, content_type,
                                              subresource=route.subresource, dry_run=dry_run))
        if method == 'DELETE':
            options = body if isinstance(body, dict) else {}
            propagation = options.get('propagationPolicy') or params.get('propagationPolicy') or 'Background'
            if options.get('orphanDependents') is True:
                propagation = 'Orphan'
            if route.name:
                return self._json(200, self.delete(resource, namespace, route.name, propagation=propagation,
                                                   preconditions=options.get('preconditions'), dry_run=dry_run))
            deleted = self.delete_collection(resource, namespace, labels=params.get('labelSelector'),
                                             fields=params.get('fieldSelector'), propagation=propagation)
            return self._json(200, self._list(resource, deleted))
        raise api_error(405, 'MethodNotAllowed', f'the server does not allow this method on the requested resource')

    def _json(self, status: int, payload: Any) -> kmock.Response:
        # Explicit status and headers on every response: kmock copies them onto its reaction object.
        return kmock.Response(status=status, headers={'Content-Type': 'application/json'}, payload=payload)

    def _list(self, resource: kmock.resource, objs: list[dict[str, Any]]) -> dict[str, Any]:
        kind = self.info(resource).kind or resource.plural.capitalize()
        return {'kind': f'{kind}List', 'apiVersion': _gv(resource),
                'metadata': {'resourceVersion': str(self._revision)}, 'items': objs}

    def _serve_log(self, resource: kmock.resource, namespace: str | None, name: str,
                   params: Mapping[str, str]) -> kmock.Response:
        if resource != kmock.resource('', 'v1', 'pods') or self.current(resource, namespace, name) is None:
            raise self._not_found(resource, name)
        text = self.pod_logs(namespace or '', name) if self.pod_logs is not None else None
        if text is None:
            raise api_error(400, 'BadRequest', f'container in pod "{name}" is waiting to start: no log yet')
        if params.get('tailLines'):
            text = ''.join(text.splitlines(keepends=True)[-int(params['tailLines']):])
        return kmock.Response(status=200, headers={'Content-Type': 'text/plain'}, payload=text.encode())

    async def _watch(self, request: kmock.Request, route: Route, as_table: bool) -> AsyncIterator[bytes]:
        params = request.params
        resource = route.resource
        storage = self._storage(resource)
        namespace = route.namespace if self.info(resource).namespaced else None
        match_labels = label_selector(params.get('labelSelector'))
        match_fields = field_selector(params.get('fieldSelector'))
        include = params.get('includeObject', 'Metadata')

        def matches(obj: dict[str, Any] | None) -> bool:
            if obj is None:
                return False
            meta = obj['metadata']
            return ((namespace is None or meta.get('namespace') == namespace)
                    and (route.name is None or meta['name'] == route.name)
                    and match_labels(meta.get('labels') or {}) and match_fields(obj))

        def line(type_: str, obj: dict[str, Any]) -> bytes:
            shown = self._table(resource, [obj], include) if as_table and type_ != 'BOOKMARK' else obj
            return json.dumps({'type': type_, 'object': shown}).encode() + b'\n'

        if self._changed is None:
            self._changed = asyncio.Event()
        since = params.get('resourceVersion', '')
        initial = since in {'', '0'} or params.get('sendInitialEvents') == 'true'
        position = len(self._changes)
        if not initial:
            since_revision = int(since) if since.isdigit() else self._revision
            position = next((i for i, c in enumerate(self._changes) if c.revision > since_revision), position)
        initial_objs = [obj for obj in self.objects_of(resource, namespace) if matches(obj)] if initial else []
        initial_revision = self._revision
        timeout = float(params['timeoutSeconds']) if params.get('timeoutSeconds') else None
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout

        yield b''  # send the headers now, even if nothing happens for a while
        for obj in initial_objs:
            yield line('ADDED', obj)
        if params.get('sendInitialEvents') == 'true':
            yield line('BOOKMARK', {'kind': self.info(resource).kind, 'apiVersion': _gv(resource), 'metadata': {
                'resourceVersion': str(initial_revision),
                'annotations': {'k8s.io/initial-events-end': 'true'}}})
        while not self._closing:
            while position < len(self._changes):
                change = self._changes[position]
                position += 1
                if change.resource != storage:
                    continue
                old = self._to_view(resource, change.old) if change.old is not None else None
                new = self._to_view(resource, change.new)
                was, now = matches(old), change.type != 'DELETED' and matches(new)
                type_ = ('ADDED' if now and not was else 'DELETED' if was and not now else
                         change.type if now else None)
                if type_ is not None:
                    yield line(type_, new)
            remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if remaining is not None and remaining <= 0:
                return
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=remaining)
            except TimeoutError:
                return

    @property
    def objects(self) -> kmock.ObjectsArray:
        """kmock's view of the store: ``objects['v1/pods', 'default', 'p'].history`` (on the loop only)."""
        return self._objects

    def close(self) -> None:
        """End all watch streams (on shutdown)."""
        self._closing = True
        if self._changed is not None:
            self._changed.set()


# ---------------------------------------------------------------------------------------------
# The running server: a background thread, so that sync tests, kubectl and Kopf can all use it
# ---------------------------------------------------------------------------------------------

class EmulatedCluster:
    """The emulator served over HTTP on 127.0.0.1 (random port) from its own thread and loop.

    ``url``, ``kubeconfig`` (a file for kubectl, Kopf and the kubernetes client), and thread-safe
    helpers that read and write the store directly (no HTTP): ``get``, ``list``, ``create``,
    ``patch``, ``delete``, ``history``, ``events_for``; ``requests`` (what was served) and
    ``request`` (a raw HTTP call). Resources are named as kubectl names them: ``'pods'``,
    ``'hpo'``, ``'v1/secrets'``, ``'hpo.strata.dev/v1alpha1/hpostudies'``.
    """

    def __init__(self, workdir: Path, *, token: str = 'emulator-token') -> None:
        self.workdir = Path(workdir)
        self.token = token
        self.handler = KubernetesAPIEmulator()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name='k8s-api-emulator', daemon=True)
        self._runner: aiohttp.web.ServerRunner | None = None
        self.url = ''
        self.kubeconfig = self.workdir / 'kubeconfig.yaml'

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> 'EmulatedCluster':
        self._thread.start()
        port = self._run(self._start())
        self.url = f'http://127.0.0.1:{port}'
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig.write_text(yaml.safe_dump({
            'apiVersion': 'v1', 'kind': 'Config', 'current-context': 'emulator', 'preferences': {},
            'clusters': [{'name': 'emulator', 'cluster': {'server': self.url}}],
            'users': [{'name': 'tester', 'user': {'token': self.token}}],
            'contexts': [{'name': 'emulator', 'context': {
                'cluster': 'emulator', 'user': 'tester', 'namespace': 'default'}}],
        }))
        return self

    async def _start(self) -> int:
        await self.handler.__aenter__()
        server = aiohttp.web.Server(self.handler, handler_cancellation=True, access_log=None)
        self._runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, '127.0.0.1', 0)
        await site.start()
        return self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._thread.is_alive():
            self._run(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    async def _stop(self) -> None:
        self.handler.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.handler.__aexit__(None, None, None)

    def __enter__(self) -> 'EmulatedCluster':
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def _run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            return fn(*args, **kwargs)
        return self._run(call())

    # --- direct access to the store (thread-safe) --------------------------------------------

    def resolve(self, ref: str | kmock.resource) -> kmock.resource:
        """``'pods'``, ``'po'``, ``'hpo'``, ``'HPOStudy'``, ``'v1/pods'``, ``'hpo.strata.dev/v1alpha1/hpostudies'``."""
        if isinstance(ref, kmock.resource):
            return ref
        if '/' in ref:
            return kmock.resource(ref)
        candidates = [r for r in self.handler.resources
                      if ref.lower() in {r.plural, (self.handler.resources[r].singular or '').lower(),
                                         (self.handler.resources[r].kind or '').lower(),
                                         *self.handler.resources[r].shortnames}]
        if not candidates:
            raise LookupError(f'no resource is called {ref!r}')
        return sorted(candidates, key=lambda r: (r.group != '', r.group))[0]

    def _namespace(self, resource: kmock.resource, namespace: str | None) -> str | None:
        return namespace if self.handler.resources[resource].namespaced else None

    def get(self, resource: str | kmock.resource, name: str, namespace: str | None = 'default') -> dict[str, Any] | None:
        res = self.resolve(resource)
        return self._call(self.handler.current, res, self._namespace(res, namespace), name)

    def list(self, resource: str | kmock.resource, namespace: str | None = None, *,
             labels: str | None = None, fields: str | None = None) -> list[dict[str, Any]]:
        res = self.resolve(resource)
        return self._call(self.handler.select, res, self._namespace(res, namespace), labels=labels, fields=fields)

    def create(self, resource: str | kmock.resource, body: Mapping[str, Any],
               namespace: str | None = 'default') -> dict[str, Any]:
        res = self.resolve(resource)
        return self._call(self.handler.create, res, self._namespace(res, namespace), body)

    def refuse_creates(self, resource: str | kmock.resource, status: int, reason: str, message: str,
                       times: int = 1) -> None:
        """Refuse the next `times` creates of this resource (a quota, an admission webhook, an outage)."""
        res = self.resolve(resource)

        def arm() -> None:
            self.handler.refusals[res] = (status, reason, message, times)
        self._call(arm)

    def patch(self, resource: str | kmock.resource, name: str, patch: Any, namespace: str | None = 'default', *,
              subresource: str | None = None, content_type: str = 'application/merge-patch+json') -> dict[str, Any]:
        res = self.resolve(resource)
        return self._call(self.handler.patch, res, self._namespace(res, namespace), name, patch,
                          content_type, subresource=subresource)

    def delete(self, resource: str | kmock.resource, name: str, namespace: str | None = 'default', *,
               propagation: str = 'Background') -> dict[str, Any]:
        res = self.resolve(resource)
        return self._call(self.handler.delete, res, self._namespace(res, namespace), name, propagation=propagation)

    def history(self, resource: str | kmock.resource, name: str, namespace: str | None = 'default') -> list[dict[str, Any] | None]:
        """Every stored version of an object, oldest first (``None`` where it was deleted)."""
        res = self.resolve(resource)
        key = (self.handler._storage(res), self._namespace(res, namespace), name)

        def versions() -> list[dict[str, Any] | None]:
            if key not in self.handler.objects:
                return []
            return [None if v is None else copy.deepcopy(v.raw) for v in self.handler.objects[key].history]
        return self._call(versions)

    def events_for(self, obj: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Core v1 Events whose involvedObject is this object (whichever API posted them)."""
        meta = obj['metadata']
        return self.list('v1/events', meta.get('namespace'), fields=f"involvedObject.uid={meta['uid']}")

    @property
    def requests(self) -> list[kmock.Request]:
        return list(self.handler)  # kmock: a handler iterates over the requests it served

    @property
    def internal_errors(self) -> list[str]:
        return list(self.handler.internal_errors)

    # --- clients -----------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = 'application/json', accept: str = 'application/json',
                timeout: float = 10) -> tuple[int, Any]:
        """A raw HTTP call: ``(status, parsed JSON body, a list of events for watches, or text)``."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            'Content-Type': content_type, 'Accept': accept, 'Authorization': f'Bearer {self.token}'})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, raw, ctype = response.status, response.read(), response.headers.get('Content-Type', '')
        except urllib.error.HTTPError as e:
            status, raw, ctype = e.code, e.read(), e.headers.get('Content-Type', '')
        if 'json' not in ctype:
            return status, raw.decode()
        text = raw.decode()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        if status == 200 and query.get('watch', [''])[0] in {'true', '1'}:  # a stream: one event per line
            return status, [json.loads(line) for line in text.splitlines() if line.strip()]
        return status, json.loads(text) if text.strip() else None

    def env(self) -> dict[str, str]:
        """Environment variables that point kubectl, Kopf and the kubernetes client here."""
        return {'KUBECONFIG': str(self.kubeconfig)}

    def kopf_connection_info(self) -> Any:
        """For ``@kopf.on.login()`` in operators run in-process (``kopf.testing.KopfRunner``)."""
        import kopf
        return kopf.ConnectionInfo(server=self.url, token=self.token, default_namespace='default')

    def kubernetes_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` configured from the kubeconfig (close it when done)."""
        import kubernetes
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
