"""Package layout: the top-level folders install under the ``sparvar`` namespace, and each
``tuned_configs/<gpu>`` folder of shipped JSON is listed as a package of its own (a folder named
like a module that is not listed makes setuptools warn "Package would be ignored"). The small
model's trained weights folder, ``sparvar/weights``, is listed the same way."""

from pathlib import Path

from setuptools import setup

FOLDERS = {"sparvar": "sparvar", "sparvar.reference": "reference", "sparvar.kernels": "kernels",
           "sparvar.autotune": "autotune", "sparvar.tuned_configs": "tuned_configs"}
GPUS = sorted(p.name for p in Path(__file__).parent.joinpath("tuned_configs").iterdir()
              if p.is_dir() and p.name.isidentifier())

setup(
    packages=[*FOLDERS, "sparvar.weights", *(f"sparvar.tuned_configs.{gpu}" for gpu in GPUS)],
    package_dir=FOLDERS,
    package_data={"sparvar.weights": ["*.safetensors"], "sparvar.tuned_configs": ["*/*.json"],
                  **{f"sparvar.tuned_configs.{g}": ["*.json"] for g in GPUS}},
)
