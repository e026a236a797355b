"""The exported model's pyfunc: MLflow's transformers flavour behind the input checks of `bertpipe fill-mask`.

MLflow's own pyfunc of a fill-mask pipeline hands any text to transformers: one without the mask token
fails there (`PipelineException: No mask_token`), one longer than the model's position table inside the
model (`The size of tensor a (604) must match ... (512)`), and `mlflow models serve` answers both with a
generic 400 carrying the server's traceback. This pyfunc refuses such an input first, in the words of
`bertpipe fill-mask` (bertpipe/export/encode.py), as MLflow's INVALID_PARAMETER_VALUE, which the server
answers with a 400 whose body is the message alone. A long input is refused, as fill-mask refuses it, not
truncated: the cut could take the mask with it, and an answer about a text the user did not send misleads.

This is a flavour module in the sense of MLflow's `Model.log`: `save_model` writes MLflow's transformers
flavour (so `mlflow.transformers.load_model` still gives the pipeline) and makes this file, copied into the
model's `code/`, the pyfunc's loader (`_load_pyfunc`). So the model loads with MLflow and transformers
alone: this file imports nothing of bertpipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

LOADER = Path(__file__).stem  # the module's name in the model's code/, where the pyfunc imports it from


def save_model(path: str, mlflow_model: Any, **kwargs: Any) -> None:
    """MLflow's transformers flavour at `path` (`kwargs` are `mlflow.transformers.save_model`'s), its pyfunc
    loaded by this file; `Model.log` calls it."""
    import mlflow.transformers

    mlflow.transformers.save_model(path=path, mlflow_model=mlflow_model, code_paths=[__file__], **kwargs)
    mlflow_model.flavors["python_function"]["loader_module"] = LOADER
    mlflow_model.save(str(Path(path) / "MLmodel"))


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> FillMask:
    """The pyfunc MLflow loads from the model at `path` (the loader protocol of `mlflow.pyfunc`)."""
    import mlflow.transformers

    return FillMask(mlflow.transformers._load_pyfunc(path, model_config))


class FillMask:
    """MLflow's pyfunc of the fill-mask pipeline (its input forms and answers), given only inputs the model
    can take."""

    def __init__(self, pyfunc: Any) -> None:
        self._pyfunc = pyfunc
        pipeline = pyfunc.get_raw_model()
        self._tokenizer = pipeline.tokenizer
        self._positions = pipeline.model.config.max_position_embeddings

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """The most likely word at the mask of each input; an input the model cannot take is an
        INVALID_PARAMETER_VALUE naming it (`input N of M: ...`) and what is wrong with it."""
        from mlflow.exceptions import MlflowException

        texts = [value for value in np.asarray(data, dtype=object).ravel() if isinstance(value, str)]
        for n, text in enumerate(texts, 1):
            problem = self._problem(text)
            if problem is not None:
                raise MlflowException.invalid_parameter_value(f"input {n} of {len(texts)}: {problem}")
        return self._pyfunc.predict(data, params)

    def _problem(self, text: str) -> str | None:
        """What `bertpipe fill-mask` says of `text` (bertpipe.export.encode: `encode`, then `fill_mask`), or
        None when the model can take it."""
        tokenizer = self._tokenizer
        ids = tokenizer(text, verbose=False)["input_ids"]  # no warning of a long input: the answer names it
        if len(ids) > self._positions:
            return (f"the input is {len(ids)} tokens with {tokenizer.cls_token} and {tokenizer.sep_token}, more "
                    f"than the model's {self._positions} positions")
        if tokenizer.mask_token_id not in ids:
            return f"the input has no {tokenizer.mask_token} to fill"
        return None
