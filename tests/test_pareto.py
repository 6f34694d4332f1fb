"""Pareto studies: students as a search dimension, costs, the front, its registration. Real Ray, real MLflow."""
from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from torch import nn

from kdtune.train import costs
from kdtune.errors import ConfigError
from kdtune.models.families import expand_family
from kdtune.models.refs import model_ref
from kdtune.pareto import Pareto, front_indices
from kdtune.pareto.front import list_front
from kdtune.spaces import MethodSpace
from kdtune.study import Search, StudySpec, run_study
from kdtune.tracking import client_for, use_tracking

SIZES = [f"vgg:blocks=8x16x16,fc=32,width={w}" for w in ("0.25", "1", "4")]


def test_the_front_keeps_exactly_the_points_no_other_point_beats_on_both_axes():
    points = [(0.90, 1.0), (0.95, 2.0), (0.93, 3.0), (0.95, 2.0), (0.80, 0.5), (0.97, 4.0), (0.90, 1.0)]
    front = front_indices(points)
    assert front == [4, 0, 1, 5]  # by cost; (0.93, 3.0) is beaten by (0.95, 2.0); duplicates kept once
    for i, (acc, cost) in enumerate(points):
        dominated = any(a >= acc and c <= cost and (a, c) != (acc, cost) for a, c in points)
        assert (i in front) == (not dominated and i == points.index((acc, cost)))


def test_a_family_reference_is_one_text_per_network_and_builds_what_its_knobs_say():
    ref = model_ref("wrn:widen=2,depth=16")
    assert ref.spec == "wrn:depth=16,widen=2" and ref.link_points == {1: "group1", 2: "group2", 3: "group3"}
    net = pickle.loads(pickle.dumps(ref)).build(10, (3, 32, 32))
    assert net.group1[0].conv1.out_channels == 32 and len(net.group1) == 2  # 16 * widen, (16 - 4) / 6 blocks
    small, large = (model_ref(s).build(10, (1, 8, 8)) for s in (SIZES[0], SIZES[2]))
    assert small.block1[0].out_channels == 2 and large.block1[0].out_channels == 32  # 8 x 0.25, 8 x 4
    assert model_ref(SIZES[1]).link_points == model_ref("digits_student").link_points  # same numbering
    assert expand_family("wrn", {"depth": ["10", "16"], "widen": ["1", "2"]}) == [
        "wrn:depth=10,widen=1", "wrn:depth=10,widen=2", "wrn:depth=16,widen=1", "wrn:depth=16,widen=2"]


@pytest.mark.parametrize("text, message", [
    ("wrn:widn=2", "'widn' is not a knob of family wrn; allowed: depth"),
    ("wrn:depth=15", "depth=15: a WRN has 6n+4 layers"),
    ("vgg:width=0", "width='0' is not allowed; width takes a multiplier > 0"),
    ("mlp:hidden=wide", "hidden='wide' is not allowed; hidden takes widths joined by x"),
])
def test_a_bad_family_knob_is_one_line_naming_it_and_what_is_allowed(text, message):
    with pytest.raises(ConfigError, match="^model .*") as error:
        model_ref(text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_flops_are_counted_deterministically_and_latency_is_a_median_per_device():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    assert costs.flops(model, (1, 8, 8)) == 2 * (64 * 32 + 32 * 10)  # 2 per multiply-add
    assert costs.flops(model, (1, 8, 8)) == costs.flops(model, (1, 8, 8))
    table = costs.measure({s: model_ref(s) for s in SIZES}, 10, (1, 8, 8), device=torch.device("cpu"),
                          threads=1, batch=16, warmup=1, repeats=3)
    assert [table[s]["params"] for s in SIZES] == sorted(table[s]["params"] for s in SIZES)
    assert table[SIZES[0]]["flops"] < table[SIZES[2]]["flops"]
    assert all(t["latency_ms_batch1"] > 0 and t["device"].startswith("cpu (") and t["threads"] == 1
               for t in table.values())


@pytest.mark.parametrize("plan, message", [
    (dict(latency_budget_ms=0), "--latency-budget-ms 0: must be a number of milliseconds > 0"),
    (dict(latency_budget_ms=-1.5), "--latency-budget-ms -1.5: must be"),
    (dict(max_params=0), "--max-params 0: must be a whole number"),
    (dict(cost="speed"), "cost='speed': not a cost; allowed: latency, latency_per_image, params, flops"),
    (dict(quantize="int8"), "--quantize int8 needs --latency-runtime onnxruntime: int8 students run in onnxruntime"),
    (dict(quantize="int4", latency_runtime="onnxruntime"), "--quantize 'int4': allowed: int8"),
    (dict(quantize="int8", latency_runtime="onnxruntime", calibration_samples=0),
     "--calibration-samples 0: must be a whole number of training samples >= 1"),
])
def test_a_bad_budget_or_cost_is_refused_before_anything_runs(plan, message):
    with pytest.raises(ConfigError) as error:
        Pareto(students=SIZES, **plan).check()
    assert message in str(error.value)


def test_the_script_refuses_bad_input_in_one_line_and_creates_nothing(tmp_path):
    from conftest import run_script

    for args, message in ((["--family", "vgg", "--knob", "widn=1,2"], "'widn' is not a knob; allowed: blocks"),
                          (["--latency-budget-ms", "0"], "--latency-budget-ms 0.0: must be a number of milliseconds")):
        result = run_script("pareto.py", "--dataset", "digits", *args, "--store", str(tmp_path / "store"),
                            cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdtune: error: ") and message in lines[0], lines
        assert not (tmp_path / "store").exists()


def _study(name, plan, tmp_path, uri, samples=4, **fields):
    space = plan.space(MethodSpace(("kd",), recipe={"lr": (0.02, 0.06)}))
    baseline = plan.space(MethodSpace(("none",), recipe={"lr": (0.02, 0.06)}))
    start = [{"method": "kd", "temperature": 4.0, "alpha": 0.9, "lr": 0.05, "student": s} for s in (SIZES[0], SIZES[2])]
    return StudySpec(name=name, dataset="digits", overrides={"epochs": 3}, teacher_overrides={"epochs": 6},
                     search=Search(space, num_samples=samples, points_to_evaluate=start, seed=0),
                     baseline_search=Search(baseline, num_samples=samples, seed=0), pareto=plan,
                     tracking_uri=uri, storage=str(tmp_path), max_concurrent=2, register_as=f"test-{name}", **fields)


def test_a_budget_no_candidate_meets_stops_before_any_run_exists(local_ray, mlflow_server, tmp_path):
    plan = Pareto(students=SIZES, latency_budget_ms=1e-9, repeats=3, warmup=1, latency_batch=16)
    with pytest.raises(ConfigError, match=r"--latency-budget-ms 1e-09: no candidate student meets it on cpu .*the "
                                          r"fastest, vgg:blocks=8x16x16,fc=32,width=[0-9.]+, takes [0-9.]+ ms at batch 1"):
        run_study(_study("test_pareto_unmet", plan, tmp_path, mlflow_server.uri), echo=lambda *a: None)
    client = client_for(mlflow_server.uri)
    assert client.get_experiment_by_name("test_pareto_unmet") is None
    assert not list(tmp_path.iterdir())


def test_a_pareto_study_registers_its_front_with_costs_and_picks_the_champion_within_budget(
        local_ray, mlflow_server, tmp_path, digits, capsys):
    budget = costs.parameters(model_ref(SIZES[1]).build(10, (1, 8, 8)))  # the two smaller students fit
    # cost: parameters, which are deterministic (latency of these tiny students differs by less than its noise)
    plan = Pareto(students=SIZES, cost="params", max_params=budget, repeats=3, warmup=1, latency_batch=16)
    result = run_study(_study("test_pareto", plan, tmp_path, mlflow_server.uri), echo=lambda *a: None)
    run = result.kind
    search = [t for t in result.phases["search"] if t.finished]
    assert {t.params["student"] for t in search} >= {SIZES[0], SIZES[2]}  # the start points ran
    # the front: non-dominated on validation accuracy and cost among the finished search trials
    points = [(t.metrics["val_acc"], run.cost_of(t)) for t in search]
    assert [t.run_id for t in run.front] == [search[i].run_id for i in front_indices(points)]
    students = [run.student_of(t) for t in run.front]
    assert len(set(students)) == len(students) and SIZES[0] in students  # the cheapest finished one is always on it
    # each front member was re-run with the same student trained without distillation, same epochs
    labels = {t.label for t in result.trials}
    assert labels == {f"{p}{s}" for s in students for p in ("front: ", "baseline: ")}
    assert all(t.metrics["epoch"] == 3 for t in result.trials)
    client = client_for(mlflow_server.uri)
    versions = {v.tags["student"]: v for v in client.search_model_versions("name = 'test-test_pareto'")}
    assert set(versions) == set(students)
    for student, version in versions.items():
        assert int(version.tags["parameters"]) == run.costs[student]["params"]
        assert int(version.tags["flops"]) == run.costs[student]["flops"] > 0
        assert float(version.tags["latency_ms_batch1"]) > 0 and version.tags["latency_device"].startswith("cpu")
    within = [r for r in run.rows if r.costs["params"] <= budget]
    chosen = max(within, key=lambda r: r.front.val_mean)
    champion = client.get_model_version_by_alias("test-test_pareto", "champion")
    assert champion.tags["student"] == chosen.student and int(champion.tags["parameters"]) <= budget
    assert "within parameters <= " in champion.tags["gate"]
    # the report: the front figure and its table, from MLflow alone
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/pareto_front.png", "report/pareto_front.txt"} <= artifacts
    tagged = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' "
                                "and tags.`kdtune.pareto.phase` = 'baseline'")
    assert {r.data.tags["kdtune.student"] for r in tagged} == set(students)
    assert all({"cost_latency_ms_batch1", "cost_params", "cost_flops"} <= set(r.data.metrics) for r in tagged)
    front = json.loads(open(client.download_artifacts(result.parent_run_id, "results/pareto_front.json",
                                                      str(tmp_path))).read())
    assert [r["student"] for r in front] == students and all(r["baseline_test_acc"] is not None for r in front)
    # what studies/pareto.py prints after the study: the front, and how many members it registered
    from kdtune.pareto.script import print_result

    capsys.readouterr()  # the study's own output
    assert print_result(result) == 0
    printed = capsys.readouterr().out
    assert f"registered {len(students)} front member(s)" in printed and "Pareto front of digits" in printed
    # `kdtune models pareto NAME` lists the front, cheapest first, with its costs and the champion marked
    from kdtune.cli import main

    assert main(["models", "pareto", "test-test_pareto", "--tracking-uri", mlflow_server.uri]) == 0
    listed = capsys.readouterr().out
    assert f"Pareto front of study run {result.parent_run_id} ({len(students)} members" in listed
    rows = [line for line in listed.splitlines() if re.match(r"v\d", line)]
    assert [next(s for s in students if s in line) for line in rows] == students
    assert "@champion" in next(line for line in rows if chosen.student in line)
    assert list_front(client, "test-test_pareto") == listed.rstrip("\n")


@pytest.mark.e2e
def test_int8_twins_join_the_front_measured_in_onnxruntime_and_registered_beside_their_fp32_members(
        local_ray, mlflow_server, tmp_path, digits, capsys):
    import mlflow
    import numpy as np

    import kdtune
    from kdtune.cli import main
    from kdtune.errors import TrackingError

    plan = Pareto(students=[SIZES[0], SIZES[2]], cost="params", latency_runtime="onnxruntime", quantize="int8",
                  calibration_samples=64, repeats=3, warmup=1, latency_batch=16)
    result = run_study(_study("test_pareto_int8", plan, tmp_path, mlflow_server.uri, samples=2), echo=print)
    run, name = result.kind, "test-test_pareto_int8"
    fp32 = {r.student: r for r in run.rows if r.precision == "float32"}
    int8 = {r.student: r for r in run.rows if r.precision == "int8"}
    assert fp32 and set(int8) == set(fp32)  # every front member has its int8 twin on the front
    client = client_for(mlflow_server.uri)
    versions = {(v.tags["student"], v.tags["precision"]): v for v in client.search_model_versions(f"name = '{name}'")}
    assert set(versions) == {(s, p) for s in fp32 for p in ("float32", "int8")}
    test_images = (digits.test_images.float() * digits.scale).numpy()
    use_tracking(mlflow_server.uri)  # run_study gave MLflow's global settings back: the fluent API needs the server
    for student, row in int8.items():
        version, twin = versions[(student, "int8")], versions[(student, "float32")]
        assert version.tags["fp32_version"] == twin.version and version.run_id == twin.run_id
        assert version.tags["latency_runtime"] == twin.tags["latency_runtime"] == "onnxruntime"
        assert float(version.tags["latency_ms_batch1"]) > 0 and version.tags["latency_device"].startswith("cpu (")
        assert version.tags["parameters"] == twin.tags["parameters"]
        # what the study measured on the int8 file, reproduced from the registry in onnxruntime
        model_uri = f"models:/{name}/{version.version}"
        info = mlflow.models.get_model_info(model_uri)
        assert info.signature is not None and "onnx" in info.flavors
        logits = mlflow.pyfunc.load_model(model_uri).predict(test_images)
        logits = np.asarray(logits if not isinstance(logits, dict) else next(iter(logits.values())))
        accuracy = float((logits.argmax(1) == digits.test_labels.numpy()).mean())
        assert accuracy == pytest.approx(float(version.tags["test_acc"]), abs=1e-3)
        # int8 costs accuracy, not much of it; measured on the same validation split as its twin
        assert abs(row.front.val_mean - fp32[student].front.val_mean) <= 0.05
        assert row.speed_ratio > 0
    confirm = client.get_run(int8[next(iter(int8))].trial.run_id)
    assert {"int8_val_acc", "int8_test_acc", "int8_agreement"} <= set(confirm.data.metrics)
    front_text = client.download_artifacts(result.parent_run_id, "results/pareto_front.txt", str(tmp_path))
    text = open(front_text).read()
    assert all(f"{s} int8" in text for s in int8) and "post-training int8 of v" in text
    capsys.readouterr()
    assert main(["models", "pareto", name, "--tracking-uri", mlflow_server.uri]) == 0
    assert sum(" int8 " in line for line in capsys.readouterr().out.splitlines()) == len(int8)
    # the int8 file ships as it is; PyTorch loading says where it runs instead
    some = versions[(next(iter(int8)), "int8")]
    out = tmp_path / "int8.onnx"
    assert main(["models", "export", f"{name}/{some.version}", "--format", "onnx", "--out", str(out),
                 "--tracking-uri", mlflow_server.uri]) == 0
    assert "onnx (int8, the registered file)" in capsys.readouterr().out and out.stat().st_size > 0
    with pytest.raises(TrackingError, match=r"is an int8 ONNX student \(--quantize int8\): it runs in onnxruntime"):
        kdtune.load_student(f"models:/{name}/{some.version}", tracking_uri=mlflow_server.uri)
