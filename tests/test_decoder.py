"""InfoPro's reconstruction decoder: the factored order of arithmetic computes the direct form's function."""

import pytest
import torch
from torch.nn import functional as F

from locallearn.errors import UserError
from locallearn.heads import Decoder, bilinear_matrix, upsampled_conv_macs
from tests.conftest import make_batches
from tests.test_methods import learner_for

SHAPES = [
    ((64, 8, 8), (3, 32, 32)),  # ResNet-32's last stage decoded to CIFAR / padded Fashion-MNIST
    ((32, 16, 16), (3, 32, 32)),
    ((64, 7, 7), (1, 28, 28)),  # Fashion-MNIST's own 28×28
    ((5, 3, 5), (3, 13, 17)),  # non-square, non-integer factors
    ((8, 1, 1), (3, 4, 4)),  # a 1×1 map: upsampling is a broadcast
]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("n_in,n_out", [(8, 32), (7, 28), (3, 13), (1, 4), (5, 5), (6, 1)])
def test_bilinear_matrix_is_interpolate(n_in, n_out):
    x = torch.randn(2, 3, n_in, dtype=torch.float64)
    expected = F.interpolate(x, size=n_out, mode="linear", align_corners=True)
    assert rel_err(x @ bilinear_matrix(n_in, n_out).T, expected) < 1e-14


@pytest.mark.parametrize("shape,image", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_factored_decoder_is_the_direct_one_in_float64(shape, image, channels_last):
    """Output, input gradient and every parameter gradient agree to float64 rounding."""
    torch.manual_seed(0)
    factored = Decoder(shape, image, 12, "factored").double()
    direct = Decoder(shape, image, 12, "direct").double()
    direct.load_state_dict(factored.state_dict())
    assert factored.factored and not direct.factored
    h = torch.randn(4, *shape, dtype=torch.float64)
    if channels_last:
        h = h.to(memory_format=torch.channels_last)
        factored.to(memory_format=torch.channels_last)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    out1, out2 = factored(h1), direct(h2)
    assert out1.shape == (4, *image)
    grad = torch.randn_like(out2)
    (out1 * grad).sum().backward()
    (out2 * grad).sum().backward()
    assert rel_err(out1, out2) < 1e-13
    assert rel_err(h1.grad, h2.grad) < 1e-13
    for (name, p1), p2 in zip(factored.named_parameters(), direct.parameters()):
        assert rel_err(p1.grad, p2.grad) < 1e-12, name
    # BN saw the same batch statistics
    assert rel_err(factored.body[1].running_var, direct.body[1].running_var) < 1e-13


def test_auto_factors_only_where_it_saves_half_the_work():
    assert Decoder((64, 8, 8), (3, 32, 32)).factored  # ×4: 7× fewer multiply-adds
    assert not Decoder((32, 16, 16), (3, 32, 32)).factored  # ×2 with 32 channels: only 1.5× fewer
    assert not Decoder((16, 32, 32), (3, 32, 32), form="factored").factored  # nothing to upsample
    direct, factored = upsampled_conv_macs(64, 12, (8, 8), (32, 32))
    assert direct == 9 * 12 * 64 * 32 * 32 and 7 * factored < direct
    with pytest.raises(UserError, match="decoder form"):
        Decoder((64, 8, 8), (3, 32, 32), form="fast")


def test_factored_decoder_checkpoints_and_dtype_round_trips():
    """The maps are derived, not saved; converting to float32 and back leaves them exactly the float64 ones."""
    factored, direct = (
        Decoder((64, 8, 8), (3, 32, 32), form="factored"),
        Decoder((64, 8, 8), (3, 32, 32), form="direct"),
    )
    assert factored.state_dict().keys() == direct.state_dict().keys()
    round_trip = Decoder((64, 8, 8), (3, 32, 32)).float().double()
    assert round_trip.row_map.dtype == torch.float64
    assert torch.equal(round_trip.row_map, Decoder((64, 8, 8), (3, 32, 32)).double().row_map)
    assert not torch.equal(round_trip.row_map, round_trip.row_map.float().double())  # float32 rounding would show


def test_infopro_man_trains_the_same_with_either_decoder_form():
    """Whole learner, float64, three steps: the decoder form changes the order of arithmetic only."""
    states = []
    for form in ("direct", "factored"):
        learner = learner_for("infopro+man", k=3, options={"decoder_form": form}, shape=(3, 16, 16))
        assert any(d.factored for d in learner.method.decoders) == (form == "factored")
        learner.model.double()
        learner.method.double()
        for batch in make_batches(3, shape=(3, 16, 16)):
            learner.train_step(type(batch)(batch.x.double(), batch.y, batch.raw.double()))
        states.append({**learner.model.state_dict(), **learner.method.state_dict()})
    for name, value in states[0].items():
        if value.is_floating_point():
            assert rel_err(states[1][name], value) < 1e-9, name
