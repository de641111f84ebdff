"""The Grafana dashboard (docs/grafana/kvtier.json): a valid dashboard by schema, panels that do not
overlap, and every metric and label its queries name served by a real kvtierd — so renaming a
metric without the dashboard fails here, not on an operator's screen."""

from __future__ import annotations

import json
import re

import jsonschema  # pinned in python/requirements-vllm.txt, which scripts/setup.sh installs
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import kvtier

from conftest import ROOT

DASHBOARD = ROOT / "docs" / "grafana" / "kvtier.json"

SCHEMA = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "templating": {"type": "object", "required": ["list"]},
        "panels": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
                "properties": {
                    "id": {"type": "integer"},
                    "type": {"enum": ["timeseries", "stat", "gauge", "table"]},
                    "title": {"type": "string", "minLength": 1},
                    "datasource": {"type": "object", "required": ["type", "uid"]},
                    "gridPos": {
                        "type": "object", "required": ["x", "y", "w", "h"],
                        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 23},
                                       "y": {"type": "integer", "minimum": 0},
                                       "w": {"type": "integer", "minimum": 1, "maximum": 24},
                                       "h": {"type": "integer", "minimum": 1}},
                    },
                    "targets": {
                        "type": "array", "minItems": 1,
                        "items": {"type": "object", "required": ["refId", "expr"],
                                  "properties": {"expr": {"type": "string", "minLength": 1}}},
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_dashboard_is_valid_and_its_panels_do_not_overlap(dashboard):
    jsonschema.validate(dashboard, SCHEMA)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel '{p['title']}' overlaps another"
        cells |= mine
    titles = " ".join(p["title"].lower() for p in panels)
    for wanted in ("hit rate per tenant", "tokens restored", "occupancy", "restore latency", "errors"):
        assert wanted in titles


def test_every_metric_and_label_the_dashboard_queries_is_served_by_kvtierd(dashboard, daemon_factory):
    d = daemon_factory(layout={"layers": 2, "kv_heads": 2, "head_dim": 8, "dtype": "bf16", "block_tokens": 4},
                       host_bytes="1MiB", nvme_bytes="4MiB", tenants="""
[[tenant]]
name = "team-a"
salt = "a"
everyone = true
""")
    with kvtier.Client(d.socket) as c:
        ns = c.open_namespace("m", tenant="team-a")
        src = torch.zeros(4, 256, dtype=torch.bfloat16)
        c.save(ns, list(range(16)), src)
        with c.lookup(ns, list(range(16))) as m:
            c.load(m, torch.zeros(4, 256, dtype=torch.bfloat16)).wait()
        text = c.metrics_text()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    for p in dashboard["panels"]:
        for t in p["targets"]:
            expr = t["expr"]
            names = set(re.findall(r"\b(kvtierd?_[a-z_]+)\b", expr))
            assert names, expr
            grouped = set()
            for g in re.findall(r"by \(([^)]*)\)", expr):
                grouped |= {x.strip() for x in g.split(",")} - {"le"}
            for name in names:
                assert name in labels, f"panel '{p['title']}' queries {name}, which kvtierd does not serve"
                assert grouped <= labels[name], f"{name} has labels {labels[name]}, the query groups by {grouped}"
            for legend in re.findall(r"\{\{(\w+)\}\}", t.get("legendFormat", "")):
                assert any(legend in labels[n] for n in names), f"legend {{{{{legend}}}}} of '{p['title']}'"
