#!/usr/bin/env python3
"""Writes dreambooth.json, the Grafana dashboard the chart ships.

Edit the panels here, then run `python3 make_dashboard.py` in this folder (standard library
only). tests/tests/chart.rs checks that every metric the queries name is exported by the
operator or the trainer.
"""

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Trainer series carry the pod's namespace (PodMonitor target labels) and the session label.
SEL = 'namespace=~"$namespace", session=~"$session"'

_next_id = iter(range(1, 1000))


def target(expr, legend="", ref="A", instant=False, fmt="time_series"):
    t = {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        "range": not instant,
        "instant": instant,
        "format": fmt,
    }
    return t


def panel(kind, title, grid, targets, unit=None, description="", **extra):
    p = {
        "id": next(_next_id),
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": dict(zip(("x", "y", "w", "h"), grid)),
        "targets": targets,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {},
    }
    if unit:
        p["fieldConfig"]["defaults"]["unit"] = unit
    p.update(extra)
    return p


def timeseries(title, grid, targets, unit=None, description="", stack=False):
    p = panel("timeseries", title, grid, targets, unit, description)
    p["fieldConfig"]["defaults"]["custom"] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 10 if stack else 0,
        "showPoints": "never",
        "stacking": {"mode": "normal" if stack else "none"},
    }
    p["options"] = {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return p


def row(title, y):
    return {
        "id": next(_next_id),
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": [],
    }


def sessions_table(y):
    """Running sessions: one row each, joined from instant queries by (namespace, session)."""
    by = "max by (namespace, session)"
    columns = [
        ("A", f"{by} (dreambooth_trainer_step{{{SEL}}})", "Step"),
        ("B", f"{by} (dreambooth_trainer_total_steps{{{SEL}}})", "Total"),
        ("C", f"{by} (dreambooth_trainer_steps_per_second{{{SEL}}})", "Steps/s"),
        ("D", f"{by} (dreambooth_trainer_eta_seconds{{{SEL}}})", "ETA"),
        ("E", f"{by} (dreambooth_operator_session_attempts{{{SEL}}})", "Attempts"),
        ("F", f"{by} (dreambooth_trainer_loss{{{SEL}}})", "Loss"),
    ]
    targets = [target(expr, ref=ref, instant=True, fmt="table") for ref, expr, _ in columns]
    p = panel(
        "table",
        "Running sessions",
        (8, y, 16, 8),
        targets,
        description="Sessions whose trainer pod is being scraped: step of total, speed, time left and attempts so far.",
    )
    rename = {f"Value #{ref}": name for ref, _, name in columns}
    p["transformations"] = [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": {"Time": True},
                "renameByName": {"namespace": "Namespace", "session": "Session", **rename},
                "indexByName": {"namespace": 0, "session": 1, **{f"Value #{ref}": i + 2 for i, (ref, _, _) in enumerate(columns)}},
            },
        },
    ]
    p["fieldConfig"]["overrides"] = [
        {"matcher": {"id": "byName", "options": "ETA"}, "properties": [{"id": "unit", "value": "s"}]},
        {"matcher": {"id": "byName", "options": "Steps/s"}, "properties": [{"id": "decimals", "value": 2}]},
        {"matcher": {"id": "byName", "options": "Loss"}, "properties": [{"id": "decimals", "value": 4}]},
        {
            "matcher": {"id": "byName", "options": "Step"},
            "properties": [{"id": "custom.cellOptions", "value": {"type": "color-text"}}],
        },
    ]
    p["options"] = {"showHeader": True, "sortBy": [{"displayName": "Session", "desc": False}]}
    return p


def dashboard():
    panels = []
    y = 0
    panels.append(row("Sessions", y))
    y += 1
    phases = panel(
        "bargauge",
        "Sessions by phase",
        (0, y, 8, 8),
        [target("max by (phase) (dreambooth_operator_sessions)", "{{phase}}", instant=True)],
        description="Every DreamBoothSession the operator knows, by status phase (the leader's count).",
    )
    phases["options"] = {"orientation": "horizontal", "displayMode": "basic", "showUnfilled": True}
    panels.append(phases)
    panels.append(sessions_table(y))
    y += 8

    panels.append(row("Training", y))
    y += 1
    panels.append(
        timeseries(
            "Loss",
            (0, y, 12, 8),
            [
                target(f"avg_over_time(dreambooth_trainer_loss{{{SEL}}}[5m])", "{{session}} (5m mean)", "A"),
                target(f"dreambooth_trainer_loss{{{SEL}}}", "{{session}}", "B"),
            ],
            description="Diffusion loss is noisy by nature; watch for jumps and NaN, judge quality by the samples.",
        )
    )
    panels.append(
        timeseries(
            "Learning rate",
            (12, y, 12, 8),
            [target(f"dreambooth_trainer_learning_rate{{{SEL}}}", "{{session}}")],
            unit="sci",
            description="Text encoder first, then the UNet, each with its own schedule.",
        )
    )
    y += 8
    panels.append(
        timeseries(
            "Training speed",
            (0, y, 12, 8),
            [
                target(f"dreambooth_trainer_steps_per_second{{{SEL}}}", "{{session}} steps/s", "A"),
                target(f"dreambooth_trainer_images_per_second{{{SEL}}}", "{{session}} images/s", "B"),
            ],
        )
    )
    panels.append(
        timeseries(
            "Stage",
            (12, y, 12, 8),
            [target(f"max by (session, phase) (dreambooth_trainer_phase{{{SEL}}}) == 1", "{{session}} {{phase}}")],
            description="downloading, preparing, text_encoder, unet, exporting, done.",
        )
    )
    y += 8

    panels.append(row("GPU and storage", y))
    y += 1
    panels.append(
        timeseries(
            "GPU memory",
            (0, y, 8, 8),
            [
                target(f"dreambooth_trainer_gpu_memory_allocated_bytes{{{SEL}}}", "{{session}} allocated", "A"),
                target(f"dreambooth_trainer_gpu_memory_peak_bytes{{{SEL}}}", "{{session}} peak", "B"),
            ],
            unit="bytes",
        )
    )
    panels.append(
        timeseries(
            "Storage throughput",
            (8, y, 8, 8),
            [
                target(f"sum by (session) (rate(dreambooth_trainer_upload_bytes_total{{{SEL}}}[$__rate_interval]))", "{{session}} upload", "A"),
                target(f"sum by (session) (rate(dreambooth_trainer_download_bytes_total{{{SEL}}}[$__rate_interval]))", "{{session}} download", "B"),
            ],
            unit="Bps",
            description="Bytes moved to and from object storage (checkpoints, samples, state; model and images).",
        )
    )
    panels.append(
        timeseries(
            "Storage retries and errors",
            (16, y, 8, 8),
            [
                target(f"sum by (kind) (increase(dreambooth_trainer_retries_total{{{SEL}}}[$__rate_interval]))", "retry {{kind}}", "A"),
                target(f"sum by (kind) (increase(dreambooth_trainer_errors_total{{{SEL}}}[$__rate_interval]))", "error {{kind}}", "B"),
            ],
        )
    )
    y += 8
    panels.append(
        timeseries(
            "Time per transfer second",
            (0, y, 12, 6),
            [
                target(f"sum by (session) (rate(dreambooth_trainer_upload_seconds_total{{{SEL}}}[$__rate_interval]))", "{{session}} uploading", "A"),
                target(f"sum by (session) (rate(dreambooth_trainer_download_seconds_total{{{SEL}}}[$__rate_interval]))", "{{session}} downloading", "B"),
            ],
            unit="percentunit",
            description="Share of wall time spent in transfers.",
        )
    )
    prep = panel(
        "stat",
        "Data preparation",
        (12, y, 12, 6),
        [target(f"max by (session) (dreambooth_trainer_data_preparation_seconds{{{SEL}}})", "{{session}}", instant=True)],
        unit="s",
        description="Decode, crop, caption and cache latents, per session.",
    )
    panels.append(prep)
    y += 6

    panels.append(row("Operator", y))
    y += 1
    panels.append(
        timeseries(
            "Reconcile rate",
            (0, y, 8, 8),
            [target("sum by (result) (rate(dreambooth_operator_reconciliations_total[$__rate_interval]))", "{{result}}")],
            unit="ops",
        )
    )
    panels.append(
        timeseries(
            "Reconcile errors",
            (8, y, 8, 8),
            [target("sum by (kind) (rate(dreambooth_operator_reconcile_errors_total[$__rate_interval]))", "{{kind}}")],
            unit="ops",
        )
    )
    panels.append(
        timeseries(
            "Reconcile latency",
            (16, y, 8, 8),
            [
                target(
                    f"histogram_quantile({q}, sum by (le) (rate(dreambooth_operator_reconcile_duration_seconds_bucket[$__rate_interval])))",
                    f"p{int(q * 100)}",
                    ref,
                )
                for ref, q in (("A", 0.5), ("B", 0.95), ("C", 0.99))
            ],
            unit="s",
        )
    )
    y += 8
    panels.append(
        timeseries(
            "Queue wait (Job created → pod running)",
            (0, y, 8, 8),
            [
                target(
                    f"histogram_quantile({q}, sum by (le) (rate(dreambooth_operator_queue_wait_seconds_bucket[1h])))",
                    f"p{int(q * 100)}",
                    ref,
                )
                for ref, q in (("A", 0.5), ("B", 0.95))
            ]
            + [
                target(
                    "sum(rate(dreambooth_operator_queue_wait_seconds_sum[1h])) / sum(rate(dreambooth_operator_queue_wait_seconds_count[1h]))",
                    "mean",
                    "C",
                )
            ],
            unit="s",
            description="Waiting for a GPU node or Kueue admission, over the last hour.",
        )
    )
    panels.append(
        timeseries(
            "Progress polls",
            (8, y, 16, 8),
            [target("sum by (result) (rate(dreambooth_operator_progress_polls_total[$__rate_interval]))", "{{result}}")],
            unit="ops",
            description="The operator's GET /progress to each trainer; errors never change a session's phase.",
        )
    )
    y += 8
    panels.append(
        timeseries(
            "Session duration by outcome",
            (0, y, 12, 8),
            [
                target(
                    "histogram_quantile(0.5, sum by (le, phase) (rate(dreambooth_operator_session_duration_seconds_bucket[6h])))",
                    "{{phase}} p50",
                )
            ],
            unit="s",
            description="From a session's start to its end, over the last six hours.",
        )
    )
    panels.append(
        timeseries(
            "Jobs created",
            (12, y, 12, 8),
            [target("sum(increase(dreambooth_operator_jobs_created_total[1h]))", "per hour")],
            description="One per attempt: more than one per session means retries.",
        )
    )

    def variable(name, label, query, include_all=True):
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-var"},
            "definition": query,
            "refresh": 2,
            "includeAll": include_all,
            "multi": include_all,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }

    return {
        "uid": "dreambooth-operator",
        "title": "DreamBooth sessions",
        "description": "DreamBooth fine-tuning sessions: progress, training curves, GPU memory, storage and the operator.",
        "tags": ["dreambooth", "stable-diffusion", "kubernetes"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                variable("namespace", "Namespace", "label_values(dreambooth_trainer_step, namespace)"),
                variable("session", "Session", 'label_values(dreambooth_trainer_step{namespace=~"$namespace"}, session)'),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("dreambooth.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
