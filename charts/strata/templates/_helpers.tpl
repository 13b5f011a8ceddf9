{{/* Names and labels shared by every template. */}}

{{- define "strata.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "strata.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "strata.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "strata.selectorLabels" -}}
app.kubernetes.io/name: {{ include "strata.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "strata.labels" -}}
helm.sh/chart: {{ include "strata.chart" . }}
{{ include "strata.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: strata
{{- end }}

{{/* Labels of one component: pass (dict "ctx" $ "component" "operator"). */}}
{{- define "strata.componentLabels" -}}
{{ include "strata.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "strata.componentSelectorLabels" -}}
{{ include "strata.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "strata.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "strata.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Namespaces the operator watches, comma-separated: watchNamespaces (needs rbac.scope=namespace),
else the release namespace in namespace scope, else "" (every namespace, cluster scope).
*/}}
{{- define "strata.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- if eq .Values.rbac.scope "cluster" }}
{{- fail "watchNamespaces needs rbac.scope=namespace: rbac.scope=cluster binds a ClusterRole that reaches every namespace. Set rbac.scope=namespace to get a Role in each listed namespace, or empty watchNamespaces to watch all." }}
{{- end }}
{{- join "," .Values.watchNamespaces }}
{{- else if eq .Values.rbac.scope "namespace" }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
An image reference: (dict "ctx" $ "image" .Values.x.image "tag" default-tag). global.imageRegistry, when
set, replaces the repository's registry (the first path part when it names a host: has a dot or a
port, or is localhost) or prefixes a repository that names none; a digest pins the image (repo@digest)
and the tag is then ignored.
*/}}
{{- define "strata.image" -}}
{{- $registry := (.ctx.Values.global | default dict).imageRegistry | default "" }}
{{- $repository := .image.repository }}
{{- if $registry }}
{{- $parts := splitList "/" $repository }}
{{- $host := first $parts }}
{{- if and (gt (len $parts) 1) (or (contains "." $host) (contains ":" $host) (eq $host "localhost")) }}
{{- $repository = join "/" (rest $parts) }}
{{- end }}
{{- $repository = printf "%s/%s" (trimSuffix "/" $registry) $repository }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repository .image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (.image.tag | default .tag) }}
{{- end }}
{{- end }}

{{- define "strata.operatorImage" -}}
{{- include "strata.image" (dict "ctx" . "image" .Values.image "tag" .Chart.AppVersion) }}
{{- end }}

{{- define "strata.trainerImage" -}}
{{- include "strata.image" (dict "ctx" . "image" .Values.trainer.image "tag" .Chart.AppVersion) }}
{{- end }}

{{/* ---- Optuna storage: in-cluster PostgreSQL or an external database ---- */}}

{{- define "strata.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "strata.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Secret with the server password (key: password). */}}
{{- define "strata.postgresql.authSecret" -}}
{{- .Values.postgresql.auth.existingSecret | default (printf "%s-auth" (include "strata.postgresql.fullname" .)) }}
{{- end }}

{{/* Name and key of the Secret holding the full Optuna URL, or "" when no database is configured. */}}
{{- define "strata.database.secretName" -}}
{{- if and .Values.postgresql.enabled .Values.externalDatabase.existingSecret }}
{{- fail "set either postgresql.enabled or externalDatabase.existingSecret, not both" }}
{{- else if .Values.postgresql.enabled }}
{{- .Values.postgresql.auth.existingSecret | default (printf "%s-url" (include "strata.postgresql.fullname" .)) }}
{{- else }}
{{- .Values.externalDatabase.existingSecret }}
{{- end }}
{{- end }}

{{- define "strata.database.secretKey" -}}
{{- if .Values.postgresql.enabled }}url{{ else }}{{ .Values.externalDatabase.existingSecretKey }}{{ end }}
{{- end }}

{{/* ---- Layer registry: in-cluster MinIO or an external S3 store ---- */}}

{{- define "strata.minio.fullname" -}}
{{- printf "%s-minio" (include "strata.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Secret with keys accessKey and secretKey (the keys trainer pods read), or "". */}}
{{- define "strata.objectStore.secretName" -}}
{{- if and .Values.minio.enabled (or .Values.externalObjectStore.existingSecret .Values.externalObjectStore.endpoint) }}
{{- fail "set either minio.enabled or externalObjectStore, not both" }}
{{- else if .Values.minio.enabled }}
{{- .Values.minio.auth.existingSecret | default (include "strata.minio.fullname" .) }}
{{- else }}
{{- .Values.externalObjectStore.existingSecret }}
{{- end }}
{{- end }}

{{- define "strata.objectStore.endpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "http://%s.%s.svc:9000" (include "strata.minio.fullname" .) .Release.Namespace }}
{{- else }}
{{- .Values.externalObjectStore.endpoint }}
{{- end }}
{{- end }}

{{- define "strata.objectStore.bucket" -}}
{{- if .Values.minio.enabled }}{{ .Values.minio.bucket }}{{ else }}{{ .Values.externalObjectStore.bucket }}{{ end }}
{{- end }}

{{/* Security context of every container: no root, no escalation, no capabilities, read-only root. */}}
{{- define "strata.containerSecurityContext" -}}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end }}

{{/*
"true" on OpenShift: openshift true, or null and the cluster serves security.openshift.io/v1. There
the restricted-v2 SCC assigns every pod's uid, gid and fsGroup from the namespace's range, and a pod
that names its own is refused: the chart's pods then name none (runAsNonRoot and seccomp stay).
*/}}
{{- define "strata.openshift" -}}
{{- if or (eq (toString .Values.openshift) "true") (and (kindIs "invalid" .Values.openshift) (.Capabilities.APIVersions.Has "security.openshift.io/v1")) }}true{{ end }}
{{- end }}

{{/* A pod securityContext without the ids OpenShift assigns: (dict "ctx" $ "context" MAP). */}}
{{- define "strata.podSecurityContext" -}}
{{- if include "strata.openshift" .ctx }}
{{- toYaml (omit .context "runAsUser" "runAsGroup" "fsGroup" "fsGroupChangePolicy") }}
{{- else }}
{{- toYaml .context }}
{{- end }}
{{- end }}
