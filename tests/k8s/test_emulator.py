"""The Kubernetes API emulator behaves as kubectl, Kopf and the operator tests need, over HTTP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.request
from pathlib import Path
from typing import Any

import kopf
import kopf.testing
import kubernetes
import pytest

from tests.k8s.emulator import EmulatedCluster
from tests.k8s.fixtures import Kubectl
from tests.k8s.kubelet import LocalKubelet
from tests.services import wait_for

STUDIES = '/apis/hpo.strata.dev/v1alpha1/namespaces/default/hpostudies'
PODS = '/api/v1/namespaces/default/pods'

CRD_YAML = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: hpostudies.hpo.strata.dev
spec:
  group: hpo.strata.dev
  scope: Namespaced
  names: {plural: hpostudies, singular: hpostudy, kind: HPOStudy, shortNames: [hpo]}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      subresources: {status: {}}
      additionalPrinterColumns:
        - {name: Phase, type: string, jsonPath: .status.phase}
        - {name: Best, type: number, jsonPath: .status.best.value}
        - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
"""

STUDY_YAML = """\
apiVersion: hpo.strata.dev/v1alpha1
kind: HPOStudy
metadata:
  name: cifar-small
  labels:
    team: vision
spec:
  maxTrials: {trials}
"""


def study(name: str, **labels: str) -> dict[str, Any]:
    return {'apiVersion': 'hpo.strata.dev/v1alpha1', 'kind': 'HPOStudy',
            'metadata': {'name': name, 'labels': labels}, 'spec': {'maxTrials': 4}}


def pod(name: str, command: list[str], *, env: list[dict[str, Any]] | None = None, **meta: Any) -> dict[str, Any]:
    return {'apiVersion': 'v1', 'kind': 'Pod', 'metadata': {'name': name, **meta}, 'spec': {
        'restartPolicy': 'Never',
        'containers': [{'name': 'trial', 'image': 'strata-trainer:test', 'command': command, 'env': env or []}]}}


def exit_with(code_env: str = 'CODE') -> list[str]:
    return [sys.executable, '-c', f"import os,sys; sys.exit(int(os.environ['{code_env}']))"]


def phase_of(api: EmulatedCluster, name: str) -> str | None:
    obj = api.get('pods', name)
    return obj and obj.get('status', {}).get('phase')


def terminated(api: EmulatedCluster, name: str) -> dict[str, Any] | None:
    obj = api.get('pods', name) or {}
    statuses = obj.get('status', {}).get('containerStatuses') or [{}]
    return statuses[0].get('state', {}).get('terminated')


@pytest.fixture()
def applied_study(kubectl: Kubectl, tmp_path: Path) -> Path:
    """The CRD and one study, applied with kubectl (client-side apply, with validation on)."""
    (tmp_path / 'crd.yaml').write_text(CRD_YAML)
    (tmp_path / 'study.yaml').write_text(STUDY_YAML.format(trials=4))
    assert 'created' in kubectl('apply', '-f', str(tmp_path / 'crd.yaml')).stdout
    assert 'created' in kubectl('apply', '-f', str(tmp_path / 'study.yaml')).stdout
    return tmp_path / 'study.yaml'


# --- kubectl ---------------------------------------------------------------------------------

def test_kubectl_lists_applied_study_by_plural_and_short_name_with_printer_columns(
        k8s_api: EmulatedCluster, kubectl: Kubectl, applied_study: Path) -> None:
    k8s_api.patch('hpostudies', 'cifar-small', {'status': {'phase': 'Running', 'best': {'value': 0.93}}},
                  subresource='status')

    for name in ('hpostudies', 'hpo', 'hpostudy.hpo.strata.dev'):
        header, row = kubectl('get', name).stdout.splitlines()
        assert header.split() == ['NAME', 'PHASE', 'BEST', 'AGE']
        assert row.split()[:3] == ['cifar-small', 'Running', '0.93']

    listed = json.loads(kubectl('get', 'hpostudies', '-o', 'json').stdout)
    assert [item['metadata']['name'] for item in listed['items']] == ['cifar-small']
    assert listed['items'][0]['kind'] == 'HPOStudy'
    assert listed['items'][0]['status']['best']['value'] == 0.93
    assert kubectl('get', 'hpo', 'cifar-small', '-o', 'jsonpath={.spec.maxTrials}').stdout == '4'


def test_kubectl_apply_of_a_changed_spec_patches_and_bumps_generation(
        k8s_api: EmulatedCluster, kubectl: Kubectl, applied_study: Path) -> None:
    before = k8s_api.get('hpostudies', 'cifar-small')
    applied_study.write_text(STUDY_YAML.format(trials=9))

    assert 'configured' in kubectl('apply', '-f', str(applied_study)).stdout

    after = k8s_api.get('hpostudies', 'cifar-small')
    assert after['spec'] == {'maxTrials': 9}
    assert after['metadata']['generation'] == before['metadata']['generation'] + 1
    assert int(after['metadata']['resourceVersion']) > int(before['metadata']['resourceVersion'])
    assert after['metadata']['uid'] == before['metadata']['uid']
    patches = [r for r in k8s_api.requests if r.method == 'PATCH']
    assert patches and patches[-1].headers['Content-Type'] == 'application/merge-patch+json'


def test_kubectl_apply_of_a_pod_uses_strategic_merge_patch(k8s_api: EmulatedCluster, kubectl: Kubectl,
                                                            tmp_path: Path) -> None:
    manifest = pod('p', ['sleep', '1'], env=[{'name': 'A', 'value': '1'}, {'name': 'B', 'value': '2'}])
    (tmp_path / 'pod.json').write_text(json.dumps(manifest))
    kubectl('apply', '-f', str(tmp_path / 'pod.json'))
    manifest['spec']['containers'][0]['env'][1]['value'] = '3'
    (tmp_path / 'pod.json').write_text(json.dumps(manifest))

    kubectl('apply', '-f', str(tmp_path / 'pod.json'))

    assert k8s_api.get('pods', 'p')['spec']['containers'][0]['env'] == [
        {'name': 'A', 'value': '1'}, {'name': 'B', 'value': '3'}]
    assert [r for r in k8s_api.requests if r.method == 'PATCH'][-1].headers['Content-Type'] == \
        'application/strategic-merge-patch+json'


def test_kubectl_describe_shows_status_conditions_and_events_from_both_event_apis(
        k8s_api: EmulatedCluster, kubectl: Kubectl, applied_study: Path) -> None:
    obj = k8s_api.patch('hpostudies', 'cifar-small', {'status': {'phase': 'Failed', 'conditions': [
        {'type': 'Ready', 'status': 'False', 'reason': 'BadSpace', 'message': 'space is empty'}]}},
        subresource='status')
    ref = {'apiVersion': obj['apiVersion'], 'kind': obj['kind'], 'name': 'cifar-small',
           'namespace': 'default', 'uid': obj['metadata']['uid']}
    client = k8s_api.kubernetes_client()
    try:
        kubernetes.client.CoreV1Api(client).create_namespaced_event('default', {
            'metadata': {'generateName': 'cifar-small.'}, 'involvedObject': ref, 'type': 'Normal',
            'reason': 'Accepted', 'message': 'study accepted', 'source': {'component': 'strata-operator'},
            'firstTimestamp': '2025-01-01T00:00:00Z', 'lastTimestamp': '2025-01-01T00:00:00Z', 'count': 1})
        kubernetes.client.EventsV1Api(client).create_namespaced_event('default', {
            'metadata': {'generateName': 'cifar-small.'}, 'regarding': ref, 'type': 'Warning',
            'reason': 'InvalidSpace', 'note': 'the search space has no values', 'action': 'Validate',
            'reportingController': 'hpo.strata.dev/operator', 'reportingInstance': 'operator-0',
            'eventTime': '2025-01-01T00:00:01.000000Z'})
    finally:
        client.close()

    described = kubectl('describe', 'hpostudy', 'cifar-small').stdout

    assert 'Reason:   BadSpace' in described and 'Message:  space is empty' in described
    events = described.split('Events:')[1]
    assert 'Accepted' in events and 'study accepted' in events and 'strata-operator' in events
    assert 'InvalidSpace' in events and 'the search space has no values' in events
    assert {e['reason'] for e in k8s_api.events_for(obj)} == {'Accepted', 'InvalidSpace'}
    status, new_api_events = k8s_api.request('GET', '/apis/events.k8s.io/v1/namespaces/default/events')
    assert {e['note'] for e in new_api_events['items']} == {'study accepted', 'the search space has no values'}
    assert all(e['regarding']['uid'] == ref['uid'] for e in new_api_events['items'])


def test_kubectl_delete_removes_the_study_and_its_owned_pods(
        k8s_api: EmulatedCluster, kubectl: Kubectl, applied_study: Path) -> None:
    owner = k8s_api.get('hpostudies', 'cifar-small')
    owned = pod('cifar-small-trial-0', ['true'], ownerReferences=[{
        'apiVersion': owner['apiVersion'], 'kind': owner['kind'], 'name': 'cifar-small',
        'uid': owner['metadata']['uid'], 'controller': True, 'blockOwnerDeletion': True}])
    k8s_api.create('pods', owned)
    k8s_api.create('pods', pod('unrelated', ['true']))

    assert 'deleted' in kubectl('delete', 'hpostudy', 'cifar-small').stdout

    assert k8s_api.get('hpostudies', 'cifar-small') is None
    assert [p['metadata']['name'] for p in k8s_api.list('pods')] == ['unrelated']
    result = kubectl('get', 'hpo', 'cifar-small', check=False)
    assert result.returncode == 1
    assert 'NotFound' in result.stderr and 'hpostudies.hpo.strata.dev "cifar-small" not found' in result.stderr


def test_a_new_crd_is_served_until_it_is_deleted(k8s_api: EmulatedCluster, kubectl: Kubectl) -> None:
    crd = {'apiVersion': 'apiextensions.k8s.io/v1', 'kind': 'CustomResourceDefinition',
           'metadata': {'name': 'archives.example.dev'}, 'spec': {
               'group': 'example.dev', 'scope': 'Cluster',
               'names': {'plural': 'archives', 'singular': 'archive', 'kind': 'Archive', 'shortNames': ['arc']},
               'versions': [{'name': 'v1', 'served': True, 'storage': True,
                             'schema': {'openAPIV3Schema': {'type': 'object'}}}]}}
    kubectl('apply', '-f', '-', input=json.dumps(crd))
    kubectl('wait', '--for=condition=Established', 'crd/archives.example.dev', '--timeout=5s')
    archive = {'apiVersion': 'example.dev/v1', 'kind': 'Archive', 'metadata': {'name': 'layers'}}
    kubectl('apply', '-f', '-', input=json.dumps(archive))
    assert kubectl('get', 'arc', '-o', 'name').stdout == 'archive.example.dev/layers\n'

    kubectl('delete', 'crd', 'archives.example.dev')

    assert 'NotFound' in kubectl('get', 'archives', check=False).stderr
    assert k8s_api.request('GET', '/apis/example.dev/v1/archives/layers')[0] == 404


def test_kubectl_namespaces_watch_and_logs(k8s_api: EmulatedCluster, kubectl: Kubectl,
                                           test_kubelet: LocalKubelet) -> None:
    kubectl('create', 'namespace', 'trials')
    assert kubectl('get', 'namespace', 'trials', '-o', 'jsonpath={.status.phase}').stdout == 'Active'
    watcher = subprocess.Popen(
        ['kubectl', '--kubeconfig', str(k8s_api.kubeconfig), '--cache-dir', str(k8s_api.workdir / 'kc'),
         '-n', 'trials', 'get', 'pods', '--watch'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows: list[list[str]] = []
    reader = threading.Thread(target=lambda: rows.extend(line.split() for line in watcher.stdout or []))
    reader.start()
    try:
        wait_for(lambda: any(r.params.get('watch') == 'true' for r in k8s_api.requests),
                   message='kubectl to start watching')
        k8s_api.create('pods', pod('hello', ['echo', 'hello from the trial']), namespace='trials')
        wait_for(lambda: ['hello', '0/1', 'Completed'] in [row[:3] for row in rows],
                   message='kubectl --watch to show the pod completed')
    finally:
        watcher.terminate()
        reader.join(timeout=10)
    assert rows[0][:3] == ['NAME', 'READY', 'STATUS']
    assert kubectl('-n', 'trials', 'logs', 'hello').stdout == 'hello from the trial\n'

    kubectl('delete', 'namespace', 'trials')
    assert k8s_api.get('pods', 'hello', 'trials') is None


# --- Kopf ------------------------------------------------------------------------------------

FINALIZER = 'hpo.strata.dev/test-operator'


def build_test_operator(api: EmulatedCluster, deleted: list[str]) -> kopf.OperatorRegistry:
    """A minimal study operator in its own registry (so it never leaks into other tests' operators)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return api.kopf_connection_info()

    @kopf.on.create('hpo.strata.dev', 'v1alpha1', 'hpostudies', registry=registry)
    def create_trial_pod(body: kopf.Body, name: str, namespace: str, patch: kopf.Patch, **_: Any) -> None:
        trial = pod(f'{name}-trial-0', ['true'])
        kopf.adopt(trial, owner=body)
        client = api.kubernetes_client()
        try:
            kubernetes.client.CoreV1Api(client).create_namespaced_pod(namespace, trial)
        finally:
            client.close()
        patch.status['phase'] = 'Running'
        kopf.info(body, reason='TrialCreated', message=f'created {name}-trial-0')

    @kopf.on.delete('hpo.strata.dev', 'v1alpha1', 'hpostudies', registry=registry)
    def clean_up(name: str, **_: Any) -> None:
        deleted.append(name)

    return registry


def test_kopf_operator_finalizes_owns_pods_patches_status_and_cleans_up(
        k8s_api: EmulatedCluster, kubectl: Kubectl) -> None:
    deleted: list[str] = []
    registry = build_test_operator(k8s_api, deleted)
    with kopf.testing.KopfRunner(['run', '--standalone', '--namespace', 'default', '--verbose'],
                                 registry=registry, timeout=30) as runner:
        kubectl('apply', '-f', '-', input=json.dumps(study('mnist')))
        wait_for(lambda: (k8s_api.get('hpostudies', 'mnist') or {}).get('status', {}).get('phase') == 'Running',
                   timeout=15, message='the operator to set status.phase')
        obj = k8s_api.get('hpostudies', 'mnist')
        assert obj['metadata']['finalizers'] == [FINALIZER]
        trial = k8s_api.get('pods', 'mnist-trial-0')
        assert trial['metadata']['ownerReferences'][0]['uid'] == obj['metadata']['uid']
        assert kubectl('get', 'hpo', 'mnist', '-o', 'jsonpath={.status.phase}').stdout == 'Running'
        wait_for(lambda: 'TrialCreated' in kubectl('describe', 'hpo', 'mnist').stdout,
                   message='the operator event in kubectl describe')

        kubectl('delete', 'hpostudy', 'mnist', '--timeout=20s')  # waits for the finalizer

        assert deleted == ['mnist']
        assert k8s_api.get('hpostudies', 'mnist') is None
        assert k8s_api.get('pods', 'mnist-trial-0') is None
    assert runner.exception is None
    assert runner.exit_code == 0


def test_kopf_operator_process_logs_in_with_the_kubeconfig(k8s_api: EmulatedCluster, tmp_path: Path) -> None:
    operator = tmp_path / 'operator.py'
    operator.write_text(textwrap.dedent("""\
        import kopf

        @kopf.on.create('hpo.strata.dev', 'v1alpha1', 'hpostudies')
        def accept(patch, **_):
            patch.status['phase'] = 'Accepted'
    """))
    k8s_api.create('hpostudies', study('fashion'))
    process = subprocess.Popen(
        [sys.executable, '-m', 'kopf', 'run', '--standalone', '--namespace', 'default', str(operator)],
        env={**os.environ, **k8s_api.env()}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (k8s_api.get('hpostudies', 'fashion') or {}).get('status', {}).get('phase'),
                   timeout=20, message='the operator process to patch the status')
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=20)
    assert k8s_api.get('hpostudies', 'fashion')['status']['phase'] == 'Accepted', output


# --- the test kubelet ------------------------------------------------------------------------

def test_kubelet_reports_success_and_failure_with_exit_codes(k8s_api: EmulatedCluster,
                                                             test_kubelet: LocalKubelet) -> None:
    k8s_api.create('pods', pod('ok', exit_with(), env=[{'name': 'CODE', 'value': '0'}]))
    k8s_api.create('pods', pod('bad', exit_with(), env=[{'name': 'CODE', 'value': '3'}]))

    wait_for(lambda: terminated(k8s_api, 'ok') and terminated(k8s_api, 'bad'), message='both pods to end')

    assert phase_of(k8s_api, 'ok') == 'Succeeded'
    assert terminated(k8s_api, 'ok')['exitCode'] == 0 and terminated(k8s_api, 'ok')['reason'] == 'Completed'
    assert phase_of(k8s_api, 'bad') == 'Failed'
    assert terminated(k8s_api, 'bad')['exitCode'] == 3 and terminated(k8s_api, 'bad')['reason'] == 'Error'
    assert k8s_api.get('pods', 'bad')['status']['startTime']
    phases = [version['status']['phase'] for version in k8s_api.history('pods', 'bad')]
    assert phases == ['Pending', 'Pending', 'Running', 'Failed']


def test_kubelet_passes_env_from_a_secret_and_the_downward_api(k8s_api: EmulatedCluster,
                                                                test_kubelet: LocalKubelet) -> None:
    env = [{'name': 'TOKEN', 'valueFrom': {'secretKeyRef': {'name': 'store', 'key': 'token'}}},
           {'name': 'POD', 'valueFrom': {'fieldRef': {'fieldPath': 'metadata.name'}}},
           {'name': 'CPUS', 'valueFrom': {'resourceFieldRef': {'resource': 'limits.cpu'}}},
           {'name': 'GREETING', 'value': '$(POD) token=$(TOKEN) cpus=$(CPUS)'}]
    script = "import os; open('seen.txt', 'w').write(os.environ['GREETING'])"
    manifest = pod('reader', [sys.executable, '-c', script], env=env)
    manifest['spec']['containers'][0]['resources'] = {'limits': {'cpu': '1500m'}}
    k8s_api.create('pods', manifest)
    wait_for(lambda: 'CreateContainerConfigError' in json.dumps(k8s_api.get('pods', 'reader')['status']),
               message='the missing secret to be reported')

    k8s_api.create('secrets', {'metadata': {'name': 'store'}, 'stringData': {'token': 's3cr3t'}})

    wait_for(lambda: phase_of(k8s_api, 'reader') == 'Succeeded', message='the pod to succeed')
    assert (test_kubelet.workdir / 'seen.txt').read_text() == 'reader token=s3cr3t cpus=2'


def test_kubelet_kills_the_process_of_a_deleted_pod(k8s_api: EmulatedCluster, kubectl: Kubectl,
                                                    test_kubelet: LocalKubelet) -> None:
    k8s_api.create('pods', pod('sleeper', ['sleep', '60']))
    wait_for(lambda: phase_of(k8s_api, 'sleeper') == 'Running', message='the pod to run')
    pid = test_kubelet.pid('sleeper')
    assert pid is not None and Path(f'/proc/{pid}').exists()

    kubectl('delete', 'pod', 'sleeper', '--timeout=10s')

    wait_for(lambda: not Path(f'/proc/{pid}').exists() and test_kubelet.running == [], timeout=5,
               message='the process to be killed')


def test_kubelet_simulates_oom_kills(k8s_api: EmulatedCluster, test_kubelet: LocalKubelet) -> None:
    test_kubelet.simulate_oom('greedy')
    k8s_api.create('pods', pod('greedy', ['sleep', '30']))

    wait_for(lambda: terminated(k8s_api, 'greedy'), message='the pod to be killed')

    assert phase_of(k8s_api, 'greedy') == 'Failed'
    assert terminated(k8s_api, 'greedy')['exitCode'] == 137
    assert terminated(k8s_api, 'greedy')['reason'] == 'OOMKilled'


def test_kubelet_runs_registered_entrypoints_and_kills_its_processes_when_stopped(
        k8s_api: EmulatedCluster, tmp_path: Path) -> None:
    entrypoints = {'strata-trainer': ['sleep']}
    with LocalKubelet(k8s_api, tmp_path, entrypoints=entrypoints) as kubelet:
        manifest = pod('long', [])
        manifest['spec']['containers'][0]['args'] = ['60']
        k8s_api.create('pods', manifest)
        wait_for(lambda: kubelet.pid('long'), message='the pod to run')
        pid = kubelet.pid('long')
    assert not Path(f'/proc/{pid}').exists()


def test_kubelet_limits_concurrent_processes(k8s_api: EmulatedCluster, tmp_path: Path) -> None:
    with LocalKubelet(k8s_api, tmp_path, max_running=2) as kubelet:
        for index in range(4):
            k8s_api.create('pods', pod(f'trial-{index}', [sys.executable, '-c', 'import time; time.sleep(0.3)']))
        wait_for(lambda: all(phase_of(k8s_api, f'trial-{i}') == 'Succeeded' for i in range(4)),
                   message='all trials to finish')
    assert kubelet.peak_running == 2


# --- API semantics that the operator relies on ------------------------------------------------

def test_selectors_filter_lists_and_watches(k8s_api: EmulatedCluster) -> None:
    for name, labels in [('a', {'team': 'vision', 'tier': 'gpu'}), ('b', {'team': 'vision'}), ('c', {'team': 'nlp'})]:
        k8s_api.create('hpostudies', study(name, **labels))

    def names(query: str) -> list[str]:
        status, body = k8s_api.request('GET', f'{STUDIES}?{query}')
        assert status == 200 and body['kind'] == 'HPOStudyList' and body['apiVersion'] == 'hpo.strata.dev/v1alpha1'
        return [item['metadata']['name'] for item in body['items']]

    assert names('labelSelector=team%3Dvision') == ['a', 'b']
    assert names('labelSelector=team%3D%3Dvision,tier') == ['a']
    assert names('labelSelector=team%20in%20(nlp,vision),!tier') == ['b', 'c']
    assert names('labelSelector=team%20notin%20(vision)') == ['c']
    assert names('labelSelector=team!%3Dnlp') == ['a', 'b']
    assert names('fieldSelector=metadata.name%3Db') == ['b']
    assert names('fieldSelector=metadata.name!%3Db&labelSelector=team%3Dvision') == ['a']

    since = k8s_api.request('GET', STUDIES)[1]['metadata']['resourceVersion']
    k8s_api.patch('hpostudies', 'c', {'metadata': {'labels': {'team': 'vision'}}})  # enters the selection
    k8s_api.patch('hpostudies', 'a', {'metadata': {'labels': {'team': 'nlp'}}})  # leaves it
    k8s_api.patch('hpostudies', 'b', {'spec': {'maxTrials': 5}})  # changes inside it
    status, events = k8s_api.request(
        'GET', f'{STUDIES}?watch=true&labelSelector=team%3Dvision&resourceVersion={since}&timeoutSeconds=1')
    assert status == 200
    assert [(e['type'], e['object']['metadata']['name']) for e in events] == [
        ('ADDED', 'c'), ('DELETED', 'a'), ('MODIFIED', 'b')]
    status, events = k8s_api.request('GET', f'{STUDIES}?watch=true&fieldSelector=metadata.name%3Db&timeoutSeconds=1')
    assert [(e['type'], e['object']['metadata']['name']) for e in events] == [('ADDED', 'b')]


def test_resource_version_and_generation(k8s_api: EmulatedCluster) -> None:
    status, created = k8s_api.request('POST', STUDIES, study('s'))
    meta = created['metadata']
    assert status == 201 and meta['generation'] == 1 and meta['uid'] and meta['creationTimestamp']

    def patched(body: dict[str, Any], subresource: str = '') -> dict[str, Any]:
        status, obj = k8s_api.request('PATCH', f'{STUDIES}/s{subresource}', body,
                                      content_type='application/merge-patch+json')
        assert status == 200, obj
        return obj

    versions = [int(meta['resourceVersion'])]
    obj = patched({'status': {'phase': 'Running'}}, '/status')
    versions.append(int(obj['metadata']['resourceVersion']))
    assert obj['metadata']['generation'] == 1 and obj['status'] == {'phase': 'Running'}
    obj = patched({'metadata': {'labels': {'x': 'y'}}})
    versions.append(int(obj['metadata']['resourceVersion']))
    assert obj['metadata']['generation'] == 1
    obj = patched({'spec': {'maxTrials': 8}, 'status': {'phase': 'ignored on the main resource'}})
    versions.append(int(obj['metadata']['resourceVersion']))
    assert obj['metadata']['generation'] == 2 and obj['status'] == {'phase': 'Running'}
    assert versions == sorted(set(versions))
    assert patched({'spec': {'maxTrials': 8}})['metadata']['resourceVersion'] == str(versions[-1])  # no-op

    stale = {'metadata': {'resourceVersion': str(versions[0])}, 'spec': {'maxTrials': 1}}
    status, error = k8s_api.request('PATCH', f'{STUDIES}/s', stale, content_type='application/merge-patch+json')
    assert status == 409 and error['reason'] == 'Conflict'
    status, error = k8s_api.request('POST', STUDIES, study('s'))
    assert status == 409 and error['reason'] == 'AlreadyExists'


def test_json_patch_test_failure_is_422_and_success_applies(k8s_api: EmulatedCluster) -> None:
    obj = k8s_api.create('hpostudies', study('s'))
    rv = obj['metadata']['resourceVersion']
    ops = [{'op': 'test', 'path': '/metadata/resourceVersion', 'value': 'stale'},
           {'op': 'add', 'path': '/metadata/finalizers', 'value': ['x']}]

    status, error = k8s_api.request('PATCH', f'{STUDIES}/s', ops, content_type='application/json-patch+json')
    assert status == 422 and error['kind'] == 'Status' and error['reason'] == 'Invalid'
    assert 'finalizers' not in k8s_api.get('hpostudies', 's')['metadata']

    ops[0]['value'] = rv
    status, patched = k8s_api.request('PATCH', f'{STUDIES}/s', ops, content_type='application/json-patch+json')
    assert status == 200 and patched['metadata']['finalizers'] == ['x']


def test_finalizers_hold_deletion_and_garbage_collection_follows_owners(k8s_api: EmulatedCluster) -> None:
    owner = k8s_api.create('hpostudies', {**study('s'), 'metadata': {'name': 's', 'finalizers': ['f']}})
    ref = {'apiVersion': owner['apiVersion'], 'kind': owner['kind'], 'name': 's', 'uid': owner['metadata']['uid']}
    k8s_api.create('pods', pod('owned', ['true'], ownerReferences=[ref]))
    k8s_api.create('pods', pod('orphaned-later', ['true'], ownerReferences=[ref]))

    status, deleting = k8s_api.request('DELETE', f'{STUDIES}/s')
    assert status == 200 and deleting['metadata']['deletionTimestamp']
    assert k8s_api.get('hpostudies', 's') is not None and len(k8s_api.list('pods')) == 2

    k8s_api.patch('hpostudies', 's', {'metadata': {'finalizers': None}})
    assert k8s_api.get('hpostudies', 's') is None
    assert k8s_api.list('pods') == []

    owner = k8s_api.create('hpostudies', study('t'))
    ref['uid'] = owner['metadata']['uid']
    k8s_api.create('pods', pod('kept', ['true'], ownerReferences=[ref]))
    status, _ = k8s_api.request('DELETE', f'{STUDIES}/t', {'propagationPolicy': 'Orphan'})
    assert status == 200
    assert 'ownerReferences' not in k8s_api.get('pods', 'kept')['metadata']


def test_discovery_namespaces_and_collections(k8s_api: EmulatedCluster) -> None:
    assert k8s_api.request('GET', '/api/v1')[1]['groupVersion'] == 'v1'
    assert k8s_api.request('GET', '/api/v1/namespaces/default')[1]['kind'] == 'Namespace'
    names = [ns['metadata']['name'] for ns in k8s_api.request('GET', '/api/v1/namespaces')[1]['items']]
    assert names == ['default', 'kube-system']
    status, error = k8s_api.request('POST', '/api/v1/namespaces/nowhere/pods', pod('p', ['true']))
    assert status == 404 and error['message'] == 'namespaces "nowhere" not found'

    k8s_api.create('pods', pod('one', ['true'], labels={'trial': 'yes'}))
    k8s_api.create('pods', pod('two', ['true']))
    status, deleted = k8s_api.request('DELETE', f'{PODS}?labelSelector=trial')
    assert status == 200 and [p['metadata']['name'] for p in deleted['items']] == ['one']
    assert [p['metadata']['name'] for p in k8s_api.list('pods')] == ['two']

    with urllib.request.urlopen(f'{k8s_api.url}{PODS}?watch=true&timeoutSeconds=1') as response:
        assert response.headers['Content-Type'].startswith('application/json')
