"""Model references: every kind builds for the dataset, pickles (pickle and cloudpickle), and fails in one line."""
from __future__ import annotations

import os
import pickle
import sys
import types
import urllib.error

import cloudpickle
import pytest
import torch
import torchvision
from torch import nn

from kdtune import models
from kdtune.errors import ConfigError
from kdtune.models import pretrained
from kdtune.models.refs import (
    MODEL_FORMS_HELP, BuiltinRef, CallableRef, FactoryRef, ModelRef, ModuleRef, TimmRef, TorchvisionRef,
    model_ref, shippable_path,
)

SHAPES = [(1, 8, 8), (3, 32, 32)]


class TinyNet(nn.Module):
    """A user's own network: adaptive pooling, so any image size works."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(input_shape[0], 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def tiny_factory(num_classes, input_shape):
    """A module-level factory: plain pickle stores it by reference."""
    return TinyNet(num_classes, input_shape)


FACTORY_MODULE = '''
from torch import nn

class _Net(nn.Module):
    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(input_shape[0], 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))

def tiny(num_classes, input_shape):
    return _Net(num_classes, input_shape)

def tiny_wide(num_classes, input_shape):
    return _Net(num_classes, input_shape)

def not_a_model(num_classes, input_shape):
    return {"num_classes": num_classes}

def wrong_classes(num_classes, input_shape):
    return _Net(num_classes + 1, input_shape)

NOT_CALLABLE = 42
'''


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A user's package written into tmp_path and put on sys.path: kdtune_user_pkg.models:tiny."""
    package = tmp_path / "kdtune_user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(FACTORY_MODULE)
    (package / "broken.py").write_text("raise ValueError('bad config in the user module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for name in [m for m in sys.modules if m == "kdtune_user_pkg" or m.startswith("kdtune_user_pkg.")]:
        del sys.modules[name]


def _instance(shape):
    return TinyNet(10, shape)


KINDS = {
    "builtin": lambda shape: "digits_student",
    "resnet18": lambda shape: "torchvision:resnet18",
    "mobilenet": lambda shape: "torchvision:mobilenet_v3_small",
    "factory": lambda shape: "kdtune_user_pkg.models:tiny",
    "instance": _instance,
    "lambda": lambda shape: (lambda num_classes, input_shape: TinyNet(num_classes, input_shape)),
    "function": lambda shape: tiny_factory,
}


@pytest.mark.parametrize("shape", SHAPES, ids=["1x8x8", "3x32x32"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_builds_for_the_dataset_and_round_trips_through_pickle(kind, shape, user_pkg):
    ref = model_ref(KINDS[kind](shape))
    assert isinstance(ref, ModelRef)
    ref.check(10, shape)
    model = ref.build(10, shape)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 10)

    # cloudpickle (what Ray uses) for every kind; plain pickle for all but the lambda
    copies = [cloudpickle.loads(cloudpickle.dumps(ref))]
    if kind == "lambda":
        with pytest.raises((pickle.PicklingError, AttributeError)):
            pickle.dumps(ref)
    else:
        copies.append(pickle.loads(pickle.dumps(ref)))
    for copy_ in copies:
        assert (copy_.spec, copy_.name, copy_.link_points, copy_.user_module) == (
            ref.spec, ref.name, ref.link_points, ref.user_module)
        rebuilt = copy_.build(10, shape).eval()
        with torch.no_grad():
            assert rebuilt(torch.zeros(2, *shape)).shape == (2, 10)


def test_fields_of_each_kind(user_pkg):
    builtin = model_ref("digits_student")
    assert isinstance(builtin, BuiltinRef)
    assert (builtin.spec, builtin.name, builtin.user_module) == ("digits_student", "digits_student", None)
    assert builtin.link_points == models.model_spec("digits_student").link_points != {}

    tv = model_ref("torchvision:resnet18")
    assert isinstance(tv, TorchvisionRef)
    assert (tv.spec, tv.name, tv.link_points, tv.user_module) == ("torchvision:resnet18", "torchvision-resnet18", {}, None)
    assert model_ref(tv) is tv
    assert pickle.loads(pickle.dumps(tv)) == tv

    factory = model_ref("kdtune_user_pkg.models:tiny")
    assert isinstance(factory, FactoryRef)
    assert (factory.spec, factory.name, factory.user_module) == (
        "kdtune_user_pkg.models:tiny", "kdtune_user_pkg.models-tiny", "kdtune_user_pkg")

    instance = model_ref(TinyNet(10, (1, 8, 8)))
    assert isinstance(instance, ModuleRef)
    assert (instance.spec, instance.name, instance.user_module) == ("python:TinyNet", "python-TinyNet", None)

    function = model_ref(tiny_factory)
    assert isinstance(function, CallableRef)
    assert (function.spec, function.name) == ("python:tiny_factory", "python-tiny_factory")
    assert model_ref(lambda n, s: TinyNet(n, s)).name == "python-lambda"
    for ref in (builtin, tv, factory, instance, function):
        assert set(ref.name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
    assert "torchvision:NAME" in MODEL_FORMS_HELP and "package.module:factory" in MODEL_FORMS_HELP


def test_instance_builds_are_deep_copies_with_its_weights():
    teacher = TinyNet(10, (1, 8, 8))
    with torch.no_grad():
        teacher.head.weight.fill_(0.5)
    ref = model_ref(teacher)
    built = ref.build(10, (1, 8, 8))
    assert built is not teacher
    assert torch.equal(built.head.weight, teacher.head.weight)
    with torch.no_grad():
        built.head.weight.fill_(0.0)
    assert float(teacher.head.weight[0, 0].detach()) == 0.5
    for copy_ in (pickle.loads(pickle.dumps(ref)), cloudpickle.loads(cloudpickle.dumps(ref))):
        assert torch.equal(copy_.build(10, (1, 8, 8)).head.weight, teacher.head.weight)


def test_factory_ref_stores_only_strings_and_imports_lazily():
    ref = model_ref("kdtune_no_such_pkg.models:tiny")  # resolving the text imports nothing
    assert ref.user_module == "kdtune_no_such_pkg"
    copy_ = pickle.loads(pickle.dumps(ref))
    assert vars(copy_) == vars(ref)
    with pytest.raises(ConfigError, match=r"cannot import module 'kdtune_no_such_pkg.models' \(ModuleNotFoundError: No module named 'kdtune_no_such_pkg'\)"):
        copy_.check(10, (1, 8, 8))


def test_a_registered_model_travels_with_its_builder(monkeypatch):
    spec = models.ModelSpec(build=lambda n, shape: TinyNet(n, shape), link_points={1: "features"}, description="x")
    monkeypatch.setitem(models._MODELS, "my_registered", spec)
    ref = model_ref("my_registered")
    shipped = cloudpickle.dumps(ref)
    monkeypatch.delitem(models._MODELS, "my_registered")  # a Ray worker's registry lacks it
    arrived = cloudpickle.loads(shipped)
    assert arrived.link_points == {1: "features"}
    assert arrived.build(10, (1, 8, 8))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_torchvision_fresh_build_fits_head_and_channels():
    model = model_ref("torchvision:resnet18").build(7, (1, 8, 8))
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
    squeeze = model_ref("torchvision:squeezenet1_1").build(7, (3, 32, 32))
    assert squeeze.classifier[1].out_channels == 7
    googlenet = model_ref("torchvision:googlenet").build(5, (1, 32, 32))
    googlenet.train()
    assert googlenet(torch.zeros(2, 1, 32, 32)).shape == (2, 5)  # no auxiliary heads: logits in training mode too


def test_torchvision_head_and_channel_surgery_on_a_pretrained_layout():
    model = torchvision.models.mobilenet_v3_small(weights=None)
    first = model.features[0][0].weight.detach().clone()
    assert pretrained.replace_head(model, 10) == "classifier.3"
    assert model.classifier[3].out_features == 10
    assert pretrained.adapt_input_channels(model, 1, pretrained=True) == "features.0.0"
    assert torch.allclose(model.features[0][0].weight, first.mean(dim=1, keepdim=True))
    assert pretrained.adapt_input_channels(model, 1, pretrained=True) is None  # already fits
    squeeze = torchvision.models.squeezenet1_1(weights=None)
    assert pretrained.replace_head(squeeze, 10) == "classifier.1"
    assert pretrained.average_rgb_kernels(torch.ones(2, 3, 3, 3), 4).shape == (2, 4, 3, 3)


# ------------------------------------------------------------------------------------------------ error messages


def test_unknown_names_list_the_allowed_forms():
    with pytest.raises(ConfigError) as info:
        model_ref("digits_studnet")
    message = str(info.value)
    assert "'digits_studnet': unknown" in message and "digits_student" in message
    assert "torchvision:NAME" in message and "timm:NAME" in message and "package.module:factory" in message
    assert "\n" not in message

    with pytest.raises(ConfigError, match=r"torchvision:resnet19: is not a torchvision classification model; close matches: resnet18"):
        model_ref("torchvision:resnet19")
    with pytest.raises(ConfigError, match=r"torchvision:fasterrcnn_resnet50_fpn: is a detection model"):
        model_ref("torchvision:fasterrcnn_resnet50_fpn")
    with pytest.raises(ConfigError, match=r"segmentation model"):
        model_ref("torchvision:fcn_resnet50")
    with pytest.raises(ConfigError, match=r"video model"):
        model_ref("torchvision:r3d_18")
    with pytest.raises(ConfigError, match=r"python:NAME stands for an object given in Python"):
        model_ref("python:MyNet")
    with pytest.raises(ConfigError, match=r"not a model reference"):
        model_ref("my pkg:make")
    with pytest.raises(ConfigError, match=r"int is not a model reference"):
        model_ref(3)


def test_factory_errors_are_one_line_and_say_what_to_do(user_pkg):
    with pytest.raises(ConfigError) as info:
        model_ref("kdtune_user_pkg.broken:tiny").check(10, (1, 8, 8))
    assert "cannot import module 'kdtune_user_pkg.broken' (ValueError: bad config in the user module)" in str(info.value)
    with pytest.raises(ConfigError, match=r"'kdtune_user_pkg.models' has no attribute 'tiyn'; close names: tiny"):
        model_ref("kdtune_user_pkg.models:tiyn").check(10, (1, 8, 8))
    with pytest.raises(ConfigError, match=r"'NOT_CALLABLE' is a int, not callable"):
        model_ref("kdtune_user_pkg.models:NOT_CALLABLE").check(10, (1, 8, 8))
    with pytest.raises(ConfigError, match=r"^student kdtune_user_pkg.models:tiyn: 'kdtune_user_pkg.models' has no attribute"):
        model_ref("kdtune_user_pkg.models:tiyn").check(10, (1, 8, 8), role="student")
    with pytest.raises(ConfigError, match=r"the factory returned dict, not an nn.Module"):
        model_ref("kdtune_user_pkg.models:not_a_model").check(10, (1, 8, 8))
    with pytest.raises(ConfigError, match=r"the factory returned str, not an nn.Module"):
        model_ref(lambda n, s: "net").build(10, (1, 8, 8))
    with pytest.raises(ConfigError) as info:
        model_ref("kdtune_user_pkg.models:wrong_classes").check(10, (1, 8, 8), role="student")
    message = str(info.value)
    assert message.startswith("student kdtune_user_pkg.models:wrong_classes: output shape (2, 11)")
    assert "expected (2, 10)" in message and "\n" not in message
    assert model_ref("kdtune_user_pkg.models:tiny").resolve().__name__ == "tiny"


def test_check_names_the_model_input_shape_and_image_size():
    with pytest.raises(ConfigError) as info:
        model_ref("torchvision:squeezenet1_1").check(10, (1, 8, 8), role="teacher")
    message = str(info.value)
    assert message.startswith("teacher torchvision:squeezenet1_1:")
    assert "(2, 1, 8, 8)" in message and "pass --image-size" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"python:TinyNet: output shape \(2, 10\) .* expected \(2, 3\)"):
        model_ref(TinyNet(10, (1, 8, 8))).check(3, (1, 8, 8))


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm fails
    with pytest.raises(ConfigError, match=r"^timm:resnet18 needs the timm package: pip install 'kdtune\[timm\]'$"):
        model_ref("timm:resnet18")


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []
    fake = types.ModuleType("timm")

    def create_model(name, pretrained=False, num_classes=1000, in_chans=3):
        calls.append(dict(name=name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans))
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return TinyNet(num_classes, (in_chans, 8, 8))

    fake.create_model = create_model
    fake.is_model = lambda name: name in ("resnet18", "resnet34")
    fake.list_models = lambda: ["resnet18", "resnet34"]
    fake.get_pretrained_cfg = lambda name: types.SimpleNamespace(hf_hub_id=f"timm/{name}.a1_in1k")
    monkeypatch.setitem(sys.modules, "timm", fake)
    return calls


def test_timm_builds_through_create_model(fake_timm):
    ref = model_ref("timm:resnet18")
    assert isinstance(ref, TimmRef) and ref.name == "timm-resnet18"
    assert ref.build(10, (1, 8, 8))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert fake_timm[-1] == dict(name="resnet18", pretrained=False, num_classes=10, in_chans=1)
    assert pickle.loads(pickle.dumps(ref)).build(10, (3, 32, 32))(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match=r"timm:resnet19: not a timm model; close matches: resnet18"):
        model_ref("timm:resnet19")


def test_timm_offline_names_the_hub_id_and_cache(fake_timm):
    with pytest.raises(ConfigError) as info:
        model_ref("timm:resnet18").build_pretrained(10, (3, 32, 32))
    message = str(info.value)
    assert message.startswith("teacher timm:resnet18: pretrained weights from the Hugging Face hub (timm/resnet18.a1_in1k)")
    assert "OSError" in message and "huggingface" in message and "\n" not in message
    assert fake_timm[-1] == dict(name="resnet18", pretrained=True, num_classes=10, in_chans=3)


# ----------------------------------------------------------------------------------------------- pretrained files


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return home


def _weights_file(name):
    return os.path.basename(torchvision.models.get_model_weights(name).DEFAULT.url)


@pytest.mark.parametrize("shape", SHAPES, ids=["1x8x8", "3x32x32"])
def test_pretrained_torchvision_loads_the_cached_file(torch_home, shape, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("the file is cached: nothing to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    saved = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(saved, folder / _weights_file("mobilenet_v3_small"))

    model = model_ref("torchvision:mobilenet_v3_small").build_pretrained(10, shape)
    state = model.state_dict()
    assert torch.equal(state["features.1.block.0.0.weight"], saved["features.1.block.0.0.weight"])
    expected_first = saved["features.0.0.weight"] if shape[0] == 3 else saved["features.0.0.weight"].mean(1, keepdim=True)
    assert torch.allclose(state["features.0.0.weight"], expected_first)
    assert model.classifier[3].out_features == 10
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("spec, filename", [
    ("torchvision:resnet18", "resnet18-f37072fd.pth"),
    ("vgg16", "vgg16-397923af.pth"),
    ("vgg16_bn", "vgg16_bn-6c64b313.pth"),
])
def test_pretrained_offline_names_file_and_folder_and_leaves_nothing(torch_home, monkeypatch, spec, filename):
    def offline(url, dst, hash_prefix=None, progress=True):
        assert os.path.basename(dst) == filename and hash_prefix == filename.split("-")[1].split(".")[0]
        with open(dst + ".0123abcd.partial", "wb") as partial:
            partial.write(b"half a file")
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    folder = os.path.join(str(torch_home), "hub", "checkpoints")
    with pytest.raises(ConfigError) as info:
        model_ref(spec).build_pretrained(10, (3, 32, 32))
    message = str(info.value)
    assert message.startswith(f"teacher {spec}: pretrained weights {filename} could not be downloaded (URLError")
    assert message.endswith(f"put that file into {folder} (torch hub cache, $TORCH_HOME) and run again")
    assert "\n" not in message
    assert not torch_home.exists() or [files for _, _, files in os.walk(torch_home) if files] == []


def test_builtins_without_weights_and_user_factories_say_so(user_pkg):
    with pytest.raises(ConfigError, match=r"^teacher digits_student: built-in model digits_student has no pretrained weights; "
                                          r"those that do: vgg16, vgg16_bn; or use torchvision:NAME / timm:NAME$"):
        model_ref("digits_student").build_pretrained(10, (1, 8, 8))
    with pytest.raises(ConfigError, match=r"student kdtune_user_pkg.models:tiny: has no library weights"):
        model_ref("kdtune_user_pkg.models:tiny").build_pretrained(10, (1, 8, 8), role="student")


def _features_only_state(batch_norm):
    """torchvision's VGG-16 conv stack (14.7M parameters) named as in vgg16 / vgg16_bn, without the 120M-parameter classifier."""
    from torchvision.models.vgg import cfgs, make_layers

    return {f"features.{k}": v for k, v in make_layers(cfgs["D"], batch_norm=batch_norm).state_dict().items()}


def test_vgg_conv_state_from_torchvision_maps_the_13_convs_in_order():
    state = torchvision.models.vgg16(weights=None).state_dict()  # in memory, no file
    mapped = models.vgg_conv_state_from_torchvision(state, batch_norm=False)
    assert len(mapped) == 26 and not any(k.startswith(("fc", "classifier")) for k in mapped)
    assert mapped["block1.0.weight"] is state["features.0.weight"]
    assert mapped["block1.2.bias"] is state["features.2.bias"]
    assert mapped["block3.4.weight"] is state["features.14.weight"]
    assert mapped["block5.4.weight"] is state["features.28.weight"]
    del state
    kd = models.build_model("vgg16", 10, (3, 32, 32))
    missing, unexpected = kd.load_state_dict(mapped, strict=False)
    assert unexpected == [] and all(k.startswith(("fc", "classifier")) for k in missing)
    gray = models.vgg_conv_state_from_torchvision(_features_only_state(False), batch_norm=False, in_channels=1)
    assert gray["block1.0.weight"].shape == (64, 1, 3, 3)

    bn_state = _features_only_state(True)
    bn = models.vgg_conv_state_from_torchvision(bn_state, batch_norm=True)
    assert len(bn) == 13 * 2 + 13 * 5
    assert bn["block1.1.running_var"] is bn_state["features.1.running_var"]
    assert bn["block5.6.weight"] is bn_state["features.40.weight"]  # stage 5, 3rd conv: conv, BN, ReLU per conv
    assert bn["block5.3.weight"] is bn_state["features.37.weight"]
    with pytest.raises(ConfigError, match=r"expected 13 conv layers and as many BatchNorm layers"):
        models.vgg_conv_state_from_torchvision(_features_only_state(False), batch_norm=True)


def test_pretrained_vgg16_bn_copies_imagenet_convs_and_keeps_fresh_fc(torch_home):
    saved = _features_only_state(True)
    with torch.no_grad():
        saved["features.0.weight"].normal_()
        saved["features.1.running_mean"].uniform_()
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    path = folder / "vgg16_bn-6c64b313.pth"
    torch.save(saved, path)
    try:
        model = model_ref("vgg16_bn").build_pretrained(10, (1, 32, 32))
    finally:
        path.unlink()
    state = model.state_dict()
    assert torch.allclose(state["block1.0.weight"], saved["features.0.weight"].mean(1, keepdim=True))
    assert torch.equal(state["block1.1.running_mean"], saved["features.1.running_mean"])
    assert torch.equal(state["block5.6.weight"], saved["features.40.weight"])
    assert model.classifier.out_features == 10
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


# ------------------------------------------------------------------------------------------------------ inspect


class TupleOut(nn.Module):
    def forward(self, x):
        return x, x


def test_module_shapes_one_pass_in_eval_mode_then_hooks_removed():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    model.train()
    rows = models.module_shapes(model, torch.zeros(2, 1, 8, 8))
    assert rows == [("0", "Conv2d", (4, 8, 8)), ("1", "ReLU", (4, 8, 8)), ("2", "MaxPool2d", (4, 4, 4)),
                    ("3", "Flatten", (64,)), ("4", "Linear", (10,))]
    assert model.training and all(not m._forward_hooks for m in model.modules())

    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = TupleOut()
            self.unused = nn.ReLU()

        def forward(self, x):
            return self.pair(x)[0]

    nested_rows = models.module_shapes(Nested(), torch.zeros(1, 3))
    assert nested_rows == [("pair", "TupleOut", None), ("unused", "ReLU", None)]

    table = models.format_module_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["module", "type", "output", "shape"]
    assert lines[2].split() == ["0", "Conv2d", "4x8x8"] and lines[-1].split() == ["4", "Linear", "10"]
    assert len({line.index(line.split()[1]) for line in lines[2:]}) == 1  # the type column is aligned
    assert "-" in models.format_module_table(nested_rows).splitlines()[-1]


def test_module_shapes_on_a_torchvision_model():
    rows = dict((path, shape) for path, _, shape in models.module_shapes(
        model_ref("torchvision:resnet18").build(10, (1, 32, 32)), torch.zeros(1, 1, 32, 32)))
    assert rows["layer1"] == (64, 8, 8) and rows["layer4"] == (512, 1, 1) and rows["fc"] == (10,)


def test_check_module_path_returns_the_module_or_names_the_nearest():
    model = models.build_model("digits_student", 10, (1, 8, 8))
    assert models.check_module_path(model, "block2", "student") is model.block2

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*[nn.ReLU() for _ in range(20)])

    with pytest.raises(ConfigError) as info:
        models.check_module_path(Features(), "features.66", "student")
    message = str(info.value)
    assert message.startswith("student module path 'features.66' not found in Features; nearest: features.6")
    assert "features.16" in message
    assert message.endswith("list them with: kdtune models links <ref> --dataset D")
    with pytest.raises(ConfigError, match=r"nearest: block1, block1.0, .*kdtune models links digits_student --dataset digits$"):
        models.check_module_path(model, "zzz", "teacher", ref="digits_student", dataset="digits")


def test_shippable_path_for_a_local_package_but_not_an_installed_one(user_pkg):
    local = shippable_path(model_ref("kdtune_user_pkg.models:tiny"))
    assert local == str(user_pkg)
    assert shippable_path("kdtune_user_pkg.models:tiny") == str(user_pkg)
    assert shippable_path(model_ref("torch.nn:Identity")) is None  # site-packages
    assert shippable_path(model_ref("json:loads")) is None  # standard library
    assert shippable_path(model_ref("digits_student")) is None
    assert shippable_path(model_ref(tiny_factory)) is None
