"""Generates ``crds/*.yaml`` from the pydantic models in ``api``.

The output is a structural OpenAPI v3 schema: ``$ref``s inlined, no titles, no defaults
(the operator applies defaults, so the API server never rewrites applied objects),
``Optional[X]`` collapsed to ``X``, and the ``x-kubernetes-*`` markers the models carry.

    privatefm-crdgen            write crds/
    privatefm-crdgen --check    exit 1 when crds/ is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from privatefm_operator.api import CRDS, GROUP, VERSION, CrdInfo

REPO = Path(__file__).resolve().parents[2]
# crds/ for kubectl and kustomize; the chart keeps an identical copy (Helm reads only its own files).
CRD_DIRS = (REPO / "crds", REPO / "charts" / "privatefm-operator" / "files" / "crds")
_DROP = {"title", "default"}


def structural(node: Any, defs: dict[str, Any]) -> Any:
    """Turns one pydantic JSON-schema node into a structural Kubernetes schema node."""
    if isinstance(node, list):
        return [structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}  # the field's own description wins over the model's
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) == 1:
            return structural({**options[0], **node}, defs)
        else:
            node["anyOf"] = options
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: structural(prop, defs) for name, prop in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = structural(value, defs)
        elif key == "anyOf":
            out[key] = [structural(v, defs) for v in value]
        else:
            out[key] = value
    if out.get("required") == []:
        out.pop("required")
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if out.get("x-kubernetes-preserve-unknown-fields") and out.get("additionalProperties") is True:
        out.pop("additionalProperties")
    if "description" in out:
        out["description"] = " ".join(str(out["description"]).split())
    return out


def openapi_schema(info: CrdInfo) -> dict[str, Any]:
    raw = info.model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = structural(raw, defs)
    # apiVersion/kind/metadata are the API server's business.
    props = schema["properties"]
    props["apiVersion"] = {"type": "string", "description": "APIVersion of this object."}
    props["kind"] = {"type": "string", "description": "Kind of this object."}
    # The API server allows nothing more here than name and generateName; name is declared so that
    # a root rule about it can name it (fieldPath .metadata.name), the rule itself is CEL.
    props["metadata"] = {"type": "object", "properties": {"name": {"type": "string", "description": "Object name."}}}
    # An empty `required: []` is valid for the API server but not for JSON Schema draft 4 (kubeconform,
    # kubectl-validate): leave the key out when nothing is required.
    required = [r for r in schema.get("required", []) if r not in ("apiVersion", "kind", "metadata")]
    if required:
        schema["required"] = required
    else:
        schema.pop("required", None)
    schema["description"] = " ".join((info.model.__doc__ or "").split())
    if info.root_rules:
        schema["x-kubernetes-validations"] = info.root_rules
    # An object the operator has not looked at yet is served with status.observedGeneration 0 (the
    # API server applies defaults on every read), so kstatus and Argo CD read it as in progress, not
    # Current: kstatus takes an object without any status for a ready one (docs/gitops.md).
    props["status"]["default"] = {"observedGeneration": 0}
    return schema


def crd(info: CrdInfo) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{info.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": info.kind, "listKind": f"{info.kind}List", "plural": info.plural,
                "singular": info.singular, "shortNames": info.short_names, "categories": ["privatefm"],
            },
            "scope": info.scope,
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": info.printer_columns,
                "schema": {"openAPIV3Schema": openapi_schema(info)},
            }],
        },
    }


def render(info: CrdInfo) -> str:
    header = "# Generated by privatefm-crdgen from operator/privatefm_operator/api.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(info), sort_keys=False, width=120, allow_unicode=True)


def files() -> dict[str, str]:
    return {f"{GROUP}_{info.plural}.yaml": render(info) for info in CRDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="privatefm-crdgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the committed CRDs are stale")
    args = parser.parse_args(argv)
    stale = []
    for directory in CRD_DIRS:
        for name, text in files().items():
            path = directory / name
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path.relative_to(REPO)))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if stale:
        print(f"stale CRDs (run privatefm-crdgen): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
