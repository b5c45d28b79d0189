"""The stages of ``bench/gpu_check.py`` and what runs them; that script's docstring is the reference.

- :mod:`.plan`: the stages (name, title, seconds), their order, the run's sizes, ``--plan``'s table;
- :mod:`.recorder`: a stage's JSON file (schema ``llm2clip_fast.gpu_check/1``), rewritten per result;
- :mod:`.measure`: timer, float64 error, peak memory, shared by the stages;
- one module per stage: :mod:`.env`, :mod:`.correctness`, :mod:`.loss_compare` (with
  :mod:`.clip_pieces`), :mod:`.delegated` (``stage2_step``, ``embed``, ``adapter``), :mod:`.clip_1m`,
  :mod:`.gpu_tests`;
- :mod:`.runner`: the parent (peers' wheels, one process per stage under its limit, merged status)
  and the child (one stage);
- :mod:`.summary`: ``summary.md``.

Nothing here imports torch at module level: the parent never loads it, and a child loads it only after
setting ``TRITON_INTERPRET`` for ``--quick``.
"""
