"""What importing the official VAR and MVAR sources needs outside their own environment: stand-ins
for the packages they import that are not installed here (natten, huggingface_hub) and the
print with `force=` their entry points install. Shared by train_steps.py and
benches/torch_cpu_models.py; copies none of the official code."""

import functools
import sys
import types


def install_natten_stand_in():
    import torch

    @functools.lru_cache(maxsize=None)
    def window_index(nx, ny, kernel_size):
        """The flat key index of every query's window, [nx * ny * k * k]."""

        def starts(n):
            return [min(max(i - kernel_size // 2, 0), n - kernel_size) for i in range(n)]

        sx, sy = starts(nx), starts(ny)
        idx = torch.empty(nx, ny, kernel_size * kernel_size, dtype=torch.long)
        for x in range(nx):
            for y in range(ny):
                win = [(sx[x] + a) * ny + (sy[y] + c) for a in range(kernel_size) for c in range(kernel_size)]
                idx[x, y] = torch.tensor(win)
        return idx.reshape(-1)

    def na2d(q, k, v, kernel_size, dilation=1, scale=None, **_):
        """q, k, v [B, X, Y, heads, d] -> [B, X, Y, heads, d]: softmax over the k x k window."""
        assert dilation == 1
        b, nx, ny, h, d = q.shape
        if kernel_size > nx or kernel_size > ny:
            raise ValueError(f"kernel_size {kernel_size} > input size {(nx, ny)}")
        scale = d ** -0.5 if scale is None else scale

        idx = window_index(nx, ny, kernel_size)
        kf = k.reshape(b, nx * ny, h, d)[:, idx].reshape(b, nx, ny, kernel_size * kernel_size, h, d)
        vf = v.reshape(b, nx * ny, h, d)[:, idx].reshape(b, nx, ny, kernel_size * kernel_size, h, d)
        logits = torch.einsum("bxyhd,bxykhd->bxyhk", q * scale, kf)
        p = logits.softmax(dim=-1)
        return torch.einsum("bxyhk,bxykhd->bxyhd", p, vf)

    mod = types.ModuleType("natten")
    mod.na2d = na2d
    sys.modules["natten"] = mod


def accept_print_force():
    """The official entry points replace print with one that takes `force=` (for the master rank);
    filter_params calls it so."""
    import builtins

    plain = builtins.print

    def print_(*args, force=False, **kw):
        plain(*args, **kw)

    builtins.print = print_


def install_hub_stand_in():
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        mod = types.ModuleType("huggingface_hub")

        class PyTorchModelHubMixin:  # only the *HF wrapper classes use it
            def __init_subclass__(cls, **kwargs):
                pass

        mod.PyTorchModelHubMixin = PyTorchModelHubMixin
        sys.modules["huggingface_hub"] = mod


def prepare_official_import(repo, natten=False):
    """Puts an official checkout first on sys.path, with the stand-ins it needs."""
    sys.path.insert(0, repo)
    install_hub_stand_in()
    accept_print_force()
    if natten:
        install_natten_stand_in()


def write_json(out_dir, name, obj, indent=None):
    """Writes `obj` to out_dir/name (creating the folder) and returns the path."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
    return path


def var_repo_args():
    """The command line of the scripts that need only the VAR checkout: --var-repo, --out."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--var-repo", required=True, help="FoundationVision/VAR at the fixture manifest's commit")
    ap.add_argument("--out", default="tests/official")
    return ap.parse_args()

