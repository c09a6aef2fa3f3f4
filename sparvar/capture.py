"""Calibration data for the semantic search: a model's attention inputs (q, k, v) at chosen
layers and scales, captured during generation and written as they come.

A calibration folder holds ``meta.json`` (schedule, model, scale, layers, steps, samples) and one
``s<sample>_l<layer>_t<step>.safetensors`` per captured attention (``q [B, H, h*w, D]``,
``k, v [B, H, L_k, D]``, bf16), each written atomically the moment it is captured; the size is
estimated and reported before the first. ``sparvar autotune --calibration FOLDER`` reads it
(``sparvar.autotune.quality.load_calibration``), as it reads a single ``torch.save`` file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sparvar.reference import Schedule

from .dispatch import StepDispatcher
from .errors import SparvarError

__all__ = ["CalibrationWriter", "RecordingDispatcher", "estimate_bytes", "read_calibration_folder"]


def estimate_bytes(schedule: Schedule, layers, steps, samples: int, batch: int, heads: int, head_dim: int) -> int:
    """Bytes of bf16 q, k, v for every (sample, layer, step)."""
    per_layer = sum(schedule.num_queries(s) + 2 * schedule.num_keys(s) for s in steps)
    return 2 * samples * len(layers) * per_layer * batch * heads * head_dim


class CalibrationWriter:
    """Writes one folder of calibration data (module docstring)."""

    def __init__(self, folder: str | Path, schedule: Schedule, layers, steps, *, scale: float, model: str,
                 samples: int):
        self.folder = Path(folder)
        if self.folder.exists() and any(self.folder.iterdir()):
            raise SparvarError(f"calibration folder {self.folder} exists and is not empty; choose a new one")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SparvarError(f"calibration folder {self.folder} cannot be created: {e.strerror or e}") from None
        self.schedule, self.layers, self.steps = schedule, sorted(layers), sorted(steps)
        #: The sample being captured (set by whoever runs the generations).
        self.sample = 0
        for s in self.steps:
            schedule.check_step(s)
        self.meta = {"format": "sparvar-calibration-1", "model": model, "grids": schedule.to_json(), "scale": scale,
                     "layers": self.layers, "steps": self.steps, "samples": samples}
        self._write(self.folder / "meta.json", json.dumps(self.meta, indent=1).encode())

    def wants(self, layer: int, step: int) -> bool:
        return layer in self.layers and step in self.steps

    def add(self, layer: int, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        from safetensors.torch import save

        tensors = {n: t.detach().to("cpu", torch.bfloat16).contiguous() for n, t in (("q", q), ("k", k), ("v", v))}
        self._write(self.folder / f"s{self.sample}_l{layer}_t{step}.safetensors", save(tensors))

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


class RecordingDispatcher(StepDispatcher):
    """A dispatcher that hands the attention inputs of the (layer, step) pairs ``writer`` wants to
    it and then attends as usual."""

    def __init__(self, *args, writer: CalibrationWriter, **kwargs):
        super().__init__(*args, **kwargs)
        self.writer = writer

    def __call__(self, layer, step, q, k, v, scale=1.0):
        if self.writer.wants(layer, step):
            self.writer.add(layer, step, q, k, v)
        return super().__call__(layer, step, q, k, v, scale)


def read_calibration_folder(folder: str | Path) -> dict:
    """``{"scale", "grids", "layers": {layer: {step: {"q", "k", "v"}}}}`` with the samples stacked
    along the batch; ``SparvarError`` names a missing or malformed file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise SparvarError(f"calibration folder {folder}: meta.json cannot be read: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "sparvar-calibration-1":
        raise SparvarError(f"calibration folder {folder}: meta.json is not a sparvar calibration description")
    layers = {}
    for layer in meta["layers"]:
        layers[layer] = {}
        for step in meta["steps"]:
            parts = []
            for sample in range(meta["samples"]):
                path = folder / f"s{sample}_l{layer}_t{step}.safetensors"
                try:
                    parts.append(load_file(str(path)))
                except Exception as e:  # noqa: BLE001 - a missing or cut file is the user's to fix
                    raise SparvarError(f"calibration folder {folder}: {path.name} cannot be read: {e}") from None
            layers[layer][step] = {n: torch.cat([p[n] for p in parts]) for n in "qkv"}
    return {"scale": meta["scale"], "grids": meta["grids"], "layers": layers}
