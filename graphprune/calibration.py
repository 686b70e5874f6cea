"""MagCache calibration files: the per-step magnitude ratios of a model's cached feature (entry points:
:class:`Calibration`, :func:`load_calibration`, :func:`model_fingerprint`).

A calibration run (``graphprune calibrate``, or :func:`graphprune.calibrate` in Python) runs one generation with
every step in full and records, per UNet call i of each cache context, the mean over positions of the ratio of the
cached feature's channel norms, ``mean(||f_i|| / ||f_(i-1)||)`` (MagCache's ``norm_ratio``; ratio 1 at call 0),
with its standard deviation and the mean cosine distance. The file is JSON::

    {"format": "graphprune-magcache", "version": 1,
     "model": {"fingerprint": "<sha256 of the parameter shapes>", "parameters": 686, "weights_checksum": 1.2e5,
               "config": {...diffusers config, when known...}},
     "cut": {"cache_branch": 0, "resnet": "up_blocks.3.resnets.2"}, "cfg": "batch",
     "loop": {"num_steps": 50, ...}, "ratios": {"batch": [1.0, 1.02, ...]}, "std": {...}, "cosine": {...},
     "graphprune": "0.1.0", "created": "2026-..."}

It is tied to the model: :meth:`Calibration.check_model` compares the fingerprint (the architecture: every
parameter's shape) and raises a :class:`CalibrationError` naming the fix on a mismatch; a different weights checksum
(same architecture, another checkpoint) is a warning. A different number of steps is interpolated (nearest, as
MagCache and diffusers do).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = "graphprune-magcache"
CALIBRATION_VERSION = 1
FIX = "run `graphprune calibrate --model PATH -o calib.json` (or --arch NAME) for this model"


class CalibrationError(ValueError):
    """A calibration file that cannot be used here; the message says why and how to make a fitting one."""


def nearest_interp(values: Sequence[float], length: int) -> list[float]:
    """``values`` resampled to ``length`` entries by nearest index (MagCache's and diffusers' ``nearest_interp``;
    halves round to even, as ``np.round``/``torch.round`` do)."""
    if length == 1:
        return [float(values[-1])]
    scale = (len(values) - 1) / (length - 1)
    return [float(values[int(round(i * scale))]) for i in range(length)]


def model_fingerprint(parameters: Iterable[Any]) -> dict[str, Any]:
    """The architecture of a model as its parameters' shapes: ``{"fingerprint": sha256 hex, "parameters": count,
    "weights_checksum": sum of every parameter (float64)}``. Shapes are sorted, so the order in which a traced
    graph or ``module.parameters()`` lists them does not matter."""
    params = list(parameters)
    shapes = sorted(tuple(int(s) for s in p.shape) for p in params)
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()
    checksum = float(sum(float(p.detach().double().sum()) for p in params))
    return {"fingerprint": digest, "parameters": len(params), "weights_checksum": checksum}


@dataclass(frozen=True)
class Calibration:
    """One calibration (see the module docstring). ``ratios``/``std``/``cosine``: context name -> one value per
    UNet call of a generation (context ``"batch"`` with ``cfg="batch"``; one per cache context with ``"split"``)."""

    ratios: Mapping[str, tuple[float, ...]]
    model: Mapping[str, Any]
    cache_branch: int = 0
    resnet: str = ""
    cfg: str = "batch"
    loop: Mapping[str, Any] = field(default_factory=dict)
    std: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    cosine: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    graphprune: str = ""
    created: str = ""
    source: str = "<dict>"

    @property
    def num_steps(self) -> int:
        """UNet calls per generation (per context) the calibration covers."""
        return len(next(iter(self.ratios.values())))

    def ratios_for(self, context: str, num_steps: int | None = None) -> list[float]:
        """The ratios of one context, resampled to ``num_steps`` calls when given and different."""
        if context not in self.ratios:
            raise CalibrationError(f"calibration {self.source} has no ratios for cache context {context!r} (it has "
                                   f"{sorted(self.ratios)}); calibrate with the same cfg mode and context names")
        values = list(self.ratios[context])
        if num_steps is not None and num_steps != len(values):
            log.info("graphprune: calibration %s covers %d calls; resampled to %d (nearest)", self.source,
                     len(values), num_steps)
            values = nearest_interp(values, num_steps)
        return values

    def check_model(self, fingerprint: Mapping[str, Any], resnet: str | None = None) -> None:
        """Raise :class:`CalibrationError` unless this calibration was made on a model of this architecture (and the
        same cut); warn when only the weights differ."""
        theirs = self.model.get("fingerprint")
        if theirs is None:
            warnings.warn(f"graphprune: calibration {self.source} names no model; it is used unchecked", stacklevel=3)
            return
        if theirs != fingerprint["fingerprint"]:
            raise CalibrationError(
                f"calibration {self.source} was made for another model ({self.model.get('parameters')} parameters, "
                f"fingerprint {str(theirs)[:12]}) than this one ({fingerprint['parameters']} parameters, fingerprint "
                f"{fingerprint['fingerprint'][:12]}): {FIX}")
        if resnet and self.resnet and resnet != self.resnet:
            raise CalibrationError(f"calibration {self.source} measured the feature read by {self.resnet} but this "
                                   f"runtime caches the input of {resnet}: {FIX} with the same --cache-branch")
        mine, ref = fingerprint.get("weights_checksum"), self.model.get("weights_checksum")
        if mine is not None and ref is not None and not math.isclose(mine, ref, rel_tol=1e-3, abs_tol=1e-3):
            warnings.warn(f"graphprune: calibration {self.source} was made on the same architecture with other "
                          f"weights (checksum {ref:.6g} vs {mine:.6g}); the schedule may not fit this checkpoint: "
                          f"{FIX}", stacklevel=3)

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "model": dict(self.model),
                "cut": {"cache_branch": self.cache_branch, "resnet": self.resnet}, "cfg": self.cfg,
                "loop": dict(self.loop), "ratios": {k: list(v) for k, v in self.ratios.items()},
                "std": {k: list(v) for k, v in self.std.items()},
                "cosine": {k: list(v) for k, v in self.cosine.items()},
                "graphprune": self.graphprune, "created": self.created}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls, blob: Mapping[str, Any], source: str = "<dict>") -> "Calibration":
        """Check the format, version and contents of a calibration dict; raise :class:`CalibrationError` naming the
        fix."""
        if not isinstance(blob, Mapping):
            raise CalibrationError(f"calibration {source} is a {type(blob).__name__}, not a JSON object: {FIX}")
        if blob.get("format") != CALIBRATION_FORMAT:
            raise CalibrationError(f"{source} is not a graphprune MagCache calibration (format "
                                   f"{blob.get('format')!r}, expected {CALIBRATION_FORMAT!r}): {FIX}")
        if blob.get("version") != CALIBRATION_VERSION:
            raise CalibrationError(f"calibration {source} has version {blob.get('version')!r}; this graphprune reads "
                                   f"version {CALIBRATION_VERSION}: {FIX}")
        ratios = blob.get("ratios")
        if not isinstance(ratios, Mapping) or not ratios:
            raise CalibrationError(f"calibration {source} has no 'ratios' (context -> list of numbers): {FIX}")
        clean: dict[str, tuple[float, ...]] = {}
        for context, values in ratios.items():
            if not isinstance(values, (list, tuple)) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    for v in values):
                raise CalibrationError(f"calibration {source}: ratios of context {context!r} must be a non-empty "
                                       f"list of positive finite numbers: {FIX}")
            clean[str(context)] = tuple(float(v) for v in values)
        if len({len(v) for v in clean.values()}) > 1:
            raise CalibrationError(f"calibration {source}: its contexts cover different numbers of calls: {FIX}")
        cut = blob.get("cut", {})
        cfg = blob.get("cfg", "batch")
        if cfg not in ("batch", "split"):
            raise CalibrationError(f"calibration {source}: cfg must be 'batch' or 'split', got {cfg!r}")
        return cls(ratios=clean, model=dict(blob.get("model", {})), cache_branch=int(cut.get("cache_branch", 0)),
                   resnet=str(cut.get("resnet", "")), cfg=cfg, loop=dict(blob.get("loop", {})),
                   std={k: tuple(v) for k, v in blob.get("std", {}).items()},
                   cosine={k: tuple(v) for k, v in blob.get("cosine", {}).items()},
                   graphprune=str(blob.get("graphprune", "")), created=str(blob.get("created", "")), source=source)

    def plot(self, path: str | Path) -> Path:
        """Ratios (with their std as a band) and cosine distance per call, one line per context (matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
        for context, ratios in self.ratios.items():
            xs = list(range(len(ratios)))
            ax.plot(xs, ratios, marker=".", label=f"ratio ({context})")
            std = self.std.get(context)
            if std:
                ax.fill_between(xs, [r - s for r, s in zip(ratios, std)], [r + s for r, s in zip(ratios, std)],
                                alpha=0.2)
            if self.cosine.get(context):
                ax2.plot(xs, self.cosine[context], marker=".", label=context)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("magnitude ratio ||f_i|| / ||f_i-1||")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax2.set_ylabel("cosine distance")
        ax2.set_xlabel("UNet call of the generation")
        ax2.grid(alpha=0.3)
        loop = textwrap.fill(", ".join(f"{k}={v}" for k, v in self.loop.items()), 110)
        ax.set_title(f"MagCache calibration: cut at {self.resnet or 'branch ' + str(self.cache_branch)}\n{loop}",
                     fontsize=7)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def load_calibration(source: str | Path | Mapping[str, Any] | Calibration) -> Calibration:
    """A :class:`Calibration` from a path to its JSON file, its dict, or itself."""
    if isinstance(source, Calibration):
        return source
    if isinstance(source, Mapping):
        return Calibration.from_dict(source)
    if not isinstance(source, (str, Path)):
        raise CalibrationError(f"calibration must be a path to a JSON file or its dict, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist: {FIX}")
    try:
        blob = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"calibration file {path} is not JSON ({exc}): {FIX}") from None
    return Calibration.from_dict(blob, source=str(path))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


__all__ = ["Calibration", "CalibrationError", "load_calibration", "model_fingerprint", "nearest_interp",
           "CALIBRATION_FORMAT", "CALIBRATION_VERSION"]
