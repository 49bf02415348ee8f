{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "pgmm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, at most 52 characters: the StatefulSet's pods are <fullname>-<ordinal>
and the controller-revision-hash label appended by Kubernetes must still fit in 63.
*/}}
{{- define "pgmm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pgmm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pgmm.headlessName" -}}
{{- printf "%s-headless" (include "pgmm.fullname" .) }}
{{- end }}

{{- define "pgmm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pgmm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pgmm.peerSecretName" -}}
{{- default (printf "%s-peer" (include "pgmm.fullname" .)) .Values.peer.existingSecret }}
{{- end }}

{{- define "pgmm.postgresSecretName" -}}
{{- default (printf "%s-postgres" (include "pgmm.fullname" .)) .Values.postgres.existingSecret }}
{{- end }}

{{- define "pgmm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "pgmm.postgresImage" -}}
{{- printf "%s:%s" .Values.postgres.image.repository .Values.postgres.image.tag }}
{{- end }}

{{/* Labels --------------------------------------------------------------------------------- */}}

{{- define "pgmm.labels" -}}
helm.sh/chart: {{ include "pgmm.chart" . }}
{{ include "pgmm.selectorLabels" . }}
app.kubernetes.io/version: {{ default .Chart.AppVersion .Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pgmm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgmm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The cluster: node names, peers ------------------------------------------------------- */}}

{{- define "pgmm.clusterName" -}}
{{- default .Release.Name .Values.cluster.name }}
{{- end }}

{{/* Node name of ordinal .ordinal ("root" is the chart's top-level context). */}}
{{- define "pgmm.nodeName" -}}
{{- printf "%s%d" .root.Values.node.namePrefix (int .ordinal) }}
{{- end }}

{{/* The ordered node names, as a JSON list (parse with fromJsonArray). */}}
{{- define "pgmm.nodeNames" -}}
{{- $names := list }}
{{- range $i := until (int .Values.replicaCount) }}
{{- $names = append $names (include "pgmm.nodeName" (dict "root" $ "ordinal" $i)) }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* host:port of the peer listener of ordinal .ordinal, through the headless Service. */}}
{{- define "pgmm.peerAddress" -}}
{{- $root := .root }}
{{- printf "%s-%d.%s.%s.svc.%s:%d" (include "pgmm.fullname" $root) (int .ordinal) (include "pgmm.headlessName" $root) $root.Release.Namespace $root.Values.clusterDomain (int $root.Values.pgmm.ports.peer) }}
{{- end }}

{{/* max_replication_slots and max_wal_senders: one per peer plus the extra, at least 10. */}}
{{- define "pgmm.replicationSlots" -}}
{{- max 10 (add (sub (int .Values.replicaCount) 1) (int .Values.postgres.extraReplicationSlots)) }}
{{- end }}

{{/*
Checks what the schema cannot express: node name length, ownership owners that are cluster nodes,
at most one rule per table. Fails the rendering with a message that names the value.
*/}}
{{- define "pgmm.validate" -}}
{{- $names := include "pgmm.nodeNames" . | fromJsonArray }}
{{- $last := include "pgmm.nodeName" (dict "root" . "ordinal" (sub (int .Values.replicaCount) 1)) }}
{{- if gt (len $last) 58 }}
{{- fail (printf "node.namePrefix: node name %q is longer than 58 characters" $last) }}
{{- end }}
{{- if and .Values.join.enabled (ge (int .Values.join.donorOrdinal) (int .Values.replicaCount)) }}
{{- fail (printf "join.donorOrdinal: %d is not an ordinal of this cluster (replicaCount %d)" (int .Values.join.donorOrdinal) (int .Values.replicaCount)) }}
{{- end }}
{{- $tables := dict }}
{{- range $i, $rule := .Values.ownership }}
{{- if hasKey $tables $rule.table }}
{{- fail (printf "ownership[%d]: a second rule for table %q (at most one rule per table)" $i $rule.table) }}
{{- end }}
{{- $_ := set $tables $rule.table true }}
{{- if and (hasKey $rule "owner") (not (has $rule.owner $names)) }}
{{- fail (printf "ownership[%d].owner: %q is not a node of this cluster (nodes: %s)" $i $rule.owner (join ", " $names)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The pgmm config (TOML) of ordinal .ordinal. Strings are written with toJson: a JSON string is a
valid TOML basic string. The Postgres password is the placeholder __PGMM_POSTGRES_PASSWORD__,
replaced at pod start by the init container (see statefulset.yaml). Only keys of
config.example.toml are emitted: pgmm refuses unknown keys.
*/}}
{{- define "pgmm.nodeConfig" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $ordinal := int .ordinal }}
{{- $names := include "pgmm.nodeNames" $root | fromJsonArray -}}
# pgmm config of node {{ include "pgmm.nodeName" . }} (pod {{ include "pgmm.fullname" $root }}-{{ $ordinal }}), rendered by the pgmm chart.
[node]
name = {{ include "pgmm.nodeName" . | toJson }}
worker_threads = {{ int $v.node.workerThreads }}
{{- if and $v.join.enabled (ne $ordinal (int $v.join.donorOrdinal)) }}
join_from = {{ include "pgmm.nodeName" (dict "root" $root "ordinal" (int $v.join.donorOrdinal)) | toJson }}
{{- end }}

[cluster]
name = {{ include "pgmm.clusterName" $root | toJson }}
nodes = {{ toJson $names }}

[client]
listen = {{ printf "0.0.0.0:%d" (int $v.pgmm.ports.client) | toJson }}
shutdown_grace_seconds = {{ int $v.pgmm.shutdownGraceSeconds }}
{{- if $v.pgmm.tls.clientSecret }}
tls_cert = "/etc/pgmm-tls/client/tls.crt"
tls_key = "/etc/pgmm-tls/client/tls.key"
{{- end }}

[postgres]
url = {{ printf "postgres://%s:__PGMM_POSTGRES_PASSWORD__@127.0.0.1:5432/%s" $v.postgres.user $v.postgres.database | toJson }}
pool_size = {{ int $v.pgmm.poolSize }}

[peer]
listen = {{ printf "0.0.0.0:%d" (int $v.pgmm.ports.peer) | toJson }}
secret_file = "/etc/pgmm/secret/peer-secret"
{{- if $v.pgmm.tls.peerSecret }}
tls_cert = "/etc/pgmm-tls/peer/tls.crt"
tls_key = "/etc/pgmm-tls/peer/tls.key"
tls_ca = "/etc/pgmm-tls/peer/ca.crt"
{{- end }}
{{- range $i := until (int $v.replicaCount) }}
{{- if ne $i $ordinal }}

[[peers]]
name = {{ include "pgmm.nodeName" (dict "root" $root "ordinal" $i) | toJson }}
address = {{ include "pgmm.peerAddress" (dict "root" $root "ordinal" $i) | toJson }}
{{- end }}
{{- end }}

[metrics]
listen = {{ printf "0.0.0.0:%d" (int $v.pgmm.ports.metrics) | toJson }}
{{- if $v.replication.tables }}

[replication]
tables = {{ toJson $v.replication.tables }}
conflict_column = {{ $v.replication.conflictColumn | toJson }}
enrol_interval_seconds = {{ int $v.replication.enrolIntervalSeconds }}
chunk_bytes = {{ int64 $v.replication.chunkBytes }}
apply_queue_bytes = {{ int64 $v.replication.applyQueueBytes }}
{{- with $v.replication.ddlNodes }}
ddl_nodes = {{ toJson . }}
{{- end }}
{{- end }}
{{- range $v.ownership }}

[[ownership]]
table = {{ .table | toJson }}
{{- if hasKey . "owner" }}
owner = {{ .owner | toJson }}
{{- else if hasKey . "owner_column" }}
owner_column = {{ .owner_column | toJson }}
{{- else }}
owner_key = {{ .owner_key | toJson }}
{{- end }}
{{- end }}
{{- end }}

{{/*
An alert expression (first of the list) with its final `> N` replaced by `> threshold` (second);
a whole number is written without a fraction or an exponent.
*/}}
{{- define "pgmm.withThreshold" -}}
{{- $expr := trim (index . 0) }}
{{- $value := index . 1 }}
{{- $number := toString $value }}
{{- if eq (float64 (int64 $value)) (float64 $value) }}
{{- $number = toString (int64 $value) }}
{{- end }}
{{- if not (regexMatch ">\\s*[0-9.eE+]+$" $expr) }}
{{- fail (printf "files/alerts.yaml: expression %q does not end with a `> N` threshold" $expr) }}
{{- end }}
{{- regexReplaceAll ">\\s*[0-9.eE+]+$" $expr (printf "> %s" $number) }}
{{- end }}
