"""setup.py's choices, checked without building: its functions run on a fake torch."""
import ast
import os
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def function_from_setup_py(name, **namespace):
    """One top-level function of setup.py (which builds when imported), bound to `namespace`."""
    with open(os.path.join(ROOT, "setup.py")) as fh:
        tree = ast.parse(fh.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([node], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


def fake_torch(capabilities):
    cuda = types.SimpleNamespace(is_available=lambda: bool(capabilities),
                                 device_count=lambda: len(capabilities),
                                 get_device_capability=lambda i: capabilities[i])
    return types.SimpleNamespace(cuda=cuda)


def test_visible_gpus_get_ptx_for_newer_cards(monkeypatch):
    # Built on the visible cards alone, the library must still run when moved
    # to a newer one: PTX of the newest arch, archs in numeric order.
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    arch_list = function_from_setup_py("arch_list", os=os, torch=fake_torch([(10, 0), (9, 0), (9, 0)]),
                               DEFAULT_ARCH_LIST="unused")
    archs, _ = arch_list()
    assert archs == "9.0;10.0+PTX"


def test_arch_list_from_the_environment_is_kept(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    arch_list = function_from_setup_py("arch_list", os=os, torch=fake_torch([(9, 0)]), DEFAULT_ARCH_LIST="unused")
    assert arch_list()[0] == "8.0;9.0"
