"""Bad input raises a clear exception that names the argument; nothing crashes."""
import pytest
import torch

import torchext
from conftest import make_inputs

OPS = torch.ops.torchext
SHAPE = ((5,), 7, 3, 4, 6)  # d=7, k=3, m=4, ell=6


def good(dtype=torch.float32):
    return list(make_inputs(SHAPE, dtype))


def call_all(args):
    """The same bad input through every face: functional, Function, raw op, backward op."""
    yield lambda: torchext.two_layer_square(*args)
    yield lambda: torchext.TwoLayerSquare.apply(*args)
    yield lambda: OPS.two_layer_square(*args)


BAD_SHAPES = [
    (0, torch.zeros(()), r"z must have shape \(\.\.\., d\).*0-dim"),
    (1, torch.zeros(3, 8), r"W must have shape \(k, d\) = \(k, 7\) with d = z.shape\[-1\]; got \(3, 8\)"),
    (1, torch.zeros(3), r"W must have shape \(k, d\) = \(k, 7\).*got \(3,\)"),
    (1, torch.zeros(1, 3, 7), r"W must have shape \(k, d\).*got \(1, 3, 7\)"),
    (2, torch.zeros(4, 5), r"V must have shape \(m, k\) = \(m, 3\) with k = W.shape\[0\]; got \(4, 5\)"),
    (2, torch.zeros(12), r"V must have shape \(m, k\).*got \(12,\)"),
    (3, torch.zeros(6, 3), r"B must have shape \(ell, m\) = \(ell, 4\) with m = V.shape\[0\]; got \(6, 3\)"),
    (3, torch.zeros(6, 4, 1), r"B must have shape \(ell, m\).*got \(6, 4, 1\)"),
    (4, torch.zeros(1, 5), r"A must have shape \(1, ell\) = \(1, 6\) or \(ell,\) = \(6,\) with ell = B.shape\[0\]; got \(1, 5\)"),
    (4, torch.zeros(2, 6), r"A must have shape \(1, ell\).*got \(2, 6\)"),
    (4, torch.zeros(6, 1), r"A must have shape \(1, ell\).*got \(6, 1\)"),
    (4, torch.zeros(()), r"A must have shape \(1, ell\).*got \(\)"),
]


@pytest.mark.parametrize("index,bad,pattern", BAD_SHAPES)
def test_bad_shapes_raise_value_error(index, bad, pattern):
    args = good()
    args[index] = bad
    for call in call_all(args):
        with pytest.raises(ValueError, match=pattern):
            call()


@pytest.mark.parametrize("index,name", list(enumerate("zWVBA"))[1:])
def test_mismatched_dtype_raises_type_error(index, name):
    args = good()
    args[index] = args[index].double()
    for call in call_all(args):
        with pytest.raises(TypeError, match=rf"{name} must have dtype torch.float32 \(the dtype of z\); got torch.float64"):
            call()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
def test_unsupported_dtype_of_z(dtype):
    args = good()
    args = [t.to(dtype) for t in args]
    for call in call_all(args):
        with pytest.raises(TypeError, match=r"z must be a floating-point tensor \(torch.float16, torch.bfloat16, torch.float32 or torch.float64\); got torch\." + str(dtype).split(".")[1]):
            call()


@pytest.mark.parametrize("index,name", list(enumerate("zWVBA")))
def test_non_tensor_raises_type_error(index, name):
    args = good()
    args[index] = args[index].tolist() if index else 3.0
    with pytest.raises(TypeError, match=rf"{name} must be a torch.Tensor; got (list|float)"):
        torchext.two_layer_square(*args)
    with pytest.raises(TypeError, match=rf"{name} must be a torch.Tensor"):
        torchext.TwoLayerSquare.apply(*args)


@pytest.mark.parametrize("index,name", list(enumerate("WVBA", start=1)))
def test_mixed_devices_raise_runtime_error(index, name):
    # meta and cpu tensors mixed: no GPU needed to check the device rule.
    args = good()
    args[index] = args[index].to("meta")
    for call in call_all(args):
        with pytest.raises(RuntimeError, match=rf"{name} must be on the same device as z \(cpu\); got meta"):
            call()
    args = [t.to("meta") for t in good()]
    args[index] = good()[index]
    for call in call_all(args):
        with pytest.raises(RuntimeError, match=rf"{name} must be on the same device as z \(meta\); got cpu"):
            call()


def test_all_meta_gives_shapes_only():
    args = [t.to("meta") for t in good()]
    f = OPS.two_layer_square(*args)
    assert f.device.type == "meta" and f.shape == (5,)
    grads = OPS.two_layer_square_backward(torch.empty(5, device="meta"), *args, [True, False, True, False, True])
    assert [None if g is None else tuple(g.shape) for g in grads] == [(5, 7), None, (4, 3), None, (1, 6)]


LAYOUTS = {
    "sparse_coo": (lambda t: t.to_sparse(), "layout Sparse"),
    "sparse_csr": (lambda t: t.to_sparse_csr(), "layout SparseCsr"),
    "mkldnn": (lambda t: t.to_mkldnn(), "layout Mkldnn"),
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("index,name", list(enumerate("zWVBA")))
def test_non_dense_input_is_refused_by_name(layout, index, name):
    # No backend computes on them; their dispatch keys get kernels that name the argument.
    convert, got = LAYOUTS[layout]
    if layout == "mkldnn" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without mkldnn")
    args = good()
    if layout == "sparse_csr" and index == 4:
        args[4] = args[4].reshape(1, -1)  # CSR is 2-D only; A may be (1, ell)
    _, r, q, state = OPS._two_layer_square_forward(*args, "auto", True)
    args[index] = convert(args[index])
    pattern = rf"{name} must be a dense \(strided\) tensor; got {got}"
    calls = list(call_all(args)) + [
        lambda: OPS.two_layer_square_backward(torch.ones(5), *args, [True] * 5),
        lambda: OPS._two_layer_square_forward(*args, "auto", True),
        lambda: OPS._two_layer_square_backward(torch.ones(5), *args, r, q, state, [True] * 5),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=pattern):
            call()
    trained = 2 if index == 1 else 1  # a dense weight requiring grad
    trainable = [t.clone().requires_grad_() if i == trained else t for i, t in enumerate(args)]
    with pytest.raises(TypeError, match=pattern):  # the recording route (C++ autograd node)
        torchext.two_layer_square(*trainable)


def test_non_dense_incoming_gradient_is_refused():
    args = good()
    args[1].requires_grad_()
    f = torchext.two_layer_square(*args)
    with pytest.raises(TypeError, match=r"grad must be a dense \(strided\) tensor; got layout Sparse"):
        torch.autograd.grad(f, args[1], torch.ones(5).to_sparse())


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
@pytest.mark.parametrize("trainable", [False, True])  # the recording route reads sizes first
def test_nested_z_is_refused_by_name(layout, trainable):
    args = good()
    args[0] = torch.nested.nested_tensor([torch.randn(2, 7), torch.randn(3, 7)], layout=layout)
    args[1].requires_grad_(trainable)
    # (a jagged tensor's own dispatch refuses the raw ops, naming only the op)
    calls = [lambda: torchext.two_layer_square(*args), lambda: torchext.TwoLayerSquare.apply(*args)]
    if layout == torch.strided:
        calls.append(lambda: OPS.two_layer_square(*args))
    for call in calls:
        with pytest.raises(TypeError, match=r"z must be a dense \(strided\) tensor; got a nested tensor"):
            call()


@pytest.mark.parametrize("index,name", list(enumerate("zWVBA")))
def test_none_to_the_ops_raises_type_error(index, name):
    # None reaches a Tensor argument of an op as an undefined tensor.
    args = good()
    args[index] = None
    for call in (lambda: OPS.two_layer_square(*args), lambda: OPS._two_layer_square_forward(*args, "auto", True),
                 lambda: OPS.two_layer_square_backward(torch.ones(5), *args, [True] * 5)):
        with pytest.raises(TypeError, match=rf"{name} must be a tensor; got None"):
            call()
    with pytest.raises(TypeError, match=r"grad must be a tensor; got None"):
        OPS.two_layer_square_backward(None, *good(), [True] * 5)


def test_backward_op_checks_grad():
    args = good()
    for grad, exc, pattern in [
        (torch.zeros(4), ValueError, r"grad must have the shape of the output, z.shape\[:-1\] = \(5,\); got \(4,\)"),
        (torch.zeros(5, 1), ValueError, r"grad must have the shape of the output.*got \(5, 1\)"),
        (torch.zeros(5, dtype=torch.float64), TypeError, r"grad must have dtype torch.float32 \(the dtype of z\); got torch.float64"),
        (torch.zeros(5, device="meta"), RuntimeError, r"grad must be on the same device as z \(cpu\); got meta"),
    ]:
        with pytest.raises(exc, match=pattern):
            OPS.two_layer_square_backward(grad, *args, [True] * 5)


def test_backward_op_checks_inputs_too():
    args = good()
    args[2] = torch.zeros(4, 5)
    with pytest.raises(ValueError, match=r"V must have shape \(m, k\)"):
        OPS.two_layer_square_backward(torch.zeros(5), *args, [True] * 5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a build without a GPU")
def test_cuda_tensor_without_cuda_kernels_says_how_to_rebuild():
    if torchext.build_info()["cuda_kernels"]:
        pytest.skip("this build has CUDA kernels")
    # A CUDA tensor cannot be created without a GPU; dispatch with the CUDA key
    # through the op's registered kernel directly.
    kernel_registered = torch._C._dispatch_has_kernel_for_dispatch_key("torchext::two_layer_square", "CUDA")
    assert kernel_registered
    with pytest.raises(RuntimeError, match="built without CUDA kernels.*FORCE_CUDA=1"):
        _call_cuda_kernel()


def _call_cuda_kernel():
    import torch._C as C

    args = good()
    ks = C.DispatchKeySet(C.DispatchKey.CUDA)
    return OPS.two_layer_square.default.redispatch(ks, *args)


@pytest.mark.parametrize("face", ["functional", "Function"])
def test_vmap_over_a_vector_z_names_z(face):
    # Each member is 0-dim; read as one batch, the vmapped dimension passed
    # for d, and the error blamed W (or failed inside c10).
    fn = torchext.two_layer_square if face == "functional" else torchext.TwoLayerSquare.apply
    W, V, B, A = torch.randn(6, 5), torch.randn(4, 6), torch.randn(3, 4), torch.rand(1, 3)
    for n in (5, 7):
        with pytest.raises(ValueError, match=r"z must have shape \(\.\.\., d\)"):
            torch.func.vmap(lambda zz: fn(zz, W, V, B, A))(torch.randn(n))


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_demo_refuses_fewer_than_one_step(steps, capsys):
    # With no step the demo's "loss fell" check could only report FAILED.
    from torchext.__main__ import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--steps", steps])
    assert exit_info.value.code == 2
    assert "--steps: must be at least 1" in capsys.readouterr().err
