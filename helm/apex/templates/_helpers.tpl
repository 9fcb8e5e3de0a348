{{/* Names and labels. */}}
{{- define "apex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "apex.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "apex.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "apex.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "apex.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "apex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "apex.selector" -}}
app.kubernetes.io/name: {{ include "apex.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "apex.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "apex.keysSecret" -}}
{{- .Values.keys.existingSecret | default (printf "%s-keys" (include "apex.fullname" .)) -}}
{{- end -}}

{{/* Shared mode: more than one hub; needs Redis. */}}
{{- define "apex.shared" -}}
{{- if gt (int .Values.hub.replicas) 1 -}}true{{- end -}}
{{- end -}}

{{- define "apex.redisUrl" -}}
{{- if .Values.redis.url -}}
{{- .Values.redis.url -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "apex.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
The hub's terminationGracePeriodSeconds: the shutdown delay, the shared-mode drain, 5 s for
the store's final flush and 10 s of margin, in seconds.
*/}}
{{- define "apex.hubGraceSeconds" -}}
{{- $drain := 0 -}}
{{- if include "apex.shared" . -}}{{- $drain = int .Values.hub.sharedShutdownDrainMs -}}{{- end -}}
{{- add (div (add (int .Values.hub.shutdownDelayMs) $drain) 1000) 15 -}}
{{- end -}}

{{/*
A value as TOML: strings, numbers and booleans as JSON (valid TOML), lists as arrays, maps as
inline tables. Call with the value.
*/}}
{{- define "apex.tomlValue" -}}
{{- if kindIs "map" . -}}
{ {{- $first := true -}}
{{- range $k, $v := . -}}
{{- if not $first }}, {{ end -}}{{- $first = false -}}
{{ toJson $k }} = {{ include "apex.tomlValue" $v }}
{{- end -}} }
{{- else if kindIs "slice" . -}}
[{{- range $i, $v := . -}}{{- if $i }}, {{ end -}}{{ include "apex.tomlValue" $v }}{{- end -}}]
{{- else if kindIs "float64" . -}}
{{- if eq . (floor .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

{{/* A map as TOML `key = value` lines. */}}
{{- define "apex.toml" -}}
{{- range $k, $v := . }}
{{ $k }} = {{ include "apex.tomlValue" $v }}
{{- end -}}
{{- end -}}

{{/* The hub's TOML: the chart's keys, then hub.config (which may override them). */}}
{{- define "apex.hubConfig" -}}
{{- $c := dict "listen" (printf "0.0.0.0:%d" (int .Values.hub.service.port)) "data_dir" "/data" "metrics_listen" "0.0.0.0:9464" "log_format" "json" "shutdown_delay_ms" .Values.hub.shutdownDelayMs "shared_shutdown_drain_ms" .Values.hub.sharedShutdownDrainMs -}}
{{- if include "apex.shared" . -}}
{{- $_ := set $c "hub_mode" "shared" -}}
{{- $_ := set $c "store" (include "apex.redisUrl" .) -}}
{{- end -}}
{{- include "apex.toml" (mergeOverwrite $c (deepCopy .Values.hub.config)) -}}
{{- end -}}

{{- define "apex.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "apex.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
