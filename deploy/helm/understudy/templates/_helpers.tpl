{{/* Names: <release>-<component>, or the release name alone when it already holds the chart's
name (release "understudy" gives the kustomize base's names: understudy-gateway, ...). */}}
{{- define "understudy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "understudy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Selector labels of a component: (dict "ctx" $ "component" "gateway"); component "" names
the release's own objects. Never change on upgrade (selectors are immutable). */}}
{{- define "understudy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "understudy.fullname" .ctx }}{{ with .component }}-{{ . }}{{ end }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- end }}

{{/* Labels of a component's objects: the selector labels, the kustomize base's, Helm's own. */}}
{{- define "understudy.labels" -}}
{{ include "understudy.selectorLabels" . }}
app.kubernetes.io/component: {{ .role | default .component }}
app.kubernetes.io/part-of: understudy
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* An image reference: (dict "ctx" $ "image" .Values.image.gateway). */}}
{{- define "understudy.image" -}}
{{ .image.repository }}:{{ .image.tag | default .ctx.Chart.AppVersion }}
{{- end }}

{{/* gateway.yaml: gateway.config with the Triton and Kafka values set in. */}}
{{- define "understudy.gatewayConfig" -}}
{{- $cfg := deepCopy .Values.gateway.config }}
{{- $triton := get $cfg "triton" | default dict }}
{{- $_ := set $triton "url" .Values.triton.url }}
{{- if .Values.triton.models }}
{{- $_ := set $triton "models" .Values.triton.models }}
{{- end }}
{{- $_ := set $cfg "triton" $triton }}
{{- $log := get $cfg "log" | default dict }}
{{- $kafka := get $log "kafka" | default dict }}
{{- $_ := set $kafka "bootstrap" .Values.kafka.bootstrap }}
{{- $_ := set $log "kafka" $kafka }}
{{- $_ := set $cfg "log" $log }}
{{- toYaml $cfg }}
{{- end }}

{{/* evaluator.yaml: evaluator.config with Kafka and this release's gateway Service set in. */}}
{{- define "understudy.evaluatorConfig" -}}
{{- $cfg := deepCopy .Values.evaluator.config }}
{{- $source := get $cfg "source" | default dict }}
{{- $kafka := get $source "kafka" | default dict }}
{{- $_ := set $kafka "bootstrap" .Values.kafka.bootstrap }}
{{- $_ := set $source "kafka" $kafka }}
{{- $_ := set $cfg "source" $source }}
{{- $gateway := get $cfg "gateway" | default dict }}
{{- $_ := set $gateway "url" (printf "http://%s-gateway:%v" (include "understudy.fullname" .) .Values.gateway.service.httpPort) }}
{{- $_ := set $cfg "gateway" $gateway }}
{{- toYaml $cfg }}
{{- end }}

{{/* The pod-level settings every workload shares. */}}
{{- define "understudy.podSpecCommon" -}}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Scheduling settings of one workload's values (nodeSelector, tolerations, affinity). */}}
{{- define "understudy.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
