"""Third-party notices users cannot act on are filtered; the library's other warnings still show."""

from __future__ import annotations

import logging
import subprocess
import sys

from llm2clip_fast.third_party_notices import UNACTIONABLE, quiet_unactionable_notices


def test_listed_notice_dropped_and_other_records_of_that_logger_kept(caplog):
    quiet_unactionable_notices()
    quiet_unactionable_notices()  # idempotent: one filter per entry
    for name, prefix, _why in UNACTIONABLE:
        logger = logging.getLogger(name)
        assert sum(getattr(f, "prefix", None) == prefix for f in logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger=name):
            logger.warning(prefix + ": %s. Please install it", "No module named 'kernels'")
            logger.warning("a real problem the user must see")
        messages = [r.getMessage() for r in caplog.records if r.name == name]
        assert messages == ["a real problem the user must see"]
        caplog.clear()


def test_importing_bitsandbytes_after_llm2clip_fast_prints_no_kernels_notice():
    code = "import torch, llm2clip_fast, bitsandbytes"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr + done.stdout


def test_peft_probe_of_deprecated_transformers_property_is_quiet_and_other_warnings_stay():
    import warnings

    from transformers import BertConfig, BertModel

    from llm2clip_fast.third_party_notices import quiet_unactionable_notices

    model = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_unactionable_notices()  # after simplefilter: the listed filter goes in front of it
        getattr(model, "is_gradient_checkpointing", True)  # what peft does while wrapping for LoRA
        warnings.warn("`is_gradient_checkpointing` is deprecated elsewhere", FutureWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert not any(m.startswith("`is_gradient_checkpointing` is deprecated and") for m in messages), messages
    assert any("deprecated elsewhere" in m for m in messages)  # same text from another module still shows
