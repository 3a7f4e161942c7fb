"""30 Ctrl-C at random moments of a projector training: each exits 130 in one line, each re-run
ends with the weights of an uninterrupted run."""

import pytest

from mcollapse.models.twins import ensure_tiny_checkpoint
from tests.interrupt_campaign import failures, run_campaign
from tests.test_train_adapter import FAST


@pytest.mark.slow
def test_thirty_interrupts_of_a_projector_training(tmp_path, env, cache_dir):
    ensure_tiny_checkpoint("tiny_qwen2audio", cache_dir)
    report = run_campaign(tmp_path, env, cache_dir / "models", [*FAST, "threads=1"],
                          ["projectors/**/*.safetensors"])
    assert len(report["trials"]) == 30
    assert not failures(report), failures(report)
