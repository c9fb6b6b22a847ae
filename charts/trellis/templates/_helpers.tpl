{{/*
Names are fixed: Trellis is a cluster singleton (one MeshConfig, one pair of
webhook configurations), and injected proxies and the controller's defaults
refer to these names.
*/}}

{{- define "trellis.labels" -}}
app.kubernetes.io/name: trellis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "trellis.selectorLabels" -}}
app.kubernetes.io/name: trellis
app.kubernetes.io/component: controller
{{- end }}

{{- define "trellis.controllerImage" -}}
{{- $i := .Values.image.controller -}}
{{- if $i.digest -}}
{{ $i.repository }}@{{ $i.digest }}
{{- else -}}
{{ $i.repository }}:{{ $i.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{- define "trellis.initImage" -}}
{{- $i := .Values.image.init -}}
{{- if $i.digest -}}
{{ $i.repository }}@{{ $i.digest }}
{{- else -}}
{{ $i.repository }}:{{ $i.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{/* Namespaces no webhook ever intercepts: the control plane's own and kube-system. */}}
{{- define "trellis.excludedNamespaces" -}}
- key: kubernetes.io/metadata.name
  operator: NotIn
  values:
    {{- toYaml (uniq (concat (list .Release.Namespace "kube-system") .Values.webhooks.excludeNamespaces)) | nindent 4 }}
{{- end }}

{{/* The cert-manager Certificate that serves the webhooks, as namespace/name. */}}
{{- define "trellis.webhookCertificate" -}}
{{ .Release.Namespace }}/trellis-webhook
{{- end }}

{{/* "true" when cert-manager serves the webhooks, else empty. */}}
{{- define "trellis.webhookCertManager" -}}
{{- if and .Values.certManager.enabled .Values.certManager.webhook.enabled -}}true{{- end -}}
{{- end }}

{{/* A webhook's clientConfig without caBundle: the trellis-webhook Service,
or webhooks.url for a controller outside the cluster. Takes (list . path). */}}
{{- define "trellis.webhookClientConfig" -}}
{{- $ := index . 0 -}}
{{- $path := index . 1 -}}
{{- if $.Values.webhooks.url -}}
url: {{ printf "%s%s" (trimSuffix "/" $.Values.webhooks.url) $path | quote }}
{{- else -}}
service:
  name: trellis-webhook
  namespace: {{ $.Release.Namespace }}
  path: {{ $path }}
  port: 443
{{- end -}}
{{- end -}}
