"""Models: built-in architectures (the zoo, kdtune/models/zoo.py), references to any model (refs.py: built-in,
torchvision:, timm:, package.module:factory), link points and feature taps, module inspection and pretrained
weights. Inside the package imports go one way: architectures <- zoo <- pretrained <- refs, inspect.
"""

from kdtune.models.zoo import (  # noqa: F401  (the package's public names)
    VGG, VGG7_STAGES, VGG16_STAGES, vgg_link_points, cnn, MLP, mlp_link_points, MOBILENET_LINK_POINTS,
    MobileNetV2, RESNET_LINK_POINTS, RESNET_X4, X4_LINK_POINTS, CifarResNet, resnet_x4, SHUFFLENET_LINK_POINTS,
    ShuffleNetV2, CIFAR_KD_WRNS, KD_WRN_LINK_POINTS, WRN_LINK_POINTS, WideResNet, ModelSpec, register_model,
    model_names, model_spec, build_model, check_links, count_parameters, EMBEDDING_PATH, classifier_path,
    FeatureTap, _MODELS,)
from kdtune.models.refs import MODEL_FORMS_HELP, ModelRef, model_ref, shippable_path  # noqa: F401,E402
from kdtune.models.inspect import check_module_path, format_module_table, module_shapes  # noqa: F401,E402
from kdtune.models.pretrained import vgg_conv_state_from_torchvision  # noqa: F401,E402
