{{/*
Names, labels and the pieces several templates share. Flags of the Quarry binaries appear only
in quarry.coordinator.args and quarry.worker.args (tests/tests/helm_chart.rs checks every flag
the chart renders against the binaries' --help).
*/}}

{{- define "quarry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the chart name.
Truncated to 42 so that the longest suffix added to it ("-coordinator-headless", 21) still
gives a valid Service name (63 characters).
*/}}
{{- define "quarry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "quarry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; call with (dict "ctx" $ "component" "coordinator"). */}}
{{- define "quarry.labels" -}}
helm.sh/chart: {{ include "quarry.chart" .ctx }}
{{ include "quarry.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: quarry
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "coordinator"). */}}
{{- define "quarry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "quarry.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{- define "quarry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "quarry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference; call with (dict "ctx" $ "image" .Values.coordinator.image). The tag
defaults to the chart's appVersion. */}}
{{- define "quarry.image" -}}
{{- $repo := .image.repository }}
{{- if .ctx.Values.imageRegistry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" .ctx.Values.imageRegistry) $repo }}
{{- end }}
{{- printf "%s:%s" $repo (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "quarry.configName" -}}
{{- printf "%s-config" (include "quarry.fullname" .) }}
{{- end }}

{{- define "quarry.coordinatorName" -}}
{{- printf "%s-coordinator" (include "quarry.fullname" .) }}
{{- end }}

{{- define "quarry.workerName" -}}
{{- printf "%s-worker" (include "quarry.fullname" .) }}
{{- end }}

{{- define "quarry.etcdName" -}}
{{- printf "%s-etcd" (include "quarry.fullname" .) }}
{{- end }}

{{- define "quarry.etcdHeadlessName" -}}
{{- printf "%s-etcd-headless" (include "quarry.fullname" .) }}
{{- end }}

{{/* The coordinator Service as workers and users reach it: host:port. */}}
{{- define "quarry.coordinatorAddress" -}}
{{- printf "%s.%s.svc:%d" (include "quarry.coordinatorName" .) .Release.Namespace (int .Values.coordinator.grpcPort) }}
{{- end }}

{{/* `--state`: etcd://member1:2379,member2:2379/<prefix>, each bundled member by its stable
DNS name, so the client fails over between members by itself. */}}
{{- define "quarry.stateUrl" -}}
{{- $hosts := list }}
{{- if .Values.etcd.enabled }}
{{- $name := include "quarry.etcdName" . }}
{{- $headless := include "quarry.etcdHeadlessName" . }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $hosts = append $hosts (printf "%s-%d.%s.%s.svc:2379" $name $i $headless $.Release.Namespace) }}
{{- end }}
{{- else }}
{{- if not .Values.etcd.external.endpoints }}
{{- fail "etcd.enabled=false needs etcd.external.endpoints (host:port of an existing etcd)" }}
{{- end }}
{{- $hosts = .Values.etcd.external.endpoints }}
{{- end }}
{{- printf "%s://%s/%s" (ternary "etcd+tls" "etcd" (eq (include "quarry.etcdTls" .) "true")) (join "," $hosts) .Values.etcd.prefix }}
{{- end }}

{{/* "true" when the coordinator reaches etcd over TLS: the bundled etcd with etcd.tls, or an
external one with etcd.external.tlsSecret. */}}
{{- define "quarry.etcdTls" -}}
{{- if .Values.etcd.enabled }}{{ .Values.etcd.tls.enabled }}{{ else }}{{ not (empty .Values.etcd.external.tlsSecret) }}{{ end }}
{{- end }}

{{/* The Secret with the etcd CA and certificates (ca.crt, client.crt, client.key; for the
bundled etcd also server.crt, server.key). */}}
{{- define "quarry.etcdTlsSecretName" -}}
{{- if .Values.etcd.enabled }}
{{- default (printf "%s-etcd-tls" (include "quarry.fullname" .)) .Values.etcd.tls.existingSecret }}
{{- else }}
{{- .Values.etcd.external.tlsSecret }}
{{- end }}
{{- end }}

{{- define "quarry.etcdTlsDir" -}}/etc/quarry/etcd-tls{{- end }}
{{- define "quarry.etcdAuthDir" -}}/etc/quarry/etcd-auth{{- end }}

{{/* The Secret with AWS_* settings, or "" when the store is not S3. */}}
{{- define "quarry.storeSecretName" -}}
{{- if hasPrefix "s3://" .Values.store.url }}
{{- default (printf "%s-store" (include "quarry.fullname" .)) .Values.store.s3.existingSecret }}
{{- end }}
{{- end }}

{{- define "quarry.authSecretName" -}}
{{- default (printf "%s-auth" (include "quarry.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Fails the render on combinations the schema cannot express. */}}
{{- define "quarry.validate" -}}
{{- if and .Values.tls.enabled (not .Values.tls.serverSecret) }}
{{- fail "tls.enabled needs tls.serverSecret (a Secret with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- if and .Values.tls.clientAuth (not .Values.tls.enabled) }}
{{- fail "tls.clientAuth needs tls.enabled" }}
{{- end }}
{{- if and .Values.tls.clientAuth (not .Values.tls.clientSecret) }}
{{- fail "tls.clientAuth needs tls.clientSecret (the workers' tls.crt, tls.key and the client CA as ca.crt)" }}
{{- end }}
{{- if and (not .Values.auth.enabled) (not .Values.tls.clientAuth) (not .Values.auth.allowUnauthenticated) }}
{{- fail "auth.enabled=false without tls.clientAuth leaves the coordinator open to anyone who reaches it: keep auth.enabled (the chart generates a token), or set auth.allowUnauthenticated=true to run that way on purpose" }}
{{- end }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.authSecret (not .Values.etcd.external.user) }}
{{- fail "etcd.external.authSecret needs etcd.external.user (the etcd user whose password it holds)" }}
{{- end }}
{{- if and (not .Values.etcd.enabled) (not .Values.etcd.external.endpoints) }}
{{- fail "etcd.enabled=false needs etcd.external.endpoints (host:port of an existing etcd)" }}
{{- end }}
{{- end }}

{{/* Checksums of the config and of the Secrets the chart writes: a change rolls the pods. */}}
{{- define "quarry.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ printf "%s%s%s" (include (print .Template.BasePath "/secret-store.yaml") .) (include (print .Template.BasePath "/secret-auth.yaml") .) (include (print .Template.BasePath "/secret-etcd-tls.yaml") .) | sha256sum }}
{{- end }}

{{/* Environment every Quarry container gets besides the ConfigMap's. */}}
{{- define "quarry.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: OTEL_SERVICE_NAME
  value: quarry-{{ .component }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),k8s.node.name=$(NODE_NAME)
{{- end }}

{{- define "quarry.envFrom" -}}
- configMapRef:
    name: {{ include "quarry.configName" . }}
{{- with include "quarry.storeSecretName" . }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end }}

{{/* Mount paths of the Secrets; the flags below point into them. */}}
{{- define "quarry.tlsDir" -}}/etc/quarry/tls{{- end }}
{{- define "quarry.tlsClientDir" -}}/etc/quarry/tls-client{{- end }}
{{- define "quarry.authDir" -}}/etc/quarry/auth{{- end }}

{{/* `coordinator serve` arguments. */}}
{{- define "quarry.coordinator.args" -}}
- serve
- --listen
- 0.0.0.0:{{ .Values.coordinator.grpcPort }}
- --advertise
- $(POD_IP):{{ .Values.coordinator.grpcPort }}
- --state
- {{ include "quarry.stateUrl" . }}
- --store
- {{ .Values.store.url }}
- --lease-ttl
- {{ .Values.coordinator.leaseTtlSeconds | quote }}
{{- if eq (include "quarry.etcdTls" .) "true" }}
- --etcd-ca
- {{ include "quarry.etcdTlsDir" . }}/ca.crt
- --etcd-cert
- {{ include "quarry.etcdTlsDir" . }}/client.crt
- --etcd-key
- {{ include "quarry.etcdTlsDir" . }}/client.key
{{- end }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.authSecret }}
- --etcd-user
- {{ .Values.etcd.external.user }}
- --etcd-password-file
- {{ include "quarry.etcdAuthDir" . }}/password
{{- end }}
{{- if .Values.coordinator.metrics.enabled }}
- --metrics-listen
- 0.0.0.0:{{ .Values.coordinator.metrics.port }}
{{- end }}
{{- if .Values.tls.enabled }}
- --tls-cert
- {{ include "quarry.tlsDir" . }}/tls.crt
- --tls-key
- {{ include "quarry.tlsDir" . }}/tls.key
{{- if .Values.tls.clientAuth }}
- --tls-client-ca
- {{ include "quarry.tlsClientDir" . }}/ca.crt
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
- --auth-token-file
- {{ include "quarry.authDir" . }}/{{ .Values.auth.secretKey }}
{{- else if and .Values.auth.allowUnauthenticated (not .Values.tls.clientAuth) }}
- --allow-unauthenticated
{{- end }}
{{- end }}

{{/* `worker` arguments; call with (dict "ctx" $ "gpu" "all"). */}}
{{- define "quarry.worker.args" -}}
{{- $v := .ctx.Values -}}
- --gpu
- {{ .gpu | quote }}
- --coordinator
- {{ default (include "quarry.coordinatorAddress" .ctx) $v.worker.coordinatorAddress }}
- --kill-grace
- {{ $v.worker.killGraceSeconds | quote }}
- --drain-grace
- {{ $v.worker.drainGraceSeconds | quote }}
{{- if $v.worker.root }}
- --root
- {{ $v.worker.root }}
{{- end }}
{{- if $v.worker.metrics.enabled }}
- --metrics-listen
- 0.0.0.0:{{ $v.worker.metrics.port }}
{{- end }}
{{- if $v.tls.enabled }}
- --tls-ca
- {{ include "quarry.tlsDir" .ctx }}/ca.crt
{{- if $v.tls.clientAuth }}
- --tls-cert
- {{ include "quarry.tlsClientDir" .ctx }}/tls.crt
- --tls-key
- {{ include "quarry.tlsClientDir" .ctx }}/tls.key
{{- end }}
{{- end }}
{{- if $v.auth.enabled }}
- --auth-token-file
- {{ include "quarry.authDir" .ctx }}/{{ $v.auth.secretKey }}
{{- end }}
{{- end }}

{{/* The worker's grace period: long enough for --drain-grace and --kill-grace. */}}
{{- define "quarry.worker.terminationGrace" -}}
{{- if kindIs "invalid" .Values.worker.terminationGracePeriodSeconds }}
{{- add .Values.worker.drainGraceSeconds .Values.worker.killGraceSeconds 30 }}
{{- else }}
{{- .Values.worker.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Preferred anti-affinity by node for a component, used when no affinity is given. */}}
{{- define "quarry.spreadAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "quarry.selectorLabels" . | nindent 12 }}
{{- end }}

{{/* The worker pod spec, shared by the DaemonSet and the per-GPU Deployment; call with
(dict "ctx" $ "gpu" "all" "gpus" N). gpus > 0 requests that many nvidia.com/gpu. */}}
{{- define "quarry.worker.podTemplate" -}}
{{- $ := .ctx }}
{{- $w := $.Values.worker -}}
metadata:
  labels:
    {{- include "quarry.labels" (dict "ctx" $ "component" "worker") | nindent 4 }}
    {{- with $w.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- include "quarry.checksums" $ | nindent 4 }}
    {{- with $w.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "quarry.serviceAccountName" $ }}
  automountServiceAccountToken: {{ $.Values.serviceAccount.automountServiceAccountToken }}
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $w.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  # The worker starts generators in their own process groups; with a shared process namespace
  # the pod's pause process is PID 1 and reaps whatever they leave behind.
  shareProcessNamespace: true
  terminationGracePeriodSeconds: {{ include "quarry.worker.terminationGrace" $ }}
  securityContext:
    {{- toYaml $w.podSecurityContext | nindent 4 }}
  {{- with $w.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: worker
      image: {{ include "quarry.image" (dict "ctx" $ "image" $w.image) }}
      imagePullPolicy: {{ $w.image.pullPolicy }}
      command: ["worker"]
      args:
        {{- include "quarry.worker.args" (dict "ctx" $ "gpu" .gpu) | nindent 8 }}
      envFrom:
        {{- include "quarry.envFrom" $ | nindent 8 }}
      env:
        {{- include "quarry.podEnv" (dict "component" "worker") | nindent 8 }}
        - name: TMPDIR
          value: /tmp
        - name: HOME
          value: /tmp
        {{- if eq (int .gpus) 0 }}
        # No GPUs requested from the device plugin: see every GPU of the node.
        - name: NVIDIA_VISIBLE_DEVICES
          value: all
        {{- end }}
        {{- with $w.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if $w.metrics.enabled }}
      ports:
        - name: metrics
          containerPort: {{ $w.metrics.port }}
          protocol: TCP
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        initialDelaySeconds: 10
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 6
      {{- end }}
      resources:
        {{- $res := deepCopy (default (dict) $w.resources) }}
        {{- if gt (int .gpus) 0 }}
        {{- $limits := default (dict) $res.limits }}
        {{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
        {{- $_ := set $res "limits" $limits }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      securityContext:
        {{- toYaml $w.securityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: work
          mountPath: /var/lib/quarry/work
        {{- if $w.shmSize }}
        - name: dshm
          mountPath: /dev/shm
        {{- end }}
        {{- if $.Values.tls.enabled }}
        - name: tls
          mountPath: {{ include "quarry.tlsDir" $ }}
          readOnly: true
        {{- if $.Values.tls.clientAuth }}
        - name: tls-client
          mountPath: {{ include "quarry.tlsClientDir" $ }}
          readOnly: true
        {{- end }}
        {{- end }}
        {{- if $.Values.auth.enabled }}
        - name: auth
          mountPath: {{ include "quarry.authDir" $ }}
          readOnly: true
        {{- end }}
        {{- with $w.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: work
      emptyDir: {{ include "quarry.emptyDir" $w.work }}
    {{- if $w.shmSize }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $w.shmSize }}
    {{- end }}
    {{- include "quarry.secretVolumes" (dict "ctx" $ "role" "worker") | nindent 4 }}
    {{- with $w.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* Volumes of the TLS and auth Secrets; call with (dict "ctx" $ "role" "coordinator"|"worker").
The coordinator takes only the client CA from the client Secret, never the workers' key. */}}
{{- define "quarry.secretVolumes" -}}
{{- $v := .ctx.Values }}
{{- if $v.tls.enabled }}
- name: tls
  secret:
    secretName: {{ $v.tls.serverSecret }}
    defaultMode: 0440
    {{- if eq .role "worker" }}
    items:
      - key: ca.crt
        path: ca.crt
    {{- end }}
{{- if $v.tls.clientAuth }}
- name: tls-client
  secret:
    secretName: {{ $v.tls.clientSecret }}
    defaultMode: 0440
    {{- if eq .role "coordinator" }}
    items:
      - key: ca.crt
        path: ca.crt
    {{- end }}
{{- end }}
{{- end }}
{{- if $v.auth.enabled }}
- name: auth
  secret:
    secretName: {{ include "quarry.authSecretName" .ctx }}
    defaultMode: 0440
    items:
      - key: {{ $v.auth.secretKey }}
        path: {{ $v.auth.secretKey }}
{{- end }}
{{- if and (eq .role "coordinator") (eq (include "quarry.etcdTls" .ctx) "true") }}
- name: etcd-tls
  secret:
    secretName: {{ include "quarry.etcdTlsSecretName" .ctx }}
    defaultMode: 0440
    items:
      - key: ca.crt
        path: ca.crt
      - key: client.crt
        path: client.crt
      - key: client.key
        path: client.key
{{- end }}
{{- if and (eq .role "coordinator") (not $v.etcd.enabled) $v.etcd.external.authSecret }}
- name: etcd-auth
  secret:
    secretName: {{ $v.etcd.external.authSecret }}
    defaultMode: 0440
    items:
      - key: password
        path: password
{{- end }}
{{- end }}

{{/* grpc_health_probe over TLS, as a JSON list for an exec probe; call with
(dict "ctx" $ "service" "liveness"). The probe runs inside the pod against 127.0.0.1, so it
skips name verification; with mutual TLS it presents the coordinator's own certificate. */}}
{{- define "quarry.coordinator.tlsProbe" -}}
{{- $v := .ctx.Values }}
{{- $cmd := list "grpc_health_probe" (printf "-addr=127.0.0.1:%d" (int $v.coordinator.grpcPort)) "-tls" "-tls-no-verify" "-connect-timeout=3s" "-rpc-timeout=3s" }}
{{- if .service }}
{{- $cmd = append $cmd (printf "-service=%s" .service) }}
{{- end }}
{{- if $v.tls.clientAuth }}
{{- $cmd = append $cmd (printf "-tls-client-cert=%s/tls.crt" (include "quarry.tlsDir" .ctx)) }}
{{- $cmd = append $cmd (printf "-tls-client-key=%s/tls.key" (include "quarry.tlsDir" .ctx)) }}
{{- end }}
{{- toJson $cmd }}
{{- end }}

{{/* An emptyDir source from {medium, sizeLimit} as inline JSON; either may be empty. */}}
{{- define "quarry.emptyDir" -}}
{{- $d := dict }}
{{- with .medium }}{{ $_ := set $d "medium" . }}{{ end }}
{{- with .sizeLimit }}{{ $_ := set $d "sizeLimit" . }}{{ end }}
{{- toJson $d }}
{{- end }}
