#!/usr/bin/env bash
# Regenerate the chart's CRD copies and its Grafana dashboard from the code
# (tests/unit/test_helm_chart.py and test_dashboard.py fail when they are stale). Run from
# anywhere with the project's virtualenv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
"$py" -m llmtrain.cli crd > "$here/crds/llmtrainingjobs.llmtrain.dev.yaml"
"$py" - "$here/crds/kopf-peerings.yaml" <<'PY'
import sys

import yaml
from llmtrain.operator.main import peering_crds

header = (
    "# Kopf's peering CRDs (llmtrain.operator.main.peering_crds()): with them, replicas of\n"
    "# the operator see each other and only one acts. Regenerate with update-crds.sh.\n"
)
with open(sys.argv[1], "w") as f:
    f.write(header + yaml.safe_dump_all(peering_crds(), sort_keys=False))
PY
# The Grafana dashboard (llmtrain/dashboard.py; needs the `test` extra's grafana-foundation-sdk).
"$py" -m llmtrain.dashboard > "$here/dashboards/llmtrain.json"
