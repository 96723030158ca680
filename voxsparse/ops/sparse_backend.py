"""The one place that imports a sparse-convolution library.

Models import sparse layers from here (``from voxsparse.ops.sparse_backend import spnn``) and never
from ``spconv`` directly, so the backend can be swapped without touching model code.

Backends, chosen by the ``VOXSPARSE_SPARSE_BACKEND`` environment variable (default ``auto``):

- ``spconv``: the spconv 2.x wheels (``spconv`` on the CPU, ``spconv-cu120``/``spconv-cu126`` on CUDA).
- ``spconv-triton``: ``spconv_triton``, a Triton re-implementation with the same API (GPU only).
- ``auto``: spconv if importable, else spconv-triton.

Four repairs make spconv's CPU path usable, all applied at import:

1. spconv asks ``torch.cuda.current_stream()`` for every op, which raises on a CPU-only torch build
   ("Torch not compiled with CUDA enabled") in the backward of strided convolutions. We return
   stream 0 when CUDA is unavailable.
2. spconv's CPU kernels race when torch runs more than one thread (spconv issues #366, #679):
   with 2 threads a SubM conv is wrong by ~0.5 absolute. The racing code is spconv's own C++ CPU
   kernels that split their loops over torch's OpenMP threads (``SpconvOps.*_cpu``: the scatter-add
   shares its row pointers between threads; max-pool), so we run every ``*_cpu`` kernel with one
   thread, restored afterwards (index generation is a serial loop either way). The convolutions
   themselves (``indice_conv`` and its backward, float32 / float64) run through
   :mod:`voxsparse.ops.cpu_sparse_conv`: spconv's arithmetic, bit for bit, with the matrix products
   and gathers on all threads and the scatter-adds single-threaded in blocks of kernel offsets, one
   thread switch per block instead of two or three per offset.
3. In eval mode spconv fuses a conv's bias (and an activation set by fusion) into its kernel, which
   its CPU build refuses ("cpu don't support act and bias"); reference architectures have biased
   sparse convs. On the CPU we run the kernel without them and add the bias and apply the
   activation afterwards: the same sum training mode computes.
4. spconv's CUDA builds give each conv and max-pool module an implicit-GEMM algorithm when it is
   built, whatever device it later runs on, and that algorithm's index generation refuses CPU
   tensors: a model run on the CPU with a CUDA build installed stopped at its first layer. On the
   CPU such a module runs the native algorithm (its weights have one layout, KRSC, for both).

Two changes concern its CUDA path:

- a repair: in training spconv's convolutions cast their inputs to float16 under autocast, but in
  eval mode they call their kernels directly, so float16 features (from a ``Linear`` under autocast,
  as in LION's blocks) met float32 weights and spconv stopped with "can't find suitable algorithm".
  In eval mode under autocast, features are cast to the weights' dtype.
- the native algorithm (kernels of more than 32 offsets, such as VoxelKP's 5x5x5 branches) runs
  through :mod:`voxsparse.ops.cuda_sparse_conv`: a few large kernels in place of spconv's three
  launches and one allocation per offset; bias and activation are applied after, as on the CPU.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from voxsparse.ops import cpu_sparse_conv, cuda_sparse_conv
from voxsparse.ops.cpu_sparse_conv import single_thread

ENV_VAR = "VOXSPARSE_SPARSE_BACKEND"
_CHOICES = ("auto", "spconv", "spconv-triton")



class _DropFxTracingNotice(logging.Filter):
    """Drops torch's notice ``is_fx_tracing will return true for both fx.symbolic_trace and
    torch.export...``, and only that record of its logger.

    spconv's ``SparseConvTensor`` has torch.fx's ``ProxyableClassMeta`` as metaclass, whose
    ``__call__`` asks ``torch.fx._symbolic_trace.is_fx_tracing()`` on every construction; torch
    logs the notice, meant for code that calls ``is_fx_tracing`` itself, on the first call (in the
    first progress bar of every tool). Nothing here traces with fx, so the notice says nothing.
    """

    NOTICE = "is_fx_tracing will return true for both fx.symbolic_trace and torch.export"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICE)


_fx_log = logging.getLogger("torch.fx._symbolic_trace")
if not any(type(f).__name__ == _DropFxTracingNotice.__name__ for f in _fx_log.filters):
    _fx_log.addFilter(_DropFxTracingNotice())


class SparseBackendError(ImportError):
    """No usable sparse-convolution library is installed, or the one requested is missing."""


def _single_threaded(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with single_thread():
            return fn(*args, **kwargs)

    return wrapper


class _SingleThreadedCpuKernels:
    """Stands in for spconv's ``SpconvOps``: its ``*_cpu`` kernels run single-threaded."""

    def __init__(self, ops: Any) -> None:
        self._ops = ops

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._ops, name)
        return _single_threaded(attr) if name.endswith("_cpu") else attr


def _own_path(features: torch.Tensor, filters: torch.Tensor, num_out: int) -> ModuleType | None:
    """The module that computes a native-algorithm convolution of ``features`` with ``filters`` onto
    ``num_out`` rows, or None for spconv's."""
    if cpu_sparse_conv.supports(features):
        return cpu_sparse_conv
    return cuda_sparse_conv if cuda_sparse_conv.supports(features, filters, num_out) else None


def _routed(indice_conv: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``spconv.pytorch.ops.indice_conv`` whose calls compute through
    :func:`voxsparse.ops.cpu_sparse_conv.indice_conv` on the CPU (repair 2; other dtypes through
    spconv's) and :func:`voxsparse.ops.cuda_sparse_conv.indice_conv` on CUDA, and add ``bias`` and
    apply ``act_type`` after the kernel instead of inside it (repair 3)."""
    import cumm.tensorview as tv

    @functools.wraps(indice_conv)
    def wrapper(features: torch.Tensor, *args: Any, bias: torch.Tensor | None = None,
                act_alpha: float = 0.0, act_beta: float = 0.0,
                act_type: Any = tv.gemm.Activation.None_, **kwargs: Any) -> torch.Tensor:
        path = _own_path(features, args[0], args[3])  # filters, num_activate_out
        if path is None and features.is_cuda:
            return indice_conv(features, *args, bias=bias, act_alpha=act_alpha, act_beta=act_beta,
                               act_type=act_type, **kwargs)
        if path is not None:
            kwargs.pop("algo", None)  # both compute spconv's native algorithm
            kwargs.pop("timer", None)
            out = path.indice_conv(features, *args, **kwargs)
        else:
            out = indice_conv(features, *args, **kwargs)
        if bias is not None:
            out = out + bias
        if act_type == tv.gemm.Activation.ReLU:
            return torch.relu(out)
        if act_type == tv.gemm.Activation.LeakyReLU:
            return torch.nn.functional.leaky_relu(out, act_alpha)
        if act_type == tv.gemm.Activation.Sigmoid:
            return torch.sigmoid(out)
        if act_type != tv.gemm.Activation.None_:
            raise NotImplementedError(f"spconv activation {act_type} after voxsparse's sparse conv")
        return out

    wrapper.voxsparse_cpu_path = True  # type: ignore[attr-defined]
    return wrapper


def _routed_backward(indice_conv_backward: Callable[..., Any]) -> Callable[..., Any]:
    """``spconv.pytorch.ops.indice_conv_backward`` whose calls compute through the same module as
    the forward's (:func:`_own_path`)."""

    @functools.wraps(indice_conv_backward)
    def wrapper(features: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        path = _own_path(features, args[0], args[1].shape[0])  # filters, out_bp
        if path is None:
            return indice_conv_backward(features, *args, **kwargs)
        kwargs.pop("algo", None)
        kwargs.pop("timer", None)
        return path.indice_conv_backward(features, *args, **kwargs)

    wrapper.voxsparse_cpu_path = True  # type: ignore[attr-defined]
    return wrapper


def _native_on_cpu(forward: Callable[..., Any]) -> Callable[..., Any]:
    """A conv / pool module's ``forward`` that runs spconv's native algorithm for CPU inputs (repair 4)."""
    from spconv.core import ConvAlgo

    @functools.wraps(forward)
    def wrapper(self: torch.nn.Module, input: Any, *args: Any, **kwargs: Any) -> Any:
        if self.algo == ConvAlgo.Native or input.features.is_cuda:
            return forward(self, input, *args, **kwargs)
        algo, self.algo = self.algo, ConvAlgo.Native
        try:
            return forward(self, input, *args, **kwargs)
        finally:
            self.algo = algo

    wrapper.voxsparse_cpu_path = True  # type: ignore[attr-defined]
    return wrapper


def _eval_features_in_weight_dtype(forward: Callable[..., Any]) -> Callable[..., Any]:
    """A conv module's ``forward`` whose eval-mode CUDA inputs take the weights' dtype under autocast."""

    @functools.wraps(forward)
    def wrapper(self: torch.nn.Module, input: Any, *args: Any, **kwargs: Any) -> Any:
        features = input.features
        if (not self.training and features.is_cuda and features.dtype != self.weight.dtype
                and torch.is_autocast_enabled("cuda")):
            input = input.replace_feature(features.to(self.weight.dtype))
        return forward(self, input, *args, **kwargs)

    wrapper.voxsparse_eval_dtype = True  # type: ignore[attr-defined]
    return wrapper


def _current_stream_or_zero() -> int:
    return torch.cuda.current_stream().cuda_stream if torch.cuda.is_available() else 0


def _patch_spconv() -> None:
    """Apply the repairs described in the module docstring (idempotent)."""
    cppcore = importlib.import_module("spconv.pytorch.cppcore")
    ops = importlib.import_module("spconv.pytorch.ops")
    # Every module that did `from cppcore import get_current_stream` holds its own reference.
    for name in ("spconv.pytorch.cppcore", "spconv.pytorch.ops", "spconv.pytorch.hash", "spconv.pytorch.utils"):
        module = importlib.import_module(name)
        if hasattr(module, "get_current_stream"):
            module.get_current_stream = _current_stream_or_zero
    assert cppcore.get_current_stream is _current_stream_or_zero
    if not isinstance(ops.SpconvOps, _SingleThreadedCpuKernels):
        ops.SpconvOps = _SingleThreadedCpuKernels(ops.SpconvOps)
    if not getattr(ops.indice_conv, "voxsparse_cpu_path", False):
        ops.indice_conv = _routed(ops.indice_conv)
    if not getattr(ops.indice_conv_backward, "voxsparse_cpu_path", False):
        ops.indice_conv_backward = _routed_backward(ops.indice_conv_backward)
    for module_name, class_name in (("spconv.pytorch.conv", "SparseConvolution"),
                                    ("spconv.pytorch.pool", "SparseMaxPool")):
        cls = getattr(importlib.import_module(module_name), class_name)
        if not getattr(cls.forward, "voxsparse_cpu_path", False):
            cls.forward = _native_on_cpu(cls.forward)
    conv_cls = importlib.import_module("spconv.pytorch.conv").SparseConvolution
    if not getattr(conv_cls.forward, "voxsparse_eval_dtype", False):
        conv_cls.forward = _eval_features_in_weight_dtype(conv_cls.forward)


def _load(name: str) -> ModuleType:
    if name == "spconv":
        module = importlib.import_module("spconv.pytorch")
        _patch_spconv()
        return module
    return importlib.import_module("spconv_triton.pytorch")


def _select() -> tuple[str, ModuleType]:
    requested = os.environ.get(ENV_VAR, "auto").strip().lower()
    if requested not in _CHOICES:
        raise SparseBackendError(f"{ENV_VAR}={requested!r} is not one of {_CHOICES}")
    candidates = ("spconv", "spconv-triton") if requested == "auto" else (requested,)
    errors = []
    for name in candidates:
        try:
            return name, _load(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise SparseBackendError(
        "No sparse-convolution backend could be imported ("
        + "; ".join(errors)
        + "). Install one: `pip install spconv` (CPU), `pip install spconv-cu126` (CUDA 12.x) or "
        "`pip install spconv-triton` (GPU via Triton); see README 'Sparse backends'."
    )


BACKEND_NAME, spnn = _select()
"""Name of the loaded backend and its ``spconv.pytorch``-compatible module."""

SparseConvTensor = spnn.SparseConvTensor


def set_tf32(enabled: bool) -> None:
    """Let fp32 matrix products run on TF32 tensor cores (inputs rounded to a 10-bit mantissa,
    fp32 accumulation), in torch and in spconv's implicit-GEMM kernels; off by default in both.

    Call it before the first convolution: spconv remembers the kernel it picked for each problem
    shape. Outputs then differ from exact fp32 at about 1e-3 relative.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if BACKEND_NAME == "spconv":
        importlib.import_module("spconv.constants").SPCONV_ALLOW_TF32 = enabled
