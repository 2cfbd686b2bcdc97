{{- define "tensafe.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tensafe.labels" -}}
app.kubernetes.io/name: tensafe-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tensafe.selectorLabels" -}}
app.kubernetes.io/name: tensafe-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tensafe.serviceAccountName" -}}
{{- default (include "tensafe.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "tensafe.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* What the operator may do: exactly what reconcile.py, operations.py and kopf itself call. */}}
{{- define "tensafe.rules" -}}
- apiGroups: [tensafe.io]
  resources: [trainingclients, trainingoperations]
  verbs: [get, list, watch, patch]
- apiGroups: [tensafe.io]
  resources: [trainingoperations]
  verbs: [delete]            # finished operations past their TTL
- apiGroups: [tensafe.io]
  resources: [trainingclients/status, trainingoperations/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [services, persistentvolumeclaims]
  verbs: [get, create]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, patch]  # the key Secret: bearer token and the tenant's key set
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
# Privacy ledgers: the operator creates one per (tenant, dataset) and lets each DP trainer pod read its own
# and patch its status (a Role may only grant what its creator holds). Nothing here can delete a ledger.
- apiGroups: [tensafe.io]
  resources: [privacybudgets]
  verbs: [get, create]
- apiGroups: [tensafe.io]
  resources: [privacybudgets/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create]
{{- end -}}
