#!/usr/bin/env python3
"""Renders, lints and reads the Quarry chart for tests/tests/helm_chart.rs, printing JSON.

Runs on the interpreter of .ci/venv-helm (helm-python-sdk: Helm's own Go SDK through ctypes,
so rendering, strict linting and values.schema.json checks are Helm's; PyYAML to read YAML).

    helm_tool.py render CHART [--values FILE] [--values-json JSON] [--name N] [--namespace NS]
        {"manifests": [{"source": "quarry/templates/x.yaml", "doc": {...}}, ...], "notes": "..."}
        Exit 1 with Helm's error on stderr when the render fails (bad values included).
    helm_tool.py lint CHART [--values FILE] [--kube-version v1.30.0]
        Helm's lint report with strict on: {"messages": [{"severity", "path", "error"}], ...}
    helm_tool.py yaml FILE
        Every YAML document of FILE as a JSON list.
"""

import argparse
import json
import os
import sys
import tempfile


def helm():
    # Helm reads its config, cache and data homes even offline; keep them out of $HOME.
    if "HELM_CONFIG_HOME" not in os.environ:
        base = tempfile.mkdtemp(prefix="quarry-helm-")
        for kind in ("CONFIG", "CACHE", "DATA"):
            os.environ[f"HELM_{kind}_HOME"] = os.path.join(base, kind.lower())
    import helm_python

    return helm_python


def merge(base, over):
    """Deep merge as Helm coalesces values files: maps merge, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def values(h, args):
    vals = {}
    if args.values:
        with open(args.values) as f:
            vals = h.values_from_yaml(f.read())
    if args.values_json:
        vals = merge(vals, json.loads(args.values_json))
    return vals


def render(args):
    import yaml

    h = helm()
    with h.Chart.load(args.chart) as chart:
        try:
            out = chart.render(
                values(h, args),
                name=args.name,
                namespace=args.namespace,
                is_install=True,
            )
        except h.HelmError as e:
            print(str(e), file=sys.stderr)
            return 1
    manifests, notes = [], ""
    for source in sorted(out):
        text = out[source]
        if source.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                manifests.append({"source": source, "doc": doc})
    json.dump({"manifests": manifests, "notes": notes}, sys.stdout)
    return 0


def lint(args):
    h = helm()
    report = h.lint(
        args.chart,
        values(h, args),
        strict=True,
        kube_version=args.kube_version,
    )
    json.dump(report, sys.stdout)
    return 0


def read_yaml(args):
    import yaml

    with open(args.file) as f:
        json.dump([d for d in yaml.safe_load_all(f) if d is not None], sys.stdout)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("render", "lint"):
        s = sub.add_parser(name)
        s.add_argument("chart")
        s.add_argument("--values")
        s.add_argument("--values-json")
        if name == "render":
            s.add_argument("--name", default="quarry")
            s.add_argument("--namespace", default="default")
        else:
            s.add_argument("--kube-version", default="v1.30.0")
    s = sub.add_parser("yaml")
    s.add_argument("file")
    args = p.parse_args()
    return {"render": render, "lint": lint, "yaml": read_yaml}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
