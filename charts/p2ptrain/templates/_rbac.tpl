{{- /*
RBAC rules, exactly as operator/p2ptrain_operator/rbac.py (OPERATOR_RULES, CLEANUP_RULES); the chart
tests keep them equal, and the operator tests prove each rule is used by a whole job lifecycle.
Every resource is namespaced: a Role in operator.watchNamespace when it is set, else a ClusterRole.
*/ -}}
{{- define "p2ptrain.operatorRules" -}}
- apiGroups: ["p2ptrain.dev"]
  resources: ["p2ptrainingjobs"]
  verbs: ["list", "watch", "patch", "delete"]
- apiGroups: ["p2ptrain.dev"]
  resources: ["p2ptrainingjobs/status"]
  verbs: ["patch"]
# Children carry blockOwnerDeletion: true, which OwnerReferencesPermissionEnforcement (e.g. OpenShift)
# allows only with update on the owner's finalizers.
- apiGroups: ["p2ptrain.dev"]
  resources: ["p2ptrainingjobs/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["secrets", "configmaps", "services"]
  verbs: ["create"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["create", "patch"]
- apiGroups: ["serving.knative.dev"]
  resources: ["services"]
  verbs: ["create"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{- define "p2ptrain.cleanupRules" -}}
- apiGroups: ["p2ptrain.dev"]
  resources: ["p2ptrainingjobs"]
  verbs: ["list", "delete", "patch"]
{{- end -}}

{{- /* "Role" with a watched namespace, else "ClusterRole". */ -}}
{{- define "p2ptrain.roleKind" -}}
{{- if .Values.operator.watchNamespace -}}Role{{- else -}}ClusterRole{{- end -}}
{{- end -}}
