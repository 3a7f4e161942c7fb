"""30 Ctrl-C at random moments of an extraction: each exits 130 in one line, each re-run resumes to
the activations of an uninterrupted run."""

import pytest

from mcollapse.models.twins import ensure_tiny_checkpoint
from tests.interrupt_campaign import failures, run_campaign

ARGS = ["experiment=extract", "model=tiny_qwen2audio", "dataset=synthetic_speech",
        "dataset.generate_options.n_speakers=4", "dataset.generate_options.n_per_class=8", "dataset.max_samples=16",
        "threads=1", "experiment.text.source=none", "model.batch_size=1", "flush_every=1"]


@pytest.mark.slow
def test_thirty_interrupts_of_an_extraction(tmp_path, env, cache_dir):
    ensure_tiny_checkpoint("tiny_qwen2audio", cache_dir)
    report = run_campaign(tmp_path, env, cache_dir / "models", ARGS, ["activations/*/activations.h5"])
    assert len(report["trials"]) == 30
    assert not failures(report), failures(report)
