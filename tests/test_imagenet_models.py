"""ImageNet networks (torchvision ResNets/ResNeXt, VGG-13 BN), their published splits and the ImageNet heads.

Everything runs on 64×64 or 57×57 inputs (the heads on one map each), never on a 224×224 ResNet-152 forward.
"""

import pytest
import torch
import torchvision
from torch import nn

from locallearn import LocalLearner, OptimConfig, create_model
from locallearn.errors import UserError
from locallearn.heads import UpsamplingDecoder, bottleneck_head
from locallearn.models import resnet_imagenet, resolve_split, split_model, vgg
from locallearn.models.split import PRESETS
from tests.conftest import make_batches

# stem + blocks + classifier; VGG-13: 10 conv units + classifier
LAYERS = {
    "resnet18": 1 + 2 + 2 + 2 + 2 + 1,
    "resnet34": 1 + 3 + 4 + 6 + 3 + 1,
    "resnet50": 1 + 3 + 4 + 6 + 3 + 1,
    "resnet101": 1 + 3 + 4 + 23 + 3 + 1,
    "resnet152": 1 + 3 + 8 + 36 + 3 + 1,
    "resnext101_32x8d": 1 + 3 + 4 + 23 + 3 + 1,
    "vgg13": 10 + 1,
}
ARCHS = list(LAYERS)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    """One 3-channel, 7-class model per arch, alive only while that arch's tests run (pytest groups them)."""
    torch.manual_seed(0)
    return create_model(request.param, num_classes=7).eval()


def composed(model, x, k=3):
    h = x
    for block in split_model(model, resolve_split(model, "even", k)):
        h = block(h)
    return h


def test_layers_names_and_stages(model):
    assert model.num_layers() == LAYERS[model.arch]
    assert model.names[-1] == "classifier" and len(set(model.names)) == len(model.names)
    if model.arch.startswith("res"):
        assert model.names[:3] == ["stem", "layer1.0", "layer1.1"]
        assert model.stage_of[0] == 0 and model.stage_of[-1] == 4
        assert [model.stage_of[model.names.index(f"layer{s}.0")] for s in (1, 2, 3, 4)] == [1, 2, 3, 4]
    else:
        assert model.names[:3] == ["conv1_1", "conv1_2", "conv2_1"]
        assert model.stage_of == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5]
        pooled = [i for i, layer in enumerate(model.layers[:-1]) if isinstance(layer[-1], nn.MaxPool2d)]
        assert pooled == [1, 3, 5, 7, 9]  # each max-pool closes the unit before it


def test_blocks_compose_to_the_unsplit_forward(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h, full = composed(model, x), model(x)
    assert h.shape == (2, 7)
    assert torch.equal(h, full)


def test_every_preset_gives_its_true_block_count(model):
    tables = [(name, table[model.arch]) for name, table in PRESETS.items() if model.arch in table]
    for name, table in tables:
        for k in table:
            assert len(split_model(model, resolve_split(model, name, k))) == k, (name, model.arch, k)
    expected = {"resnet34": 2, "resnet101": 3, "resnet152": 3, "resnext101_32x8d": 3, "vgg13": 1}
    assert len(tables) == expected.get(model.arch, 0)


def test_block_factory_maps_in_to_out_channels_at_the_stride(model):
    wide = {"resnet18": 1, "resnet34": 1, "vgg13": 1}.get(model.arch, 4)  # Bottleneck outputs planes·4
    for c_in, c_out, stride in [(64, 64 * wide, 1), (64 * wide, 128 * wide, 2), (32, 48 * wide, 1)]:
        layer = model.block_factory(c_in, c_out, stride).eval()
        assert layer(torch.randn(2, c_in, 16, 16)).shape == (2, c_out, 16 // stride, 16 // stride)
    if model.arch == "resnext101_32x8d":
        assert model.block_factory(256, 512, 2).conv2.groups == 32


@pytest.mark.parametrize("arch", ARCHS)
def test_any_in_channels_and_odd_sizes(arch):
    model = create_model(arch, num_classes=5, in_channels=1).eval()
    x = torch.randn(2, 1, 57, 57)
    with torch.no_grad():
        assert torch.equal(composed(model, x, 4), model(x))
    assert model(x).shape == (2, 5)


PUBLISHED = {  # the first layer of each later block, by name, for the papers' cuts "after layerS[i]"
    ("resnet101", "man", 4): ["layer3.1", "layer3.10", "layer3.18"],  # after layer3[0], [9], [17]
    ("resnet101", "man++", 4): ["layer2.3", "layer3.9", "layer3.17"],  # after layer2[2], layer3[8], [16]
    ("resnet101", "infopro", 2): ["layer2.1"],
    ("resnet152", "man", 2): ["layer2.6"],
    ("resnet152", "man++", 4): ["layer2.7", "layer3.14", "layer3.26"],
    ("resnext101_32x8d", "infopro", 2): ["layer2.3"],
    ("resnext101_32x8d", "man", 2): ["layer2.1"],
    ("resnet34", "man", 4): ["layer2.1", "layer3.1", "layer4.0"],
    ("vgg13", "dgl", 4): ["conv2_2", "conv4_1", "conv5_2"],  # block size 3: 3, 3, 3 and 1 conv units
}


def test_published_boundaries_by_name(model):
    for (arch, split, k), names in PUBLISHED.items():
        if arch == model.arch:
            assert [model.names[b] for b in resolve_split(model, split, k)] == names, (arch, split, k)


def randomise_bn_statistics(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize(
    "arch,build,family",
    [
        ("resnet18", torchvision.models.resnet18, resnet_imagenet),
        ("resnet50", torchvision.models.resnet50, resnet_imagenet),
        ("vgg13", torchvision.models.vgg13_bn, vgg),
    ],
)
def test_torchvision_weights_give_the_same_forward(arch, build, family):
    # A torchvision ResNet / VGG instance, allocated and initialised once (torchvision's own constructor does it twice).
    tv = resnet_imagenet.build_torchvision(build, family.init_like_torchvision, num_classes=7).eval()
    randomise_bn_statistics(tv)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tv(x)
        ours = create_model(arch, num_classes=7).eval()
        family.load_torchvision_state_dict(ours, tv.state_dict())  # strict: every key maps
        assert torch.equal(ours(x), expected)
        shared = family.from_torchvision(tv, arch)  # shares tv's modules: same tensors, same forward
        assert {id(p) for p in shared.parameters()} == {id(p) for p in tv.parameters()}
        assert torch.equal(shared(x), expected)


def conv_widths(module: nn.Module) -> list[int]:
    return [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_bottleneck_head_widths():
    head = bottleneck_head((512, 28, 28), 1000, final_width=2048)
    assert conv_widths(head) == [128, 256, 512, 2048]  # methods.md §1.4
    assert [m.stride[0] for m in head.modules() if isinstance(m, nn.Conv2d)] == [1, 2, 2, 1]
    assert head[-1].in_features == 2048 and head[-1].out_features == 1000
    assert head.eval()(torch.randn(1, 512, 28, 28)).shape == (1, 1000)
    assert conv_widths(bottleneck_head((1024, 14, 14), 10, 2048)) == [256, 256, 512, 2048]  # MAN's released code


def test_upsampling_decoder_ladders():
    dec = UpsamplingDecoder((512, 28, 28), (3, 224, 224)).eval()
    assert conv_widths(dec) == [128, 32, 12, 3]  # methods.md §1.4
    assert [m.size for m in dec if isinstance(m, nn.Upsample)] == [(56, 56), (112, 112), (224, 224)]
    assert isinstance(dec[-1], nn.Sigmoid)
    with torch.no_grad():
        assert dec(torch.randn(1, 512, 28, 28)).shape == (1, 3, 224, 224)
        big = UpsamplingDecoder((1024, 14, 14), (3, 224, 224)).eval()
        assert conv_widths(big) == [192, 64, 32, 12, 3]
        assert [m.kernel_size[0] for m in big if isinstance(m, nn.Conv2d)] == [1, 1, 3, 3, 3]
        assert big(torch.randn(1, 1024, 14, 14)).shape == (1, 3, 224, 224)
        odd = UpsamplingDecoder((512, 8, 8), (1, 57, 57)).eval()  # not a power of two: the last stage lands on 57
        assert odd(torch.randn(1, 512, 8, 8)).shape == (1, 1, 57, 57)


def assert_finite_step(learner, shape, n=1):
    stats = learner.train_step(make_batches(1, shape=shape, batch_size=4)[0])
    losses = [v for key, v in stats.items() if key.startswith("loss/")]
    assert len(losses) == n and all(torch.isfinite(v) for v in losses), stats


def test_infopro_man_with_imagenet_heads_trains():
    model = create_model("resnet50", num_classes=10)
    options = {"head": "bottleneck", "decoder": "upsampling"}
    learner = LocalLearner(model, "infopro+man", 2, input_shape=(3, 64, 64), method_options=options)
    assert conv_widths(learner.method.heads[0])[-1] == 2048  # the probed classifier input width
    assert conv_widths(learner.method.decoders[0])[-1] == 3
    assert_finite_step(learner, (3, 64, 64), 2)


def test_auglocal_on_resnet18_trains():
    learner = LocalLearner(create_model("resnet18", num_classes=10), "auglocal", 3, input_shape=(3, 64, 64))
    assert_finite_step(learner, (3, 64, 64), 3)


def test_dgl_on_vgg13_trains():
    # Plain SGD: momentum buffers for VGG's 120M-parameter classifier would only slow the test down.
    optim = OptimConfig(momentum=0.0, nesterov=False, weight_decay=0.0)
    model = create_model("vgg13", num_classes=10)
    learner = LocalLearner(model, "dgl", 4, "dgl", input_shape=(3, 32, 32), optim=optim)
    assert_finite_step(learner, (3, 32, 32), 4)


def test_infopro_rejects_unknown_head_and_decoder():
    model = create_model("resnet18", num_classes=10)
    with pytest.raises(UserError, match="bottleneck"):
        LocalLearner(model, "infopro", 2, input_shape=(3, 32, 32), method_options={"head": "wide"})
    with pytest.raises(UserError, match="upsampling"):
        LocalLearner(model, "infopro", 2, input_shape=(3, 32, 32), method_options={"decoder": "deconv"})
