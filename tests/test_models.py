"""Models, splits and presets: the K blocks composed are the unsplit network; presets have the published counts."""

import pytest
import torch

from locallearn.errors import UserError
from locallearn.models import create_model, resolve_split, split_model
from locallearn.models.split import PRESETS


@pytest.mark.parametrize("arch,layers", [("resnet20", 11), ("resnet32", 17), ("resnet56", 29), ("resnet110", 56)])
def test_layer_counts(arch, layers):
    assert create_model(arch).num_layers() == layers


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 96, 96), (2, 17, 23)])
@pytest.mark.parametrize("k", [1, 3, 16])
def test_blocks_compose_to_the_unsplit_forward(shape, k):
    model = create_model("resnet32", num_classes=7, in_channels=shape[0]).eval()
    x = torch.randn(2, *shape)
    h = x
    for block in split_model(model, resolve_split(model, "even", k)):
        h = block(h)
    assert h.shape == (2, 7)
    assert torch.equal(h, model(x))


def test_blocks_share_the_model_parameters():
    model = create_model("resnet20")
    blocks = split_model(model, resolve_split(model, "even", 4))
    block_params = {id(p) for b in blocks for p in b.parameters()}
    assert block_params == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_gives_its_true_block_count(preset):
    for arch, table in PRESETS[preset].items():
        model = create_model(arch)
        for k in table:
            assert len(split_model(model, resolve_split(model, preset, k))) == k, (preset, arch, k)


def test_published_cut_points():
    r32 = create_model("resnet32")
    # InfoPro ResNet-32 K=4 cuts after (1,2), (2,1), (3,0): layers 3, 7, 11 -> blocks start at 4, 8, 12
    assert resolve_split(r32, "infopro", 4) == [4, 8, 12]
    # InfoPro K=16 puts the stem alone; MAN's "K=16" glues it to block 1 and trains 15 blocks
    assert resolve_split(r32, "infopro", 16)[0] == 1
    assert resolve_split(r32, "man", 15) == resolve_split(r32, "infopro", 16)[1:]
    r110 = create_model("resnet110")
    assert resolve_split(r110, "infopro", 55) == list(range(1, 55))
    assert resolve_split(r110, "infopro-balanced", 2) == [16]  # after (1,14): layer 15


def test_man_k16_explains_the_15_blocks():
    with pytest.raises(UserError, match="trains 15 blocks"):
        resolve_split(create_model("resnet32"), "man", 16)


@pytest.mark.parametrize("k", [0, 17, 100])
def test_k_out_of_range(k):
    with pytest.raises(UserError, match="does not fit"):
        resolve_split(create_model("resnet32"), "even", k)


def test_even_split_sizes_differ_by_at_most_one():
    model = create_model("resnet110")
    bounds = resolve_split(model, "even", 4)
    sizes = [b - a for a, b in zip([0, *bounds], [*bounds, model.num_layers() - 1])]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 55


def test_unknown_arch_and_split():
    with pytest.raises(UserError, match="unknown arch"):
        create_model("resnet33")
    with pytest.raises(UserError, match="unknown split"):
        resolve_split(create_model("resnet20"), "nope", 2)


def test_boundaries_given_as_layer_indices():
    model = create_model("resnet32")
    assert resolve_split(model, "2, 5,10", None) == resolve_split(model, "2,5,10", 4) == [2, 5, 10]
    with pytest.raises(UserError, match="give 4 blocks, not K=3"):
        resolve_split(model, "2,5,10", 3)
    with pytest.raises(UserError, match="must increase strictly"):
        resolve_split(model, "5,2", None)
