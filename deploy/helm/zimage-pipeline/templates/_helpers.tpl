{{- define "zimage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "zimage.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "zimage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zimage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end -}}

{{- define "zimage.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "zimage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: zimage-pipeline
{{- end -}}

{{- define "zimage.labels" -}}
{{ include "zimage.commonLabels" . }}
app.kubernetes.io/component: worker
{{- end -}}

{{- define "zimage.migrationLabels" -}}
{{ include "zimage.commonLabels" . }}
app.kubernetes.io/component: migration
{{- end -}}

{{- define "zimage.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "zimage.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "zimage.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Where a secret file is mounted: one projected volume, a folder per Secret. */}}
{{- define "zimage.secretsDir" -}}/run/secrets/zimage{{- end -}}

{{/*
The settings the chart owns are passed as environment variables (they win over the TOML
file), so the probes, the KEDA triggers and the grace period always match the worker.
Refuse the same keys in config.settings: two sources would disagree silently.
*/}}
{{- define "zimage.checkSettings" -}}
{{- $s := .Values.config.settings | default dict -}}
{{- $broker := get $s "broker" | default dict -}}
{{- $worker := get $s "worker" | default dict -}}
{{- $engine := get $s "engine" | default dict -}}
{{- if hasKey $broker "requests_queue" -}}
{{- fail "config.settings.broker.requests_queue: set broker.requestsQueue instead (KEDA's triggers and the alerts use it)" -}}
{{- end -}}
{{- range $key := list "http_port" "http_host" "shutdown_grace_s" "worker_id" -}}
{{- if hasKey $worker $key -}}
{{- fail (printf "config.settings.worker.%s is set by the chart (worker.httpPort, worker.shutdownGraceSeconds, the pod name)" $key) -}}
{{- end -}}
{{- end -}}
{{- range $key := list "model_path" "compile_cache_dir" -}}
{{- if hasKey $engine $key -}}
{{- fail (printf "config.settings.engine.%s is set by the chart (model.path, compileCache.mountPath)" $key) -}}
{{- end -}}
{{- end -}}
{{- range $s := .Values.secretFiles -}}
{{- if not $s.setting -}}
{{- /* Mounted only: a path in config.settings must name it, or it is a mistake. */ -}}
{{- $path := printf "%s/%s/%s" (include "zimage.secretsDir" $) $s.secretName $s.key -}}
{{- if not (contains $path (toToml $.Values.config.settings)) -}}
{{- fail (printf "secretFiles %s/%s has no setting, and no value of config.settings names its path %s" $s.secretName $s.key $path) -}}
{{- end -}}
{{- else if hasKey $.Values.config.settings (index (splitList "." $s.setting) 0) -}}
{{- $section := get $.Values.config.settings (index (splitList "." $s.setting) 0) -}}
{{- if hasKey $section (index (splitList "." $s.setting) 1) -}}
{{- fail (printf "%s is given by secretFiles and in config.settings" $s.setting) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The environment of the worker and of the migration Job. */}}
{{- define "zimage.env" -}}
- name: ZIMAGE_CONFIG
  value: /app/config/zimage.toml
- name: ZIMAGE_POLICY__FILE
  value: /app/config/policy.toml
- name: ZIMAGE_BROKER__REQUESTS_QUEUE
  value: {{ .Values.broker.requestsQueue | quote }}
- name: ZIMAGE_WORKER__HTTP_HOST
  value: "0.0.0.0"
- name: ZIMAGE_WORKER__HTTP_PORT
  value: {{ .Values.worker.httpPort | quote }}
- name: ZIMAGE_WORKER__SHUTDOWN_GRACE_S
  value: {{ .Values.worker.shutdownGraceSeconds | quote }}
- name: ZIMAGE_WORKER__WORKER_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: ZIMAGE_ENGINE__MODEL_PATH
  value: {{ .Values.model.path | quote }}
- name: ZIMAGE_ENGINE__COMPILE_CACHE_DIR
  value: {{ printf "%s/compile" .Values.compileCache.mountPath | quote }}
- name: HOME
  value: {{ .Values.compileCache.mountPath | quote }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.compileCache.mountPath | quote }}
{{- if .Values.model.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- range .Values.secretFiles }}
{{- if .setting }}
- name: {{ printf "ZIMAGE_%s" (.setting | upper | replace "." "__") }}
  value: {{ printf "%s/%s/%s" (include "zimage.secretsDir" $) .secretName .key | quote }}
{{- end }}
{{- end }}
{{- with .Values.worker.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The configuration volumes. Called with (dict "root" $ "migration" bool): the migration
hook runs before the release's objects exist, so it mounts its own hook ConfigMap and no
templates (which it does not need).
*/}}
{{- define "zimage.configVolumes" -}}
{{- $root := .root -}}
- name: config
  configMap:
    name: {{ include "zimage.fullname" $root }}-{{ if .migration }}migrate-{{ end }}config
{{- if and $root.Values.config.templates (not .migration) }}
- name: templates
  configMap:
    name: {{ include "zimage.fullname" $root }}-templates
{{- end }}
{{- if $root.Values.secretFiles }}
- name: secret-files
  projected:
    defaultMode: 0440
    sources:
    {{- range $root.Values.secretFiles }}
      - secret:
          name: {{ .secretName }}
          items:
            - key: {{ .key }}
              path: {{ printf "%s/%s" .secretName .key }}
    {{- end }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* The configuration mounts; same argument as zimage.configVolumes. */}}
{{- define "zimage.configMounts" -}}
{{- $root := .root -}}
- name: config
  mountPath: /app/config
  readOnly: true
{{- if and $root.Values.config.templates (not .migration) }}
- name: templates
  mountPath: /app/config/templates
  readOnly: true
{{- end }}
{{- if $root.Values.secretFiles }}
- name: secret-files
  mountPath: {{ include "zimage.secretsDir" $root }}
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* The priority queues: <requestsQueue>.<class>, in the order the worker serves them. */}}
{{- define "zimage.priorityQueues" -}}
{{- range $class := list "interactive" "standard" "bulk" }}
- {{ printf "%s.%s" $.Values.broker.requestsQueue $class }}
{{- end }}
{{- end -}}
