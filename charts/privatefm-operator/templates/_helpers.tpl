{{/* The chart's name, or nameOverride. */}}
{{- define "privatefm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name of this release's objects. The release name is used alone when it already contains the
chart's name, so `helm install privatefm-operator .` gives "privatefm-operator", like manifests/.
*/}}
{{- define "privatefm.fullname" -}}
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

{{- define "privatefm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "privatefm.labels" -}}
helm.sh/chart: {{ include "privatefm.chart" . }}
{{ include "privatefm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: privatefm
{{- end }}

{{/* Labels that pick the operator's Pod; they never change across upgrades. */}}
{{- define "privatefm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "privatefm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "privatefm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "privatefm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the store's credentials: the user's own, or the one this chart renders. */}}
{{- define "privatefm.s3SecretName" -}}
{{- default (printf "%s-s3" (include "privatefm.fullname" .)) .Values.s3.existingSecret }}
{{- end }}

{{/* repository:tag (or repository@digest); the tag defaults to the chart's appVersion. */}}
{{- define "privatefm.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
"true" when the chart renders the credentials Secret: no existingSecret and both keys given. Fails
on one key without the other, which would otherwise be a Secret with an empty key.
*/}}
{{- define "privatefm.rendersSecret" -}}
{{- if not .Values.s3.existingSecret }}
{{- if and .Values.s3.accessKey .Values.s3.secretKey }}true
{{- else if or .Values.s3.accessKey .Values.s3.secretKey }}
{{- fail "s3.accessKey and s3.secretKey go together: set both, or neither (workload identity), or use s3.existingSecret" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A map of labels or annotations whose values may be numbers or booleans in values (no --set-string
needed): each value is rendered through tpl and quoted. Call with (dict "map" ... "ctx" $).
*/}}
{{- define "privatefm.stringMap" -}}
{{- range $key, $value := .map }}
{{ $key }}: {{ tpl (toString $value) $.ctx | quote }}
{{- end }}
{{- end }}
