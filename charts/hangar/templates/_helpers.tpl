{{/* Name of the chart. */}}
{{- define "hangar.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name; components append `-operator`, `-proxy`, `-webhook`. */}}
{{- define "hangar.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of cluster-scoped objects: unique per release and namespace. */}}
{{- define "hangar.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "hangar.fullname" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "hangar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "hangar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: hangar
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator"). */}}
{{- define "hangar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hangar.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "hangar.componentLabels" -}}
{{ include "hangar.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "hangar.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "hangar.serviceAccountName" -}}
{{- printf "%s-%s" (include "hangar.fullname" .ctx) .component -}}
{{- end -}}

{{/* Pod-level settings shared by the components. Takes the root context, or
(dict "ctx" $ "supplementalGroups" (list gid...)) to add groups to the pod's securityContext. */}}
{{- define "hangar.podSpecCommon" -}}
{{- $ctx := . -}}
{{- $groups := list -}}
{{- if hasKey . "ctx" }}{{ $ctx = .ctx }}{{ $groups = .supplementalGroups }}{{ end -}}
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- if $ctx.Values.hostNetwork }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- with $ctx.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- $security := deepCopy ($ctx.Values.podSecurityContext | default dict) -}}
{{- if $groups }}
{{- $_ := set $security "supplementalGroups" (concat ($security.supplementalGroups | default list) $groups | uniq) }}
{{- end }}
{{- with $security }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $ctx.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $ctx.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $ctx.Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Environment shared by the components. */}}
{{- define "hangar.commonEnv" -}}
- name: HANGAR_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: HANGAR_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "hangar.webhookSecretName" -}}
{{- .Values.webhook.secret.existingSecret | default (printf "%s-webhook" (include "hangar.fullname" .)) -}}
{{- end -}}

{{- define "hangar.registrySecretName" -}}
{{- .Values.operator.builder.credentials.existingSecret | default (printf "%s-registry" (include "hangar.fullname" .)) -}}
{{- end -}}

{{- define "hangar.registryCredentials" -}}
{{- $c := .Values.operator.builder.credentials -}}
{{- if or $c.existingSecret $c.username -}}true{{- end -}}
{{- end -}}

{{- define "hangar.nodeAgentSecretName" -}}
{{- .Values.nodeAgent.token.existingSecret | default (printf "%s-node-agent" (include "hangar.fullname" .)) -}}
{{- end -}}

{{- define "hangar.tokenKeySecretName" -}}
{{- .Values.tokenKey.existingSecret | default (printf "%s-token-key" (include "hangar.fullname" .)) -}}
{{- end -}}

{{/* The token key volume of the operator and the proxy (both hash private Spaces' tokens with it). */}}
{{- define "hangar.tokenKeyVolume" -}}
- name: token-key
  secret:
    secretName: {{ include "hangar.tokenKeySecretName" . }}
    items:
      - key: {{ .Values.tokenKey.key }}
        path: {{ .Values.tokenKey.key }}
{{- end -}}

{{- define "hangar.tokenKeyMount" -}}
- name: token-key
  mountPath: /etc/hangar/token-key
  readOnly: true
{{- end -}}

{{- define "hangar.tokenKeyEnv" -}}
- name: HANGAR_TOKEN_KEY_FILE
  value: /etc/hangar/token-key/{{ .Values.tokenKey.key }}
{{- end -}}
