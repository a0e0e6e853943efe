"""TwoLayerSquareNet: the drop-in nn.Module."""
import io

import pytest
import torch

import torchext
from conftest import DEVICES, assert_matches


def test_parameters_and_buffers():
    net = torchext.TwoLayerSquareNet(5, 4, 3, 2)
    assert {n for n, _ in net.named_parameters()} == {"W", "V"}
    assert {n for n, _ in net.named_buffers()} == {"A", "B"}
    assert net.W.shape == (4, 5) and net.V.shape == (3, 4) and net.B.shape == (2, 3) and net.A.shape == (1, 2)
    net = torchext.TwoLayerSquareNet(5, 4, 3, 2, trainable_AB=True)
    assert {n for n, _ in net.named_parameters()} == {"W", "V", "A", "B"}
    assert not list(net.named_buffers())


def test_user_A_and_B_are_kept():
    A = torch.arange(3.0)
    B = torch.randn(3, 2)
    net = torchext.TwoLayerSquareNet(4, 5, 2, 3, A=A, B=B)
    assert torch.equal(net.A, A.reshape(1, 3)) and torch.equal(net.B, B)
    net.reset_parameters()
    assert torch.equal(net.A, A.reshape(1, 3)) and torch.equal(net.B, B)
    with pytest.raises(ValueError, match=r"B must have shape \(3, 2\)"):
        torchext.TwoLayerSquareNet(4, 5, 2, 3, B=torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"A must have shape \(3,\) or \(1, 3\)"):
        torchext.TwoLayerSquareNet(4, 5, 2, 3, A=torch.randn(4))
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        torchext.TwoLayerSquareNet(4, -1, 2, 3)


def test_given_A_and_B_set_the_modules_dtype():
    # Without dtype=, a float64 A and B (from numpy, say) make W and V float64 too.
    A, B = torch.rand(3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    net = torchext.TwoLayerSquareNet(4, 5, 2, 3, A=A, B=B)
    assert {t.dtype for t in net.state_dict().values()} == {torch.float64}
    assert net(torch.randn(6, 4, dtype=torch.float64)).dtype == torch.float64
    net32 = torchext.TwoLayerSquareNet(4, 5, 2, 3, A=A, B=B, dtype=torch.float32)
    assert {t.dtype for t in net32.state_dict().values()} == {torch.float32}
    # an integer A leaves the choice to B; of two floating dtypes the wider wins
    for A2 in (torch.ones(3, dtype=torch.long), A.float()):
        net = torchext.TwoLayerSquareNet(4, 5, 2, 3, A=A2, B=B)
        assert {t.dtype for t in net.state_dict().values()} == {torch.float64}
        net(torch.randn(6, 4, dtype=torch.float64))


def test_forward_matches_reference_and_shapes():
    net = torchext.TwoLayerSquareNet(6, 5, 4, 3, dtype=torch.float64)
    z = torch.randn(2, 7, 6, dtype=torch.float64)
    f = net(z)
    assert f.shape == (2, 7)
    assert_matches(f, torchext.reference.two_layer_square(z, net.W, net.V, net.B, net.A), torch.float64)
    assert net(torch.randn(6, dtype=torch.float64)).dim() == 0


def test_initialisation_scale():
    torch.manual_seed(0)
    net = torchext.TwoLayerSquareNet(64, 128, 128, 128)
    f = net(torch.randn(4096, 64))
    assert 0.3 < f.mean().item() < 3.0  # f ≈ 1 for standard-normal z, as documented
    assert (net.A >= 0).all() and net.A.max() <= 2.0 / 128


def test_state_dict_round_trip():
    net = torchext.TwoLayerSquareNet(5, 4, 3, 2)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    other = torchext.TwoLayerSquareNet(5, 4, 3, 2)
    other.load_state_dict(torch.load(buf))
    z = torch.randn(9, 5)
    assert torch.equal(net(z), other(z))
    assert set(net.state_dict()) == {"W", "V", "A", "B"}


def test_extra_repr_and_to_dtype():
    net = torchext.TwoLayerSquareNet(5, 4, 3, 2)
    assert "d=5, k=4, m=3, ell=2, trainable_AB=False" in repr(net)
    net64 = net.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in net64.state_dict().values())
    assert net64(torch.randn(3, 5, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trainable_AB", [False, True])
def test_training_reduces_loss(trainable_AB, device):
    torch.manual_seed(0)
    teacher = torchext.TwoLayerSquareNet(8, 16, 12, 10, device=device)
    student = torchext.TwoLayerSquareNet(8, 16, 12, 10, A=teacher.A, B=teacher.B, trainable_AB=trainable_AB, device=device)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    z_val = torch.randn(512, 8, device=device)
    with torch.no_grad():
        start = torch.mean((student(z_val) - teacher(z_val)) ** 2).item()
    for _ in range(150):
        z = torch.randn(128, 8, device=device)
        loss = torch.mean((student(z) - teacher(z).detach()) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = torch.mean((student(z_val) - teacher(z_val)) ** 2).item()
    assert end < 0.5 * start, (start, end)
    if not trainable_AB:
        assert student.A.grad is None and torch.equal(student.A, teacher.A)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_matches_plain_run(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    net = torchext.TwoLayerSquareNet(8, 6, 5, 4, dtype=torch.float64)
    z = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    f = checkpoint(net, z, use_reentrant=use_reentrant)
    f.sum().backward()
    got = [p.grad.clone() for p in (net.W, net.V)] + [z.grad.clone()]
    net.zero_grad()
    z.grad = None
    net(z).sum().backward()
    for a, b in zip(got, [net.W.grad, net.V.grad, z.grad]):
        assert torch.equal(a, b)
