"""The one place CrypTen 0.4.1 is imported: makes it work on torch 2.x and fixes its GPU convs.

CrypTen 0.4.1 (the last release) predates torch 2.x. Everything in this project imports it
through :func:`load_crypten`, which

* puts a stand-in for the removed ``torch.onnx._internal.registration`` module into
  ``sys.modules``: ``crypten.nn.onnx_converter`` only imports ``registry`` from it (its
  ``_update_onnx_symbolic_registry`` then uses ``torch.onnx.register_custom_op_symbolic``,
  which still exists), so an attribute that refuses use is enough;
* replaces CrypTen's GPU convolution (``CUDALongTensor.__patched_conv_ops``), which picks
  its float64 block count from the *spatial* kernel size only (3 blocks for a 3x3 kernel)
  although every output sums ``c_in * kh * kw`` products. With 3 blocks of 22 bits a
  product of two blocks is < 2^44, so more than 512 summands exceed float64's 53-bit
  mantissa and the low bits are rounded away; ResNet-18's 3x3 convs sum 576..4608 products,
  which is the H100 error of ~3e7 (single encrypted ops with few input channels stay
  exact). :func:`blocked_ring_conv` chooses the blocks from the true reduction size and
  splits the input channels when even 16-bit blocks would not be exact.

Models reach CrypTen as ONNX written by the TorchScript exporter (:func:`export_onnx`) and
cleaned by :func:`clean_onnx` (CrypTen rejects ``Identity``, which torch emits for
de-duplicated initializers, and inference needs no ``Dropout``).
"""
from __future__ import annotations

import functools
import io
import logging
import math
import sys
import types
import warnings
from typing import Any

import onnx
import torch
from omegaconf import DictConfig
from onnx import numpy_helper

from protocols.errors import IomtError

log = logging.getLogger(__name__)

#: The CrypTen release this module was written and tested against.
CRYPTEN_VERSION = "0.4.1"
#: ONNX opset CrypTen's converter understands.
OPSET = 17
#: Fixed-point precision of CrypTen's default encoder (and of protocols.fixedpoint).
PRECISION_BITS = 16
#: float64 represents every integer below 2^53 exactly.
FP64_EXACT_BITS = 53
_RING_BITS = 64

_STANDIN = "torch.onnx._internal.registration"
_crypten: types.ModuleType | None = None


class CryptenCompatError(IomtError):
    """CrypTen could not be loaded or a model could not be converted for it."""


class _RemovedRegistry:
    """Stand-in for torch's removed symbolic registry: importable, but never to be used."""

    def __getattr__(self, name: str) -> Any:
        raise CryptenCompatError(
            f"torch.onnx._internal.registration.registry.{name} was removed from torch; "
            "CrypTen must not need it (see cloud_aggregator.crypten_compat)"
        )


def install_registration_standin() -> bool:
    """Register the stand-in module unless torch still ships the real one; True if installed."""
    if _STANDIN in sys.modules:
        return False
    try:
        __import__(_STANDIN)
        return False
    except ImportError:
        pass
    standin = types.ModuleType(_STANDIN)
    standin.__doc__ = "Stand-in installed by cloud_aggregator.crypten_compat for CrypTen 0.4.1."
    standin.registry = _RemovedRegistry()
    sys.modules[_STANDIN] = standin
    return True


def load_crypten() -> types.ModuleType:
    """Import CrypTen once, with the torch 2.x stand-in and the GPU convolution fix in place."""
    global _crypten
    if _crypten is not None:
        return _crypten
    install_registration_standin()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import crypten
    except ImportError as err:
        raise CryptenCompatError(f"CrypTen is not importable ({err}); run `make install`") from err
    if crypten.__version__ != CRYPTEN_VERSION:
        raise CryptenCompatError(f"CrypTen {crypten.__version__} found, this module supports {CRYPTEN_VERSION}")
    patch_cuda_conv()
    skip_placeholder_sharing()
    fuse_batched_all_reduce()
    cache_validation_flag(crypten)
    cache_config_sections()
    _crypten = crypten
    return crypten


def skip_placeholder_sharing() -> bool:
    """Build CrypTen's empty placeholder tensor ``MPCTensor([])`` without sharing anything.

    ``shallow_copy``, ``clone``, ``from_shares``, ``rand`` and every ``crypten.cat`` /
    ``crypten.stack`` make a placeholder ``MPCTensor([])`` and then replace its contents.
    CrypTen 0.4.1 means to special-case it (``if tensor is []``), but that test is never
    true (each ``[]`` is a new list), so each placeholder encodes an empty tensor and draws a
    pseudo-random sharing of zero: about 110 per fusion-head request, a quarter of a party's
    time under cProfile. Here the placeholder is what that sharing produced (an empty share
    with the default encoder) without the work. Every party skips the same draws (all of
    size 0), so their generators stay in step. True if the patch was installed.
    """
    from crypten.cryptensor import CrypTensor
    from crypten.encoder import FixedPointEncoder
    from crypten.mpc.mpc import MPCTensor
    from crypten.mpc.primitives.arithmetic import SENTINEL, ArithmeticSharedTensor
    from crypten.mpc.ptype import ptype as Ptype

    original = MPCTensor.__init__
    if getattr(original, "_iomt_placeholder", False):
        return False

    @functools.wraps(original)
    def __init__(self: Any, tensor: Any, ptype: Any = Ptype.arithmetic, device: Any = None,  # noqa: N807
                 *args: Any, **kwargs: Any) -> None:
        if isinstance(tensor, list) and not tensor and ptype is Ptype.arithmetic and not args and not kwargs:
            CrypTensor.__init__(self, requires_grad=False)
            placeholder = ArithmeticSharedTensor(src=SENTINEL)
            placeholder.share = torch.empty(0, dtype=torch.long, device=device)
            placeholder.encoder = FixedPointEncoder()
            self._tensor = placeholder
            self.ptype = ptype
            return
        original(self, tensor, ptype, device, *args, **kwargs)

    __init__._iomt_placeholder = True
    MPCTensor.__init__ = __init__
    return True


def fuse_batched_all_reduce() -> bool:
    """Open a batch of shares with one ``all_reduce`` of their concatenation, not one per tensor.

    Every Beaver multiplication opens two masked values (``x - a`` and ``y - b``; XOR for
    the binary AND gates of a secure comparison) with CrypTen's batched ``all_reduce``,
    which issues one gloo collective per tensor and waits for all; each collective is a full
    exchange between the parties. Reductions are elementwise, so one collective of the
    concatenated shares gives the same result and carries the same bytes in one exchange. Communication statistics
    count it as before (one round, the same number of elements). Batches that are not all
    plain torch tensors of one dtype and device (CUDA shares are wrapped) go the original way.
    True if the patch was installed.
    """
    from crypten.communicator.distributed_communicator import DistributedCommunicator
    from torch.distributed import ReduceOp

    original = DistributedCommunicator.all_reduce
    if getattr(original, "_iomt_fused", False):
        return False

    @functools.wraps(original)
    def all_reduce(self: Any, input: Any, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:  # noqa: A002
        if not batched or len(input) < 2 or \
                any(type(t) is not torch.Tensor for t in input) or \
                len({(t.dtype, t.device) for t in input}) != 1:
            return original(self, input, op=op, batched=batched)
        flat = original(self, torch.cat([t.reshape(-1) for t in input]), op=op)
        return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in input]), input)]

    all_reduce._iomt_fused = True
    DistributedCommunicator.all_reduce = all_reduce
    return True


def cache_validation_flag(crypten: types.ModuleType) -> bool:
    """Read ``cfg.debug.validation_mode`` once per config object, not on every attribute access.

    CrypTen wraps ``CrypTensor.__getattribute__`` so that *every* attribute access of every
    encrypted tensor looks up ``cfg.debug.validation_mode`` through omegaconf (~20 us): about
    2,300 lookups and a third of the CPU time of one fusion-head request. ``cfg.temp_override``
    and ``cfg[...] = ...`` replace ``cfg.config`` with a new object, so the flag is re-read
    whenever the config object changes; only an in-place ``cfg.debug.validation_mode = x``
    would go unnoticed (nothing in this project sets it). True if the patch was installed.
    """
    from crypten.cryptensor import CrypTensor

    current = CrypTensor.__dict__["__getattribute__"]
    original = getattr(current, "__wrapped__", None)
    if original is None or getattr(current, "_iomt_cached_flag", False):
        return False
    cfg = crypten.cfg
    seen: list[Any] = [None, False]  # the config object (kept alive, so its id stays unique), its flag

    @functools.wraps(original)
    def __getattribute__(self: Any, name: str) -> Any:  # noqa: N807 - replaces CrypTen's
        function = original(self, name)
        config = object.__getattribute__(cfg, "config")
        if config is not seen[0]:
            seen[0], seen[1] = config, bool(config.debug.validation_mode)
        if not seen[1]:
            return function
        return crypten.debug.validate_correctness(self, function, name)

    __getattribute__._iomt_cached_flag = True
    CrypTensor.__getattribute__ = __getattribute__
    return True


class _CachedSection:
    """Read-through cache of one section of CrypTen's config; writes go through to omegaconf."""

    __slots__ = ("_node", "_values")

    def __init__(self, node: Any) -> None:
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_values", {})

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        try:
            return values[name]
        except KeyError:
            pass
        value = getattr(object.__getattribute__(self, "_node"), name)
        if isinstance(value, DictConfig):
            value = _CachedSection(value)
        values[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_node"), name, value)
        object.__getattribute__(self, "_values").pop(name, None)


def cache_config_sections(keep: int = 8) -> bool:
    """Serve ``cfg.section.key`` from a cache instead of omegaconf (~25 us a lookup).

    CrypTen reads its config on every operation (``cfg.encoder.precision_bits`` for each
    new tensor, ``cfg.mpc.provider``, ``cfg.communicator.verbose`` per message, ...): about
    1,600 omegaconf lookups per fusion-head request. Sections are cached per config object:
    ``temp_override``, ``cfg[...] = ...`` and ``load_config`` install a new object (a new
    cache; the last ``keep`` objects are held so that their ids stay unique), and
    ``cfg.section.key = value`` writes through the cached section. Only a write to the
    omegaconf object itself (``cfg.config.section.key = value``) would go unnoticed; nothing
    in this project or CrypTen does that. True if the patch was installed.
    """
    from collections import OrderedDict

    from crypten.config.config import CrypTenConfig

    if getattr(CrypTenConfig.__getattribute__, "_iomt_cached", False):
        return False
    original = CrypTenConfig.__getattribute__
    recent: OrderedDict[int, tuple[Any, dict]] = OrderedDict()

    def __getattribute__(self: Any, name: str) -> Any:  # noqa: N807 - replaces CrypTen's
        try:
            return object.__getattribute__(self, name)
        except AttributeError:
            if "." in name:
                return original(self, name)
        config = object.__getattribute__(self, "config")
        entry = recent.get(id(config))
        if entry is None or entry[0] is not config:
            entry = recent[id(config)] = (config, {})
            while len(recent) > keep:
                recent.popitem(last=False)
        sections = entry[1]
        if name not in sections:
            value = getattr(config, name)
            sections[name] = _CachedSection(value) if isinstance(value, DictConfig) else value
        return sections[name]

    __getattribute__._iomt_cached = True
    CrypTenConfig.__getattribute__ = __getattribute__
    return True


# --------------------------------------------------------------------------- ONNX


def export_onnx(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> bytes:
    """Export ``model`` (eval mode) with the TorchScript exporter CrypTen's converter expects."""
    buf = io.BytesIO()
    model = model.eval()
    names = [f"input{i}" for i in range(len(example))] if len(example) > 1 else ["input"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, buf, dynamo=False, opset_version=OPSET,
                          do_constant_folding=False, input_names=names, output_names=["output"])
    return buf.getvalue()


def clean_onnx(data: bytes | onnx.ModelProto) -> onnx.ModelProto:
    """Remove ``Identity`` and ``Dropout`` nodes so ``crypten.nn.from_onnx`` accepts the graph.

    An ``Identity`` whose input is an initializer (torch de-duplicates equal weights, e.g.
    every freshly initialised BatchNorm scale) becomes a copy of that initializer under the
    Identity's output name, so each model parameter keeps its own name; any other Identity
    or Dropout is bypassed by renaming its consumers' inputs.
    """
    model = onnx.load_model_from_string(data) if isinstance(data, bytes) else data
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type not in ("Identity", "Dropout"):
            kept.append(node)
            continue
        src = rename.get(node.input[0], node.input[0])
        out = node.output[0]
        if node.op_type == "Identity" and src in inits:
            arr = numpy_helper.to_array(inits[src])
            copy = numpy_helper.from_array(arr.copy(), name=out)
            graph.initializer.append(copy)
            inits[out] = copy
        else:
            rename[out] = src
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for out in graph.output:
        if out.name in rename:
            raise CryptenCompatError(f"graph output {out.name!r} is produced by a removed node")
    del graph.node[:]
    graph.node.extend(kept)
    return model


def from_onnx(data: bytes | onnx.ModelProto) -> Any:
    """A (plaintext) ``crypten.nn`` graph from ONNX bytes, after :func:`clean_onnx`."""
    crypten = load_crypten()
    model = clean_onnx(data)
    try:
        return crypten.nn.from_onnx(io.BytesIO(model.SerializeToString()))
    except (ValueError, AssertionError, KeyError) as err:
        raise CryptenCompatError(f"CrypTen cannot convert this model: {err}") from err


# --------------------------------------------------------------------------- GPU convolutions


def conv_reduction_size(weight_shape: tuple[int, ...], transposed: bool = False, groups: int = 1) -> int:
    """Number of products summed into one output of a convolution with this weight."""
    kernel = math.prod(weight_shape[2:])
    # conv weight: (c_out, c_in/groups, *k); transposed: (c_in, c_out/groups, *k)
    c_in = weight_shape[0] // groups if transposed else weight_shape[1]
    return c_in * kernel


def blocks_for(reduction: int) -> int | None:
    """Fewest float64 blocks (3 or 4, CrypTen's decodings) exact for ``reduction`` summands.

    A ring element is cut into ``nb`` blocks of ``ceil(64 / nb)`` bits; one output of a
    block pair sums ``reduction`` products below ``2^(2*bits)``, exact while that sum stays
    below ``2^53``. ``None``: not even 4 blocks are exact, the reduction must be split.
    """
    for nb in (3, 4):
        bits = math.ceil(_RING_BITS / nb)
        if reduction * ((1 << bits) - 1) ** 2 < (1 << FP64_EXACT_BITS):
            return nb
    return None


def _split_blocks(x: torch.Tensor, nb: int) -> torch.Tensor:
    bits = math.ceil(_RING_BITS / nb)
    return torch.stack([(x >> (bits * i)) & ((1 << bits) - 1) for i in range(nb)]).double()


def _ring_sum_blocks(z: torch.Tensor, nb: int) -> torch.Tensor:
    """Recombine per-block-pair float64 results (nb*nb, ...) into int64 ring elements."""
    bits = math.ceil(_RING_BITS / nb)
    out = torch.zeros(z.shape[1:], dtype=torch.long, device=z.device)
    for i in range(nb):
        for j in range(nb):
            shift = (i + j) * bits
            if shift < _RING_BITS:
                out += z[i * nb + j].long() << shift  # wraps modulo 2^64
    return out


def blocked_ring_conv(op: str, x: torch.Tensor, w: torch.Tensor, *args: Any, nb: int | None = None,
                      **kwargs: Any) -> torch.Tensor:
    """``op`` (e.g. ``"conv2d"``) of int64 tensors modulo 2^64 using only float64 convolutions.

    This is the arithmetic CrypTen needs on GPUs, which have no int64 convolution. It runs
    on any device, so the CPU can check it against the exact int64 result. ``nb`` forces a
    block count (only to demonstrate the upstream bug); by default it follows the true
    reduction size, and input channels are split into exact chunks when needed.
    """
    groups = kwargs.pop("groups", 1)
    if groups != 1:
        raise CryptenCompatError(f"grouped convolutions (groups={groups}) are not supported on the GPU")
    transposed = "transpose" in op
    reduction = conv_reduction_size(tuple(w.shape), transposed)
    if nb is None:
        nb = blocks_for(reduction)
        if nb is None:  # split the input channels into chunks that are exact with 4 blocks
            kernel = math.prod(w.shape[2:])
            chunk = max(1, ((1 << FP64_EXACT_BITS) // ((1 << 16) - 1) ** 2 - 1) // kernel)
            c_in = x.shape[1]
            total = None
            for start in range(0, c_in, chunk):
                xs = x[:, start:start + chunk]
                ws = w[start:start + chunk] if transposed else w[:, start:start + chunk]
                part = blocked_ring_conv(op, xs, ws, *args, nb=4, **kwargs)
                total = part if total is None else total + part
            return total
    fn = getattr(torch.nn.functional, op)
    xb, wb = _split_blocks(x, nb), _split_blocks(w, nb)  # (nb, B, C, ...), (nb, O, I, ...)
    bs, c_in = x.shape[0], x.shape[1]
    # one grouped float64 conv computes every block pair (i, j): group i*nb+j = x_i * w_j
    xs = xb.repeat_interleave(nb, dim=0)  # x_i for pair (i, j)
    ws = wb.repeat(nb, *([1] * (wb.dim() - 1)))  # w_j for pair (i, j)
    xs = xs.transpose(0, 1).reshape(bs, nb * nb * c_in, *x.shape[2:])
    ws = ws.reshape(nb * nb * w.shape[0], *w.shape[1:])
    z = fn(xs, ws, *args, groups=nb * nb, **kwargs)
    z = z.reshape(bs, nb * nb, -1, *z.shape[2:]).transpose(0, 1)
    return _ring_sum_blocks(z, nb)


def patch_cuda_conv() -> None:
    """Route CrypTen's CUDALongTensor convolutions through :func:`blocked_ring_conv`."""
    from crypten.cuda.cuda_tensor import CUDALongTensor

    if getattr(CUDALongTensor, "_iomt_conv_patched", False):
        return

    def patched(op: str, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        xt = x.tensor() if hasattr(x, "tensor") else x
        yt = y.tensor() if hasattr(y, "tensor") else y
        return CUDALongTensor(blocked_ring_conv(op, xt, yt, *args, **kwargs))

    CUDALongTensor._CUDALongTensor__patched_conv_ops = staticmethod(patched)
    CUDALongTensor._iomt_conv_patched = True

