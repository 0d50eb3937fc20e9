{{/* Names, labels and the namespaces the operator serves. */}}

{{- define "selflengthen.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "selflengthen.fullname" -}}
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

{{- define "selflengthen.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "selflengthen.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: selflengthen
{{- end -}}

{{- define "selflengthen.selectorLabels" -}}
app.kubernetes.io/name: {{ include "selflengthen.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "selflengthen.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "selflengthen.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "selflengthen.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The namespaces a namespaced operator serves (one per line): rbac.namespaces, else the release's. */}}
{{- define "selflengthen.watchedNamespaces" -}}
{{- $namespaces := .Values.rbac.namespaces | default (list .Release.Namespace) -}}
{{- range $namespaces }}
{{ . }}
{{- end -}}
{{- end -}}

{{/* The namespaces that get the NetworkPolicy (one per line). */}}
{{- define "selflengthen.policyNamespaces" -}}
{{- $namespaces := .Values.networkPolicy.namespaces -}}
{{- if not $namespaces -}}
{{- if eq .Values.rbac.scope "namespaced" -}}
{{- $namespaces = .Values.rbac.namespaces | default (list .Release.Namespace) -}}
{{- else -}}
{{- $namespaces = list .Release.Namespace -}}
{{- end -}}
{{- end -}}
{{- range $namespaces }}
{{ . }}
{{- end -}}
{{- end -}}

{{/* Labels the operator puts on the pods of every run (operator/resources.py labels()). */}}
{{- define "selflengthen.runPodLabels" -}}
app.kubernetes.io/name: selflengthen
app.kubernetes.io/managed-by: selflengthen-operator
{{- end -}}
