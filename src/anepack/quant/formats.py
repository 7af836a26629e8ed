"""Core ML weight formats as values: parse a spec string into a frozen format, and back.

Every stage that cares how a weight is stored (quantizer, Core ML emitter, MIL interpreter,
residency lint, recipes, reports) looks the format up here, so a format is decided once.
The grammar (documented in docs/quantization.md, "Quantization formats"):

    fp16                                  dense float16, no compression
    {int|uint}{8|4}-{tensor|channel|block<B>}[-affine]
                                          constexpr_blockwise_shift_scale; scale per tensor,
                                          per output channel, or per <B> input columns
    lut{1|2|3|4|6|8}-{tensor|g<G>}[-pcs][-int8lut]
                                          constexpr_lut_to_dense, one LUT per tensor or per
                                          <G> output channels; -pcs adds a per-output-channel
                                          scale, -int8lut stores the LUT as int8 + scale
    vlut{nbits}x{V}                       constexpr_lut_to_dense with vector_axis = Cout:
                                          one per-tensor LUT of <V>-long vectors along Cout
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from anepack.errors import AnepackError


class FormatSpecError(AnepackError):
    """A spec string that names no format, or a format that cannot hold the given weight."""


# Apple's limits for vector LUTs that run natively on the ANE (brief section 3).
ANE_MAX_VECTOR_SIZE = 16
ANE_MAX_VECTOR_LUT_VALUES = 256

LUT_NBITS = (1, 2, 3, 4, 6, 8)
LINEAR_NBITS = (4, 8)


def _packed_bytes(count: int, nbits: int) -> int:
    return -(-count * nbits // 8)


def _matrices(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(experts, Cout, Cin) of a ``[Cout, Cin]`` weight or an ``[E, Cout, Cin]`` bank."""
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    experts, rows, cols = shape
    return experts, rows, cols


@dataclass(frozen=True)
class Float16Format:
    """The weight kept as float16 (what Core ML stores for an uncompressed weight)."""

    family = "dense"

    @property
    def spec(self) -> str:
        return "fp16"

    def payload_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes Core ML stores for a weight of ``shape`` (numpy order) in this format."""
        experts, rows, cols = _matrices(shape)
        return 2 * experts * rows * cols

    @property
    def ane_safe(self) -> bool:
        return True


@dataclass(frozen=True)
class LinearFormat:
    """Integer data with scales: ``out = scale[block] * (data - offset[block])``.

    ``block_size`` 0 with ``per_channel`` False is per-tensor; ``per_channel`` is one scale
    per output row; ``block_size`` B > 0 is one scale per row and per B input columns.
    Symmetric formats follow coremltools' ``linear_symmetric``: signed codes in
    [-(2^(b-1) - 1), 2^(b-1) - 1] with no offset, unsigned codes in [0, 2^b - 2] around a
    fixed offset 2^(b-1) - 1. ``affine`` uses the full code range and a per-block offset.
    """

    nbits: int
    signed: bool
    per_channel: bool = False
    block_size: int = 0
    affine: bool = False

    family = "linear"

    def __post_init__(self):
        if self.nbits not in LINEAR_NBITS:
            raise FormatSpecError(None, f"linear formats have 4 or 8 bits, not {self.nbits}")
        if self.block_size < 0 or (self.per_channel and self.block_size):
            raise FormatSpecError(None, "a linear format is per tensor, per channel or per block")

    @property
    def spec(self) -> str:
        granularity = (
            f"block{self.block_size}" if self.block_size else
            "channel" if self.per_channel else "tensor"
        )
        kind = "int" if self.signed else "uint"
        return f"{kind}{self.nbits}-{granularity}" + ("-affine" if self.affine else "")

    @property
    def ane_safe(self) -> bool:
        # Scales that vary along Cin (per-block) fall off the ANE or give wrong results there.
        return self.block_size == 0

    def payload_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of data, scales and offsets for a weight of ``shape``, each expert quantized alone."""
        experts, rows, cols = _matrices(shape)
        scales = experts * (rows * cols // self.block_size if self.block_size else rows if self.per_channel else 1)
        stored_offset = self.affine or not self.signed
        return (
            _packed_bytes(experts * rows * cols, self.nbits)
            + 2 * scales
            + (_packed_bytes(scales, self.nbits) if stored_offset else 0)
        )

    @property
    def code_range(self) -> tuple[int, int]:
        """Smallest and largest integer code, as coremltools' ``get_quant_range``."""
        levels = 2**self.nbits
        if self.signed:
            low, high = -levels // 2, levels // 2 - 1
            return (low if self.affine else low + 1), high
        return 0, (levels - 1 if self.affine else levels - 2)


@dataclass(frozen=True)
class LutFormat:
    """Scalar palettization: ``2^nbits``-entry LUTs, one per tensor or per ``group_size`` rows.

    ``per_channel_scale`` normalizes each output row by its max |w| before clustering and
    stores that scale (fp16) as a ``constexpr_blockwise_shift_scale`` on the dense output,
    as coremltools' converter does for ``enable_per_channel_scale``. ``int8_lut`` stores
    each LUT as int8 codes plus one fp16 scale, dequantized by
    ``constexpr_blockwise_shift_scale`` before ``constexpr_lut_to_dense``.
    """

    nbits: int
    group_size: int = 0  # 0 = one LUT for the whole tensor
    per_channel_scale: bool = False
    int8_lut: bool = False

    family = "lut"

    def __post_init__(self):
        if self.nbits not in LUT_NBITS:
            raise FormatSpecError(None, f"LUT indices have {LUT_NBITS} bits, not {self.nbits}")
        if self.group_size < 0:
            raise FormatSpecError(None, f"LUT group size must be positive, not {self.group_size}")

    @property
    def spec(self) -> str:
        granularity = f"g{self.group_size}" if self.group_size else "tensor"
        return (
            f"lut{self.nbits}-{granularity}"
            + ("-pcs" if self.per_channel_scale else "")
            + ("-int8lut" if self.int8_lut else "")
        )

    @property
    def ane_safe(self) -> bool:
        # Grouped scalar LUTs, an output-channel scale and an int8 LUT dequantized before
        # lut_to_dense all stay on the ANE; only latency grows with the number of LUTs.
        return True

    @property
    def entries(self) -> int:
        return 2**self.nbits

    def payload_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of indices, LUTs and scales for a weight of ``shape``, each expert quantized alone."""
        experts, rows, cols = _matrices(shape)
        luts = experts * (rows // self.group_size if self.group_size else 1)
        lut_bytes = luts * self.entries * (1 if self.int8_lut else 2) + (2 * luts if self.int8_lut else 0)
        channel_scale = 2 * experts * rows if self.per_channel_scale else 0
        return _packed_bytes(experts * rows * cols, self.nbits) + lut_bytes + channel_scale


@dataclass(frozen=True)
class VectorLutFormat:
    """Vector palettization: one per-tensor LUT of ``2^nbits`` vectors of ``vector_size``
    consecutive output channels (``vector_axis`` = Cout)."""

    nbits: int
    vector_size: int

    family = "vlut"

    def __post_init__(self):
        if self.nbits not in LUT_NBITS:
            raise FormatSpecError(None, f"LUT indices have {LUT_NBITS} bits, not {self.nbits}")
        if self.vector_size < 2:
            raise FormatSpecError(None, "a vector LUT needs vectors of at least 2 values")

    @property
    def spec(self) -> str:
        return f"vlut{self.nbits}x{self.vector_size}"

    def payload_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of indices and the vector LUT for a weight of ``shape``, each expert alone."""
        experts, rows, cols = _matrices(shape)
        vectors = experts * rows * cols // self.vector_size
        return _packed_bytes(vectors, self.nbits) + experts * self.entries * self.vector_size * 2

    @property
    def ane_safe(self) -> bool:
        return (
            self.vector_size <= ANE_MAX_VECTOR_SIZE
            and self.entries * self.vector_size <= ANE_MAX_VECTOR_LUT_VALUES
        )

    @property
    def entries(self) -> int:
        return 2**self.nbits


Format = Union[Float16Format, LinearFormat, LutFormat, VectorLutFormat]


def _linear(match: re.Match) -> LinearFormat:
    granularity = match["granularity"]
    return LinearFormat(
        nbits=int(match["nbits"]),
        signed=match["kind"] == "int",
        per_channel=granularity == "channel",
        block_size=int(granularity[5:]) if granularity.startswith("block") else 0,
        affine=match["affine"] is not None,
    )


def _lut(match: re.Match) -> LutFormat:
    return LutFormat(
        nbits=int(match["nbits"]),
        group_size=int(match["group"] or 0),
        per_channel_scale=match["pcs"] is not None,
        int8_lut=match["int8lut"] is not None,
    )


def _vector_lut(match: re.Match) -> VectorLutFormat:
    return VectorLutFormat(nbits=int(match["nbits"]), vector_size=int(match["size"]))


# The grammar as a table: one pattern per family, tried in order. Numbers have no leading
# zeros so that every format has exactly one spelling and ``parse_format(f.spec) == f``.
_NUMBER = r"[1-9][0-9]*"
_GRAMMAR = (
    (re.compile(r"fp16"), lambda match: Float16Format()),
    (
        re.compile(
            rf"(?P<kind>u?int)(?P<nbits>{_NUMBER})-(?P<granularity>tensor|channel|block{_NUMBER})"
            r"(?P<affine>-affine)?"
        ),
        _linear,
    ),
    (
        re.compile(
            rf"lut(?P<nbits>{_NUMBER})-(?:tensor|g(?P<group>{_NUMBER}))"
            r"(?P<pcs>-pcs)?(?P<int8lut>-int8lut)?"
        ),
        _lut,
    ),
    (re.compile(rf"vlut(?P<nbits>{_NUMBER})x(?P<size>{_NUMBER})"), _vector_lut),
)

# A representative set for sweeps, listings and docs; any spec the grammar accepts works.
STANDARD_SPECS = (
    "fp16",
    "int8-tensor",
    "int8-channel",
    "int8-channel-affine",
    "uint8-channel",
    "int4-channel",
    "int4-block32",
    "lut8-g8-int8lut",
    "lut6-tensor",
    "lut6-g16",
    "lut4-tensor",
    "lut4-g16",
    "lut4-g8",
    "lut4-g16-pcs",
    "lut3-g16",
    "lut2-g16",
    "vlut2x8",
    "vlut4x16",
)


def parse_format(spec: "str | Format") -> Format:
    """The format named by ``spec`` (a format value passes through unchanged)."""
    if not isinstance(spec, str):
        return spec
    text = spec.strip().lower()
    for pattern, build in _GRAMMAR:
        match = pattern.fullmatch(text)
        if match:
            return build(match)
    raise FormatSpecError(
        None,
        f"unknown weight format '{spec}' (expected fp16, int8-channel, int4-block32, "
        "lut4-g16, lut4-g16-pcs, lut8-g8-int8lut, vlut2x8, ...)",
    )


def formats() -> tuple[Format, ...]:
    """The standard formats, in the order sweeps and listings show them."""
    return tuple(parse_format(spec) for spec in STANDARD_SPECS)
