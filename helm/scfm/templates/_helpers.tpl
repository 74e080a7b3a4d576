{{/*
Names. Kubernetes names are at most 63 characters; names with a suffix leave room for it.
*/}}
{{- define "scfm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "scfm.fullname" -}}
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

{{/* The RayJob: KubeRay names its RayCluster "<rayjob>-<5 chars>" and refuses RayJob names over 47 characters. */}}
{{- define "scfm.jobName" -}}
{{- include "scfm.fullname" . | trunc 47 | trimSuffix "-" }}
{{- end }}

{{- define "scfm.configName" -}}
{{- printf "%s-config" (include "scfm.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "scfm.mlflowName" -}}
{{- printf "%s-mlflow" (include "scfm.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "scfm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "scfm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "scfm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "scfm.labels" -}}
helm.sh/chart: {{ include "scfm.chart" . }}
{{ include "scfm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* repository:tag, or repository@sha256:... when the tag is a digest. */}}
{{- define "scfm.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- printf "%s%s%s" .Values.image.repository (ternary "@" ":" (hasPrefix "sha256:" $tag)) $tag }}
{{- end }}

{{/*
A container security context: the shared one with a pod group's keys laid over it, key by key (sprig's merge
would drop an override set to false).
*/}}
{{- define "scfm.securityContext" -}}
{{- $sc := deepCopy (index . 0) }}
{{- range $k, $v := (index . 1) }}
{{- $_ := set $sc $k $v }}
{{- end }}
{{- toYaml $sc }}
{{- end }}

{{/* MLflow tracking URI the run logs to: the chart's own server or the external one. */}}
{{- define "scfm.mlflowUri" -}}
{{- if eq .Values.mlflow.mode "deploy" }}
{{- printf "http://%s.%s.svc:%v" (include "scfm.mlflowName" .) .Release.Namespace .Values.mlflow.port }}
{{- else if eq .Values.mlflow.mode "external" }}
{{- required "mlflow.externalUri is required when mlflow.mode=external" .Values.mlflow.externalUri }}
{{- else }}
{{- fail (printf "mlflow.mode=%q is not allowed; choose deploy or external" .Values.mlflow.mode) }}
{{- end }}
{{- end }}

{{/* Where run outputs and checkpoints go: the shared PVC, or scratch space on the pod. */}}
{{- define "scfm.outputDir" -}}
{{- if .Values.checkpoints.claimName }}/checkpoints{{ else }}/scratch/runs{{ end }}
{{- end }}

{{/* The job's shell command: the launch subcommand, the mounted config, then key=value overrides. */}}
{{- define "scfm.entrypoint" -}}
{{- $args := list .Values.job.command "/etc/scfm/config.yaml" }}
{{- $args = append $args (printf "tracking.uri=%s" (include "scfm.mlflowUri" .) | squote) }}
{{- $args = append $args (printf "train.output_dir=%s" (include "scfm.outputDir" .) | squote) }}
{{- if and .Values.atlas.uri (not .Values.atlas.claimName) }}
{{- $args = append $args (printf "data.atlas=%s" .Values.atlas.uri | squote) }}
{{- end }}
{{- range .Values.job.overrides }}
{{- $args = append $args (squote .) }}
{{- end }}
{{- join " " $args }}
{{- end }}

{{/*
A Ray pod template. Called with (dict "root" $ "group" <head or worker group values> "kind" "head"|"worker").
Every pod gets the same volumes: config (read-only), /dev/shm in memory, /tmp and /scratch (the root
filesystem is read-only), and the atlas / checkpoint PVCs when they are set.
*/}}
{{- define "scfm.rayPodTemplate" -}}
{{- $root := .root }}
{{- $g := .group }}
{{- $gpus := int (default 0 $g.gpus) }}
{{- $resources := deepCopy (default dict $g.resources) }}
{{- if gt $gpus 0 }}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" $gpus) (default dict $resources.limits)) }}
{{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" $gpus) (default dict $resources.requests)) }}
{{- end }}
metadata:
  labels:
    {{- include "scfm.labels" $root | nindent 4 }}
    app.kubernetes.io/component: ray-{{ .kind }}
  {{- with $g.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .kind }}
      image: {{ include "scfm.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if eq .kind "head" }}
      ports:
        - {name: gcs, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
      {{- end }}
      env:
        - {name: MLFLOW_TRACKING_URI, value: {{ include "scfm.mlflowUri" $root | quote }}}
        - {name: SCFM_CONFIG, value: /etc/scfm/config.yaml}
        - {name: HOME, value: /scratch/home}
        - {name: XDG_CACHE_HOME, value: /scratch/cache}
        - {name: TRITON_CACHE_DIR, value: /scratch/triton}
        - {name: TORCH_EXTENSIONS_DIR, value: /scratch/torch_extensions}
        - {name: MPLCONFIGDIR, value: /scratch/matplotlib}
      {{- with $root.Values.atlas.secretName }}
      envFrom:
        - secretRef:
            name: {{ . }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- include "scfm.securityContext" (list $root.Values.securityContext $g.securityContext) | nindent 8 }}
      volumeMounts:
        - {name: config, mountPath: /etc/scfm, readOnly: true}
        - {name: dshm, mountPath: /dev/shm}
        - {name: tmp, mountPath: /tmp}
        - {name: scratch, mountPath: /scratch}
        {{- if $root.Values.atlas.claimName }}
        - {name: atlas, mountPath: {{ $root.Values.atlas.mountPath }}, readOnly: true}
        {{- end }}
        {{- if $root.Values.checkpoints.claimName }}
        - {name: checkpoints, mountPath: /checkpoints}
        {{- end }}
        {{- with $g.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "scfm.configName" $root }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $root.Values.shm.sizeLimit }}
    - name: tmp
      emptyDir: {}
    - name: scratch
      emptyDir:
        sizeLimit: {{ $root.Values.scratch.sizeLimit }}
    {{- if $root.Values.atlas.claimName }}
    - name: atlas
      persistentVolumeClaim:
        claimName: {{ $root.Values.atlas.claimName }}
        readOnly: true
    {{- end }}
    {{- if $root.Values.checkpoints.claimName }}
    - name: checkpoints
      persistentVolumeClaim:
        claimName: {{ $root.Values.checkpoints.claimName }}
    {{- end }}
    {{- with $g.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
