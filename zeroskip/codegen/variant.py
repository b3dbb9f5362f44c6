"""Kernel variants: one grammar for the knobs the autotuner turns, on every target.

A variant is a strategy and the target's knobs, named ``<strategy>[/<knob>...]``:

* strategy: ``auto`` (the cost model's), ``dense`` or ``sparse`` (the IR's choose_strategy pass
  marks regions so; each target implements sparse regions its own way);
* C knobs: ``w<n>`` register-tile width (output positions), ``v<n>`` register-tile vectors of
  output channels: of the sparse tiles, or of a dense variant's tiles (they shape the source);
  ``rhs``: a sparse weight gradient that walks the output gradient's zeros, not the input's;
* Triton knob: ``m<M>n<N>k<K>w<warps>s<stages>[x<split>]``, a :class:`Config` of launch-time
  block sizes (constexprs: one source serves every config).

``dense``, ``dense/w6``, ``dense/w10/v2``, ``sparse/v8``, ``sparse/rhs`` and ``sparse/m64n64k32w4s3`` are variant names, and so
the choices the tuning database records (besides ``torch``). Names come from a user-writable
file: :meth:`Variant.parse` accepts nothing else, and every field becomes a plain int or the
canonical constant before it can reach generated source.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

STRATEGIES = ("auto", "dense", "sparse")
_CONFIG = re.compile(r"m(\d+)n(\d+)k(\d+)w(\d+)s(\d+)(?:x(\d+))?")


@dataclass(frozen=True)
class Config:
    """Launch-time knobs of a Triton kernel. Forward/input-gradient families: BLOCK_M output
    rows x BLOCK_N output channels, BLOCK_K contracted channels per MMA step. Weight gradient:
    BLOCK_M output channels x BLOCK_N contracted channels, BLOCK_K positions per step, and
    ``split`` programs per tile splitting the positions (0: chosen per launch)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    warps: int = 4
    stages: int = 3
    split: int = 0

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value > 256 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two in [1, 256], got {value!r}")
        if self.warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"warps must be 1, 2, 4, 8 or 16, got {self.warps!r}")
        if not isinstance(self.stages, int) or not 1 <= self.stages <= 8:
            raise ValueError(f"stages must be an int in [1, 8], got {self.stages!r}")
        if not isinstance(self.split, int) or not 0 <= self.split <= 1024:
            raise ValueError(f"split must be an int in [0, 1024], got {self.split!r}")

    @property
    def name(self) -> str:
        """'m64n64k32w4s3' (and 'x4' appended where split is fixed)."""
        text = (f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.warps}s{self.stages}")
        return text + (f"x{self.split}" if self.split else "")

    @classmethod
    def parse(cls, name: str) -> "Config":
        match = _CONFIG.fullmatch(name) if isinstance(name, str) else None
        if not match:
            raise ValueError(f"not a Triton config: {name!r}")
        m, n, k, w, s, x = match.groups()
        return cls(int(m), int(n), int(k), int(w), int(s), int(x or 0))



@dataclass(frozen=True)
class Variant:
    """Knobs of one kernel: the strategy forced on its regions ('auto': the cost model's), the
    C register tile shapes and the Triton launch config (None: the heuristic's)."""

    strategy: str = "auto"            # auto | dense | sparse
    tile_width: int | None = None     # C dense channel tiles: output positions per tile
    vectors: int | None = None        # C tiles: vectors of output channels per tile (the
                                      # sparse tiles'; a dense variant's dense tiles')
    config: Config | None = None      # Triton launch-time block sizes
    rhs: bool = False                 # sparse weight gradient: walk the output gradient

    def __post_init__(self):
        # Plain values only (the tile width is rendered into the C source): the strategy
        # becomes its constant, a tile size a plain int (never a bool or an int subclass).
        strategy = str.__str__(self.strategy) if isinstance(self.strategy, str) else None
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be 'auto', 'dense' or 'sparse', got "
                             f"{strategy if strategy is not None else type(self.strategy)!r}")
        object.__setattr__(self, "strategy", STRATEGIES[STRATEGIES.index(strategy)])
        if type(self.rhs) is not bool:
            raise ValueError(f"rhs must be a bool, got {type(self.rhs).__name__}")
        if self.rhs and strategy != "sparse":
            raise ValueError("rhs (walk the output gradient) is a knob of the sparse strategy")
        if self.config is not None and type(self.config) is not Config:
            raise ValueError(f"config must be None or a Config, got {type(self.config).__name__}")
        for name in ("tile_width", "vectors"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or \
                    not 1 <= int.__index__(value) <= 16:
                shown = type(value).__name__ if isinstance(value, bool) or \
                    not isinstance(value, int) else int.__repr__(value)
                raise ValueError(f"{name} must be None or an int in [1, 16], got {shown}")
            object.__setattr__(self, name, int.__index__(value))

    @property
    def name(self) -> str:
        """A short, stable name: 'sparse', 'dense/w6', 'dense/w10/v2', 'sparse/v8',
        'dense/m64n64k32w4s3'."""
        parts = [self.strategy]
        if self.tile_width is not None:
            parts.append(f"w{self.tile_width}")
        if self.vectors is not None:
            parts.append(f"v{self.vectors}")
        if self.rhs:
            parts.append("rhs")
        if self.config is not None:
            parts.append(self.config.name)
        return "/".join(parts)

    @classmethod
    def parse(cls, name: str) -> "Variant":
        """The variant a :attr:`name` names; ValueError for anything else (names come from the
        tuning database, a user-writable file)."""
        if not isinstance(name, str):
            raise ValueError(f"not a kernel variant: a {type(name).__name__}")
        strategy, *knobs = str.__str__(name).split("/")
        fields: dict = {}
        try:
            for knob in knobs:
                if knob == "rhs":
                    field, value = "rhs", True
                elif _CONFIG.fullmatch(knob):
                    field, value = "config", Config.parse(knob)
                else:
                    field, value = {"w": "tile_width", "v": "vectors"}[knob[0]], \
                        int(knob[1:])
                if field in fields:
                    raise ValueError(f"{field} given twice")
                fields[field] = value
            return cls(strategy, **fields)
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"not a kernel variant: {name!r}") from exc

    def with_strategy(self, strategy: str) -> "Variant":
        return Variant(strategy, self.tile_width, self.vectors, self.config, self.rhs)


DEFAULT = Variant()
