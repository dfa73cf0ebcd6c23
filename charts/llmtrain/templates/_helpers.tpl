{{/* Names, labels and the RBAC rules: the one place each is spelled out. */}}

{{- define "llmtrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llmtrain.fullname" -}}
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

{{- define "llmtrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmtrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "llmtrain.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llmtrain.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llmtrain
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "llmtrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llmtrain.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false: name the existing ServiceAccount the operator runs as" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llmtrain.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The namespaces the operator watches, deduplicated; empty means cluster-wide. */}}
{{- define "llmtrain.watchNamespaces" -}}
{{- $out := list }}
{{- range .Values.watchNamespaces }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" .) }}
{{- fail (printf "watchNamespaces: %q is not a namespace name (lowercase letters, digits and '-')" .) }}
{{- end }}
{{- $out = append $out . }}
{{- end }}
{{- toJson (uniq $out) }}
{{- end }}

{{/*
What the operator does inside each namespace it watches (a Role there, or part of the
ClusterRole when it watches all of them). Each rule names the code that needs it;
tests/unit/test_helm_chart.py checks the rules against operator/kube.py, the Kopf
handlers and Kopf's own needs, and the cluster test runs the operator on these rules.
*/}}
{{- define "llmtrain.rules.namespaced" -}}
# Kopf lists and watches jobs (its on.event handler feeds the controller's cache); the
# controller merge-patches their annotations and finalizers (llmtrain.dev/stop-ray-job while
# a Ray job may run). Nothing GETs or PUTs a job.
- apiGroups: ["llmtrain.dev"]
  resources: ["llmtrainingjobs"]
  verbs: ["list", "watch", "patch"]
# The reconciler's outcome: the controller merge-patches the status subresource.
- apiGroups: ["llmtrain.dev"]
  resources: ["llmtrainingjobs/status"]
  verbs: ["patch"]
# The Ray head/worker pods: the pod index watches them (label-selected), the reconciler
# creates/deletes them and annotates them (retriable-in-group=false ends the Kueue pod group
# of pods an operator before the Workload integration made).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
# A crashed Ray container's last log lines go into the job's condition (kube.RestApi.pod_log).
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# Per-job children made create-if-absent (get after a 409) and deleted after the TTL:
# the head Service, the Ray auth-token Secret, the job-spec ConfigMap.
- apiGroups: [""]
  resources: ["services", "secrets", "configmaps"]
  verbs: ["get", "create", "delete"]
# The job-spec ConfigMap is brought up to date with the spec before each Ray job submission
# (the driver reads its mounted copy).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["patch"]
# The per-job NetworkPolicies (the Ray cluster's; spec.serve's model server's, patched when
# spec.serve changes).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "delete", "patch"]
# spec.serve: the model server's Deployment (and its Service, above), kept to the spec.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "create", "delete", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["patch"]
# The job's PodDisruptionBudget (holds a node drain until the just-in-time checkpoint),
# made create-if-absent and deleted after the TTL.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "delete"]
# spec.resources.queueName (operator/kueue.py): the job's Kueue Workload, made create-if-absent
# (deleted with the job by its owner reference); its status patched when Kueue evicts it (the
# admission handed back) and when the job finishes (Finished: the quota released).
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "create", "delete"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads/status"]
  verbs: ["patch"]
# The controller posts Events on jobs; the diagnosis lists the scheduler's FailedScheduling.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- end }}

{{- define "llmtrain.rules.namespacedPeering" -}}
{{- if .Values.peering.enabled }}
# Namespaced peering: a KopfPeering per watched namespace carries the replicas' heartbeats.
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}

{{/* Cluster-scoped needs: Kopf's discovery, and cluster-wide peering. */}}
{{- define "llmtrain.rules.discovery" -}}
# Kopf watches CRDs to notice when the LLMTrainingJob CRD is (re)installed or upgraded.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}

{{/* Node drains (operator/disruption.py): is a node of a job's pods cordoned? */}}
{{- define "llmtrain.rules.nodes" -}}
# Read-only: a node of a job's pods is read by name (a list with a fieldSelector) to see a
# cordon, so that the job takes a just-in-time checkpoint before a drain evicts its pods.
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list"]
{{- end }}

{{/* spec.resources.queueName (operator/kueue.py): a job's Kueue priority class, by name. */}}
{{- define "llmtrain.rules.kueue" -}}
# Read-only: the value of the WorkloadPriorityClass a job's kueue.x-k8s.io/priority-class
# label names goes into its Workload's spec.priority (Kueue preempts by it).
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloadpriorityclasses"]
  verbs: ["get"]
{{- end }}

{{/* Only a namespaced Kopf follows namespaces (a cluster-wide one watches across all). */}}
{{- define "llmtrain.rules.namespaces" -}}
# Kopf lists/watches namespaces to learn which of the watched ones exist.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

{{- define "llmtrain.rules.clusterPeering" -}}
{{- if .Values.peering.enabled }}
# Cluster-wide peering: the ClusterKopfPeering carries the replicas' heartbeats.
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}
