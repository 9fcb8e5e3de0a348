{{/* The pod template of apex-node (Deployment and DaemonSet); call with (dict "root" $ "component" NAME). */}}
{{- define "apex.nodePod" -}}
{{- $hub := printf "%s-hub" (include "apex.fullname" $.root) -}}
metadata:
  labels:
    {{- include "apex.labels" $.root | nindent 4 }}
    app.kubernetes.io/component: {{ $.component }}
  annotations:
    checksum/config: {{ include "apex.toml" $.root.Values.nodes.config | sha256sum }}
spec:
  {{- with $.root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  automountServiceAccountToken: false
  securityContext:
    {{- include "apex.podSecurityContext" $.root | nindent 4 }}
  terminationGracePeriodSeconds: {{ $.root.Values.nodes.terminationGracePeriodSeconds }}
  containers:
    - name: node
      image: {{ include "apex.image" $.root }}
      imagePullPolicy: {{ $.root.Values.image.pullPolicy }}
      command: ["/usr/local/bin/apex-node"]
      args: ["--config", "/etc/apex/node.toml"]
      env:
        - name: APEX_NODE_KEY
          valueFrom:
            secretKeyRef:
              name: {{ include "apex.keysSecret" $.root }}
              key: node-key
        # The hub Service; in shared mode also the headless Service (every hub), tried next.
        - name: APEX_NODE_HUB
          value: {{ if include "apex.shared" $.root }}{{ printf "[ws://%s:%d, ws://%s-headless:%d]" $hub (int $.root.Values.hub.service.port) $hub (int $.root.Values.hub.service.port) | quote }}{{ else }}{{ printf "ws://%s:%d" $hub (int $.root.Values.hub.service.port) | quote }}{{ end }}
        - name: APEX_NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- with $.root.Values.nodes.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- toYaml $.root.Values.nodes.resources | nindent 8 }}
      securityContext:
        {{- include "apex.containerSecurityContext" $.root | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/apex
          readOnly: true
        - name: data
          mountPath: /data
        - name: tmp
          mountPath: /tmp
        {{- with $.root.Values.nodes.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "apex.fullname" $.root }}-node
    - name: data
      emptyDir: {}
    - name: tmp
      emptyDir: {}
    {{- with $.root.Values.nodes.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $.root.Values.nodes.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $.root.Values.nodes.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $.root.Values.nodes.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
