{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "eventops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "eventops.fullname" -}}
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

{{- define "eventops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eventops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "eventops.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "eventops.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eventops
{{- end }}

{{- define "eventops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "eventops.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Kafka security protocol: the value given, or derived from SASL and TLS. */}}
{{- define "eventops.kafkaProtocol" -}}
{{- $k := .Values.kafka }}
{{- if $k.securityProtocol }}
{{- $k.securityProtocol }}
{{- else if and $k.sasl.secretName $k.tls.enabled }}SASL_SSL
{{- else if $k.sasl.secretName }}SASL_PLAINTEXT
{{- else if $k.tls.enabled }}SSL
{{- else }}PLAINTEXT
{{- end }}
{{- end }}

{{/* Fails on combinations of values the schema cannot express, naming the value to fix. */}}
{{- define "eventops.validate" -}}
{{- $k := .Values.kafka }}
{{- $protocol := include "eventops.kafkaProtocol" . }}
{{- if and (hasPrefix "SASL" $protocol) (not $k.sasl.secretName) }}
{{- fail (printf "kafka.sasl.secretName: kafka.securityProtocol %s needs a Secret with the operator's SASL user and password" $protocol) }}
{{- end }}
{{- if and $k.sasl.secretName (not (hasPrefix "SASL" $protocol)) }}
{{- fail (printf "kafka.securityProtocol: %s does not use SASL, yet kafka.sasl.secretName is set; use SASL_PLAINTEXT or SASL_SSL, or leave it empty" $protocol) }}
{{- end }}
{{- if and $k.tls.enabled (not $k.tls.caSecret.name) }}
{{- fail "kafka.tls.caSecret.name: kafka.tls.enabled needs the Secret holding the brokers' CA certificate" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "leaderElection.enabled: more than one replica (replicaCount) needs leader election" }}
{{- end }}
{{- end }}
