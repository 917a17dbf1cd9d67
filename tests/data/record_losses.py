"""Re-record the debug-preset loss trajectory that tests/test_train.py::test_debug_losses_equal_a_plain_loop_and_the_record checks.

    .venv/bin/python -m tests.data.record_losses

Run it only when the model or the data pipeline changes on purpose, and say why in the commit.
"""
import json
import tempfile
from pathlib import Path

import torch

from glmkit.train import train
from tests.helpers import debug_train_config, make_shards

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        shards = make_shards(Path(d))
        losses = train(debug_train_config(shards, Path(d) / "run"))["losses"]
    out = Path(__file__).parent / "debug_losses.json"
    out.write_text(json.dumps({"torch": torch.__version__, "losses": losses}, indent=1) + "\n")
    print(out, losses)
