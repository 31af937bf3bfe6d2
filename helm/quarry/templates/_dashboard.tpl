{{/*
PLACEHOLDER, TO BE REPLACED: a minimal dashboard used only while the chart ships no
dashboards/quarry-dashboard.json (the real one is deploy/grafana/quarry-dashboard.json, from
another issue). It plots whatever quarry_* series exist, so it works with any metric names.
*/}}
{{- define "quarry.placeholderDashboard" -}}
{
  "title": "Quarry (placeholder)",
  "uid": "quarry-placeholder",
  "description": "Placeholder until deploy/grafana/quarry-dashboard.json is copied into the chart as dashboards/quarry-dashboard.json.",
  "schemaVersion": 39,
  "version": 1,
  "editable": true,
  "time": {"from": "now-6h", "to": "now"},
  "templating": {
    "list": [
      {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"}
    ]
  },
  "panels": [
    {
      "type": "text",
      "title": "About",
      "gridPos": {"x": 0, "y": 0, "w": 24, "h": 3},
      "options": {"mode": "markdown", "content": "Placeholder dashboard: the chart's real Quarry dashboard is not bundled yet. Below: every `quarry_*` series Prometheus has."}
    },
    {
      "type": "timeseries",
      "title": "Up (coordinators and workers)",
      "datasource": {"type": "prometheus", "uid": "${datasource}"},
      "gridPos": {"x": 0, "y": 3, "w": 12, "h": 8},
      "targets": [{"refId": "A", "expr": "up{namespace=\"{{ .Release.Namespace }}\", service=~\"{{ include "quarry.fullname" . }}-.*\"}", "legendFormat": "{{ "{{" }}pod{{ "}}" }}"}]
    },
    {
      "type": "timeseries",
      "title": "Quarry series (rates of counters)",
      "datasource": {"type": "prometheus", "uid": "${datasource}"},
      "gridPos": {"x": 12, "y": 3, "w": 12, "h": 8},
      "targets": [{"refId": "A", "expr": "sum by (__name__) (rate({__name__=~\"quarry_.*_total\", namespace=\"{{ .Release.Namespace }}\"}[5m]))", "legendFormat": "{{ "{{" }}__name__{{ "}}" }}"}]
    }
  ]
}
{{- end }}
