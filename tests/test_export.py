"""Students that ship: `kdtune models export --format onnx|pt2`, signatures, dataset lineage, onnxruntime latency.

A real MLflow store (SQLite, artifacts in the test's folder), a digits student really trained, logged with
kdtune's own log_model and registered; onnxruntime and torch.export really run the exported files.
"""
from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from kdtune import cli, export, registry
from kdtune.train import costs
from kdtune.models import build_model
from kdtune.registry import log_dataset
from kdtune.tracking import ServableModel, client_for, log_model, register_model, use_tracking

NAME = "test-export-student"


def train_student(digits, epochs: int = 6) -> ServableModel:
    """digits_student trained with a plain loop for a few epochs (about a second): a real, accurate student."""
    torch.manual_seed(0)
    images = digits.train_images.float() * digits.scale
    mean, std = images.mean().item(), images.std().item()
    net = build_model("digits_student", 10, (1, 8, 8))
    optimiser = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            loss = nn.functional.cross_entropy(net((images[batch] - mean) / std), digits.train_labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return ServableModel(net.eval(), [mean], [std])


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits):
    folder = tmp_path_factory.mktemp("export-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    use_tracking(uri)
    client = client_for(uri)
    experiment = client.create_experiment("export", artifact_location=str(folder / "artifacts"))
    run = client.create_run(experiment)
    student = train_student(digits)
    model_uri = log_model(client, run.info.run_id, student, digits.example(2))
    with_dataset = register_model(model_uri, NAME, "champion", {"dataset": "digits", "study": "export-test"})
    without = register_model(model_uri, NAME, "bare", {})  # no dataset tag: checked on the input example alone
    yield SimpleNamespace(uri=uri, client=client, experiment=experiment, run_id=run.info.run_id,
                          model_uri=model_uri, version=with_dataset, bare=without, student=student)
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


def kdtune(store, *args):
    return cli.main(["models", "export", *args, "--tracking-uri", store.uri])


def registered_outputs(store, samples: torch.Tensor) -> np.ndarray:
    model = mlflow.pytorch.load_model(f"models:/{NAME}@champion", map_location="cpu")
    with torch.no_grad():
        return model(samples).numpy()


def test_onnx_export_runs_in_onnxruntime_as_the_registered_model(store, digits, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "student.onnx"
    assert kdtune(store, f"{NAME}@champion", "--format", "onnx", "--out", str(out)) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{out}: onnx of models:/{NAME}/{store.version} (@champion); max abs difference from "
                           "the registered model ")
    assert "on 258 samples (logged input example 2 + digits test 256) and at batch 1, tolerance 0.0001" in line
    printed = float(line.split("registered model ")[1].split()[0])
    assert printed <= 1e-4
    assert sorted(os.listdir(tmp_path)) == ["student.onnx"]  # no temporary file left beside it
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask

    # onnxruntime on every test sample, in batches the export never saw: the registered model's outputs
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert given.name == "images" and given.shape[1:] == [1, 8, 8] and isinstance(given.shape[0], str)
    samples = digits.test_images.float() * digits.scale
    expected = registered_outputs(store, samples)
    for batch in (samples[:1], samples[:7], samples):
        got = session.run(None, {"images": batch.numpy()})[0]
        assert np.abs(got - expected[:len(batch)]).max() <= 1e-4
    onnx_acc = (session.run(None, {"images": samples.numpy()})[0].argmax(1) == digits.test_labels.numpy()).mean()
    assert onnx_acc == (expected.argmax(1) == digits.test_labels.numpy()).mean() and onnx_acc > 0.8
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["kdtune.source"] == f"models:/{NAME}/{store.version}" and props["kdtune.alias"] == "champion"


def test_pt2_export_by_version_loads_with_torch_export(store, digits, tmp_path, capsys):
    out = tmp_path / "student.pt2"
    assert kdtune(store, f"{NAME}/{store.bare}", "--format", "pt2", "--out", str(out)) == 0
    line = capsys.readouterr().out
    assert f"pt2 of models:/{NAME}/{store.bare};" in line and "on 2 samples (logged input example 2)" in line
    extra = {"kdtune.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    assert json.loads(extra["kdtune.json"])["kdtune.source"] == f"models:/{NAME}/{store.bare}"
    samples = digits.test_images.float() * digits.scale
    with torch.no_grad():
        got = program.module()(samples).numpy()
    assert np.abs(got - registered_outputs(store, samples)).max() <= 1e-4


class Shifted(nn.Module):
    """What a broken exporter might produce: the model's logits, off by 1e-3."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images) + 1e-3


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_file_that_does_not_match_is_refused_and_not_written(store, tmp_path, capsys, monkeypatch, fmt):
    real = export.export_file
    monkeypatch.setattr(export, "export_file", lambda model, *a: real(Shifted(model), *a))
    out = tmp_path / f"student.{fmt}"
    out.write_bytes(b"an earlier export")
    assert kdtune(store, f"{NAME}@champion", "--format", fmt, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"kdtune: error: the {fmt} file of models:/{NAME}/{store.version} differs from the registered model by max "
        "abs 0.001")  # 1e-3 added to float32 logits of about 10: 0.001 to within their rounding
    assert err[0].endswith("> tolerance 0.0001 on 258 samples (logged input example 2 + digits test 256): "
                           "not written")
    assert os.listdir(tmp_path) == [out.name] and out.read_bytes() == b"an earlier export"  # untouched


def test_bad_inputs_are_one_line_and_write_nothing(store, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "student.onnx")
    (tmp_path / "a-file").write_text("")
    cases = [
        (["no-such-model@champion", "--format", "onnx", "--out", out],
         "model 'no-such-model': not in the registry (`kdtune models list --all` shows the registered models)"),
        ([f"{NAME}@gold", "--format", "onnx", "--out", out], f"model '{NAME}' has no alias 'gold'; its aliases: "
                                                               "bare, champion"),
        ([f"{NAME}/99", "--format", "onnx", "--out", out], f"model '{NAME}' has no version 99"),
        ([NAME, "--format", "onnx", "--out", out], f"model '{NAME}': expected NAME@ALIAS or NAME/VERSION"),
        ([f"{NAME}@champion", "--format", "tflite", "--out", out],
         "--format 'tflite': not an export format; allowed: weights, onnx, pt2"),
        ([f"{NAME}@champion", "--format", "onnx", "--out", str(tmp_path / "missing" / "s.onnx")],
         f"--out {tmp_path / 'missing' / 's.onnx'}: folder {tmp_path / 'missing'} does not exist"),
        ([f"{NAME}@champion", "--format", "onnx", "--out", str(tmp_path)], f"--out {tmp_path}: is a folder"),
        ([f"{NAME}@champion", "--format", "pt2", "--out", str(tmp_path / "a-file" / "s.pt2")],
         f"--out {tmp_path / 'a-file' / 's.pt2'}: {tmp_path / 'a-file'} is not a folder"),
        ([f"{NAME}@champion", "--format", "onnx", "--tolerance", "-1", "--out", out],
         "--tolerance -1.0: must be a number >= 0"),
    ]
    if os.path.isdir("/sys"):  # a folder nobody may create files in, not even root
        cases.append(([f"{NAME}@champion", "--format", "onnx", "--out", "/sys/s.onnx"],
                      "--out /sys/s.onnx: " + ("folder /sys is not writable" if not os.access("/sys", os.W_OK)
                                               else "cannot write in /sys (")))
    for args, message in cases:
        assert kdtune(store, *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"kdtune: error: {message}"), (args, err)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    assert kdtune(store, f"{NAME}@champion", "--format", "onnx", "--out", out) == 2
    assert capsys.readouterr().err.strip() == ("kdtune: error: --format onnx needs onnxruntime, not installed: "
                                               "pip install 'kdtune[export]'")
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_registered_students_carry_a_signature_and_an_input_example(store, digits):
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    (inputs,), (outputs,) = info.signature.inputs.to_dict(), info.signature.outputs.to_dict()
    assert inputs["tensor-spec"] == {"dtype": "float32", "shape": (-1, 1, 8, 8)}
    assert outputs["tensor-spec"] == {"dtype": "float32", "shape": (-1, 10)}
    assert info.saved_input_example_info["artifact_path"] == "input_example.json"
    # the signature is what pyfunc serving checks: the logged example goes through it and gives the model's logits
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    example = digits.example(2).numpy()
    assert np.abs(pyfunc.predict(example) - registered_outputs(store, torch.from_numpy(example))).max() <= 1e-6


def test_the_study_dataset_is_logged_as_run_inputs(store, digits):
    parent = store.client.create_run(store.experiment, tags={"kdtune.role": "study"}).info.run_id
    fingerprints = log_dataset(store.client, parent, digits, 0.1)
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i
              for i in store.client.get_run(parent).inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "testing"}
    n_val = len(digits.split(0.1)[1])
    expected = {"training": (registry.train_set_fingerprint(digits), digits.num_train - n_val),
                "validation": (registry.validation_fingerprint(digits, 0.1), n_val),
                "testing": (registry.test_set_fingerprint(digits), len(digits.test_labels))}
    for context, (fingerprint, samples) in expected.items():
        entry = inputs[context]
        tags = {t.key: t.value for t in entry.tags}
        assert entry.dataset.name == "digits" and entry.dataset.digest == fingerprint.rsplit(":", 1)[1]
        assert tags["kdtune.fingerprint"] == fingerprint == fingerprints[context]
        assert tags["kdtune.samples"] == str(samples)
        assert json.loads(entry.dataset.profile)["samples_used"] == samples
    assert {t.key: t.value for t in inputs["training"].tags}["kdtune.validation_held_out"] == str(n_val)
    assert n_val + int({t.key: t.value for t in inputs["training"].tags}["kdtune.samples"]) == digits.num_train


def test_latency_on_onnxruntime_records_its_runtime_and_device():
    from kdtune.errors import ConfigError
    from kdtune.models.refs import model_ref

    refs = {"digits_student": model_ref("digits_student")}
    timing = dict(threads=1, batch=16, warmup=1, repeats=3)
    on_torch = costs.measure(refs, 10, (1, 8, 8), **timing)["digits_student"]
    on_ort = costs.measure(refs, 10, (1, 8, 8), runtime="onnxruntime", **timing)["digits_student"]
    assert on_torch["runtime"] == "torch" and on_ort["runtime"] == "onnxruntime"
    assert on_ort["device"].startswith("cpu (") and on_ort["threads"] == 1
    assert (on_ort["params"], on_ort["flops"]) == (on_torch["params"], on_torch["flops"])
    assert 0 < on_ort["latency_ms_batch1"] < 1000 and 0 < on_ort["latency_ms_per_image"] < 1000
    tags = costs.latency_tags(on_ort)
    assert tags["latency_runtime"] == "onnxruntime" and tags["latency_device"] == on_ort["device"]
    one, per_image = costs.onnxruntime_latency(build_model("digits_student", 10, (1, 8, 8)), (1, 8, 8), batch=8,
                                               warmup=1, repeats=3, threads=1)
    assert one > 0 and per_image > 0
    with pytest.raises(ConfigError, match=r"^--latency-runtime 'tensorrt': allowed: torch, onnxruntime$"):
        costs.measure(refs, 10, (1, 8, 8), runtime="tensorrt", **timing)


def test_an_int8_student_calibrated_on_training_samples_keeps_its_accuracy(store, digits, tmp_path):
    import onnx
    from onnx import TensorProto

    from kdtune.train import quantize
    from kdtune.errors import ConfigError

    samples, chosen = quantize.calibration_samples(digits, 128, val_fraction=0.1)
    _, val_idx = digits.split(0.1)
    assert len(samples) == 128 and not set(chosen.tolist()) & set(val_idx.tolist())  # never validation
    assert np.array_equal(samples, (digits.train_images[chosen].float() * digits.scale).numpy())
    fp32, int8 = quantize.int8_onnx(store.student, digits, tmp_path, n=128)
    graph = onnx.load(str(int8)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == TensorProto.INT8 for t in graph.initializer)  # int8 weights
    test = (digits.test_images.float() * digits.scale).numpy()
    result = quantize.compare(fp32, int8, test, digits.test_labels.numpy())
    assert result.accuracy_fp32 > 0.8
    assert result.accuracy_int8 >= result.accuracy_fp32 - 0.03 and result.agreement >= 0.95
    assert result.bytes_int8 < result.bytes_fp32
    with pytest.raises(ConfigError, match=r"^calibration samples=0: must be a whole number >= 1$"):
        quantize.calibration_samples(digits, 0)
